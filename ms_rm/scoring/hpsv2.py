"""The HPSv2 scorer: Flow-GRPO-MS's `scorer(images, prompts) -> list[float]` with HPSv2's score.

The score is the hpsv2 package's (img_score.score): the diagonal of image_features @
text_features.T, both L2-normalised, no logit scale: one cosine per (image, prompt), about 0.25
to 0.3 for the released model on a fitting image. Images go through hpsv2's preprocess_val
(ms_rm.rewards.hpsv2.preprocess: RGB, ToTensor, the longer side resized to 224 bicubic on the
floats, zero padding to 224 x 224, OpenAI CLIP's normalisation), prompts through open_clip's
tokenizer (ms_rm.rewards.hpsv2.tokenizer).

`scorer(images, prompts)`: PIL images, uint8 arrays, or floats in [0, 1] (rounded to 8 bits
first, as Flow-GRPO-MS's HPSv2 scorer does), no gradient. `scorer.score_pixels(pixels, prompts)`
takes a MindSpore float tensor (B, 3, H, W) in [0, 1] and returns the scores as a tensor that
gradients flow through back to the pixels; it is the same preprocessing without the 8-bit step
(hpsv2's resize already works on floats), so on 8-bit images both paths agree.
"""

from __future__ import annotations

import logging
import os
from typing import Any, List, Optional, Sequence

import numpy as np
import mindspore as ms
from mindspore import Tensor, mint

from ..core.config import is_int
from ..core.errors import ConfigError, InputError
from ..core.inputs import pixel_batch
from ..rewards.hpsv2 import HPSv2, OpenCLIPTokenizer, pixel_values, resize_pad_matrices
from ..rewards.hpsv2.preprocess import MEAN, STD
from .images import split_batch, to_unit_rgb

logger = logging.getLogger(__name__)


