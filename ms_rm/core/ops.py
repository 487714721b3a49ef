"""Portable op spellings: the one module that knows which MindSpore ops run where.

The models call these helpers, plus plain elementwise `mint` calls that run on every backend.
Each spelling here runs on the CPU and on Ascend: MindSpore's CPU backend lacks many `mint` kernels (`mint.nn.functional.layer_norm`, `gelu`, `scaled_dot_product_attention`,
`conv2d`, ...) and all bf16 arithmetic (docs/measurements.md, "Op spellings"). Any choice
that depends on the device belongs in this module and nowhere else.

Why each spelling was chosen is written beside it; the measured figures behind the choices (op
accuracy against float64, kernel times, memory) live in docs/measurements.md ("Op spellings",
"Op accuracy"), next to the commands that reproduce them, and the accuracy facts are pinned by
tests/test_ops.py.

* Accuracy: MindSpore's CPU `exp`, `log`, `tanh`, `expm1` and `log1p` are much less accurate than
  torch's: ms_rm calls the written-out spellings at the end of this module instead
  (docs/measurements.md, "Op accuracy"), except inside the hot fused kernels (softmax, SiLU, sigmoid), kept for speed.
  Anything that can be computed once on the host in float64 (timestep frequencies, position
  tables) is computed there. For fp16/bf16 inputs torch's CPU
  kernels compute norms, softmax and activations in float32 internally; the helpers here do the
  same explicitly (a no-op in fp32).
* Memory: MindSpore's CPU graph executor does not reuse the memory of a binary op that
  broadcasts implicitly, of the Dense kernel behind mint.nn.Linear, or of permute/Transpose:
  each such intermediate stays allocated until the graph ends. So broadcasts are explicit
  (`expand`), `linear` is MatMul + BiasAdd and heads move with mint.swapaxes, all of which are
  reused.
* Speed: some spellings are chosen for the CPU's kernels (linear, mean_last, gelu). Two depend
  on the device, through `use_cpu_spellings()`, checked when a model is built (outside the
  compiled graph): conv2d as unfold + GEMM and attention in query chunks on the CPU, the plain
  kernels elsewhere. An Ascend build would also want the fused kernels (LayerNorm, RmsNorm,
  FlashAttentionScore): that choice belongs here too, and must be measured on Ascend first (no
  Ascend machine was available for this work).
"""

from __future__ import annotations

import logging
import math
from typing import Optional

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


BAND_BYTES = 256 * 2 ** 20     # with the CPU spellings: a convolution band's columns, an attention chunk's scores


def use_cpu_spellings() -> bool:
    """Whether a model built now should use the CPU spellings of `conv2d` (unfold + GEMM, in bands)
    and `attention` (queries in chunks); decided when the model is built, outside any compiled
    graph. On the CPU, yes: MindSpore's CPU Conv2D kernel is far slower than unfold + GEMM for 3x3
    convolutions, and the graph executor keeps more of a large graph's intermediates than torch
    (docs/measurements.md, "Op spellings"). On Ascend the device's own Conv2D and whole attention
    are kept."""
    return device_target() == "CPU"


_MATMUL_T = ops.MatMul(transpose_b=True)
_BATCH_MATMUL = ops.BatchMatMul()
_BATCH_MATMUL_T = ops.BatchMatMul(transpose_b=True)
_BIAS_ADD = ops.BiasAdd()


def linear(x: ms.Tensor, weight: ms.Tensor, bias: Optional[ms.Tensor] = None) -> ms.Tensor:
    """x (..., in) @ weight (out, in)^T + bias: a 2-D MatMul with transposed weight, the fastest
    CPU spelling measured and one whose memory the graph executor reuses (see the module notes)."""
    shape = x.shape
    y = _MATMUL_T(x.reshape(-1, shape[-1]), weight)
    if bias is not None:
        y = _BIAS_ADD(y, bias)
    return y.reshape(shape[:-1] + (weight.shape[0],))


def expand(small: ms.Tensor, like: ms.Tensor) -> ms.Tensor:
    """`small` broadcast to `like`'s shape, explicitly (see the module notes on memory)."""
    return ops.broadcast_to(small, like.shape)


def broadcast_to_shape(small: ms.Tensor, shape) -> ms.Tensor:
    """`small` broadcast to `shape`, explicitly (see the module notes on memory)."""
    return ops.broadcast_to(small, tuple(shape))


def _float32(x: ms.Tensor) -> ms.Tensor:
    return x if x.dtype == ms.float32 else x.astype(ms.float32)


