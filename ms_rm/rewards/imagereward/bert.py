"""BLIP's text encoder: BERT (post-norm layers) whose every layer also attends to the image
(or, built without an image width, the text-only encoder of med.py's mode='text').

The package's med.py BertModel in "multimodal" mode, as ImageReward calls it: word embeddings plus
learned absolute positions (no token-type embeddings), LayerNorm; each layer runs self-attention
over the prompt (padding masked by adding -10000 to its scores), cross-attention from the prompt to
the image features (keys and values projected from the image width), and the GELU (erf)
feed-forward, each followed by dropout (inactive), a residual add and LayerNorm. No pooler.
Parameter names are the package's (`encoder.layer.0.crossattention.self.key.weight`, ...).
Shapes: B batch, L prompt tokens, N image tokens, D text width, E image width.
"""

from __future__ import annotations

from typing import Optional

import mindspore as ms
from mindspore import Parameter, Tensor, nn
from mindspore.common.initializer import initializer

from ...core import ops
from ...core.layers import LayerNorm, Linear
from .config import TextConfig

MASKED = -10000.0            # what med.py adds to the scores of padding tokens


class Embeddings(nn.Cell):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.word_embeddings = _Table(config.vocab_size, config.width)
        self.position_embeddings = _Table(config.max_positions, config.width)
        self.LayerNorm = LayerNorm(config.width, config.eps)

    def construct(self, input_ids: Tensor) -> Tensor:
        words = ops.embedding(self.word_embeddings.weight, input_ids)               # (B, L, D)
        positions = self.position_embeddings.weight[:input_ids.shape[1]]           # (L, D)
        return self.LayerNorm(words + ops.expand(positions[None], words))


class _Table(nn.Cell):
    """An embedding table (rows, width) under torch's name `weight`."""

    def __init__(self, rows: int, width: int):
        super().__init__()
        self.weight = Parameter(initializer("zeros", (rows, width), ms.float32), name="weight")


class SelfAttention(nn.Cell):
    """query from the prompt; key and value from the prompt, or from the image (`kv_width` = E)."""

    def __init__(self, width: int, heads: int, kv_width: int):
        super().__init__()
        self.heads = heads
        self.query = Linear(width, width)
        self.key = Linear(kv_width, width)
        self.value = Linear(kv_width, width)

    def construct(self, x: Tensor, context: Tensor, bias: Optional[Tensor]) -> Tensor:
        q = ops.split_heads(self.query(x), self.heads)                              # (B, H, L, d)
        k = ops.split_heads(self.key(context), self.heads)                          # (B, H, L or N, d)
        v = ops.split_heads(self.value(context), self.heads)
        return ops.merge_heads(ops.attention(q, k, v, bias))                        # (B, L, D)


class Output(nn.Cell):
    """dense -> (dropout) -> LayerNorm(residual + .)."""

    def __init__(self, in_width: int, width: int, eps: float):
        super().__init__()
        self.dense = Linear(in_width, width)
        self.LayerNorm = LayerNorm(width, eps)

    def construct(self, x: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class Attention(nn.Cell):
    def __init__(self, config: TextConfig, kv_width: int):
        super().__init__()
        self.self = SelfAttention(config.width, config.heads, kv_width)
        self.output = Output(config.width, config.width, config.eps)

    def construct(self, x: Tensor, context: Tensor, bias: Optional[Tensor]) -> Tensor:
        return self.output(self.self(x, context, bias), x)


class Intermediate(nn.Cell):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.dense = Linear(config.width, config.intermediate)

    def construct(self, x: Tensor) -> Tensor:
        return ops.gelu(self.dense(x), approximate=False)


class Layer(nn.Cell):
    """image_width None: med.py's mode='text' (no cross-attention, and no parameters for it)."""

    def __init__(self, config: TextConfig, image_width: Optional[int]):
        super().__init__()
        self.attention = Attention(config, config.width)
        self.cross = image_width is not None
        if self.cross:
            self.crossattention = Attention(config, image_width)
        self.intermediate = Intermediate(config)
        self.output = Output(config.intermediate, config.width, config.eps)

    def construct(self, x: Tensor, bias: Tensor, image: Optional[Tensor]) -> Tensor:
        x = self.attention(x, x, bias)                       # the prompt, padding masked
        if self.cross:
            x = self.crossattention(x, image, None)          # every image token is attended
        return self.output(self.intermediate(x), x)


class Encoder(nn.Cell):
    def __init__(self, config: TextConfig, image_width: Optional[int]):
        super().__init__()
        self.layer = nn.CellList([Layer(config, image_width) for _ in range(config.layers)])

    def construct(self, x: Tensor, bias: Tensor, image: Tensor) -> Tensor:
        for layer in self.layer:
            x = layer(x, bias, image)
        return x


class TextEncoder(nn.Cell):
    """input_ids (B, L) int, attention_mask (B, L) (1 = token), image features (B, N, E) -> (B, L, D).

    image_width None builds the text-only encoder (med.py's mode='text', as BLIP's contrastive text
    features and the BLIP score use it): no cross-attention layers; call it with image=None."""

    def __init__(self, config: TextConfig, image_width: Optional[int]):
        super().__init__()
        self.embeddings = Embeddings(config)
        self.encoder = Encoder(config, image_width)

    def construct(self, input_ids: Tensor, attention_mask: Tensor, image: Optional[Tensor] = None) -> Tensor:
        x = self.embeddings(input_ids)
        mask = attention_mask.astype(ms.float32)
        bias = ((1.0 - mask) * MASKED).reshape(mask.shape[0], 1, 1, mask.shape[1])     # (B, 1, 1, L)
        return self.encoder(x, bias, None if image is None else image.astype(x.dtype))