class HPSv2Scorer:
    """A converted HPSv2 folder (`ms-rm convert --reward hpsv2`) as a scorer of (image, prompt) pairs.

    model_path: the converted folder; or pass `model=` (a loaded ms_rm.rewards.hpsv2.HPSv2).
    tokenizer_path: CLIP's BPE file bpe_simple_vocab_16e6.txt.gz (in the open_clip package), a
        Hugging Face CLIP tokenizer's merges.txt, or a folder holding either (default: model_path).
    max_batch: split larger batches into chunks of this size (None: never split).
    """

    name = "hpsv2"
    input_kind = "pixels"

    def __init__(self, model_path: Optional[str] = None, *, tokenizer_path: Optional[str] = None,
                 model: Optional[HPSv2] = None, max_batch: Optional[int] = None, mode: str = "graph",
                 verify: bool = False):
        if (model_path is None) == (model is None):
            raise ConfigError("pass exactly one of model_path (a folder ms-rm convert --reward hpsv2 wrote) or model")
        if tokenizer_path is None and model_path is None:
            raise ConfigError("with model=, pass tokenizer_path (CLIP's bpe_simple_vocab_16e6.txt.gz or merges.txt)")
        if max_batch is not None and not is_int(max_batch, 1):
            raise ConfigError(f"max_batch must be a positive integer or None, got {max_batch!r}")
        if model_path is not None and not os.path.isdir(model_path):
            raise ConfigError(f"{model_path}: model_path is not a folder")
        self.model = model if model is not None else HPSv2.from_pretrained(model_path, mode=mode, verify=verify)
        self.tokenizer = OpenCLIPTokenizer(tokenizer_path or model_path,
                                           self.model.config.text.max_position_embeddings)
        if self.tokenizer.vocab_size != self.model.config.text.vocab_size:
            raise ConfigError(f"{self.tokenizer.path}: a vocabulary of {self.tokenizer.vocab_size} tokens, the model's "
                              f"has {self.model.config.text.vocab_size}")
        self.size = self.model.config.vision.image_size
        self.max_batch = max_batch
        self._matrices = {}                     # (H, W) -> the resize tensors of score_pixels

    # --- inputs ------------------------------------------------------------------------------
    def _prompts(self, prompts, batch: int) -> List[str]:
        if prompts is None:
            raise InputError("hpsv2 scores an image against its prompt: pass prompts (one per image)")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
        if bad:
            raise InputError(f"prompts[{bad[0]}] is a {type(prompts[bad[0]]).__name__}, not a string")
        if len(prompts) != batch:
            raise InputError(f"got {batch} images and {len(prompts)} prompts: pass one prompt per image")
        return prompts

    @staticmethod
    def unit_images(images) -> List[np.ndarray]:
        """float32 (3, H, W) arrays of ToTensor's values (8-bit / 255): PIL images (RGB; RGBA refused,
        as hpsv2's model cannot take its alpha), uint8 arrays, floats in [0, 1] rounded to 8 bits."""
        items = split_batch(images)
        if not items:
            raise InputError("images is empty")
        out = []
        for i, image in enumerate(items):
            mode = getattr(image, "mode", None)
            if mode in ("RGBA", "RGBa"):
                raise InputError(f"images[{i}] is an {mode} image: hpsv2's preprocessing keeps the alpha channel and its "
                                 "model takes 3 channels; convert it first (image.convert('RGB'))")
            unit = to_unit_rgb(image, i)                                   # (3, H, W) in [0, 1]
            if mode is None and getattr(image, "dtype", None) != np.uint8:          # floats: to 8 bits first
                unit = np.round(unit * 255).astype(np.uint8).astype(np.float32) / 255.0
            out.append(unit.astype(np.float32))
        return out

    def text_embeds(self, prompts: Sequence[str]) -> Tensor:
        """(B, P) normalised text embeddings of the prompts."""
        return self.model.encode_text(self.tokenizer(list(prompts)))

    def _chunks(self, batch: int):
        step = self.max_batch or batch
        return [slice(s, min(s + step, batch)) for s in range(0, batch, step)]

    # --- scoring -------------------------------------------------------------------------------
    def __call__(self, images: Any, prompts: Optional[Sequence[str]] = None) -> List[float]:
        """One HPSv2 score per (image, prompt): hpsv2's preprocess_val, no gradient."""
        images = self.unit_images(images)
        prompts = self._prompts(prompts, len(images))
        scores: List[float] = []
        for part in self._chunks(len(images)):
            image_embeds = self.model.encode_images(pixel_values(images[part], self.size))
            values = mint.sum(image_embeds * self.text_embeds(prompts[part]), dim=-1)
            scores += [float(v) for v in values.asnumpy()]
        return scores

    def score(self, images: Any, prompts: Sequence[str]) -> List[float]:
        """`scorer(images, prompts)`, under the name the search objective (ms_rm.search) calls."""
        return self(images, prompts)

    def score_pixels(self, pixels: Any, prompts: Sequence[str]) -> Tensor:
        """(B,) scores of float pixels (B, 3, H, W) in [0, 1], differentiable with respect to them:
        `ms.grad(lambda x: scorer.score_pixels(x, prompts).sum())(pixels)`."""
        pixels = pixel_batch(pixels)
        prompts = self._prompts(prompts, pixels.shape[0])
        key = tuple(pixels.shape[2:])
        if key not in self._matrices:
            rows, cols_t = resize_pad_matrices(key[0], key[1], self.size)
            self._matrices[key] = (Tensor(rows), Tensor(cols_t), Tensor(np.float32(MEAN)), Tensor(np.float32(STD)))
        pixels = pixels.astype(ms.float32)
        chunks = []
        for part in self._chunks(pixels.shape[0]):
            image_embeds = self.model.run("unit_pixel_embeds", pixels[part], *self._matrices[key])
            chunks.append(mint.sum(image_embeds * self.text_embeds(prompts[part]), dim=-1))
        return chunks[0] if len(chunks) == 1 else mint.cat(chunks, dim=0)
