"""The portable ops and host-side tables against torch and diffusers (independent sources)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import mindspore as ms

from ms_rm.core import ops
from ms_rm.core.layers import Timesteps, timestep_frequencies
from ms_rm.backbones.sd3_transformer import sd3_position_table

RNG = np.random.default_rng(0)


def _rel(ours, ref):
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def test_layer_norm_matches_torch():
    x = (RNG.standard_normal((2, 37, 96)) * 3 + 1).astype(np.float32)
    ref = F.layer_norm(torch.from_numpy(x), (96,), eps=1e-6).numpy()
    assert _rel(ops.layer_norm(ms.Tensor(x)).asnumpy(), ref) < 1e-6


def test_rms_norm_matches_diffusers():
    from diffusers.models.normalization import RMSNorm

    x = RNG.standard_normal((2, 3, 11, 16)).astype(np.float32)
    w = (1 + 0.1 * RNG.standard_normal(16)).astype(np.float32)
    norm = RMSNorm(16, eps=1e-6)
    norm.weight.data = torch.from_numpy(w)
    ref = norm(torch.from_numpy(x)).detach().numpy()
    assert _rel(ops.rms_norm(ms.Tensor(x), ms.Tensor(w), 1e-6).asnumpy(), ref) < 1e-6


def test_attention_matches_sdpa():
    q, k, v = (RNG.standard_normal((2, 3, n, 32)).astype(np.float32) for n in (9, 14, 14))
    ref = F.scaled_dot_product_attention(*(torch.from_numpy(a) for a in (q, k, v))).numpy()
    ours = ops.attention(ms.Tensor(q), ms.Tensor(k), ms.Tensor(v)).asnumpy()
    assert _rel(ours, ref) < 3e-6


def test_patchify_linear_is_the_conv2d_patch_embedding():
    x = RNG.standard_normal((2, 5, 12, 8)).astype(np.float32)
    w = RNG.standard_normal((7, 5, 2, 2)).astype(np.float32)
    ref = F.conv2d(torch.from_numpy(x), torch.from_numpy(w), stride=2).flatten(2).transpose(1, 2).numpy()
    patches = ops.patchify(ms.Tensor(x), 2).asnumpy()
    assert patches.shape == (2, 24, 20)
    assert _rel(patches @ w.reshape(7, -1).T, ref) < 1e-6


@pytest.mark.parametrize("mode", ["pynative", "graph"])
@pytest.mark.parametrize("band_bytes", [None, 4096])          # one band; bands of a few rows
@pytest.mark.parametrize("stride, padding", [(1, 1), (2, 0), (2, 1)])
def test_conv2d_as_gemm_matches_torch(monkeypatch, mode, band_bytes, stride, padding):
    """unfold + GEMM (the CPU spelling), whole or in bands of output rows, with the VAE's
    GroupNorm -> SiLU before it and a residual after, is torch's; so is the Conv2D spelling."""
    if band_bytes is not None:
        monkeypatch.setattr(ops, "BAND_BYTES", band_bytes)
    x, w, bias, norm_w, norm_b = (RNG.standard_normal(shape).astype(np.float32)
                                  for shape in ((2, 6, 13, 10), (7, 6, 3, 3), (7,), (6,), (6,)))
    out_shape = F.conv2d(torch.from_numpy(x), torch.from_numpy(w), stride=stride, padding=padding).shape
    residual = RNG.standard_normal(tuple(out_shape)).astype(np.float32)
    t = {name: torch.from_numpy(a) for name, a in dict(x=x, w=w, bias=bias, norm_w=norm_w, norm_b=norm_b,
                                                         residual=residual).items()}
    plain = F.conv2d(t["x"], t["w"], t["bias"], stride=stride, padding=padding).numpy()
    activated = F.silu(F.group_norm(t["x"], 3, t["norm_w"], t["norm_b"], eps=1e-6))
    fused = (F.conv2d(activated, t["w"], t["bias"], stride=stride, padding=padding) + t["residual"]).numpy()

    def conv(x, w, bias, norm_w, norm_b, residual, as_gemm):
        pre_norm = (ops.group_statistics(x, 3, 1e-6), norm_w, norm_b)
        return (ops.conv2d(x, w, bias, stride, padding, as_gemm=as_gemm),
                ops.conv2d(x, w, bias, stride, padding, as_gemm=as_gemm, pre_norm=pre_norm, residual=residual))

    fn = ms.jit(conv) if mode == "graph" else conv
    for as_gemm in (True, False):
        ours_plain, ours_fused = fn(*(ms.Tensor(a) for a in (x, w, bias, norm_w, norm_b, residual)), as_gemm)
        assert ours_plain.shape == plain.shape and ours_fused.shape == fused.shape
        assert _rel(ours_plain.asnumpy(), plain) < 1e-6
        assert _rel(ours_fused.asnumpy(), fused) < 2e-6
    if band_bytes is not None:
        row = 2 * 6 * 9 * plain.shape[-1] * 4             # the bytes of one output row's columns
        assert band_bytes // row < plain.shape[2]          # the bands did split the rows


