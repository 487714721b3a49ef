"""Filling a model's parameters from named arrays, strictly.

Every parameter must be filled, every supplied tensor must be used (or be declared unused by
the caller, with a reason), shapes must match and values must be finite. Errors list the keys.
"""

from __future__ import annotations

import zlib
from typing import Callable, Iterable, Mapping, Optional

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn

from .errors import CheckpointError

_SHOWN = 12   # keys listed in one error before "... and N more"


def _listing(keys) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:_SHOWN])
    return shown + (f", ... and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else "")


def check_key_sets(expected: Iterable[str], found: Iterable[str], source: str, hint: str = "") -> None:
    """CheckpointError listing the missing and unexpected keys, if the two sets differ."""
    expected, found = set(expected), set(found)
    missing, unexpected = expected - found, found - expected
    if not missing and not unexpected:
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys: {_listing(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys: {_listing(unexpected)}")
    raise CheckpointError(f"{source}: " + "; ".join(parts) + (f". {hint}" if hint else ""))


def to_float32(array: np.ndarray) -> np.ndarray:
    """A float array as float32 (bf16 arrays, which numpy knows once mindspore is imported, included)."""
    return array if array.dtype == np.float32 else array.astype(np.float32)


def check_tensor(name: str, array: np.ndarray, shape, source: str) -> np.ndarray:
    """The array as float32 after checking its shape and that it is finite."""
    if tuple(array.shape) != tuple(shape):
        raise CheckpointError(f"{source}: tensor '{name}' has shape {tuple(array.shape)}, "
                              f"the model expects {tuple(shape)}")
    values = to_float32(array)
    if not np.isfinite(values).all():
        bad = int(values.size - np.isfinite(values).sum())
        raise CheckpointError(f"{source}: tensor '{name}' has {bad} NaN/Inf values")
    return values


def load_parameters(cell: nn.Cell, read: Callable[[str], np.ndarray], names: Iterable[str],
                    source: str, progress: Optional[Callable[[int], None]] = None) -> None:
    """Fill every parameter of `cell` by calling read(name) once per parameter.

    `names` are the keys the source holds (after the caller removed those it declares
    unused): they must equal the cell's parameter names. Tensors are read one at a time, so a
    memory-mapped source stays mapped rather than loaded.
    """
    params = {p.name: p for p in cell.get_parameters()}
    check_key_sets(params, names, source)
    for name, param in params.items():
        values = check_tensor(name, read(name), param.shape, source)
        param.set_data(Tensor(values, dtype=param.dtype))
        if progress is not None:
            progress(values.nbytes)


NORM_WEIGHT_SUFFIXES = ("norm_q.weight", "norm_k.weight", "norm_added_q.weight", "norm_added_k.weight",
                        "norm_v.weight", "norm_t.weight", "norm_ff.weight")


def random_parameter(name: str, shape, seed: int) -> np.ndarray:
    """A random value of realistic scale for parameter `name`, for demos, parity models and benchmarks.

    Drawn from a generator seeded by (seed, name), so any process, framework or parameter order
    gets the same values for the same name. Matrices (and conv kernels, LoRA factors) ~
    N(0, 1/fan_in), norm weights ~ 1 + N(0, 0.01), eta4 ~ 0.15 + N(0, 0.0025), other vectors ~
    N(0, 0.01). Every value is random: the released init zeroes some layers, which would hide
    bugs in a parity check.
    """
    rng = np.random.default_rng([seed, zlib.crc32(name.encode("utf-8"))])
    noise = rng.standard_normal(tuple(shape), dtype=np.float32)
    if name.endswith(NORM_WEIGHT_SUFFIXES):
        return 1.0 + 0.1 * noise
    if name.endswith("eta4"):
        return 0.15 + 0.05 * noise
    if len(shape) >= 2 and (name.endswith(".weight") or "lora_" in name):
        return noise / np.float32(np.sqrt(np.prod(shape[1:])))
    return 0.1 * noise


def state_arrays(cell: nn.Cell, dtype: Optional[ms.Type] = None) -> Mapping[str, np.ndarray]:
    """The cell's parameters as numpy arrays (cast to `dtype` first when given)."""
    out = {}
    for param in cell.get_parameters():
        tensor = param if dtype is None else param.astype(dtype)
        out[param.name] = tensor.asnumpy()
    return out
