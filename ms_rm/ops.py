"""Portable op spellings: the one module that knows which MindSpore ops run where.

The models call these helpers, plus plain `mint.nn.Linear` / elementwise calls that run on
every backend. Each spelling here runs on the CPU and on Ascend: MindSpore's CPU backend lacks
many `mint` kernels (`mint.nn.functional.layer_norm`, `gelu`, `scaled_dot_product_attention`,
`conv2d`, ...) and all bf16 arithmetic (see ../shared/platform/mindspore-cpu.md). Any choice
that depends on the device belongs in this module and nowhere else.

Accuracy notes (measured on the CPU against float64, see tests/test_ops.py):
* `mint.exp` is off by up to ~76 ulp, so softmax/SiLU/sigmoid carry ~5e-6 relative error
  where torch has ~1e-6. Anything that can be computed once on the host in float64 (timestep
  frequencies, position tables) is computed there instead.
* sin/cos/rsqrt/GELU are within 2 ulp.
* For fp16/bf16 inputs torch's CPU kernels compute norms, softmax and activations in float32
  internally; the helpers here do the same explicitly (a no-op in fp32).
"""

from __future__ import annotations

import logging

import mindspore as ms
from mindspore import mint, ops

logger = logging.getLogger(__name__)


def device_target() -> str:
    """The MindSpore device target in use: 'CPU', 'Ascend' or 'GPU'."""
    return ms.get_context("device_target")


def compute_dtype(requested: ms.Type = ms.float32) -> ms.Type:
    """The dtype to compute in when `requested` is asked for on the current device.

    The CPU backend has no bf16 matmul, softmax or reductions: bf16 is upcast to fp32 there
    (weights stored in bf16 lose nothing by it). fp16 runs on the CPU, slowly.
    """
    if requested == ms.bfloat16 and device_target() == "CPU":
        logger.info("bf16 compute is not available on the CPU backend: computing in fp32")
        return ms.float32
    return requested


def _float32(x: ms.Tensor) -> ms.Tensor:
    return x if x.dtype == ms.float32 else x.astype(ms.float32)


def layer_norm(x: ms.Tensor, eps: float = 1e-6) -> ms.Tensor:
    """LayerNorm over the last axis without affine parameters (diffusers' elementwise_affine=False).

    Statistics in float32, result cast back to x's dtype, as torch's kernels do for fp16/bf16.
    """
    x32 = _float32(x)
    mean = mint.mean(x32, -1, True)
    centred = x32 - mean
    var = mint.mean(centred * centred, -1, True)              # biased, as torch
    return (centred * mint.rsqrt(var + eps)).astype(x.dtype)


def rms_norm(x: ms.Tensor, weight: ms.Tensor, eps: float, scale_in_float32: bool = False) -> ms.Tensor:
    """RMSNorm over the last axis: x * rsqrt(mean(x^2) + eps) * weight, normalised in float32.

    scale_in_float32=False is diffusers' RMSNorm (cast to the weight's dtype, then scaled);
    True is torch.nn.RMSNorm (scaled in float32, then cast to x's dtype). Same in fp32.
    """
    x32 = _float32(x)
    normed = x32 * mint.rsqrt(mint.mean(x32 * x32, -1, True) + eps)
    if scale_in_float32:
        return (normed * _float32(weight)).astype(x.dtype)
    return normed.astype(weight.dtype) * weight


def gelu(x: ms.Tensor, approximate: bool) -> ms.Tensor:
    """GELU; `approximate=True` is the tanh form ("gelu-approximate"), False the exact erf form."""
    return ops.gelu(x, approximate="tanh" if approximate else "none")


def silu(x: ms.Tensor) -> ms.Tensor:
    """SiLU computed in float32 (MindSpore's fp16 kernel is ~2x less accurate than torch's)."""
    return mint.nn.functional.silu(_float32(x)).astype(x.dtype)


def sigmoid(x: ms.Tensor) -> ms.Tensor:
    """Sigmoid computed in float32, like silu."""
    return mint.sigmoid(_float32(x)).astype(x.dtype)


def split_heads(x: ms.Tensor, heads: int) -> ms.Tensor:
    """(B, L, H*d) -> (B, H, L, d)."""
    b, length, width = x.shape
    return x.reshape(b, length, heads, width // heads).permute(0, 2, 1, 3)


def merge_heads(x: ms.Tensor) -> ms.Tensor:
    """(B, H, L, d) -> (B, L, H*d)."""
    b, heads, length, d = x.shape
    return x.permute(0, 2, 1, 3).reshape(b, length, heads * d)


def attention(q: ms.Tensor, k: ms.Tensor, v: ms.Tensor) -> ms.Tensor:
    """softmax(q k^T / sqrt(d)) v on split heads: q (B,H,Lq,d), k and v (B,H,Lk,d) -> (B,H,Lq,d)."""
    scale = q.shape[-1] ** -0.5
    # Scaling q rather than the (Lq, Lk) scores is cheaper, and exact for power-of-two d.
    scores = mint.matmul(q * scale, k.permute(0, 1, 3, 2))   # (B, H, Lq, Lk)
    # Softmax in float32 (torch's fused attention keeps scores in float32 for fp16/bf16 inputs).
    probs = mint.softmax(_float32(scores), dim=-1).astype(q.dtype)
    return mint.matmul(probs, v)


def patchify(x: ms.Tensor, patch: int) -> ms.Tensor:
    """(B, C, H, W) -> (B, H/p * W/p, C*p*p), row-major patches with (C, p, p) inside each.

    Followed by a Linear with the conv weight flattened to (D, C*p*p) this is exactly the
    stride-p Conv2d patch embedding (mint.nn.Conv2d does not run on the CPU).
    """
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // patch, patch, w // patch, patch)
    x = x.permute(0, 2, 4, 1, 3, 5)                            # (B, H/p, W/p, C, p, p)
    return x.reshape(b, (h // patch) * (w // patch), c * patch * patch)
