"""The FLUX.1 backbone of a Diffusion-RM: the first double-stream blocks, cut after the deepest tap.

Mirrors diffusers' FluxTransformer2DModel up to double-stream block N: 2x2 latent packing into
x_embedder, the 3-axis rotary embedding of [text ids, image ids], timestep (and, for FLUX.1-dev,
guidance) embeddings, pooled-text projection, context_embedder, FluxTransformerBlocks. The time
and guidance reach the embeddings by one of two conventions: "reference", as the upstream FLUX
reward model calls `time_text_embed` (sigma = timestep / 1000 and the guidance as they are), or
"diffusers", as FluxTransformer2DModel.forward does (both multiplied by 1000). Single-stream blocks, norm_out and proj_out are never
used. Parameter names equal diffusers' state-dict keys.

Shapes: latents (B, 16, H, W) -> packed (B, N = H/2 * W/2, 64); T text tokens; L = T + N; D width;
d = head width.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Optional, Tuple

import numpy as np
from mindspore import Tensor, nn

from ..core import ops
from ..core.errors import ConfigError, InputError
from ..core.layers import Linear
from .config import TIME_SCALES, FluxBackboneConfig, cut_streams
from .joint import CombinedTimestepTextEmbedding, JointTransformerBlock, run_blocks
from .protocol import PooledTextBackbone

ROPE_THETA = 10000.0


@lru_cache(maxsize=16)
def flux_rotary_tables(text_tokens: int, height: int, width: int, axes_dims: Tuple[int, ...]
                       ) -> Tuple[np.ndarray, np.ndarray]:
    """cos, sin (1, T + h*w, 1, d) float32 of FluxPosEmbed for text ids (all zero) then image ids
    (0, row, col) of an h x w token grid: per axis, frequencies 1 / theta^(2i / dim) in float64,
    each repeated for its pair, as diffusers computes them on the CPU."""
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    image_ids = np.stack([np.zeros(height * width), rows.ravel(), cols.ravel()], axis=1)
    ids = np.concatenate([np.zeros((text_tokens, 3)), image_ids]).astype(np.float32)   # (L, 3)
    cos, sin = [], []
    for axis, dim in enumerate(axes_dims):
        freqs = 1.0 / (ROPE_THETA ** (np.arange(0, dim, 2, dtype=np.float64) / dim))    # (dim/2,)
        angles = ids[:, axis].astype(np.float64)[:, None] * freqs[None, :]               # (L, dim/2)
        cos.append(np.repeat(np.cos(angles), 2, axis=1))
        sin.append(np.repeat(np.sin(angles), 2, axis=1))
    shape = (1, ids.shape[0], 1, sum(axes_dims))
    return (np.concatenate(cos, axis=1).astype(np.float32).reshape(shape),
            np.concatenate(sin, axis=1).astype(np.float32).reshape(shape))


class FluxBackbone(PooledTextBackbone, nn.Cell):
    """Double-stream blocks 1..depth of a FLUX.1 transformer, returning temb and the tapped streams.

    Tap depth 0 is the embedded input (x_embedder output for image tokens, context_embedder
    output for text); depth k >= 1 is the stream after block k.
    """

    def __init__(self, bb: FluxBackboneConfig, visual_taps: Tuple[int, ...], text_taps: Tuple[int, ...],
                 guidance_scale: Optional[float] = None, time_convention: str = "reference"):
        super().__init__()
        if time_convention not in TIME_SCALES:
            raise ConfigError(f"time_convention must be one of {sorted(TIME_SCALES)}, got {time_convention!r}")
        self.config = bb
        self.guidance_scale = guidance_scale
        self.time_scale = TIME_SCALES[time_convention]
        self.visual_taps = tuple(visual_taps)
        self.text_taps = tuple(text_taps)
        dim = bb.inner_dim
        self.x_embedder = Linear(bb.in_channels, dim)
        self.time_text_embed = CombinedTimestepTextEmbedding(dim, bb.pooled_projection_dim, guidance=bb.guidance_embeds)
        self.context_embedder = Linear(bb.joint_attention_dim, dim)
        self.transformer_blocks = nn.CellList([
            JointTransformerBlock(dim, bb.num_attention_heads, "rms_norm", image_out=image_out,
                                  context_out=context_out, flux=True)
            for image_out, context_out in cut_streams(self.visual_taps, self.text_taps)])

    @classmethod
    def from_reward_config(cls, config) -> "FluxBackbone":
        """The backbone of a RewardModelConfig, with its guidance scale and time convention."""
        return cls(config.backbone, config.visual_head_idx, config.text_head_idx, config.guidance_scale,
                   config.time_convention)

    def host_inputs(self, height: int, width: int, text_tokens: int, batch: int) -> Tuple[np.ndarray, ...]:
        """Inputs computed on the host: rotary cos, sin of the joint sequence, and the guidance (B,)."""
        if height % 2 or width % 2:
            raise InputError(f"latents height and width must be multiples of the patch size 2 (FLUX packs "
                             f"2x2 patches), got {height}x{width}")
        cos, sin = flux_rotary_tables(text_tokens, height // 2, width // 2, tuple(self.config.axes_dims_rope))
        guidance = np.full(batch, self.guidance_scale or 0.0, dtype=np.float32)
        return cos, sin, guidance

    def construct(self, latents: Tensor, timestep: Tensor, encoder_hidden_states: Tensor,
                  pooled_projections: Tensor, cos: Tensor, sin: Tensor, guidance: Tensor):
        """latents (B, 16, H, W), timestep (B,) = sigma * 1000, encoder_hidden_states (B, T, J),
        pooled (B, P), cos / sin (1, L, 1, d), guidance (B,) -> temb, visual taps, text taps."""
        hidden = self.x_embedder(ops.patchify(latents, 2))                   # (B, N, 64) -> (B, N, D)
        dtype = hidden.dtype
        # Both conventions pass t / 1000 in the hidden dtype; diffusers' forward then scales by 1000.
        timestep = (timestep / 1000).astype(dtype) * self.time_scale
        guidance = guidance.astype(dtype) * self.time_scale
        temb = self.time_text_embed(timestep, pooled_projections.astype(dtype), guidance)   # (B, D)
        context = self.context_embedder(encoder_hidden_states.astype(dtype))                # (B, T, D)
        visual, text = run_blocks(self.transformer_blocks, hidden, context, temb, self.visual_taps,
                                  self.text_taps, (cos, sin))
        return temb, visual, text
