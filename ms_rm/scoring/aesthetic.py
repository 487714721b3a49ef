"""The aesthetic scorer: Flow-GRPO-MS's `aesthetic`, `scorer(images, prompts=None) -> list[float]`.

One score per image from the LAION improved aesthetic predictor (ms_rm.rewards.aesthetic); the
prompts are accepted and ignored. Two preprocessings, which differ on images that are not
already square at the crop size:

* preprocess="clip" (default, Flow-GRPO-MS's scorer): float images rounded to uint8 as the fork's
  `array_to_images` (round(x * 255)), then CLIPProcessor's image half (CLIPImageProcessor): the
  image converted to RGB first, PIL's bicubic resize of the shortest edge, transformers' center
  crop (offset floor((n - 224) / 2)), x / 255 in float64, normalised with CLIP's mean / std;
* preprocess="imagereward" (ImageReward's `AestheticScore`, OpenAI CLIP's torchvision transform):
  PIL's bicubic resize in the image's own mode (RGBA premultiplied, L as L), torchvision's center
  crop (offset round((n - 224) / 2)), and only then RGB, x / 255 in float32, the same mean / std.

Both divide the projected image features by their L2 norm and run the MLP; ms_rm computes in
float32 (Flow-GRPO-MS runs bf16 by default, ImageReward fp32 on the CPU and fp16 on a GPU).

`scorer.score_pixels(pixels)` takes a MindSpore float tensor (B, 3, H, W) in [0, 1] and returns
(B,) scores that gradients flow through back to the pixels (ReFL, search): its resize is torch's
F.interpolate(bicubic, antialias=True) on the floats (ms_rm.rewards.clip.preprocess), with
CLIPImageProcessor's size and crop.
"""

from __future__ import annotations

import logging
from typing import Any, List, Optional, Sequence

import numpy as np
from mindspore import Tensor, mint

from ..core.config import is_int
from ..core.errors import ConfigError, InputError
from ..rewards.aesthetic import Aesthetic
from ..rewards.clip import pixel_values
from .images import load_image, resize_center_crop, split_batch, to_unit_rgb

logger = logging.getLogger(__name__)

PREPROCESSINGS = ("clip", "imagereward")


class AestheticScorer:
    """A converted aesthetic-predictor folder as a scorer of images.

    checkpoint_path: the folder `ms-rm convert --reward aesthetic` wrote (or pass `model=`).
    preprocess: "clip" (Flow-GRPO-MS's CLIPProcessor; default) or "imagereward" (ImageReward's).
    max_batch: split larger batches into chunks of this size (None: never split).
    """

    name = "aesthetic"
    input_kind = "pixels"

    def __init__(self, checkpoint_path: Optional[str] = None, *, model: Optional[Aesthetic] = None,
                 preprocess: str = "clip", max_batch: Optional[int] = None, mode: str = "graph"):
        if (checkpoint_path is None) == (model is None):
            raise ConfigError("pass exactly one of checkpoint_path (a folder ms-rm convert --reward aesthetic wrote) "
                              "or model")
        if preprocess not in PREPROCESSINGS:
            raise ConfigError(f"preprocess must be one of {PREPROCESSINGS}, got {preprocess!r}")
        if max_batch is not None and not is_int(max_batch, 1):
            raise ConfigError(f"max_batch must be a positive integer or None, got {max_batch!r}")
        self.model = model if model is not None else Aesthetic.from_pretrained(checkpoint_path, mode=mode)
        self.preprocess_name, self.max_batch = preprocess, max_batch

    def preprocess(self, images: Any) -> np.ndarray:
        """Images (PIL, files, uint8 / float arrays (H, W, 3) or (3, H, W), a (B, ...) batch) ->
        pixel values (B, 3, S, S) float32, by this scorer's preprocessing."""
        items = [load_image(i) if isinstance(i, str) else i for i in split_batch(images)]
        if not items:
            raise InputError("images is empty")
        processing = self.model.config.processing
        if self.preprocess_name == "imagereward":
            size = self.model.config.clip.vision.image_size
            unit = np.stack([resize_center_crop(image, size, i) for i, image in enumerate(items)])
            mean = np.asarray(processing.mean, np.float32).reshape(1, 3, 1, 1)
            std = np.asarray(processing.std, np.float32).reshape(1, 3, 1, 1)
            return (unit - mean) / std
        uint8 = []
        for i, image in enumerate(items):
            mode = getattr(image, "mode", "RGB")
            if mode != "RGB" and not processing.do_convert_rgb:
                raise InputError(f"images[{i}] is a {mode} image and the preprocessor config sets "
                                 "do_convert_rgb=false: convert it to RGB first")
            if hasattr(image, "convert") and hasattr(image, "size"):
                uint8.append(np.asarray(image.convert("RGB"), dtype=np.uint8))          # CLIPImageProcessor's
            else:
                unit = to_unit_rgb(image, i)                                           # (3, H, W) in [0, 1]
                uint8.append(np.round(unit.transpose(1, 2, 0) * 255).astype(np.uint8))  # the fork's rounding
        return pixel_values(uint8, processing)

    def _chunks(self, batch: int):
        step = self.max_batch or batch
        return [slice(s, min(s + step, batch)) for s in range(0, batch, step)]

    def __call__(self, images: Any, prompts: Optional[Sequence[str]] = None, **unused) -> List[float]:
        """One float per image, no gradient; prompts are ignored."""
        values = self.preprocess(images)
        scores: List[float] = []
        for part in self._chunks(len(values)):
            scores += [float(v) for v in self.model.reward(values[part]).asnumpy()[:, 0]]
        return scores

    def score_pixels(self, pixels: Any, prompts: Optional[Sequence[str]] = None) -> Tensor:
        """(B,) scores of float pixels (B, 3, H, W) in [0, 1], differentiable with respect to them:
        `ms.grad(lambda x: scorer.score_pixels(x).sum())(pixels)`."""
        inputs = self.model.prepare_pixels(pixels)
        chunks = [self.model.run("forward_pixels", inputs[0][part], *inputs[1:])[:, 0]
                  for part in self._chunks(inputs[0].shape[0])]
        return chunks[0] if len(chunks) == 1 else mint.cat(chunks, dim=0)
