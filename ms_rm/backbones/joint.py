"""The joint (MMDiT / FLUX double-stream) transformer block shared by the SD3 and FLUX backbones,
and the attention that Z-Image's single-stream layers share with it.

Attribute names follow diffusers' modules, so parameter names are the checkpoint's tensor names
and the converter maps nothing. Shapes: B batch, N image tokens, T text tokens, D width,
H heads, d = D / H.
"""

from __future__ import annotations

from typing import Optional

import mindspore as ms
from mindspore import Tensor, mint, nn

from ..core import ops
from ..core.layers import (AdaLNModulation, FeedForward, Linear, MLPEmbedding, RMSNorm, Timesteps,
                           gated_residual, modulate)


class Attention(nn.Cell):
    """diffusers' joint (MMDiT / FLUX double-stream) attention, or plain self-attention.

    joint=True adds the text projections (add_q/k/v_proj, to_add_out): image and text tokens
    attend together as one sequence, [image, text] for SD3 or [text, image] for FLUX
    (`text_first`), and the output is split back. `context_out=False` skips to_add_out when the
    caller will not use the text output. `qk_norm` is None or "rms_norm": per-head RMSNorm, as
    diffusers' RMSNorm (SD3) or, with `torch_qk_norm`, as torch.nn.RMSNorm (FLUX). A `rotary`
    (cos, sin) pair, for the whole joint sequence, rotates q and k after the norm (FLUX,
    Z-Image). `bias=False` drops the projections' biases (Z-Image); a `key_bias` (B, 1, 1, L)
    masks keys (see ops.attention).
    """

    def __init__(self, dim: int, heads: int, joint: bool, qk_norm: Optional[str],
                 context_out: bool = True, eps: float = 1e-6, text_first: bool = False,
                 torch_qk_norm: bool = False, bias: bool = True):
        super().__init__()
        head_dim = dim // heads
        self.heads = heads
        self.joint = joint
        self.context_out = context_out
        self.text_first = text_first
        self.use_qk_norm = qk_norm is not None
        self.chunked = ops.use_cpu_spellings()          # queries in chunks on the CPU (memory at large sizes)
        self.to_q = Linear(dim, dim, bias)
        self.to_k = Linear(dim, dim, bias)
        self.to_v = Linear(dim, dim, bias)
        self.to_out = nn.SequentialCell([Linear(dim, dim, bias)])   # to_out.1 is diffusers' dropout
        if self.use_qk_norm:
            self.norm_q = RMSNorm(head_dim, eps, torch_qk_norm)
            self.norm_k = RMSNorm(head_dim, eps, torch_qk_norm)
        if joint:
            self.add_q_proj = Linear(dim, dim)
            self.add_k_proj = Linear(dim, dim)
            self.add_v_proj = Linear(dim, dim)
            if context_out:
                self.to_add_out = Linear(dim, dim)
            if self.use_qk_norm:
                self.norm_added_q = RMSNorm(head_dim, eps, torch_qk_norm)
                self.norm_added_k = RMSNorm(head_dim, eps, torch_qk_norm)

    def _qkv(self, x: Tensor, to_q, to_k, to_v, norm_q, norm_k):
        """Projections in token-major head layout (B, L, H, d); the qk-norm acts on d there."""
        b, length, _ = x.shape
        q = to_q(x).reshape(b, length, self.heads, -1)
        k = to_k(x).reshape(b, length, self.heads, -1)
        v = to_v(x).reshape(b, length, self.heads, -1)
        if self.use_qk_norm:
            q, k = norm_q(q), norm_k(k)
        return q, k, v

    def construct(self, x: Tensor, context: Optional[Tensor] = None, rotary=None, key_bias=None):
        """x (B, N, D), context (B, T, D) -> out (B, N, D) [, context out (B, T, D) or None]."""
        q, k, v = self._qkv(x, self.to_q, self.to_k, self.to_v,
                            self.norm_q if self.use_qk_norm else None,
                            self.norm_k if self.use_qk_norm else None)          # (B, N, H, d)
        if self.joint:   # one sequence, joined before the heads move to axis 1
            cq, ck, cv = self._qkv(context, self.add_q_proj, self.add_k_proj, self.add_v_proj,
                                   self.norm_added_q if self.use_qk_norm else None,
                                   self.norm_added_k if self.use_qk_norm else None)
            if self.text_first:
                q, k, v = mint.cat([cq, q], dim=1), mint.cat([ck, k], dim=1), mint.cat([cv, v], dim=1)
            else:
                q, k, v = mint.cat([q, cq], dim=1), mint.cat([k, ck], dim=1), mint.cat([v, cv], dim=1)
        if rotary is not None:
            q, k = apply_rotary(q, rotary), apply_rotary(k, rotary)
        q, k, v = ops.heads_first(q), ops.heads_first(k), ops.heads_first(v)      # (B, H, L, d)
        out = ops.merge_heads(ops.attention(q, k, v, key_bias, chunked=self.chunked))   # (B, L, D)
        if not self.joint:
            return self.to_out(out)
        n_text = context.shape[1]
        n_image = x.shape[1]
        image_out = out[:, n_text:] if self.text_first else out[:, :n_image]
        image_out = self.to_out(image_out)
        if not self.context_out:
            return image_out, None
        text_out = out[:, :n_text] if self.text_first else out[:, n_image:]
        return image_out, self.to_add_out(text_out)


