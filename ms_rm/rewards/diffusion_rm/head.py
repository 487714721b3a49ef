"""The released Diffusion-RM reward head, in MindSpore.

FiLM adapters per tap -> view tokens; learned queries -> V-gated cross attention over visual
and text tokens -> visual-only refine -> FFN -> Linear -> mean over queries. Parameter names
equal the reference head's state-dict keys (`rm_head.pt`).

Shapes: B batch, Nv visual tokens, Nt text tokens, D backbone width, E temb width (D, or 256 for
Z-Image), W head width, F = W // 4 adapter output, Q queries.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, mint, nn
from mindspore.common.initializer import initializer

from ...core import ops
from ...core.layers import GELU, Linear, RMSNorm, SiLU, modulate
from .config import RewardModelConfig


# The head's norms are torch.nn.RMSNorm(width) with eps=None. torch (2.5 and later, so the
# reference's 2.6 too) then upcasts fp16/bf16 inputs to float32 and uses float32's machine
# epsilon whatever the input dtype: eps is 2^-23 at every precision.
HEAD_NORM_EPS = float(np.finfo(np.float32).eps)


def head_norm(width: int) -> RMSNorm:
    return RMSNorm(width, HEAD_NORM_EPS, scale_in_float32=True)


def mlp(dim_in: int, hidden: int, dim_out: int) -> nn.SequentialCell:
    """Linear -> SiLU -> Linear, its Linears named 0 and 2 like the reference's nn.Sequential."""
    return nn.SequentialCell([Linear(dim_in, hidden), SiLU(), Linear(hidden, dim_out)])


class FiLMAdapter(nn.Cell):
    """x (B, L, D) conditioned on temb (B, E) -> (B, L, F)."""

    def __init__(self, dim: int, width: int, use_proj_in: bool, temb_dim: int):
        super().__init__()
        self.has_proj_in = use_proj_in or dim != width
        if self.has_proj_in:
            self.proj_in = Linear(dim, width)
        self.layer_embed = Parameter(initializer("zeros", (1, 1, width), ms.float32), name="layer_embed")
        self.cond_mlp = mlp(temb_dim, 2 * width, 2 * width)
        self.proj = Linear(width, width // 4)

    def construct(self, x: Tensor, temb: Tensor) -> Tensor:
        if self.has_proj_in:
            x = self.proj_in(x)                                          # (B, L, W)
        gamma, beta = mint.chunk(self.cond_mlp(temb), 2, dim=-1)         # (B, E) -> (B, W) each
        x = modulate(x, beta, gamma)
        x = x + ops.expand(self.layer_embed, x)
        return self.proj(x)                                              # (B, L, F)


class CrossAttention(nn.Cell):
    """Queries attend to visual tokens and, with `use_text`, separately to text tokens.

    The two softmax attentions are summed, projected by to_out and added to the queries.
    With `gated`, each context token's value is scaled by sigmoid(MLP(token)).
    """

    def __init__(self, width: int, heads: int, use_text: bool, gated: bool):
        super().__init__()
        self.heads = heads
        self.use_text = use_text
        self.gated = gated
        self.norm_q = head_norm(width)
        self.norm_v = head_norm(width)
        self.to_q = Linear(width, width)
        self.to_k_vis = Linear(width, width)
        self.to_v_vis = Linear(width, width)
        if gated:
            self.gate_vis = mlp(width, width, 1)
        if use_text:
            self.norm_t = head_norm(width)
            self.to_k_text = Linear(width, width)
            self.to_v_text = Linear(width, width)
            if gated:
                self.gate_text = mlp(width, width, 1)
        self.to_out = nn.SequentialCell([Linear(width, width)])  # to_out.1 is dropout

    def _branch(self, q: Tensor, context: Tensor, to_k, to_v, gate) -> Tensor:
        value = to_v(context)                                            # (B, L, W)
        if self.gated:
            value = value * ops.expand(ops.sigmoid(gate(context)), value)   # gate (B, L, 1)
        return ops.attention(q, ops.split_heads(to_k(context), self.heads),
                             ops.split_heads(value, self.heads))         # (B, H, Q, W/H)

    def construct(self, queries: Tensor, visual: Tensor, text: Optional[Tensor] = None) -> Tensor:
        """queries (B, Q, W), visual (B, Nv, W), text (B, Nt, W) -> (B, Q, W)."""
        q = ops.split_heads(self.to_q(self.norm_q(queries)), self.heads)
        out = self._branch(q, self.norm_v(visual), self.to_k_vis, self.to_v_vis,
                           self.gate_vis if self.gated else None)
        if self.use_text:
            out = out + self._branch(q, self.norm_t(text), self.to_k_text, self.to_v_text,
                                     self.gate_text if self.gated else None)
        return queries + self.to_out(ops.merge_heads(out))


class RewardHead(nn.Cell):
    """Tapped backbone streams + temb -> raw reward (B, out_dim)."""

    def __init__(self, config: RewardModelConfig):
        super().__init__()
        dim, width, head = config.backbone.inner_dim, config.width, config.head
        temb_dim = config.backbone.temb_dim                  # the reference's t_embed_dim
        features = width // 4
        n_visual, n_text = len(config.visual_head_idx), len(config.text_head_idx)
        self.layer_adapters_visual = nn.CellList(
            [FiLMAdapter(dim, width, head.use_proj_in, temb_dim) for _ in range(n_visual)])
        self.layer_adapters_text = nn.CellList(
            [FiLMAdapter(dim, width, head.use_proj_in, temb_dim) for _ in range(n_text)])
        self.agg_visual = Linear(n_visual * features, width)
        self.agg_text = Linear(n_text * features, width)
        self.query_tokens = Parameter(initializer("zeros", (1, head.num_queries, width), ms.float32),
                                      name="query_tokens")
        self.attn1 = CrossAttention(width, head.num_attn_heads, use_text=True, gated=True)
        self.attn2 = CrossAttention(width, head.num_attn_heads, use_text=False, gated=False)
        self.norm_ff = head_norm(width)
        # ff.3 is the reference's dropout.
        self.ff = nn.SequentialCell([Linear(width, 4 * width), GELU(approximate=False),
                                     Linear(4 * width, width), nn.Identity()])
        self.head = Linear(width, head.out_dim)

    def view_tokens(self, visual: Sequence[Tensor], text: Sequence[Tensor], temb: Tensor
                    ) -> Tuple[Tensor, Tensor]:
        """Taps + temb -> visual tokens (B, Nv, W), text tokens (B, Nt, W)."""
        vis = mint.cat([a(x, temb) for a, x in zip(self.layer_adapters_visual, visual)], dim=-1)
        txt = mint.cat([a(x, temb) for a, x in zip(self.layer_adapters_text, text)], dim=-1)
        return self.agg_visual(vis), self.agg_text(txt)

    def pool(self, visual_tokens: Tensor, text_tokens: Tensor) -> Tensor:
        """View tokens -> raw reward (B, out_dim)."""
        batch = visual_tokens.shape[0]
        queries = mint.broadcast_to(self.query_tokens, (batch,) + self.query_tokens.shape[1:])
        queries = self.attn1(queries, visual_tokens, text_tokens)
        queries = self.attn2(queries, visual_tokens)
        queries = queries + self.ff(self.norm_ff(queries))               # (B, Q, W)
        return mint.mean(self.head(queries), dim=1)                      # (B, out_dim)

    def construct(self, visual: Sequence[Tensor], text: Sequence[Tensor], temb: Tensor) -> Tensor:
        return self.pool(*self.view_tokens(visual, text, temb))
