"""Bicubic resize and center crop of images, as sizes and as matrices (host side, numpy).

The two preprocessing conventions ms_rm's pixel rewards follow:
* the shorter side resized to `size`, the longer one to int(size * long / short) (torchvision's
  Resize(size) and transformers' get_resize_output_image_size(default_to_square=False) agree);
* the center crop's offset: transformers' center_crop takes (length - crop) // 2 ("floor"),
  torchvision's CenterCrop int(round((length - crop) / 2)) ("round").

A resize followed by a crop is separable: each output row (column) is a fixed weighted sum of the
input rows (columns), so for float pixels it is two matrices, computed here in float64 from the
kernels of torch's CPU interpolate (mode="bicubic", align_corners=False): antialiased (the support
widened by the downscale factor, cubic a = -0.5, as PIL) or not (four taps, a = -0.75, border
rows repeated). A model applies them as two matmuls, which carry the gradient back to the pixels.
"""

from __future__ import annotations

import math
from typing import Tuple

import numpy as np

CROP_ROUNDING = ("floor", "round")


def shortest_edge_size(height: int, width: int, size: int) -> Tuple[int, int]:
    """(height, width) once the shorter side is `size` and the longer int(size * long / short)."""
    if width <= height:
        return int(size * height / width), size
    return size, int(size * width / height)


def center_crop_start(length: int, crop: int, rounding: str) -> int:
    """Where a center crop of `crop` pixels starts in `length`: "floor" (transformers) or "round" (torchvision)."""
    if rounding == "floor":
        return (length - crop) // 2
    if rounding == "round":
        return int(round((length - crop) / 2.0))
    raise ValueError(f"rounding must be one of {CROP_ROUNDING}, got {rounding!r}")


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def bicubic_matrix(in_size: int, out_size: int, antialias: bool = True) -> np.ndarray:
    """(out_size, in_size) float64: torch's bicubic interpolate along one axis (align_corners=False)."""
    scale = in_size / out_size
    matrix = np.zeros((out_size, in_size), np.float64)
    if antialias:
        support = 2.0 * scale if scale >= 1.0 else 2.0
        inv = 1.0 / scale if scale >= 1.0 else 1.0
        for i in range(out_size):
            center = scale * (i + 0.5)
            lo = max(int(center - support + 0.5), 0)
            hi = min(int(center + support + 0.5), in_size)
            w = _cubic((np.arange(lo, hi) - center + 0.5) * inv, -0.5)
            matrix[i, lo:hi] = w / w.sum()
        return matrix
    for i in range(out_size):
        real = scale * (i + 0.5) - 0.5
        base = math.floor(real)
        t = real - base
        weights = _cubic(np.array([t + 1.0, t, 1.0 - t, 2.0 - t]), -0.75)
        for k, w in zip(range(base - 1, base + 3), weights):
            matrix[i, min(max(k, 0), in_size - 1)] += w
    return matrix


def resize_crop_matrices(height: int, width: int, size: int, crop: Tuple[int, int], rounding: str,
                         antialias: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """(rows (crop_h, H), cols (crop_w, W)) float32: resizing an (H, W) image's shorter side to
    `size`, then center-cropping `crop`, is rows @ image @ cols^T."""
    new_h, new_w = shortest_edge_size(height, width, size)
    top, left = center_crop_start(new_h, crop[0], rounding), center_crop_start(new_w, crop[1], rounding)
    rows = bicubic_matrix(height, new_h, antialias)[top:top + crop[0]]
    cols = bicubic_matrix(width, new_w, antialias)[left:left + crop[1]]
    return rows.astype(np.float32), cols.astype(np.float32)