def mean_last(x: ms.Tensor) -> ms.Tensor:
    """Mean over the last axis, kept: (..., n) -> (..., 1).

    Written as a matrix-vector product with ones: on the CPU MindSpore's ReduceMean kernel is
    several times slower than its BLAS GEMV.
    """
    n = x.shape[-1]
    return mint.matmul(x, mint.ones((n, 1), dtype=x.dtype)) / n


def layer_norm(x: ms.Tensor, eps: float = 1e-6, weight: Optional[ms.Tensor] = None,
               bias: Optional[ms.Tensor] = None) -> ms.Tensor:
    """LayerNorm over the last axis, without affine parameters (diffusers' elementwise_affine=False)
    or with `weight` and `bias` (torch.nn.LayerNorm).

    In float32, cast back to x's dtype, as torch's kernels do for fp16/bf16. The LayerNorm
    primitive is one kernel whose memory is reused; the functional mint/ops layer_norm
    spellings have no CPU kernel.
    """
    x32 = _float32(x)
    n = x32.shape[-1]
    gamma = mint.ones((n,), dtype=ms.float32) if weight is None else _float32(weight)
    beta = mint.zeros((n,), dtype=ms.float32) if bias is None else _float32(bias)
    normed = ops.LayerNorm(-1, -1, eps)(x32, gamma, beta)[0]
    return normed.astype(x.dtype)


def embedding(table: ms.Tensor, ids: ms.Tensor) -> ms.Tensor:
    """Rows `ids` (any shape, integer) of `table` (V, D) -> ids.shape + (D,): torch.nn.Embedding.
    ops.gather; mint.nn.Embedding has no CPU kernel."""
    return ops.gather(table, ids, 0)


def rms_norm(x: ms.Tensor, weight: ms.Tensor, eps: float, scale_in_float32: bool = False) -> ms.Tensor:
    """RMSNorm over the last axis: x * rsqrt(mean(x^2) + eps) * weight, normalised in float32.

    scale_in_float32=False is diffusers' RMSNorm (cast to the weight's dtype, then scaled);
    True is torch.nn.RMSNorm (scaled in float32, then cast to x's dtype). Same in fp32.
    """
    x32 = _float32(x)
    normed = x32 * expand(mint.rsqrt(mean_last(x32 * x32) + eps), x32)
    if scale_in_float32:
        return (normed * expand(_float32(weight), normed)).astype(x.dtype)
    normed = normed.astype(weight.dtype)
    return normed * expand(weight, normed)


_GELU_C = 2.0 * math.sqrt(2.0 / math.pi)


def gelu(x: ms.Tensor, approximate: bool) -> ms.Tensor:
    """GELU; `approximate=True` is the tanh form ("gelu-approximate"), False the exact erf form.

    The tanh form is computed as x * sigmoid(2 * sqrt(2/pi) * (x + 0.044715 x^3)), which equals
    0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))): an order of magnitude faster than
    MindSpore's CPU GeLU kernel, at the same accuracy.
    """
    if not approximate:
        return ops.gelu(x, approximate="none")
    x32 = _float32(x)
    return (x32 * mint.sigmoid(x32 * (_GELU_C + (_GELU_C * 0.044715) * (x32 * x32)))).astype(x.dtype)


def silu(x: ms.Tensor) -> ms.Tensor:
    """SiLU computed in float32 (MindSpore's fp16 kernel is ~2x less accurate than torch's)."""
    return mint.nn.functional.silu(_float32(x)).astype(x.dtype)


def sigmoid(x: ms.Tensor) -> ms.Tensor:
    """Sigmoid computed in float32, like silu."""
    return mint.sigmoid(_float32(x)).astype(x.dtype)


