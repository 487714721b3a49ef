"""BLIP's image encoder: a ViT with a class token, learned positions, pre-norm blocks.

Parameter names are the package's (`patch_embed.proj.weight`, `blocks.3.attn.qkv.weight`, ...),
so the converter only strips the `blip.visual_encoder.` prefix. Shapes: B batch, N = 1 + patches,
D width.
"""

from __future__ import annotations

import mindspore as ms
from mindspore import Parameter, Tensor, mint, nn
from mindspore.common.initializer import initializer

from ...core import ops
from ...core.layers import LayerNorm, Linear, PatchProjection
from .config import VisionConfig


class PatchEmbed(nn.Cell):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.proj = PatchProjection(3, config.width, config.patch_size)

    def construct(self, x: Tensor) -> Tensor:
        return self.proj(x)


class Attention(nn.Cell):
    """Self-attention with one fused qkv projection (q, k, v in that order along the output)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = Linear(width, 3 * width)
        self.proj = Linear(width, width)

    def construct(self, x: Tensor) -> Tensor:
        q, k, v = mint.chunk(self.qkv(x), 3, dim=-1)                            # 3 x (B, N, D)
        out = ops.attention(ops.split_heads(q, self.heads), ops.split_heads(k, self.heads),
                            ops.split_heads(v, self.heads))                      # (B, H, N, d)
        return self.proj(ops.merge_heads(out))


class Mlp(nn.Cell):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = Linear(width, hidden)
        self.fc2 = Linear(hidden, width)

    def construct(self, x: Tensor) -> Tensor:
        return self.fc2(ops.gelu(self.fc1(x), approximate=False))


class Block(nn.Cell):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.norm1 = LayerNorm(config.width, config.eps)
        self.attn = Attention(config.width, config.heads)
        self.norm2 = LayerNorm(config.width, config.eps)
        self.mlp = Mlp(config.width, config.mlp_width)

    def construct(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Cell):
    """Normalised pixels (B, 3, S, S) -> image features (B, 1 + (S/p)^2, D), after the final norm."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.patch_embed = PatchEmbed(config)
        self.cls_token = Parameter(initializer("zeros", (1, 1, config.width), ms.float32), name="cls_token")
        self.pos_embed = Parameter(initializer("zeros", (1, config.tokens, config.width), ms.float32),
                                   name="pos_embed")
        self.blocks = nn.CellList([Block(config) for _ in range(config.layers)])
        self.norm = LayerNorm(config.width, config.eps)

    def construct(self, pixels: Tensor) -> Tensor:
        x = self.patch_embed(pixels)                                            # (B, P, D)
        x = mint.cat([ops.expand(self.cls_token, x[:, :1]), x], dim=1)      # (B, N, D)
        x = x + ops.expand(self.pos_embed, x)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)
