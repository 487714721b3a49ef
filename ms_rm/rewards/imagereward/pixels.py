"""ImageReward's differentiable pixel transform, as the package's ReFL applies it to decoded images:

    Resize(224, bicubic) -> CenterCrop(224) -> Normalize(CLIP mean, std)

on a float tensor (B, 3, H, W) in [0, 1]. torchvision resizes float tensors with
torch.nn.functional.interpolate(mode="bicubic", align_corners=False, antialias=True) (its default
since torchvision 0.17; antialias=False is the older default). Both are separable: each output
row (column) is a fixed weighted sum of input rows (columns), so the resize and the crop together
are two matrices computed here on the host in float64, from the kernels of torch's CPU code
(antialiased: the support widened by the downscale factor, cubic a = -0.5, as PIL; plain: four
taps, a = -0.75, border rows repeated). The model applies them as two matmuls, which carry the
gradient back to the pixels.
"""

from __future__ import annotations

import math
from typing import Tuple

import numpy as np


def resized_size(height: int, width: int, size: int) -> Tuple[int, int]:
    """torchvision's Resize(size) output: the shorter side becomes `size`, the longer one
    int(size * long / short)."""
    if width <= height:
        return int(size * height / width), size
    return size, int(size * width / height)


def crop_start(length: int, size: int) -> int:
    """torchvision's CenterCrop offset: int(round((length - size) / 2))."""
    return int(round((length - size) / 2.0))


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def resize_matrix(in_size: int, out_size: int, antialias: bool = True) -> np.ndarray:
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


def resize_crop_matrices(height: int, width: int, size: int, antialias: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """(rows (size, H), cols (size, W)) float32: Resize(size) then CenterCrop(size) of an (H, W)
    image is rows @ image @ cols^T."""
    new_h, new_w = resized_size(height, width, size)
    top, left = crop_start(new_h, size), crop_start(new_w, size)
    rows = resize_matrix(height, new_h, antialias)[top:top + size]
    cols = resize_matrix(width, new_w, antialias)[left:left + size]
    return rows.astype(np.float32), cols.astype(np.float32)
