"""ImageReward as a Flow-GRPO-MS scorer: `scorer(images, prompts) -> list[float]`.

Images (PIL, files, uint8 arrays, float arrays or a (B, 3, H, W) batch in [0, 1]) are preprocessed
as the package does (ms_rm.scoring.images.resize_center_crop, then CLIP's mean and std); prompts
are tokenized with BLIP's tokenizer (ms_rm.rewards.imagereward.tokenizer) from a local folder.
`inference_rank(prompt, images)` is the package's call of the same name; `reward_of_pixels`
the differentiable reward of decoded pixels that ReFL uses.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple, Union

import numpy as np
from mindspore import Tensor

from ..core.errors import ConfigError, InputError
from ..rewards.imagereward import ImageReward, ImageRewardTokenizer
from ..rewards.imagereward.config import PIXEL_MEAN, PIXEL_STD
from .images import load_image, resize_center_crop, split_batch


class ImageRewardScorer:
    name = "imagereward"
    input_kind = "pixels"
    model_class = ImageReward         # the BLIP score's scorer (ms_rm.scoring.blip_score) loads its own

    def __init__(self, checkpoint_path: Optional[str] = None, tokenizer: Optional[str] = None, *,
                 model: Optional[ImageReward] = None, mode: str = "graph", max_batch: int = 8):
        if (checkpoint_path is None) == (model is None):
            raise ConfigError(f"pass exactly one of checkpoint_path (a converted {self.model_class.__name__} folder) "
                              "or model")
        if tokenizer is None:
            raise ConfigError("tokenizer: pass the folder of bert-base-uncased's tokenizer (vocab.txt)")
        self.model = model if model is not None else self.model_class.from_pretrained(checkpoint_path, mode=mode)
        self.tokenizer = ImageRewardTokenizer(tokenizer, self.model.config.max_length)
        if len(self.tokenizer) > self.model.config.text.vocab_size:
            raise InputError(f"{tokenizer}: {len(self.tokenizer)} tokens with [DEC] and [ENC], more than the "
                             f"model's {self.model.config.text.vocab_size}: is this the model's tokenizer?")
        if max_batch < 1:
            raise ConfigError(f"max_batch must be positive, got {max_batch}")
        self.max_batch = max_batch

    def preprocess(self, images: Any) -> np.ndarray:
        """Images -> normalised pixels (B, 3, S, S) float32."""
        items = [load_image(i) if isinstance(i, str) else i for i in split_batch(images)]
        if not items:
            raise InputError("images is empty")
        size = self.model.config.vision.image_size
        unit = np.stack([resize_center_crop(image, size, i) for i, image in enumerate(items)])
        mean = np.asarray(PIXEL_MEAN, np.float32).reshape(1, 3, 1, 1)
        std = np.asarray(PIXEL_STD, np.float32).reshape(1, 3, 1, 1)
        return (unit - mean) / std

    def _prompts(self, prompts: Union[str, Sequence[str], None], batch: int) -> List[str]:
        if isinstance(prompts, str):
            return [prompts] * batch
        if prompts is None or len(prompts) != batch:
            raise InputError(f"prompts must be one string or one per image ({batch}), got "
                             f"{None if prompts is None else len(prompts)}")
        return list(prompts)

    def __call__(self, images: Any, prompts: Union[str, Sequence[str], None] = None) -> List[float]:
        pixels = self.preprocess(images)
        ids, mask = self.tokenizer(self._prompts(prompts, len(pixels)))
        scores: List[float] = []
        for start in range(0, len(pixels), self.max_batch):
            part = slice(start, start + self.max_batch)
            scores += self.model.score(pixels[part], ids[part], mask[part])
        return scores

    def inference_rank(self, prompt: str, images: Sequence[Any]) -> Tuple[List[int], List[float]]:
        """(rank of each image, 1 = best; its reward), as the package's inference_rank."""
        rewards = self(images, prompt)
        order = np.argsort(-np.asarray(rewards), kind="stable")
        ranks = np.empty(len(rewards), np.int64)
        ranks[order] = np.arange(1, len(rewards) + 1)
        return ranks.tolist(), rewards

    def reward_of_pixels(self, pixels: Any, prompts: Union[str, Sequence[str]]) -> Tensor:
        """Rewards (B, 1) of pixels (B, 3, H, W) in [0, 1] (a MindSpore tensor keeps its gradient)."""
        batch = pixels.shape[0] if hasattr(pixels, "shape") and len(pixels.shape) == 4 else 0
        if not batch:
            raise InputError(f"pixels must be (B, 3, H, W) in [0, 1], got {getattr(pixels, 'shape', type(pixels))}")
        ids, mask = self.tokenizer(self._prompts(prompts, batch))
        return self.model.reward_of_pixels(pixels, ids, mask)
