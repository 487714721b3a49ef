"""The full SD3 / SD3.5 transformer: every MMDiT block, norm_out, proj_out and unpatchify.

Mirrors diffusers' SD3Transformer2DModel.forward (no ControlNet, no skipped layers): the reward
backbone's embeddings and blocks (ms_rm.backbones), all `num_layers` of them, the last one
`context_pre_only`; then AdaLayerNormContinuous (`norm_out`: scale and shift from
linear(silu(temb))), `proj_out` and the inverse of the patch embedding. Parameter names equal
diffusers' state-dict keys.

Shapes: latents (B, C, H, W); N = H/p * W/p tokens; T text tokens; D width; velocity (B, C', H, W).
"""

from __future__ import annotations

from typing import Tuple

import numpy as np
from mindspore import Tensor, nn

from ..backbones.config import SD3BackboneConfig
from ..backbones.joint import CombinedTimestepTextEmbedding, JointTransformerBlock
from ..backbones.sd3 import PatchEmbed, sd3_positions
from ..core import ops
from ..core.layers import AdaLNModulation, Linear, modulate


def unpatchify(x: Tensor, height: int, width: int, patch: int) -> Tensor:
    """(B, h*w, p*p*C) with (p, p, C) inside each token -> (B, C, h*p, w*p), diffusers' einsum
    "nhwpqc->nchpwq"."""
    b, _, features = x.shape
    channels = features // (patch * patch)
    x = x.reshape(b, height, width, patch, patch, channels).permute(0, 5, 1, 3, 2, 4)   # (B, C, h, p, w, p)
    return x.reshape(b, channels, height * patch, width * patch)


class SD3Transformer(nn.Cell):
    """SD3Transformer2DModel: latents, timestep, prompt embeddings -> velocity (the flow's model output)."""

    def __init__(self, bb: SD3BackboneConfig):
        super().__init__()
        self.config = bb
        dim, last = bb.inner_dim, bb.num_layers - 1
        self.out_channels = bb.out_channels or bb.in_channels
        self.pos_embed = PatchEmbed(bb.in_channels, dim, bb.patch_size)
        self.time_text_embed = CombinedTimestepTextEmbedding(dim, bb.pooled_projection_dim)
        self.context_embedder = Linear(bb.joint_attention_dim, dim)
        self.transformer_blocks = nn.CellList([
            JointTransformerBlock(dim, bb.num_attention_heads, bb.qk_norm, dual_attention=i in bb.dual_attention_layers,
                                  context_pre_only=i == last)
            for i in range(bb.num_layers)])
        self.norm_out = AdaLNModulation(dim, 2)
        self.proj_out = Linear(dim, bb.patch_size * bb.patch_size * self.out_channels)

    def positions(self, height: int, width: int) -> np.ndarray:
        """The cropped position table (1, N, D) of latents (height, width), computed on the host."""
        return sd3_positions(self.config, height, width)

    def blocks(self, latents: Tensor, timestep: Tensor, encoder_hidden_states: Tensor, pooled: Tensor,
               positions: Tensor) -> Tuple[Tensor, Tuple[Tensor, ...], Tuple[Tensor, ...]]:
        """-> temb (B, D), the image stream after every block ((B, N, D), ...) and the text stream
        after every block but the last ((B, T, D), ...; the last, context_pre_only, returns none,
        as diffusers' returns None)."""
        dtype = latents.dtype
        hidden = self.pos_embed(latents, positions)                                     # (B, N, D)
        temb = self.time_text_embed(timestep, pooled.astype(dtype))                      # (B, D)
        context = self.context_embedder(encoder_hidden_states.astype(dtype))            # (B, T, D)
        image, text = (), ()
        for block in self.transformer_blocks:
            hidden, context = block(hidden, context, temb)
            image = image + (hidden,)
            if not block.context_pre_only:
                text = text + (context,)
        return temb, image, text

    def construct(self, latents: Tensor, timestep: Tensor, encoder_hidden_states: Tensor, pooled: Tensor,
                  positions: Tensor) -> Tensor:
        """latents (B, C, H, W), timestep (B,) in 0..1000, encoder_hidden_states (B, T, J), pooled (B, P),
        positions (1, N, D) -> velocity (B, C', H, W)."""
        temb, image, _ = self.blocks(latents, timestep, encoder_hidden_states, pooled, positions)
        return self.output(image[-1], temb, latents.shape[2], latents.shape[3])

    def output(self, hidden: Tensor, temb: Tensor, height: int, width: int) -> Tensor:
        """norm_out, proj_out, unpatchify: the last image stream (B, N, D) -> (B, C', H, W)."""
        scale, shift = self.norm_out(temb)
        hidden = self.proj_out(modulate(ops.layer_norm(hidden), shift, scale))          # (B, N, p*p*C')
        p = self.config.patch_size
        return unpatchify(hidden, height // p, width // p, p)
