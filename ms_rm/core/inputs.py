"""Checking and converting the arrays a reward call receives.

Each problem raises InputError naming the argument, what was expected and what came.
Accepted: MindSpore tensors and numpy arrays (anything np.asarray understands) of a float
dtype, bf16 included.
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

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


def pixel_batch(pixels: Any, name: str = "pixels") -> Tensor:
    """Float pixels (B, 3, H, W) in [0, 1] with B > 0 as a tensor, checked finite (a pixel reward's input)."""
    x = as_float_tensor(pixels, name)
    if x.ndim != 4 or x.shape[1] != 3 or x.shape[0] == 0:
        raise InputError(f"{name} must be (B, 3, H, W) in [0, 1] with B > 0, got {tuple(x.shape)}")
    check_finite(x, name)
    return x


def check_shape(tensor: Tensor, name: str, expected: Tuple[Optional[int], ...], meaning: str) -> None:
    """InputError unless tensor.shape matches `expected` (None matches any size)."""
    shape = tuple(tensor.shape)
    if len(shape) != len(expected) or any(e is not None and e != s for e, s in zip(expected, shape)):
        want = "(" + ", ".join("*" if e is None else str(e) for e in expected) + ")"
        raise InputError(f"{name} must have shape {want} {meaning}, got {shape}")


def reward_inputs(latents: Any, encoder_hidden_states: Any, pooled_projections: Any,
                  in_channels: int, joint_dim: int, pooled_dim: int, check_values: bool = True,
                  latents_name: str = "latents") -> Tuple[Tensor, Tensor, Tensor]:
    """The three conditioning inputs of a reward call, checked against the model's sizes
    (latents_name: the latents' argument name, for errors)."""
    latents = latent_input(latents, in_channels, check_values, latents_name)
    return (latents,) + pooled_text(encoder_hidden_states, pooled_projections, latents.shape[0], joint_dim,
                                    pooled_dim, check_values)


def pooled_text(encoder_hidden_states: Any, pooled_projections: Any, batch: int, joint_dim: int, pooled_dim: int,
                check_values: bool = True) -> Tuple[Tensor, Tensor]:
    """Fixed-length text (B, T, joint_dim) and its pooled vector (B, pooled_dim), checked (SD3, FLUX)."""
    if encoder_hidden_states is None or pooled_projections is None:
        raise InputError("encoder_hidden_states and pooled_projections are required by this model")
    ehs = as_float_tensor(encoder_hidden_states, "encoder_hidden_states")
    pooled = as_float_tensor(pooled_projections, "pooled_projections")
    check_shape(ehs, "encoder_hidden_states", (batch, None, joint_dim),
                "= (B, tokens, joint_attention_dim) with B from latents")
    if ehs.shape[1] == 0:
        raise InputError("encoder_hidden_states has no tokens")
    check_shape(pooled, "pooled_projections", (batch, pooled_dim),
                "= (B, pooled_projection_dim) with B from latents")
    if check_values:
        for tensor, name in ((ehs, "encoder_hidden_states"), (pooled, "pooled_projections")):
            check_finite(tensor, name)
    return ehs, pooled


def latent_input(latents: Any, in_channels: int, check_values: bool = True, name: str = "latents") -> Tensor:
    """Latents (B, in_channels, H, W) of a float dtype, B > 0 (`name`: the argument, for errors)."""
    latents = as_float_tensor(latents, name)
    check_shape(latents, name, (None, in_channels, None, None), "= (B, channels, H, W)")
    if latents.shape[0] == 0:
        raise InputError(f"{name} has an empty batch")
    if check_values:
        check_finite(latents, name)
    return latents


def timestep_input(timestep: Any, batch: int, name: str = "timestep") -> Tensor:
    """A diffusion timestep, one number or one per sample (batch,), as a float32 (batch,) tensor."""
    if isinstance(timestep, (int, float)) and not isinstance(timestep, bool):
        timestep = np.float32(timestep)
    tensor = as_float_tensor(timestep, name)
    if tensor.ndim == 0 or tuple(tensor.shape) == (1,):
        tensor = ops.broadcast_to(tensor.reshape(1), (batch,))
    check_shape(tensor, name, (batch,), "= a number or one per sample (B,)")
    check_finite(tensor, name)
    return tensor.astype(ms.float32)


def noise_input(noise: Any, shape: Tuple[int, ...], name: str = "noise", check_values: bool = True) -> Tensor:
    """Caller-supplied noise as a float32 tensor of exactly `shape`."""
    tensor = as_float_tensor(noise, name)
    check_shape(tensor, name, shape, "(the shape of the latents it noises)")
    if check_values:
        check_finite(tensor, name)
    return tensor.astype(ms.float32)


def variable_length_text(encoder_hidden_states: Any, encoder_attention_mask: Any, pooled_projections: Any,
                         batch: int, dim: int, check_values: bool = True) -> List[np.ndarray]:
    """Per-sample text features of variable length (Z-Image): B float32 arrays (T_i, dim).

    encoder_hidden_states: a list of B arrays (T_i, dim), or a padded (B, T, dim) array with
    encoder_attention_mask (B, T) (1 = token; a sample's tokens are its rows where the mask is 1,
    in order, as the pipeline selects them), or a (B, T, dim) array whose rows are all tokens.
    """
    if pooled_projections is not None:
        raise InputError("pooled_projections must be None: this backbone takes no pooled text embedding")
    if encoder_hidden_states is None:
        raise InputError("encoder_hidden_states is required: a list of (tokens, dim) arrays, or (B, T, dim) "
                         "with encoder_attention_mask (B, T)")
    if isinstance(encoder_hidden_states, (list, tuple)):
        if encoder_attention_mask is not None:
            raise InputError("encoder_attention_mask goes with a padded (B, T, dim) encoder_hidden_states, "
                             "not with a list of per-sample arrays")
        if len(encoder_hidden_states) != batch:
            raise InputError(f"encoder_hidden_states lists {len(encoder_hidden_states)} samples, latents hold {batch}")
        texts = []
        for i, item in enumerate(encoder_hidden_states):
            tensor = as_float_tensor(item, f"encoder_hidden_states[{i}]")
            check_shape(tensor, f"encoder_hidden_states[{i}]", (None, dim), "= (tokens, text width)")
            texts.append(tensor.astype(ms.float32).asnumpy())
    else:
        ehs = as_float_tensor(encoder_hidden_states, "encoder_hidden_states")
        check_shape(ehs, "encoder_hidden_states", (batch, None, dim),
                    "= (B, tokens, text width) with B from latents")
        array = ehs.astype(ms.float32).asnumpy()
        if encoder_attention_mask is None:
            texts = list(array)
        else:
            mask = np.asarray(encoder_attention_mask.asnumpy() if isinstance(encoder_attention_mask, Tensor)
                              else encoder_attention_mask)
            if mask.shape != array.shape[:2]:
                raise InputError(f"encoder_attention_mask has shape {mask.shape}; it must be (B, T) = "
                                 f"{array.shape[:2]}, one entry per row of encoder_hidden_states")
            if mask.dtype.kind not in "biuf" or not np.isin(mask, (0, 1)).all():
                raise InputError("encoder_attention_mask must hold 0 (padding) and 1 (token) only")
            texts = [row[m.astype(bool)] for row, m in zip(array, mask)]
    for i, text in enumerate(texts):
        if text.shape[0] == 0:
            raise InputError(f"sample {i} has no text tokens (an empty caption, or an all-zero "
                             "encoder_attention_mask row)")
        if check_values and not np.isfinite(text).all():
            raise InputError(f"encoder_hidden_states of sample {i} contain NaN or Inf values")
    return texts
