"""CLIP's inputs: images the way CLIPImageProcessor prepares them, prompts through CLIPTokenizer.

Two image paths:

* `pixel_values` (numpy + PIL, no gradient): uint8 RGB images resized with their shortest edge
  to `shortest_edge` by PIL's bicubic filter (what CLIPImageProcessor does to uint8 images:
  the output size is transformers' get_resize_output_image_size, the long edge
  int(shortest_edge * long / short)), center-cropped as transformers' center_crop, rescaled
  by 1/255 in float64 then float32, normalised with mean / std in float32. Identical to
  CLIPImageProcessor's pixel values, bit for bit (tested).
* `resize_matrices` (the differentiable path over float pixels): the same output size and crop,
  with the resize written as a matrix per axis (ms_rm.core.resize), so resizing is two matrix
  products that gradients flow through. The filter is torch's `F.interpolate(mode="bicubic",
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
from ...core.resize import center_crop_start, resize_crop_matrices, shortest_edge_size
from .config import ImageProcessing

TOKENIZER_FILES = ("vocab.json", "merges.txt")


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
        new_h, new_w = shortest_edge_size(height, width, processing.shortest_edge)
        resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BICUBIC))     # (h, w, 3) uint8
        top = center_crop_start(new_h, processing.crop_size[0], "floor")                      # transformers' crop
        left = center_crop_start(new_w, processing.crop_size[1], "floor")
        crop = resized[top:top + processing.crop_size[0], left:left + processing.crop_size[1]]
        unit = (crop.astype(np.float64) * (1 / 255)).astype(np.float32)
        out.append(((unit - mean) / std).transpose(2, 0, 1))                                    # (3, S, S)
    return np.stack(out)


# --- float pixels: the resize as matrices -------------------------------------------------------------

def resize_matrices(height: int, width: int, processing: ImageProcessing) -> Tuple[np.ndarray, np.ndarray]:
    """(S_h, H) and the transposed (W, S_w) matrices of the differentiable resize-and-crop."""
    rows, cols = resize_crop_matrices(height, width, processing.shortest_edge, processing.crop_size, "floor")
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
