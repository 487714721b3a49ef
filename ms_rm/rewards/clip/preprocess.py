"""CLIP's inputs: images the way CLIPImageProcessor prepares them, prompts through CLIPTokenizer.

Two image paths:

* `pixel_values` (numpy + PIL, no gradient): uint8 RGB images resized with their shortest edge
  to `shortest_edge` by PIL's bicubic filter (what CLIPImageProcessor does to uint8 images:
  the output size is transformers' get_resize_output_image_size, the long edge
  int(shortest_edge * long / short)), center-cropped as transformers' center_crop, rescaled
  by 1/255 in float64 then float32, normalised with mean / std in float32. Identical to
  CLIPImageProcessor's pixel values, bit for bit (tested).
* `resize_matrix` (the differentiable path over float pixels): the same output size and crop,
  with the resize written as a (S, n) matrix per axis, so resizing is two matrix products that
  gradients flow through. The filter is torch's `F.interpolate(mode="bicubic",
  antialias=True, align_corners=False)`: PIL's bicubic (a = -0.5, support widened by the
  downscale factor), on floats rather than on rounded uint8 values.

The tokenizer is transformers' CLIPTokenizer read from a local folder (vocab.json and
merges.txt); transformers comes with ms_rm's `images` extra and is imported only here.
"""

from __future__ import annotations

import os
from typing import List, Sequence, Tuple

import numpy as np

from ...core.errors import ConfigError, InputError, MissingDependencyError
from .config import ImageProcessing

TOKENIZER_FILES = ("vocab.json", "merges.txt")


# --- sizes -----------------------------------------------------------------------------------------

def resized_size(height: int, width: int, shortest_edge: int) -> Tuple[int, int]:
    """(height, width) after resizing the shortest edge to `shortest_edge` (transformers'
    get_resize_output_image_size with default_to_square=False)."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(shortest_edge * long / short)
    return (new_long, shortest_edge) if width <= height else (shortest_edge, new_long)


def crop_offsets(height: int, width: int, crop: Tuple[int, int]) -> Tuple[int, int]:
    """(top, left) of transformers' center_crop."""
    return (height - crop[0]) // 2, (width - crop[1]) // 2


# --- uint8 images -> pixel values (CLIPImageProcessor) ----------------------------------------------

def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise MissingDependencyError("CLIP preprocessing needs Pillow: pip install 'ms-rm[images]'") from None
    return Image


def pixel_values(images: Sequence[np.ndarray], processing: ImageProcessing) -> np.ndarray:
    """uint8 RGB images (H, W, 3) -> float32 (B, 3, S, S) as CLIPImageProcessor returns them."""
    Image = _pil()
    mean = np.array(processing.mean, dtype=np.float32)
    std = np.array(processing.std, dtype=np.float32)
    out = []
    for i, image in enumerate(images):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise InputError(f"images[{i}] must be uint8 (H, W, 3) here, got {image.dtype} {image.shape}")
        height, width = image.shape[:2]
        new_h, new_w = resized_size(height, width, processing.shortest_edge)
        resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BICUBIC))     # (h, w, 3) uint8
        top, left = crop_offsets(new_h, new_w, processing.crop_size)
        crop = resized[top:top + processing.crop_size[0], left:left + processing.crop_size[1]]
        unit = (crop.astype(np.float64) * (1 / 255)).astype(np.float32)
        out.append(((unit - mean) / std).transpose(2, 0, 1))                                    # (3, S, S)
    return np.stack(out)


# --- float pixels: the resize as matrices -------------------------------------------------------------

def _bicubic(x: np.ndarray) -> np.ndarray:
    """The cubic convolution kernel with a = -0.5 (PIL's and torch's antialiased bicubic)."""
    a = np.float32(-0.5)
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1, near, np.where(x < 2, far, np.float32(0))).astype(np.float32)


def _interpolation_matrix(size_in: int, size_out: int) -> np.ndarray:
    """(size_out, size_in): row i holds the weights of output pixel i, computed in float32 with
    torch's steps (upsample_bicubic2d_aa: scale = in / out, support 2 * max(scale, 1), window
    [int(center - support + 0.5), int(center + support + 0.5)), weights normalised to sum 1)."""
    scale = np.float32(size_in) / np.float32(size_out)
    support = np.float32(2.0) * scale if scale >= 1 else np.float32(2.0)
    invscale = np.float32(1.0) / scale if scale >= 1 else np.float32(1.0)
    matrix = np.zeros((size_out, size_in), dtype=np.float32)
    for i in range(size_out):
        center = scale * np.float32(i + 0.5)
        lo = max(int(center - support + np.float32(0.5)), 0)
        hi = min(int(center + support + np.float32(0.5)), size_in)
        weights = _bicubic((np.arange(lo, hi, dtype=np.float32) - center + np.float32(0.5)) * invscale)
        total = weights.sum(dtype=np.float32)
        matrix[i, lo:hi] = weights / total if total != 0 else weights
    return matrix


def resize_matrix(size_in: int, size_out: int, crop: int, offset: int) -> np.ndarray:
    """(crop, size_in): resize `size_in` -> `size_out` pixels, then keep `crop` from `offset`."""
    return _interpolation_matrix(size_in, size_out)[offset:offset + crop]


def resize_matrices(height: int, width: int, processing: ImageProcessing) -> Tuple[np.ndarray, np.ndarray]:
    """(S_h, H) and the transposed (W, S_w) matrices of the differentiable resize-and-crop."""
    new_h, new_w = resized_size(height, width, processing.shortest_edge)
    top, left = crop_offsets(new_h, new_w, processing.crop_size)
    rows = resize_matrix(height, new_h, processing.crop_size[0], top)
    cols = resize_matrix(width, new_w, processing.crop_size[1], left)
    return rows, np.ascontiguousarray(cols.T)


# --- prompts -------------------------------------------------------------------------------------------

def load_tokenizer(folder: str):
    """transformers' CLIPTokenizer from a local folder holding vocab.json and merges.txt (and,
    optionally, tokenizer_config.json / special_tokens_map.json); nothing is downloaded."""
    missing = [name for name in TOKENIZER_FILES if not os.path.isfile(os.path.join(folder, name))]
    if missing:
        raise ConfigError(f"{folder}: no CLIP tokenizer here (missing {', '.join(missing)}); pass the folder that "
                          f"holds {' and '.join(TOKENIZER_FILES)} (e.g. the processor folder of the checkpoint)")
    try:
        from transformers import CLIPTokenizer
    except ImportError:
        raise MissingDependencyError(f"reading the CLIP tokenizer in {folder} ({', '.join(TOKENIZER_FILES)}) needs "
                                     "transformers: pip install 'ms-rm[images]'") from None
    return CLIPTokenizer.from_pretrained(folder, local_files_only=True)


def tokenize(tokenizer, prompts: List[str], max_length: int) -> np.ndarray:
    """(B, max_length) int64 token ids: padded to max_length, longer prompts truncated (their end
    token kept), as PickScore's processor call (padding, truncation, max_length=77)."""
    ids = tokenizer(list(prompts), padding="max_length", truncation=True, max_length=max_length,
                    return_tensors="np")["input_ids"]
    return np.asarray(ids, dtype=np.int64)
