"""The db1 (Haar) wavelet transform over the last two axes, as PyWavelets computes it in float32.

`wavedec2(x, levels)` and `waverec2(coeffs)` mirror `pywt.wavedec2(x, "db1", mode="symmetric",
level=levels, axes=(-2, -1))` and `pywt.waverec2(...)` on float32 arrays bit for bit (tested
against PyWavelets): along an axis, pairs (x[2k], x[2k+1]) -> a = f x[2k] + f x[2k+1],
d = f x[2k] - f x[2k+1] with f = float32(1 / sqrt(2)); an odd length is extended by repeating its
last sample (half-sample symmetric); each 2-D level transforms axis -2, then axis -1. The inverse
rebuilds axis -1 first, then axis -2, x[2k] = f a + f d, x[2k+1] = f a - f d, and, as waverec2
does, trims an approximation one row or column longer than the details of the next level.

Written in numpy rather than taking PyWavelets as a dependency: 60 lines for the one wavelet SES
uses, no compiled package in ms_rm's install; PyWavelets stays a test-side check.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np

from ..core.config import is_int
from ..core.errors import InputError

F = np.float32(np.sqrt(0.5))            # pywt's db1 filter taps, float32 for float32 data
Details = Tuple[np.ndarray, np.ndarray, np.ndarray]      # (horizontal, vertical, diagonal) as pywt orders them


def _split(x: np.ndarray, axis: int) -> Tuple[np.ndarray, np.ndarray]:
    """One analysis step along `axis`: (approximation, detail), each ceil(n / 2) long."""
    x = np.moveaxis(x, axis, -1)
    if x.shape[-1] % 2:
        x = np.concatenate([x, x[..., -1:]], axis=-1)
    even, odd = x[..., 0::2], x[..., 1::2]
    a = F * even + F * odd
    d = F * even - F * odd
    return np.moveaxis(a, -1, axis), np.moveaxis(d, -1, axis)


def _merge(a: np.ndarray, d: np.ndarray, axis: int) -> np.ndarray:
    """One synthesis step along `axis`: 2n samples from n approximation and n detail coefficients."""
    a, d = np.moveaxis(a, axis, -1), np.moveaxis(d, axis, -1)
    out = np.empty(a.shape[:-1] + (2 * a.shape[-1],), dtype=a.dtype)
    out[..., 0::2] = F * a + F * d
    out[..., 1::2] = F * a - F * d
    return np.moveaxis(out, -1, axis)


def max_levels(height: int, width: int) -> int:
    """The most levels pywt allows for db1 (filter length 2): floor(log2(min(h, w)))."""
    return int(np.floor(np.log2(min(height, width)))) if min(height, width) >= 1 else 0


def wavedec2(x: np.ndarray, levels: int) -> List:
    """[approximation, (details of the coarsest level), ..., (details of the finest level)]."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim < 2:
        raise InputError(f"the wavelet transform needs at least 2 axes, got shape {x.shape}")
    if not is_int(levels, 1, max_levels(*x.shape[-2:])):
        raise InputError(f"{levels} wavelet levels cannot split a {x.shape[-2]}x{x.shape[-1]} noise: db1 allows "
                         f"1..{max_levels(*x.shape[-2:])} levels for that size")
    details: List[Details] = []
    a = x
    for _ in range(levels):
        low, high = _split(a, -2)                    # approximation / detail along axis -2
        a, vertical = _split(low, -1)
        horizontal, diagonal = _split(high, -1)
        details.append((horizontal, vertical, diagonal))
    return [a] + details[::-1]


def waverec2(coeffs: Sequence) -> np.ndarray:
    """The inverse of wavedec2 (its output may be a row / column longer than an odd input: crop)."""
    a = np.asarray(coeffs[0], dtype=np.float32)
    for horizontal, vertical, diagonal in coeffs[1:]:
        if a.shape[-2:] != horizontal.shape[-2:]:
            a = a[..., :horizontal.shape[-2], :horizontal.shape[-1]]
        low = _merge(a, vertical, -1)
        high = _merge(horizontal, diagonal, -1)
        a = _merge(low, high, -2)
    return a
