"""Building blocks shared by the models (the diffusion backbones SD3 MMDiT and FLUX, the ViT).

Attribute names follow diffusers' modules, so a Cell's parameter names are the checkpoint's
tensor names (`attn.to_out.0.weight`, `ff.net.2.bias`, `norm1.linear.weight`, ...) and the
converter maps nothing. Shapes: B batch, N image tokens, T text tokens, D width.
"""

from __future__ import annotations

import math
from typing import Tuple

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, mint, nn
from mindspore.common.initializer import initializer

from . import ops


def timestep_frequencies(channels: int = 256, downscale_freq_shift: float = 0.0,
                         max_period: float = 10000.0) -> np.ndarray:
    """The sinusoid frequencies of diffusers' get_timestep_embedding, float32: the float32 exponent
    steps torch takes, then exp correctly rounded (computed in float64 on the host).

    MindSpore's float32 exp is tens of ulp off (1e-3 of phase at t ~ 1000). torch's own float32 exp
    is within one ulp but not correctly rounded, at indices that differ between CPUs, so no fixed
    table reproduces it: the correctly rounded value is the one that is right on every machine, and
    the parity harness measures the reference's own noise with its sinusoids in float64
    (ms_rm_parity.exact64)."""
    half = channels // 2
    exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32)
    exponent = exponent / np.float32(half - downscale_freq_shift)     # the float32 steps torch takes
    return np.exp(exponent.astype(np.float64)).astype(np.float32)


class Linear(nn.Cell):
    """y = x W^T + b with weight (out, in) and bias (out,), torch's layout and names.

    Through ops.linear (MatMul + BiasAdd) rather than mint.nn.Linear: faster on the CPU, and
    its memory is reused inside compiled graphs. `add_lora` gives it separate low-rank factors,
    peft's LoRA: y + scale * (x A^T) B^T with lora_A (r, in) and lora_B (out, r).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.weight = Parameter(initializer("zeros", (out_features, in_features), ms.float32), name="weight")
        self.bias = Parameter(initializer("zeros", (out_features,), ms.float32), name="bias") if bias else None
        self.lora_A = self.lora_B = None
        self.lora_scale = 0.0

    def add_lora(self, a: np.ndarray, b: np.ndarray, scale: float, prefix: str) -> None:
        """Separate (trainable) LoRA factors a (r, in), b (out, r), in the weight's dtype, named
        `prefix`.lora_A / .lora_B (`prefix`: this Linear's path in the model; MindSpore does not
        prefix parameters added after construction)."""
        self.lora_A = Parameter(Tensor(np.asarray(a, np.float32), self.weight.dtype), name=f"{prefix}.lora_A")
        self.lora_B = Parameter(Tensor(np.asarray(b, np.float32), self.weight.dtype), name=f"{prefix}.lora_B")
        self.lora_scale = float(scale)

    def construct(self, x: Tensor) -> Tensor:
        y = ops.linear(x, self.weight, self.bias)
        if self.lora_A is not None:
            y = y + ops.linear(ops.linear(x, self.lora_A), self.lora_B) * self.lora_scale
        return y


class PatchProjection(nn.Cell):
    """A stride-p Conv2d patch embedding run as patchify + linear (exact; the conv does not run on
    the CPU): (B, C, H, W) -> (B, H/p * W/p, D). The weight stays in the conv's stored shape
    (D, C, p, p), so its name and shape are the checkpoint's (`proj.weight`, `proj.bias`)."""

    def __init__(self, in_channels: int, dim: int, patch: int):
        super().__init__()
        self.patch = patch
        self.weight = Parameter(initializer("zeros", (dim, in_channels, patch, patch), ms.float32), name="weight")
        self.bias = Parameter(initializer("zeros", (dim,), ms.float32), name="bias")

    def construct(self, x: Tensor) -> Tensor:
        patches = ops.patchify(x, self.patch)                        # (B, N, C*p*p)
        return ops.linear(patches, self.weight.reshape(self.weight.shape[0], -1), self.bias)   # (B, N, D)