@pytest.mark.parametrize("mode", ["pynative", "graph"])
def test_chunked_attention_is_whole_attention(monkeypatch, mode):
    """Queries in chunks of 4 (of 9), with and without a key mask."""
    monkeypatch.setattr(ops, "BAND_BYTES", 2 * 3 * 14 * 4 * 4)
    q, k, v = (RNG.standard_normal((2, 3, n, 32)).astype(np.float32) for n in (9, 14, 14))
    keep = np.ones((2, 14), bool)
    keep[1, 10:] = False
    bias = np.where(keep, 0.0, -np.inf).astype(np.float32)[:, None, None, :]
    t = [torch.from_numpy(a) for a in (q, k, v)]
    refs = [F.scaled_dot_product_attention(*t).numpy(),
            F.scaled_dot_product_attention(*t, attn_mask=torch.from_numpy(keep)[:, None, None, :]).numpy()]

    def attend(q, k, v, bias):
        return ops.attention(q, k, v, chunked=True), ops.attention(q, k, v, bias, chunked=True)

    fn = ms.jit(attend) if mode == "graph" else attend
    for ours, ref in zip(fn(*(ms.Tensor(a) for a in (q, k, v, bias))), refs):
        assert _rel(ours.asnumpy(), ref) < 3e-6


def test_cpu_spellings_on_the_cpu_only():
    assert ops.use_cpu_spellings() == (ops.device_target() == "CPU")


@pytest.mark.parametrize("approximate", [True, False])
def test_gelu_matches_torch(approximate):
    x = (RNG.standard_normal(1000) * 3).astype(np.float32)
    ref = F.gelu(torch.from_numpy(x), approximate="tanh" if approximate else "none").numpy()
    assert np.abs(ops.gelu(ms.Tensor(x), approximate).asnumpy() - ref).max() < 1e-6


def test_timestep_frequencies_are_correctly_rounded_and_torchs_within_one_ulp():
    import math

    exponent = (-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128).numpy()  # as diffusers
    exact = np.exp(exponent.astype(np.float64))
    freqs = timestep_frequencies(256)
    assert np.array_equal(freqs, exact.astype(np.float32))                  # correctly rounded
    # torch's float32 exp, the reference's, is within one ulp (not always correctly rounded, at
    # indices that differ between CPUs): ms_rm's frequencies differ from it by at most that ulp.
    theirs = torch.exp(torch.from_numpy(exponent)).numpy()
    assert np.all(np.abs(theirs - exact) <= np.spacing(theirs))
    assert np.all(np.abs(freqs.astype(np.float64) - theirs) <= np.spacing(theirs))


def test_timestep_projection_matches_diffusers_under_the_tolerance_policy():
    """ms_rm's projection against diffusers' fp32 one, bounded by diffusers' own fp32 error against
    the projection computed in float64 throughout (ms_rm_parity.exact64), as the parity harness
    bounds every stage; and ms_rm's own error against float64 no larger than torch's."""
    from diffusers.models import embeddings           # the module's name: float64_sinusoids replaces it there

    from ms_rm_parity.compare import max_rel_error, policy_bound
    from ms_rm_parity.exact64 import float64_sinusoids

    t = np.array([1000.0, 997.3, 399.8, 28.6, 1.0], np.float32)
    project = lambda: embeddings.get_timestep_embedding(torch.from_numpy(t), 256, flip_sin_to_cos=True,
                                                         downscale_freq_shift=0).double().numpy()
    ref = project()
    with float64_sinusoids():
        ref64 = project()
    ours = Timesteps(256)(ms.Tensor(t)).asnumpy()
    torch_noise = max_rel_error(ref, ref64)
    assert 0 < torch_noise < 1e-4                      # float32 phases at t ~ 1000: real, and small
    assert max_rel_error(ours, ref) <= policy_bound(torch_noise)
    assert max_rel_error(ours, ref64) <= 2 * torch_noise


