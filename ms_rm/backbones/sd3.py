"""The SD3 / SD3.5 MMDiT backbone of Diffusion-RM, cut after its deepest tap.

Mirrors diffusers' SD3Transformer2DModel up to block N: PatchEmbed with the cropped 2-D sin-cos
position table, CombinedTimestepTextProjEmbeddings, context_embedder, JointTransformerBlocks
(SD3.5's dual attention `attn2` with 9-chunk adaLN and RMS qk-norm included). norm_out and
proj_out are never used. Parameter names equal diffusers' state-dict keys.

Shapes: latents (B, C, H, W); N = H/p * W/p image tokens; T text tokens; D width.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Optional, Tuple

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn
from mindspore.common.initializer import initializer

from ..core import ops
from ..core.errors import ConfigError, InputError
from ..core.layers import Linear
from .config import SD3BackboneConfig, cut_streams
from .joint import CombinedTimestepTextEmbedding, JointTransformerBlock, run_blocks
from .protocol import PooledTextBackbone      # the Backbone protocol (w-api)


POSITION_TABLE_KEY = "pos_embed.pos_embed"


def sd3_position_rows(rows: np.ndarray, dim: int, max_size: int, base_size: int) -> np.ndarray:
    """Rows of diffusers' full 2-D sin-cos table (flat indices into max_size x max_size), float64.

    As in diffusers: positions are float32 arange(max_size) / (max_size / base_size); row r of
    the table is [sincos(column of r), sincos(grid row of r)], each half [sin(pos * omega),
    cos(pos * omega)] with omega = 1 / 10000^(k / (D/4)) in float64.
    """
    grid = np.arange(max_size, dtype=np.float32) / np.float32(max_size / base_size)
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))

    def sincos(pos: np.ndarray) -> np.ndarray:                       # (M,) -> (M, D/2)
        out = pos.astype(np.float64)[:, None] * omega[None, :]
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    rows = np.asarray(rows, dtype=np.int64)
    return np.concatenate([sincos(grid[rows % max_size]), sincos(grid[rows // max_size])], axis=1)


@lru_cache(maxsize=16)
def sd3_position_table(height: int, width: int, dim: int, max_size: int, base_size: int,
                       stored_dtype: str = "float32") -> np.ndarray:
    """The centre crop of the table for a (height, width) token grid: (1, h*w, D) float32.

    Only the crop is computed (the full table is max_size^2 x D). diffusers saves the table in
    the checkpoint and loads it back, so a bf16 checkpoint's model adds bf16-rounded positions
    even when it computes in fp32: `stored_dtype` reproduces that rounding.
    """
    if height > max_size or width > max_size:
        raise InputError(f"latents give a {height}x{width} token grid; the position table allows "
                         f"at most {max_size}x{max_size} (pos_embed_max_size)")
    top, left = (max_size - height) // 2, (max_size - width) // 2
    rows = ((top + np.arange(height))[:, None] * max_size + (left + np.arange(width))[None, :]).reshape(-1)
    table = sd3_position_rows(rows, dim, max_size, base_size).astype(np.float32)
    return table.astype(np.dtype(stored_dtype)).astype(np.float32).reshape(1, height * width, dim)


def sd3_positions(c: SD3BackboneConfig, height: int, width: int) -> np.ndarray:
    """The cropped position table (1, N, D) for latents (height, width) of transformer config `c`."""
    p = c.patch_size
    if height % p or width % p:
        raise InputError(f"latents height and width must be multiples of the patch size {p}, got {height}x{width}")
    return sd3_position_table(height // p, width // p, c.inner_dim, c.pos_embed_max_size, c.sample_size // p,
                              c.position_table_dtype)


class PatchProjection(nn.Cell):
    """The patch Conv2d as a Linear over flattened patches; weight kept in conv shape (D, C, p, p)."""

    def __init__(self, in_channels: int, dim: int, patch: int):
        super().__init__()
        self.patch = patch
        self.weight = Parameter(initializer("zeros", (dim, in_channels, patch, patch), ms.float32), name="weight")
        self.bias = Parameter(initializer("zeros", (dim,), ms.float32), name="bias")

    def construct(self, latents: Tensor) -> Tensor:
        patches = ops.patchify(latents, self.patch)                  # (B, N, C*p*p)
        return ops.linear(patches, self.weight.reshape(self.weight.shape[0], -1), self.bias)   # (B, N, D)


class PatchEmbed(nn.Cell):
    """diffusers PatchEmbed (pos_embed): patch projection plus the cropped position table."""

    def __init__(self, in_channels: int, dim: int, patch: int):
        super().__init__()
        self.proj = PatchProjection(in_channels, dim, patch)

    def construct(self, latents: Tensor, positions: Tensor) -> Tensor:
        patches = self.proj(latents)                                 # (B, N, D)
        # diffusers adds its float32 table in float32, then casts back.
        patches32 = patches.astype(ms.float32)
        return (patches32 + ops.expand(positions, patches32)).astype(patches.dtype)


class SD3Backbone(PooledTextBackbone, nn.Cell):      # PooledTextBackbone: the Backbone protocol (w-api)
    """Blocks 1..depth of an SD3 transformer, returning temb and the tapped streams.

    Tap depth 0 is the embedded input (patch embedding + positions for image tokens, the
    context_embedder output for text); depth k >= 1 is the stream after block k.
    """

    def __init__(self, bb: SD3BackboneConfig, visual_taps: Tuple[int, ...], text_taps: Tuple[int, ...],
                 guidance_scale: Optional[float] = None, time_convention: str = "reference"):
        super().__init__()
        if guidance_scale is not None or time_convention != "reference":
            raise ConfigError(f"guidance_scale {guidance_scale} / time_convention '{time_convention}': SD3 "
                              "transformers embed no guidance and take the timestep one way only")
        self.config = bb
        self.visual_taps = tuple(visual_taps)
        self.text_taps = tuple(text_taps)
        dim = bb.inner_dim
        self.pos_embed = PatchEmbed(bb.in_channels, dim, bb.patch_size)
        self.time_text_embed = CombinedTimestepTextEmbedding(dim, bb.pooled_projection_dim)
        self.context_embedder = Linear(bb.joint_attention_dim, dim)
        self.transformer_blocks = nn.CellList([
            JointTransformerBlock(dim, bb.num_attention_heads, bb.qk_norm,
                                  dual_attention=i in bb.dual_attention_layers,
                                  image_out=image_out, context_out=context_out)
            for i, (image_out, context_out) in enumerate(cut_streams(self.visual_taps, self.text_taps))])

    def host_inputs(self, height: int, width: int, text_tokens: int, batch: int) -> Tuple[np.ndarray, ...]:
        """Inputs computed on the host for latents (height, width): the cropped position table."""
        return (sd3_positions(self.config, height, width),)

    def construct(self, latents: Tensor, timestep: Tensor, encoder_hidden_states: Tensor,
                  pooled_projections: Tensor, positions: Tensor):
        """latents (B, C, H, W), timestep (B,), encoder_hidden_states (B, T, J), pooled (B, P),
        positions (1, N, D) -> temb (B, D), visual taps ((B, N, D), ...), text taps ((B, T, D), ...)."""
        dtype = latents.dtype
        hidden = self.pos_embed(latents, positions)                          # (B, N, D)
        temb = self.time_text_embed(timestep, pooled_projections.astype(dtype))          # (B, D)
        context = self.context_embedder(encoder_hidden_states.astype(dtype))             # (B, T, D)
        visual, text = run_blocks(self.transformer_blocks, hidden, context, temb, self.visual_taps, self.text_taps)
        return temb, visual, text
