"""The portable ops and host-side tables against torch and diffusers (independent sources)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import mindspore as ms

from ms_rm.core import ops
from ms_rm.core.layers import Timesteps, timestep_frequencies
from ms_rm.backbones.sd3 import sd3_position_table

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


@pytest.mark.parametrize("approximate", [True, False])
def test_gelu_matches_torch(approximate):
    x = (RNG.standard_normal(1000) * 3).astype(np.float32)
    ref = F.gelu(torch.from_numpy(x), approximate="tanh" if approximate else "none").numpy()
    assert np.abs(ops.gelu(ms.Tensor(x), approximate).asnumpy() - ref).max() < 1e-6


def test_timestep_frequencies_are_torchs_values():
    import math

    exponent = (-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128).numpy()  # as diffusers
    freqs = timestep_frequencies(256)
    np.testing.assert_array_equal(freqs, torch.exp(torch.from_numpy(exponent)).numpy())
    # ... which are within one ulp of the exact values, and correctly rounded but at two indices.
    exact = np.exp(exponent.astype(np.float64))
    off = np.abs(freqs - exact) > 0.5 * np.spacing(freqs)
    assert np.all(np.abs(freqs - exact) <= np.spacing(freqs)) and np.nonzero(off)[0].tolist() == [12, 106]


def test_timestep_projection_matches_diffusers():
    from diffusers.models.embeddings import get_timestep_embedding

    t = np.array([1000.0, 997.3, 399.8, 28.6, 1.0], np.float32)
    ref = get_timestep_embedding(torch.from_numpy(t), 256, flip_sin_to_cos=True,
                                 downscale_freq_shift=0).numpy()
    ours = Timesteps(256)(ms.Tensor(t)).asnumpy()
    assert np.abs(ours - ref).max() <= 2.5e-7                  # sin/cos of equal float32 phases


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