@pytest.mark.parametrize("hw", [(8, 8), (6, 10), (24, 24), (5, 7)])
def test_position_table_is_the_diffusers_crop(hw):
    from diffusers.models.embeddings import PatchEmbed

    embed = PatchEmbed(height=32, width=32, patch_size=2, in_channels=4, embed_dim=64, pos_embed_max_size=24)
    ref = embed.cropped_pos_embed(hw[0] * 2, hw[1] * 2).numpy()
    ours = sd3_position_table(hw[0], hw[1], 64, 24, 16)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() < 1e-7


def test_position_table_refuses_grids_beyond_the_table():
    from ms_rm.core.errors import InputError

    with pytest.raises(InputError, match="at most 24x24"):
        sd3_position_table(25, 8, 64, 24, 16)


# --- op accuracy over the whole float32 range (ms_rm_parity.op_accuracy; README "Op accuracy") ---

@pytest.fixture(scope="module")
def op_accuracy():
    from ms_rm_parity import op_accuracy

    return {sweep.name: sweep for sweep in op_accuracy._sweeps()}


@pytest.mark.parametrize("name", ["exp", "expm1", "log", "log1p", "tanh", "softplus (beta 1)", "elu (alpha 1)",
                                  "swish (beta 1)", "leakyrelu (0.01)", "sqrt", "rsqrt", "sin", "cos", "pow(2, k)",
                                  "erf", "sigmoid", "SiLU", "GELU (erf)", "GELU (tanh)", "QuickGELU",
                                  "softmax (rows of 64)"])
def test_op_is_accurate_over_its_whole_range(op_accuracy, name):
    from ms_rm_parity.op_accuracy import markdown, measure

    row = measure(op_accuracy[name])
    assert row.passed, markdown([row])


def test_the_sweep_fails_mindspores_own_tanh_exp_and_log1p(op_accuracy):
    """The kernels ops.tanh / exp / log1p replace: the same sweep and bound refuse them."""
    import dataclasses

    from mindspore import mint

    from ms_rm_parity.op_accuracy import measure

    for name, kernel in [("tanh", mint.tanh), ("exp", mint.exp), ("log1p", mint.log1p), ("log", mint.log)]:
        assert not measure(dataclasses.replace(op_accuracy[name], ours=kernel)).passed, name


@pytest.mark.parametrize("mode", ["pynative", "graph"])
def test_written_out_ops_have_their_exact_derivative(mode):
    """tanh' = 1 - tanh^2 stays nonzero where tanh rounds near 1 (MindSpore's kernel: exactly 0
    from x = 6), exp' = exp, expm1' = exp, log' = 1/x, log1p' = 1/(1+x), within a few ulp, in
    graph mode too; and fp16 inputs come back fp16."""
    from ms_rm_parity.op_accuracy import ulp_errors

    x = np.concatenate([np.linspace(-12, 12, 4001), np.geomspace(1e-30, 1, 200)]).astype(np.float32)
    cases = [(ops.tanh, x, lambda v: 1 / np.cosh(v) ** 2), (ops.exp, x, np.exp), (ops.expm1, x, np.exp),
             (ops.log, np.abs(x) + 1e-20, lambda v: 1 / v), (ops.log1p, np.abs(x), lambda v: 1 / (1 + v))]
    def total(fn):
        def summed(t):
            return fn(t).sum()
        return summed

    for fn, points, derivative in cases:
        grad = ms.grad(total(fn))
        grad = ms.jit(grad) if mode == "graph" else grad
        got = grad(ms.Tensor(points)).asnumpy()
        assert ulp_errors(got, derivative(points.astype(np.float64))).max() <= 8, fn.__name__
    slope_at_6 = ms.grad(lambda t: ops.tanh(t).sum())(ms.Tensor(np.float32([6.0]))).asnumpy()[0]
    assert abs(slope_at_6 - 1 / np.cosh(6.0) ** 2) <= 1e-6 * slope_at_6
    assert ops.tanh(ms.Tensor(np.float16([0.5, -7.0]))).dtype == ms.float16
    assert ops.exp(ms.Tensor(np.float32([100.0, -200.0]))).asnumpy().tolist() == [np.inf, 0.0]