class Timesteps(nn.Cell):
    """Sinusoidal projection of (B,) timesteps to (B, channels), cos first (flip_sin_to_cos=True)."""

    def __init__(self, channels: int = 256, downscale_freq_shift: float = 0.0):
        super().__init__()
        self.half = channels // 2
        self.freqs = Tensor(timestep_frequencies(channels, downscale_freq_shift)[None, :])  # (1, C/2)

    def construct(self, timestep: Tensor) -> Tensor:
        args = timestep.astype(ms.float32)[:, None] * self.freqs          # (B, C/2)
        return mint.cat([mint.cos(args), mint.sin(args)], dim=-1)          # (B, C)


class MLPEmbedding(nn.Cell):
    """linear_1 -> SiLU -> linear_2: diffusers' TimestepEmbedding and PixArtAlphaTextProjection(silu)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = Linear(in_dim, dim)
        self.linear_2 = Linear(dim, dim)

    def construct(self, x: Tensor) -> Tensor:
        return self.linear_2(ops.silu(self.linear_1(x)))


class AdaLNModulation(nn.Cell):
    """The `linear(silu(temb))` of adaLN-Zero, split into `chunks` (B, D) modulation vectors."""

    def __init__(self, dim: int, chunks: int):
        super().__init__()
        self.chunks = chunks
        self.linear = Linear(dim, chunks * dim)

    def construct(self, temb: Tensor) -> Tuple[Tensor, ...]:
        return mint.chunk(self.linear(ops.silu(temb)), self.chunks, dim=1)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """x (B, L, D) * (1 + scale) + shift, with (B, D) modulation vectors."""
    return x * ops.expand((1 + scale)[:, None], x) + ops.expand(shift[:, None], x)


def gated_residual(residual: Tensor, gate: Tensor, x: Tensor) -> Tensor:
    """residual + gate * x, with x (B, L, D) and a (B, D) gate (adaLN-Zero's gated residual)."""
    return residual + ops.expand(gate[:, None], x) * x


class SiLU(nn.Cell):
    def construct(self, x: Tensor) -> Tensor:
        return ops.silu(x)


class GELU(nn.Cell):
    def __init__(self, approximate: bool):
        super().__init__()
        self.approximate = approximate

    def construct(self, x: Tensor) -> Tensor:
        return ops.gelu(x, self.approximate)


class GELUProjection(nn.Cell):
    """diffusers' activations.GELU: Linear then GELU (net.0 of FeedForward)."""

    def __init__(self, dim_in: int, dim_out: int, approximate: bool):
        super().__init__()
        self.approximate = approximate
        self.proj = Linear(dim_in, dim_out)

    def construct(self, x: Tensor) -> Tensor:
        return ops.gelu(self.proj(x), self.approximate)


class FeedForward(nn.Cell):
    """diffusers FeedForward(activation_fn="gelu-approximate"): D -> 4D -> GELU(tanh) -> D."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        # Index 1 is diffusers' dropout, kept so that the second Linear is named net.2.
        self.net = nn.SequentialCell([GELUProjection(dim, dim * mult, approximate=True), nn.Identity(),
                                      Linear(dim * mult, dim)])

    def construct(self, x: Tensor) -> Tensor:
        return self.net(x)


class LayerNorm(nn.Cell):
    """torch.nn.LayerNorm(dim, eps) with its weight and bias (ops.layer_norm)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = Parameter(initializer("ones", (dim,), ms.float32), name="weight")
        self.bias = Parameter(initializer("zeros", (dim,), ms.float32), name="bias")

    def construct(self, x: Tensor) -> Tensor:
        return ops.layer_norm(x, self.eps, self.weight, self.bias)


class RMSNorm(nn.Cell):
    """RMSNorm with a weight: diffusers' (qk-norm, eps 1e-6) or, with scale_in_float32,
    torch.nn.RMSNorm's (see ops.rms_norm)."""

    def __init__(self, dim: int, eps: float, scale_in_float32: bool = False):
        super().__init__()
        self.eps = eps
        self.scale_in_float32 = scale_in_float32
        self.weight = Parameter(initializer("ones", (dim,), ms.float32), name="weight")

    def construct(self, x: Tensor) -> Tensor:
        return ops.rms_norm(x, self.weight, self.eps, self.scale_in_float32)
