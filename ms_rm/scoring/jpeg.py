"""JPEG (in)compressibility: Flow-GRPO-MS's `jpeg-compressibility` and `jpeg-imcompressibility` rewards.

Each image, as RGB, is saved as a JPEG of quality 95 (Pillow); its size s in KiB (bytes / 1024)
gives the compressibility max(0, 1 - s / max_size) (max_size 256 KiB: a 256 KiB file scores 0, an
empty one 1) and the incompressibility 1 minus that. Float images in [0, 1] become 8-bit as the
fork's `array_to_images` makes them, round(x * 255). The reward is the encoder's output size: it
has no gradient (as in the fork), so ReFL and gradient-based search cannot use it; best-of-N and
GRPO can.
"""

from __future__ import annotations

import io
from typing import Any, List, Optional, Sequence

import numpy as np

from ..core.errors import ConfigError
from .images import pil_image_module, split_batch, to_unit_rgb

QUALITY = 95


def jpeg_size_kib(image: Any, index: int = 0, quality: int = QUALITY) -> float:
    """The size in KiB of one image saved as an RGB JPEG of `quality`."""
    Image = pil_image_module()
    if not (hasattr(image, "convert") and hasattr(image, "size")):                 # an array: 8-bit RGB
        pixels = np.round(to_unit_rgb(image, index) * 255).clip(0, 255).astype(np.uint8)
        image = Image.fromarray(pixels.transpose(1, 2, 0))
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.tell() / 1024


class JpegCompressibilityScorer:
    """max(0, 1 - JPEG size / max_size) per image (Flow-GRPO-MS's `jpeg-compressibility`)."""

    name = "jpeg-compressibility"
    input_kind = "pixels"

    def __init__(self, max_size: float = 256):
        if isinstance(max_size, bool) or not isinstance(max_size, (int, float)) or not max_size > 0:
            raise ConfigError(f"max_size must be a positive number of KiB, got {max_size!r}")
        self.max_size = float(max_size)

    def sizes(self, images: Any) -> List[float]:
        """Each image's JPEG size in KiB."""
        return [jpeg_size_kib(image, i) for i, image in enumerate(split_batch(images))]

    def __call__(self, images: Any, prompts: Optional[Sequence[str]] = None) -> List[float]:
        return [max(0.0, 1 - size / self.max_size) for size in self.sizes(images)]


class JpegIncompressibilityScorer(JpegCompressibilityScorer):
    """1 - the compressibility (Flow-GRPO-MS's `jpeg-imcompressibility`; the registry keeps the fork's
    spelling, so a fork's config names it the same way)."""

    name = "jpeg-imcompressibility"

    def __call__(self, images: Any, prompts: Optional[Sequence[str]] = None) -> List[float]:
        return [1 - reward for reward in super().__call__(images, prompts)]
