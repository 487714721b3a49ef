"""HPSv2's image preprocessing, as the hpsv2 package's `preprocess_val` computes it.

hpsv2's img_score builds its model with `create_model_and_transforms(..., light_augmentation=True)`,
so its preprocess_val is open_clip's `image_transform(224, is_train=False, resize_longest_max=True)`
(hpsv2/src/open_clip/transform.py), not the resize + center crop of open_clip's default:

1. `_convert_to_rgb_or_rgba`: RGBA is kept (its alpha then reaches the model as a fourth channel,
   which the 3-channel patch embedding refuses: ms_rm raises InputError instead); any other mode
   is converted to RGB.
2. ToTensor: uint8 / 255 in float32.
3. ResizeMaxSize(224, fill=0): scale = 224 / max(H, W); the image is resized to
   (round(H * scale), round(W * scale)) by torchvision's tensor resize (torch's
   F.interpolate(bicubic, align_corners=False, antialias=True), on the floats, unclamped), then
   padded with zeros to 224 x 224, the odd pixel at the bottom / right. When the longer side is
   already 224, hpsv2 neither resizes nor pads (a non-square image then fails in its model);
   ms_rm pads it.
4. Normalize with OpenAI CLIP's mean and std (float32).

The resize and the pad together are two matrices (rows (224, H), cols (224, W): the bicubic
weights of ms_rm.core.resize placed at the pad offset, zero rows in the pad), applied on the host
in float64 (`pixel_values`) or inside the differentiable program (`resize_pad_matrices`, the
CLIP model's `unit_pixel_embeds`).
"""

from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np

from ...core.errors import InputError
from ...core.resize import bicubic_matrix
from ..clip.config import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

MEAN = OPENAI_CLIP_MEAN
STD = OPENAI_CLIP_STD


def resized_size(height: int, width: int, size: int) -> Tuple[int, int]:
    """ResizeMaxSize's (height, width) before the pad: each side round(side * size / max side)
    (Python's round, as the transform computes it); the image's own size when the scale is 1."""
    scale = size / float(max(height, width))
    if scale == 1.0:
        return height, width
    return tuple(round(dim * scale) for dim in (height, width))


def pad_offsets(height: int, width: int, size: int) -> Tuple[int, int]:
    """(top, left) of the resized image inside the size x size padded one."""
    new_h, new_w = resized_size(height, width, size)
    return (size - new_h) // 2, (size - new_w) // 2


def _axis(length: int, new: int, start: int, size: int) -> np.ndarray:
    matrix = np.zeros((size, length), np.float64)
    matrix[start:start + new] = np.eye(length) if new == length else bicubic_matrix(length, new, antialias=True)
    return matrix


def resize_pad_matrices64(height: int, width: int, size: int) -> Tuple[np.ndarray, np.ndarray]:
    """(rows (size, H), cols (size, W)) float64: ResizeMaxSize of an H x W image is rows @ image @ cols^T."""
    if height < 1 or width < 1:
        raise InputError(f"an image must have at least one pixel, got {height}x{width}")
    new_h, new_w = resized_size(height, width, size)
    if new_h < 1 or new_w < 1 or new_h > size or new_w > size:
        raise InputError(f"a {height}x{width} image resizes to {new_h}x{new_w}, which HPSv2's transform cannot pad "
                         f"to {size}x{size} (too thin): crop it first")
    top, left = pad_offsets(height, width, size)
    return _axis(height, new_h, top, size), _axis(width, new_w, left, size)


def resize_pad_matrices(height: int, width: int, size: int) -> Tuple[np.ndarray, np.ndarray]:
    """The float32 (rows (size, H), transposed cols (W, size)) of the differentiable path."""
    rows, cols = resize_pad_matrices64(height, width, size)
    return rows.astype(np.float32), np.ascontiguousarray(cols.T.astype(np.float32))


def unit_images(images: Sequence[np.ndarray]) -> None:
    """InputError unless every image is a float32 (3, H, W) array."""
    for i, image in enumerate(images):
        if image.dtype != np.float32 or image.ndim != 3 or image.shape[0] != 3:
            raise InputError(f"images[{i}] must be float32 (3, H, W) here, got {image.dtype} {image.shape}")


def pixel_values(images: Sequence[np.ndarray], size: int) -> np.ndarray:
    """float32 (3, H, W) images, ToTensor's values (uint8 / 255) -> (B, 3, size, size) pixel values:
    resized and padded (float64 products of the float32 pixels, rounded once to float32), then
    normalised in float32 as torchvision's Normalize."""
    unit_images(images)
    mean = np.array(MEAN, dtype=np.float32).reshape(3, 1, 1)
    std = np.array(STD, dtype=np.float32).reshape(3, 1, 1)
    out = []
    for image in images:
        rows, cols = resize_pad_matrices64(image.shape[1], image.shape[2], size)
        resized = np.einsum("sh,chw,tw->cst", rows, image.astype(np.float64), cols).astype(np.float32)
        out.append((resized - mean) / std)
    return np.stack(out)
