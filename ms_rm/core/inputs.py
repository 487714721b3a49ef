"""Checking and converting the arrays a reward call receives.

Each problem raises InputError naming the argument, what was expected and what came.
Accepted: MindSpore tensors and numpy arrays (anything np.asarray understands) of a float
dtype, bf16 included.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import numpy as np
import mindspore as ms
from mindspore import Tensor, ops

from .errors import InputError

_FLOAT_TYPES = (ms.float16, ms.float32, ms.float64, ms.bfloat16)


def as_float_tensor(value: Any, name: str) -> Tensor:
    """`value` as a MindSpore tensor of a float dtype (kept as it is), else InputError."""
    if isinstance(value, Tensor):
        if value.dtype not in _FLOAT_TYPES:
            raise InputError(f"{name} must have a float dtype, got {value.dtype}")
        return value
    try:
        array = np.asarray(value)
    except Exception as e:   # an object numpy cannot read: say which argument it was
        raise InputError(f"{name} must be a MindSpore tensor or numpy array, got "
                         f"{type(value).__name__} ({e})") from None
    if array.dtype.kind != "f" and array.dtype.name != "bfloat16":
        raise InputError(f"{name} must have a float dtype, got {array.dtype} "
                         f"(from {type(value).__name__})")
    return Tensor(array)


def check_finite(tensor: Tensor, name: str) -> None:
    """InputError if the tensor holds NaN or Inf (one host sync)."""
    if not bool(ops.isfinite(tensor.astype(ms.float32)).all()):
        raise InputError(f"{name} contains NaN or Inf values")


def check_shape(tensor: Tensor, name: str, expected: Tuple[Optional[int], ...], meaning: str) -> None:
    """InputError unless tensor.shape matches `expected` (None matches any size)."""
    shape = tuple(tensor.shape)
    if len(shape) != len(expected) or any(e is not None and e != s for e, s in zip(expected, shape)):
        want = "(" + ", ".join("*" if e is None else str(e) for e in expected) + ")"
        raise InputError(f"{name} must have shape {want} {meaning}, got {shape}")


def reward_inputs(latents: Any, encoder_hidden_states: Any, pooled_projections: Any,
                  in_channels: int, joint_dim: int, pooled_dim: int, check_values: bool = True
                  ) -> Tuple[Tensor, Tensor, Tensor]:
    """The three conditioning inputs of a reward call, checked against the model's sizes."""
    latents = as_float_tensor(latents, "latents")
    ehs = as_float_tensor(encoder_hidden_states, "encoder_hidden_states")
    pooled = as_float_tensor(pooled_projections, "pooled_projections")
    check_shape(latents, "latents", (None, in_channels, None, None), "= (B, channels, H, W)")
    batch = latents.shape[0]
    if batch == 0:
        raise InputError("latents has an empty batch")
    check_shape(ehs, "encoder_hidden_states", (batch, None, joint_dim),
                "= (B, tokens, joint_attention_dim) with B from latents")
    if ehs.shape[1] == 0:
        raise InputError("encoder_hidden_states has no tokens")
    check_shape(pooled, "pooled_projections", (batch, pooled_dim),
                "= (B, pooled_projection_dim) with B from latents")
    if check_values:
        for tensor, name in ((latents, "latents"), (ehs, "encoder_hidden_states"),
                             (pooled, "pooled_projections")):
            check_finite(tensor, name)
    return latents, ehs, pooled


def noise_input(noise: Any, shape: Tuple[int, ...], name: str = "noise", check_values: bool = True) -> Tensor:
    """Caller-supplied noise as a float32 tensor of exactly `shape`."""
    tensor = as_float_tensor(noise, name)
    check_shape(tensor, name, shape, "(the shape of the latents it noises)")
    if check_values:
        check_finite(tensor, name)
    return tensor.astype(ms.float32)