def split_heads(x: ms.Tensor, heads: int) -> ms.Tensor:
    """(B, L, H*d) -> (B, H, L, d)."""
    b, length, width = x.shape
    return heads_first(x.reshape(b, length, heads, width // heads))


def heads_first(x: ms.Tensor) -> ms.Tensor:
    """(B, L, H, d) -> (B, H, L, d). swapaxes, not permute: see the module notes on memory."""
    return mint.swapaxes(x, 1, 2)


def merge_heads(x: ms.Tensor) -> ms.Tensor:
    """(B, H, L, d) -> (B, L, H*d)."""
    b, heads, length, d = x.shape
    return mint.swapaxes(x, 1, 2).reshape(b, length, heads * d)


def attention(q: ms.Tensor, k: ms.Tensor, v: ms.Tensor, bias: Optional[ms.Tensor] = None,
              scale: Optional[float] = None, chunked: bool = False) -> ms.Tensor:
    """softmax(q k^T * scale + bias) v on split heads: q (B,H,Lq,d), k and v (B,H,Lk,d) -> (B,H,Lq,d).

    scale: 1 / sqrt(d) by default (T5 uses 1). bias: float32, broadcast to the scores: (B, 1, 1, Lk),
    0 for keys to attend and -inf for masked ones (what torch's scaled_dot_product_attention makes
    of a boolean key mask), or a position bias (1, H, Lq, Lk).
    chunked (the CPU spelling, `use_cpu_spellings()`; with no bias or a key mask): the queries in
    chunks whose scores take at most BAND_BYTES, each waiting for the previous one, instead of all
    (B, H, Lq, Lk) scores at once (1 GiB in the SD3 VAE's mid block at 1024 x 1024 pixels, 1.9 GiB
    per sample in the reward model's attention there). The same numbers."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    # Scaling q rather than the (Lq, Lk) scores is cheaper, and exact for power-of-two d.
    q = q if scale == 1.0 else q * scale
    b, heads, length = q.shape[0], q.shape[1], q.shape[2]
    per_row = b * heads * k.shape[2] * 4                                  # float32 scores of one query
    rows = max(1, BAND_BYTES // per_row) if chunked and (bias is None or bias.shape[2] == 1) else length
    chunks = []
    for first in range(0, length, rows):
        part = q[:, :, first:first + rows] if rows < length else q
        if chunks:
            part = ops.depend(part, chunks[-1])
        scores = _BATCH_MATMUL_T(part, k)                                  # (B, H, rows, Lk)
        # Softmax in float32 (torch's fused attention keeps scores in float32 for fp16/bf16 inputs).
        scores = _float32(scores)
        if bias is not None:
            scores = scores + expand(bias, scores)
        chunks.append(_BATCH_MATMUL(mint.softmax(scores, dim=-1).astype(q.dtype), v))
    return chunks[0] if len(chunks) == 1 else ops.concat(chunks, 2)


def patchify(x: ms.Tensor, patch: int, channels_last: bool = False) -> ms.Tensor:
    """(B, C, H, W) -> (B, H/p * W/p, C*p*p), row-major patches with (C, p, p) inside each,
    or (p, p, C) with `channels_last` (Z-Image's order).

    Followed by a Linear with the conv weight flattened to (D, C*p*p) this is exactly the
    stride-p Conv2d patch embedding (mint.nn.Conv2d does not run on the CPU).
    """
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // patch, patch, w // patch, patch)
    if channels_last:
        x = x.permute(0, 2, 4, 3, 5, 1)                        # (B, H/p, W/p, p, p, C)
    else:
        x = x.permute(0, 2, 4, 1, 3, 5)                        # (B, H/p, W/p, C, p, p)
    return x.reshape(b, (h // patch) * (w // patch), c * patch * patch)


# --- convolutional helpers (the SD3 VAE, ms_rm/vae/) ------------------------------

def conv2d(x: ms.Tensor, weight: ms.Tensor, bias: Optional[ms.Tensor] = None, stride: int = 1,
           padding: int = 0, as_gemm: bool = False, pre_norm=None, residual: Optional[ms.Tensor] = None
           ) -> ms.Tensor:
    """torch.nn.functional.conv2d on NCHW: weight (out, in, kh, kw), symmetric zero `padding`.

    pre_norm: (statistics, norm weight, norm bias), see `group_statistics`: the convolution's input
        is silu(normalize(x, ...)) rather than x (the VAE's GroupNorm -> SiLU -> conv).
    residual: a tensor of the output's shape, added to it.

    as_gemm=False: ops.conv2d (the Conv2D primitive, on every backend; mint's conv2d has no CPU
    kernel). as_gemm=True (`use_cpu_spellings()`): a k x k convolution as ops.unfold (each output
    position's (in, kh, kw) patch as a column, torch's order) and a batched GEMM with the weight
    flattened to (out, in * kh * kw), over bands of output rows whose columns take at most
    BAND_BYTES. Each band reads its own input rows (the pre_norm activation and the zero padding
    are made per band, so they never exist whole) and waits for the previous band (ops.depend), so
    that the graph executor reuses the bands' memory instead of holding them all. 1x1 convolutions
    keep Conv2D, which is fast for them on the CPU too.
    """
    out_channels, in_channels, k, _ = weight.shape
    if not as_gemm or k == 1:
        if pre_norm is not None:
            x = silu(normalize(x, *pre_norm))
        if padding:
            y = ops.conv2d(x, weight, bias, stride=stride, pad_mode="pad", padding=padding)
        else:
            y = ops.conv2d(x, weight, bias, stride=stride, pad_mode="valid")
        return y if residual is None else y + residual
    b, _, h, w = x.shape
    out_h, out_w = (h + 2 * padding - k) // stride + 1, (w + 2 * padding - k) // stride + 1
    depth = in_channels * k * k
    kernel = broadcast_to_shape(weight.reshape(1, out_channels, depth), (b, out_channels, depth))
    band_rows = max(1, BAND_BYTES // (b * depth * out_w * x.dtype.itemsize))
    bands = []
    for first in range(0, out_h, band_rows):
        last = min(out_h, first + band_rows)
        top, bottom = first * stride - padding, (last - 1) * stride + k - padding    # input rows read, unpadded
        rows = x[:, :, max(top, 0):min(bottom, h)]                                   # (B, in, rows, W)
        if bands:
            rows = ops.depend(rows, bands[-1])
        if pre_norm is not None:
            rows = silu(normalize(rows, *pre_norm))
        above, below = max(-top, 0), max(bottom - h, 0)                              # zero rows to add
        if above == below == padding:                     # the whole height: unfold pads the rows too
            columns = ops.unfold(rows, k, padding=padding, stride=stride)
        else:
            parts = [ops.zeros((b, in_channels, above, w), rows.dtype)] if above else []
            parts += [rows] + ([ops.zeros((b, in_channels, below, w), rows.dtype)] if below else [])
            rows = ops.concat(parts, 2) if len(parts) > 1 else rows
            columns = ops.unfold(rows, k, padding=(0, padding), stride=stride)       # (B, in*k*k, rows*out_w)
        band = _BATCH_MATMUL(kernel, columns)                                        # (B, out, rows*out_w)
        if bias is not None:
            band = _BIAS_ADD(band, bias)
        if residual is not None:
            band = band + residual[:, :, first:last].reshape(b, out_channels, -1)
        bands.append(band)
    y = bands[0] if len(bands) == 1 else ops.concat(bands, 2)                       # (B, out, out_h*out_w)
    return y.reshape(b, out_channels, out_h, out_w)


def pad(x: ms.Tensor, padding) -> ms.Tensor:
    """Zero padding in torch.nn.functional.pad's order (last axis first: left, right, top, bottom).
    ops.pad; mint.nn.functional.pad has no CPU kernel."""
    return ops.pad(x, tuple(padding))


def group_statistics(x: ms.Tensor, groups: int, eps: float = 1e-6):
    """torch.nn.GroupNorm(groups, C, eps)'s statistics of x (B, C, *spatial), per channel: (mean,
    1 / sqrt(var + eps)), each float32 (B, C, 1, ...). Over each group's C/groups channels and all
    positions: the mean, then the variance of the centred values (two passes: no cancellation),
    both as mean_last GEMVs."""
    b, c = x.shape[0], x.shape[1]
    x32 = _float32(x).reshape(b, groups, -1)                            # (B, G, C/G * positions)
    mean = mean_last(x32)
    centred = x32 - expand(mean, x32)
    inv_std = mint.rsqrt(mean_last(centred * centred) + eps)             # (B, G, 1)
    per_channel, shape = (b, groups, c // groups), (b, c) + (1,) * (len(x.shape) - 2)
    return (broadcast_to_shape(mean, per_channel).reshape(shape),
            broadcast_to_shape(inv_std, per_channel).reshape(shape))


def normalize(x: ms.Tensor, statistics, weight: ms.Tensor, bias: ms.Tensor) -> ms.Tensor:
    """((x - mean) * inv_std) * weight + bias per channel, in float32 (cast back to x's dtype, as
    torch's CPU GroupNorm does for fp16/bf16), with `group_statistics` of x or of a tensor that
    x is a slice of (its rows)."""
    mean, inv_std = statistics
    x32 = _float32(x)
    affine = (1, x.shape[1]) + (1,) * (len(x.shape) - 2)
    normed = (x32 - expand(mean, x32)) * expand(inv_std, x32)
    return (normed * expand(_float32(weight).reshape(affine), x32)
            + expand(_float32(bias).reshape(affine), x32)).astype(x.dtype)


def group_norm(x: ms.Tensor, groups: int, weight: ms.Tensor, bias: ms.Tensor, eps: float = 1e-6) -> ms.Tensor:
    """torch.nn.GroupNorm(groups, C, eps, affine=True) on x (B, C, *spatial), in float32.

    Written out (group_statistics, normalize) because the fused GroupNorm kernels are not the same
    on every backend and this spelling needs only matmul, rsqrt and elementwise ops.
    """
    return normalize(x, group_statistics(x, groups, eps), weight, bias)


# --- CLIP's helpers (ms_rm/rewards/clip) ----------------------------------------------------------

def quick_gelu(x: ms.Tensor) -> ms.Tensor:
    """x * sigmoid(1.702 x): transformers' QuickGELU (OpenAI CLIP's activation), in float32."""
    x32 = _float32(x)
    return (x32 * mint.sigmoid(1.702 * x32)).astype(x.dtype)


# --- transcendentals written out (MindSpore's CPU kernels are not accurate enough) ----------------
#
# MindSpore's CPU `exp` and `tanh` are far off float64 (`tanh` goes above 1, then is exactly 1 so
# its slope vanishes), and `expm1` / `log1p` are exp(x) - 1 and log(1 + x), which lose every digit
# near 0 (the ulp figures: docs/measurements.md, "Op accuracy"). The spellings below are
# float32 arithmetic, rounding and `pow(2, k)` (exact), the same on every backend, within a few ulp
# over the whole float32 range. Each returns its value with its exact derivative attached
# (`_with_slope`), so autodiff never differentiates the polynomials or the branches.
# The hot kernels (softmax in attention, sigmoid in SiLU and GELU) keep MindSpore's: an elementwise
# spelling of exp costs ~15 passes over the (B, H, L, L) scores.

_FLOAT32_MAX = 3.4028234663852886e38
_LOG2E = 1.4426950408889634
_LN2_HI, _LN2_LO = 0.693359375, -2.12194440e-4       # ln 2 = hi + lo, hi with few bits: k * hi is exact
_EXP_MAX, _EXP_MIN = 88.72283935546875, -103.97208404541016   # exp overflows / underflows past these
_EXP_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1,
             5.0000001201e-1)                         # e^r = 1 + r + r^2 p(r) on |r| <= ln 2 / 2 (Cephes' expf)
_EXPM1_SMALL = 0.5                                    # below it expm1 by its Taylor series
_ATANH_RANGE = 0.42                                   # |f| below it: log(1 + f) = 2 atanh(f / (2 + f)) by its series


def _with_slope(value: ms.Tensor, x: ms.Tensor, slope: ms.Tensor) -> ms.Tensor:
    """`value` (a function of x), whose derivative autodiff takes to be `slope` (exactly):
    value + (x - x) x slope, the last two held constant; both clamped finite so that the added
    term is 0 (an infinite slope, of an overflowed value, reads as the largest float32)."""
    finite_x, finite_slope = mint.clamp(x, -_FLOAT32_MAX, _FLOAT32_MAX), mint.clamp(slope, -_FLOAT32_MAX, _FLOAT32_MAX)
    return ops.stop_gradient(value) + (finite_x - ops.stop_gradient(finite_x)) * ops.stop_gradient(finite_slope)


def _exp_value(x: ms.Tensor) -> ms.Tensor:
    """e^x in float32 to ~1 ulp: x = k ln 2 + r with |r| <= ln 2 / 2, e^r by its minimax polynomial,
    times 2^k as two exact powers of two (so that e^88 and the subnormals do not overflow)."""
    x = mint.clamp(x, _EXP_MIN, _EXP_MAX)
    k = mint.floor(x * _LOG2E + 0.5)
    r = (x - k * _LN2_HI) - k * _LN2_LO
    p = _EXP_POLY[0] * r + _EXP_POLY[1]
    for c in _EXP_POLY[2:]:
        p = p * r + c
    return _times_power_of_two(p * (r * r) + r + 1.0, k)


def _times_power_of_two(x: ms.Tensor, k: ms.Tensor) -> ms.Tensor:
    """x 2^k for integer-valued k, exactly: as two powers of two, each a normal float32 (2^128 is not)."""
    half = mint.floor(k * 0.5)
    two = ms.Tensor(2.0, ms.float32)
    return x * mint.pow(two, half) * mint.pow(two, k - half)


def exp(x: ms.Tensor) -> ms.Tensor:
    """e^x, float32, within ~1 ulp over the whole float32 range (module notes); derivative e^x."""
    x32 = _float32(x)
    value = _exp_value(x32)
    return _with_slope(value, x32, value).astype(x.dtype)


def _expm1_value(x: ms.Tensor, exp_x: ms.Tensor) -> ms.Tensor:
    """e^x - 1 without cancellation: its Taylor series (to x^10 / 10!) for |x| < 1/2, else exp_x - 1."""
    series = x / 10.0 + 1.0
    for n in (9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0):
        series = series * (x / n) + 1.0
    return mint.where(mint.abs(x) < _EXPM1_SMALL, x * series, exp_x - 1.0)


def expm1(x: ms.Tensor) -> ms.Tensor:
    """e^x - 1, float32, within a few ulp also near 0 (torch.expm1); derivative e^x."""
    x32 = _float32(x)
    exp_x = _exp_value(x32)
    return _with_slope(_expm1_value(x32, exp_x), x32, exp_x).astype(x.dtype)


def _log1p_series(f: ms.Tensor) -> ms.Tensor:
    """log(1 + f) for |f| < 0.42, to ~1 ulp: 2 atanh(s), s = f / (2 + f), |s| < 0.18, by its series."""
    two_over = 2.0 / (2.0 + f)
    s = f * (0.5 * two_over)
    s2 = s * s
    series = s2 * (1.0 / 13.0) + 1.0 / 11.0
    for c in (1.0 / 9.0, 1.0 / 7.0, 1.0 / 5.0, 1.0 / 3.0, 1.0):
        series = series * s2 + c
    return f * two_over * series                              # 2 s series, with no subnormal s


def _log_value(u: ms.Tensor, correction) -> ms.Tensor:
    """log(u) + correction / u for u > 0, to ~1 ulp: u = m 2^k with m in [0.7, 1.42] (k from
    MindSpore's log, which is close enough for that), log u = k ln 2 + log(1 + (m - 1)), m - 1 exact.
    0, negative and infinite u give MindSpore's log (-inf, nan, inf)."""
    plain = mint.log(u)
    regular = (u > 0) & (u < _FLOAT32_MAX * 2)
    safe = mint.where(regular, u, u * 0 + 1.0)
    k = mint.round(mint.where(regular, plain, plain * 0) * _LOG2E)
    m = _times_power_of_two(safe, -k)
    value = k * _LN2_HI + (k * _LN2_LO + (_log1p_series(m - 1.0) + correction / safe))
    return mint.where(regular, value, plain)


def log(x: ms.Tensor) -> ms.Tensor:
    """Natural log, float32, within ~1 ulp also near 1 (MindSpore's CPU kernel is far off
    there: module notes); derivative 1 / x."""
    x32 = _float32(x)
    return _with_slope(_log_value(x32, 0.0), x32, 1.0 / x32).astype(x.dtype)


def log1p(x: ms.Tensor) -> ms.Tensor:
    """log(1 + x), float32, within ~1 ulp also near 0 (torch.log1p); derivative 1 / (1 + x).
    Near 0 by the atanh series of x itself; elsewhere log(u), u = 1 + x rounded, plus the rounding
    error x - (u - 1) over u (Goldberg's correction)."""
    x32 = _float32(x)
    u = 1.0 + x32
    value = mint.where(mint.abs(x32) < _ATANH_RANGE, _log1p_series(x32), _log_value(u, x32 - (u - 1.0)))
    return _with_slope(value, x32, 1.0 / u).astype(x.dtype)


def tanh(x: ms.Tensor) -> ms.Tensor:
    """tanh, float32, within a few ulp over the whole range (MindSpore's CPU kernel is far off:
    module notes): -expm1(-2|x|) / (2 + expm1(-2|x|)) with x's sign; derivative 1 - tanh^2, as
    4 e^(-2|x|) / (2 + expm1(-2|x|))^2, accurate where 1 - t^2 would cancel."""
    x32 = _float32(x)
    minus_2a = -2.0 * mint.abs(x32)
    exp_m2a = _exp_value(minus_2a)
    e = _expm1_value(minus_2a, exp_m2a)                       # in (-1, 0]
    t = -e / (2.0 + e)
    value = mint.where(x32 < 0, -t, t)
    slope = 4.0 * exp_m2a / ((2.0 + e) * (2.0 + e))
    return _with_slope(value, x32, slope).astype(x.dtype)