def apply_rotary(x: Tensor, rotary) -> Tensor:
    """diffusers' apply_rotary_emb on (B, L, H, d), pairs (2i, 2i+1) rotated, in float32.

    rotary: (cos, sin), each (1, L, 1, d) float32, each frequency repeated for its pair.
    """
    cos, sin = rotary
    b, length, heads, d = x.shape
    x32 = x.astype(ms.float32)
    pairs = x32.reshape(b, length, heads, d // 2, 2)
    rotated = mint.cat([-pairs[..., 1:2], pairs[..., 0:1]], dim=-1).reshape(b, length, heads, d)
    return (x32 * ops.expand(cos, x32) + rotated * ops.expand(sin, x32)).astype(x.dtype)


class CombinedTimestepTextEmbedding(nn.Cell):
    """temb = MLP(sinusoid(t)) [+ MLP(sinusoid(guidance))] + MLP(pooled text): (B,), (B, P) -> (B, D).

    diffusers' CombinedTimestepTextProjEmbeddings (SD3, FLUX without guidance) and, with
    `guidance`, CombinedTimestepGuidanceTextProjEmbeddings (FLUX.1-dev), in their order of sums.
    """

    def __init__(self, dim: int, pooled_dim: int, guidance: bool = False):
        super().__init__()
        self.guidance = guidance
        self.time_proj = Timesteps(256)
        self.timestep_embedder = MLPEmbedding(256, dim)
        if guidance:
            self.guidance_embedder = MLPEmbedding(256, dim)
        self.text_embedder = MLPEmbedding(pooled_dim, dim)

    def construct(self, timestep: Tensor, pooled: Tensor, guidance: Optional[Tensor] = None) -> Tensor:
        emb = self.timestep_embedder(self.time_proj(timestep).astype(pooled.dtype))
        if self.guidance:
            emb = emb + self.guidance_embedder(self.time_proj(guidance).astype(pooled.dtype))
        return emb + self.text_embedder(pooled)


class JointTransformerBlock(nn.Cell):
    """One MMDiT (SD3) or FLUX double-stream block.

    SD3.5's dual attention adds `attn2` over the image stream with a 9-chunk adaLN-Zero. FLUX's
    block is the plain form with the text-first joint sequence, rotary embeddings, torch-style
    qk-norm and an fp16 clip of the text stream (`flux=True`). image_out / context_out False skip
    (and do not hold the weights of) the part whose output nobody reads: attn2 and ff for the
    image stream, to_add_out and ff_context for the text stream; the joint attention itself
    always needs both streams' q, k, v. `context_pre_only` is diffusers' last SD3 block: its text
    stream is only read (AdaLayerNormContinuous: scale and shift from linear(silu(temb))), never
    written.
    """

    def __init__(self, dim: int, heads: int, qk_norm, dual_attention: bool = False,
                 image_out: bool = True, context_out: bool = True, flux: bool = False,
                 context_pre_only: bool = False):
        super().__init__()
        self.dual_attention = dual_attention
        self.image_out = image_out
        self.context_pre_only = context_pre_only
        self.context_out = context_out and not context_pre_only
        context_out = self.context_out
        self.flux = flux
        self.norm1 = AdaLNModulation(dim, 9 if dual_attention else 6)
        self.norm1_context = AdaLNModulation(dim, 2 if context_pre_only else 6)
        self.attn = Attention(dim, heads, joint=True, qk_norm=qk_norm, context_out=context_out,
                              text_first=flux, torch_qk_norm=flux)
        if image_out:
            if dual_attention:
                self.attn2 = Attention(dim, heads, joint=False, qk_norm=qk_norm)
            self.ff = FeedForward(dim)
        if context_out:
            self.ff_context = FeedForward(dim)

    def construct(self, hidden: Tensor, context: Tensor, temb: Tensor, rotary=None):
        """hidden (B, N, D), context (B, T, D), temb (B, D) -> (hidden, context), each maybe None."""
        mod = self.norm1(temb)            # shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp[, msa2 x3]
        c_mod = self.norm1_context(temb)  # the same six for the text stream (context_pre_only: scale, shift)
        c_shift, c_scale = (c_mod[1], c_mod[0]) if self.context_pre_only else (c_mod[0], c_mod[1])
        normed = ops.layer_norm(hidden)
        attn = self.attn(modulate(normed, mod[0], mod[1]), modulate(ops.layer_norm(context), c_shift, c_scale), rotary)
        attn_out = attn[0]
        if self.image_out:
            hidden = gated_residual(hidden, mod[2], attn_out)
            if self.dual_attention:
                hidden = gated_residual(hidden, mod[8], self.attn2(modulate(normed, mod[6], mod[7])))
            hidden = gated_residual(hidden, mod[5], self.ff(modulate(ops.layer_norm(hidden), mod[3], mod[4])))
        else:
            hidden = None
        if self.context_out:
            context = gated_residual(context, c_mod[2], attn[1])
            context = gated_residual(context, c_mod[5],
                                     self.ff_context(modulate(ops.layer_norm(context), c_mod[3], c_mod[4])))
            if self.flux and context.dtype == ms.float16:
                context = mint.clamp(context, -65504.0, 65504.0)
        else:
            context = None
        return hidden, context


def run_blocks(blocks, hidden: Tensor, context: Tensor, temb: Tensor, visual_taps, text_taps, rotary=None):
    """Run the joint blocks, collecting the streams at the tap depths (0: the embedded input).
    -> visual taps ((B, N, D), ...), text taps ((B, T, D), ...)."""
    visual = (hidden,) if 0 in visual_taps else ()
    text = (context,) if 0 in text_taps else ()
    for i, block in enumerate(blocks):
        hidden, context = block(hidden, context, temb, rotary)
        if i + 1 in visual_taps:
            visual = visual + (hidden,)
        if i + 1 in text_taps:
            text = text + (context,)
    return visual, text
