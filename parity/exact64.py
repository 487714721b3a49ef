"""A float64 reference run that is float64 all through: the sinusoidal timestep projections.

diffusers' `get_timestep_embedding` and Z-Image's `TimestepEmbedder.timestep_embedding` build their
frequencies with a float32 `arange` and `exp` and multiply the timesteps `.float()`, whatever the
model's dtype. A model moved to float64 therefore still computes its sinusoids from float32 phases:
at t ~ 1000 one float32 ulp of a phase is 3e-5, and the frequencies themselves are torch's 1-ulp
exp, whose rounding differs between CPUs. Measured against such a "float64" run, torch fp32 shows
none of that noise, so the tolerance policy's bound (torch's own fp32 error) leaves it out while
any other correct float32 implementation carries it.

`float64_sinusoids()` replaces both functions, around the float64 run only (`run_float64`), by the same formulas
(written from the two functions above) computed in float64 throughout; outside it the original
code runs, so the torch fp32 side is still the reference's own code, bit for bit.
"""

from __future__ import annotations

import contextlib
import math

import torch


def _float64_embedding(timesteps: torch.Tensor, half: int, shift: float, max_period: float,
                       scale: float = 1.0) -> torch.Tensor:
    """[sin, cos] of timesteps x max_period^(-k / (half - shift)), every step in float64: (N, 2 half)."""
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float64, device=timesteps.device)
    args = scale * timesteps.to(torch.float64)[:, None] * torch.exp(exponent / (half - shift))[None, :]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)


@contextlib.contextmanager
def float64_sinusoids():
    """Inside: the two sinusoidal projections compute in float64 (module notes)."""
    import diffusers.models.embeddings as embeddings

    original = embeddings.get_timestep_embedding

    def get_timestep_embedding(timesteps, embedding_dim, flip_sin_to_cos=False, downscale_freq_shift=1, scale=1,
                               max_period=10000):
        half = embedding_dim // 2
        emb = _float64_embedding(timesteps, half, downscale_freq_shift, max_period, scale)
        if flip_sin_to_cos:
            emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
        return torch.nn.functional.pad(emb, (0, 1, 0, 0)) if embedding_dim % 2 else emb

    patches = [(embeddings, "get_timestep_embedding", original, get_timestep_embedding)]
    try:
        from diffusers.models.transformers import transformer_z_image
    except ImportError:                      # a diffusers without Z-Image: nothing of it to patch
        transformer_z_image = None
    if transformer_z_image is not None:
        embedder = transformer_z_image.TimestepEmbedder

        def timestep_embedding(t, dim, max_period=10000):
            sin_cos = _float64_embedding(t, dim // 2, 0.0, max_period)
            emb = torch.cat([sin_cos[:, dim // 2:], sin_cos[:, :dim // 2]], dim=-1)      # cos first
            return torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1) if dim % 2 else emb

        patches.append((embedder, "timestep_embedding", embedder.__dict__["timestep_embedding"],
                        staticmethod(timestep_embedding)))
    for owner, name, _, new in patches:
        setattr(owner, name, new)
    try:
        yield
    finally:
        for owner, name, old, _ in patches:
            setattr(owner, name, old)


def run_float64(torch_run):
    """torch_run(torch.float64) with its timestep sinusoids in float64 too."""
    with float64_sinusoids():
        return torch_run(torch.float64)
