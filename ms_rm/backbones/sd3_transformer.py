"""The SD3 / SD3.5 MMDiT transformer: diffusers' SD3Transformer2DModel, whole or cut after N blocks.

One class serves the generator and the reward model, as diffusers' single SD3Transformer2DModel
does: PatchEmbed with the cropped 2-D sin-cos position table, CombinedTimestepTextProjEmbeddings,
context_embedder, JointTransformerBlocks (SD3.5's dual attention `attn2` with 9-chunk adaLN and
RMS qk-norm included; the last block `context_pre_only`), then AdaLayerNormContinuous
(`norm_out`: scale and shift from linear(silu(temb))), `proj_out` and the inverse of the patch
embedding.

* Whole (`SD3Transformer(config)`, the generator's): every block, norm_out and proj_out;
  latents -> velocity (construct), or temb and the streams after every block (`streams`).
* Cut (`SD3Transformer(config, visual_taps, text_taps)`, the reward backbone's): blocks 1..N
  with N the deepest tap, the last one computing only the streams tapped there; no norm_out,
  no proj_out; latents -> temb and the tapped streams (construct).

Parameter names equal diffusers' state-dict keys.

Shapes: latents (B, C, H, W); N = H/p * W/p image tokens; T text tokens; D width; velocity (B, C', H, W).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Optional, Tuple

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn

from ..core import ops
from ..core.errors import ConfigError, InputError
from ..core.layers import AdaLNModulation, Linear, PatchProjection, modulate
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


def unpatchify(x: Tensor, height: int, width: int, patch: int) -> Tensor:
    """(B, h*w, p*p*C) with (p, p, C) inside each token -> (B, C, h*p, w*p), diffusers' einsum
    "nhwpqc->nchpwq"."""
    b, _, features = x.shape
    channels = features // (patch * patch)
    x = x.reshape(b, height, width, patch, patch, channels).permute(0, 5, 1, 3, 2, 4)   # (B, C, h, p, w, p)
    return x.reshape(b, channels, height * patch, width * patch)


class SD3Transformer(PooledTextBackbone, nn.Cell):      # PooledTextBackbone: the Backbone protocol
    """SD3Transformer2DModel, whole (visual_taps and text_taps None) or cut after its deepest tap.

    Tap depth 0 is the embedded input (patch embedding + positions for image tokens, the
    context_embedder output for text); depth k >= 1 is the stream after block k. The whole
    network taps the image stream after every block and the text stream after every block but
    the last (context_pre_only, whose text output diffusers returns as None). FLUX's options
    (guidance, time convention) never reach it (Backbone.from_reward_config); a config that sets
    them for SD3 is refused by RewardModelConfig.
    """

    def __init__(self, bb: SD3BackboneConfig, visual_taps: Optional[Tuple[int, ...]] = None,
                 text_taps: Optional[Tuple[int, ...]] = None):
        super().__init__()
        if (visual_taps is None) != (text_taps is None):
            raise ConfigError("an SD3 transformer cut takes both visual_taps and text_taps (neither: the whole "
                              "network)")
        self.config = bb
        self.whole = visual_taps is None
        last = bb.num_layers - 1
        if self.whole:
            self.visual_taps = tuple(range(1, bb.num_layers + 1))
            self.text_taps = tuple(range(1, bb.num_layers))
            streams = [(True, True)] * bb.num_layers
        else:
            self.visual_taps, self.text_taps = tuple(visual_taps), tuple(text_taps)
            streams = cut_streams(self.visual_taps, self.text_taps)
        dim = bb.inner_dim
        self.out_channels = bb.out_channels or bb.in_channels
        self.pos_embed = PatchEmbed(bb.in_channels, dim, bb.patch_size)
        self.time_text_embed = CombinedTimestepTextEmbedding(dim, bb.pooled_projection_dim)
        self.context_embedder = Linear(bb.joint_attention_dim, dim)
        self.transformer_blocks = nn.CellList([
            JointTransformerBlock(dim, bb.num_attention_heads, bb.qk_norm, dual_attention=i in bb.dual_attention_layers,
                                  image_out=image_out, context_out=context_out, context_pre_only=i == last)
            for i, (image_out, context_out) in enumerate(streams)])
        if self.whole:
            self.norm_out = AdaLNModulation(dim, 2)
            self.proj_out = Linear(dim, bb.patch_size * bb.patch_size * self.out_channels)

    def positions(self, height: int, width: int) -> np.ndarray:
        """The cropped position table (1, N, D) of latents (height, width), computed on the host."""
        return sd3_positions(self.config, height, width)

    def host_inputs(self, height: int, width: int, text_tokens: int, batch: int) -> Tuple[np.ndarray, ...]:
        """Inputs computed on the host for latents (height, width): the cropped position table."""
        return (self.positions(height, width),)

    def streams(self, latents: Tensor, timestep: Tensor, encoder_hidden_states: Tensor, pooled_projections: Tensor,
                positions: Tensor) -> Tuple[Tensor, Tuple[Tensor, ...], Tuple[Tensor, ...]]:
        """latents (B, C, H, W), timestep (B,), encoder_hidden_states (B, T, J), pooled (B, P),
        positions (1, N, D) -> temb (B, D), the image stream at the visual taps ((B, N, D), ...)
        and the text stream at the text taps ((B, T, D), ...)."""
        dtype = latents.dtype
        hidden = self.pos_embed(latents, positions)                                      # (B, N, D)
        temb = self.time_text_embed(timestep, pooled_projections.astype(dtype))          # (B, D)
        context = self.context_embedder(encoder_hidden_states.astype(dtype))             # (B, T, D)
        visual, text = run_blocks(self.transformer_blocks, hidden, context, temb, self.visual_taps, self.text_taps)
        return temb, visual, text

    def construct(self, latents: Tensor, timestep: Tensor, encoder_hidden_states: Tensor, pooled_projections: Tensor,
                  positions: Tensor):
        """Whole: the velocity (B, C', H, W) (timestep in 0..1000). Cut: temb and the tapped
        streams, as `streams`."""
        temb, visual, text = self.streams(latents, timestep, encoder_hidden_states, pooled_projections, positions)
        if not self.whole:
            return temb, visual, text
        return self.output(visual[-1], temb, latents.shape[2], latents.shape[3])

    def output(self, hidden: Tensor, temb: Tensor, height: int, width: int) -> Tensor:
        """norm_out, proj_out, unpatchify (whole network only): the last image stream (B, N, D) -> (B, C', H, W)."""
        scale, shift = self.norm_out(temb)
        hidden = self.proj_out(modulate(ops.layer_norm(hidden), shift, scale))          # (B, N, p*p*C')
        p = self.config.patch_size
        return unpatchify(hidden, height // p, width // p, p)


# The reward backbone's name: the same class, built with taps.
SD3Backbone = SD3Transformer
