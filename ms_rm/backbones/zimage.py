"""The Z-Image backbone of a Diffusion-RM: the refiners and the first main layers, cut after the deepest tap.

Mirrors what the upstream Z-Image reward model computes with diffusers' ZImageTransformer2DModel
modules: per sample, the 2x2 image patches (channels last) through all_x_embedder["2-1"] and the
caption features through cap_embedder, each padded to a multiple of 32 with the learned
x_pad_token / cap_pad_token; the noise refiner over the image tokens and the context refiner
over the caption tokens; then the main layers over [image, caption] of each sample. The time
input is t = (1000 - timestep) / 1000 (= 1 - sigma) times t_scale; temb is the 256-wide adaLN
input. Parameter names equal diffusers' state-dict keys; all_final_layer is never used.

Batches are padded the way the reference pads them: captions of different lengths are
zero-padded to the longest, those rows are masked out as attention keys and carry zero rotary
tables, and the text tap of each sample is everything after its image tokens, so a shorter
caption's tap also holds the layers' output at the batch-padding rows, as in the reference.

Shapes: latents (B, C, H, W); N = H/2 * W/2 image tokens, Nx = N padded to 32; caption lengths
T_i, padded C_i, Cmax = max C_i; D width; d = D / heads.
"""

from __future__ import annotations

from typing import Any, ClassVar, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, mint, nn
from mindspore.common.initializer import initializer

from ..core import ops
from ..core.errors import InputError
from ..core.inputs import variable_length_text
from ..core.layers import Linear, RMSNorm, SiLU, Timesteps
from .config import ZImageBackboneConfig
from .joint import Attention

QK_NORM_EPS = 1e-5                   # diffusers builds the qk-norm with eps 1e-5 whatever norm_eps says
TIME_EMBED_HIDDEN = 1024             # t_embedder's hidden width, fixed in diffusers


def padded(length: int, multiple: int = ZImageBackboneConfig.SEQ_MULTIPLE) -> int:
    return -(-length // multiple) * multiple


def _rotary(positions: np.ndarray, axes_dims: Sequence[int], theta: float) -> Tuple[np.ndarray, np.ndarray]:
    """cos, sin (..., d) of integer positions (..., 3), each frequency repeated for its pair, as
    diffusers' RopeEmbedder tabulates them: angles in float64 rounded to float32, then cos / sin."""
    cos, sin = [], []
    for axis, dim in enumerate(axes_dims):
        freqs = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))          # (dim/2,)
        angles = (positions[..., axis:axis + 1].astype(np.float64) * freqs).astype(np.float32)
        cos.append(np.repeat(np.cos(angles.astype(np.float64)), 2, axis=-1))
        sin.append(np.repeat(np.sin(angles.astype(np.float64)), 2, axis=-1))
    return (np.concatenate(cos, axis=-1).astype(np.float32), np.concatenate(sin, axis=-1).astype(np.float32))


def zimage_host_inputs(height: int, width: int, lengths: Tuple[int, ...], axes_dims: Tuple[int, ...],
                       axes_lens: Tuple[int, ...], theta: float) -> Tuple[np.ndarray, ...]:
    """The per-batch tables of latents (height, width) (in latent pixels) and caption lengths T_i:

    cap_pad (B, Cmax, 1): 1 at the learned-pad rows T_i <= j < C_i;
    cap_valid (B, Cmax, 1): 1 at the rows j < C_i (caption and its pad tokens), 0 at batch padding;
    cap_bias (B, 1, 1, Cmax): 0 / -inf key mask of the caption sequence;
    x_cos, x_sin (B, Nx, 1, d); cap_cos, cap_sin (B, Cmax, 1, d): rotary tables. Positions
    (axis 0, row, col): caption token j -> (1 + j, 0, 0); image token (r, c) -> (C_i + 1, r, c);
    image pad tokens -> (0, 0, 0); batch padding -> a zero table.
    """
    rows, cols = height // 2, width // 2
    n = rows * cols
    nx, caps = padded(n), [padded(t) for t in lengths]
    cmax, batch = max(caps), len(lengths)
    if max(caps) + 1 >= axes_lens[0] or rows > axes_lens[1] or cols > axes_lens[2]:
        raise InputError(f"a {rows}x{cols} token grid after a caption padded to {max(caps)} tokens needs rotary "
                         f"positions up to ({max(caps) + 1}, {rows - 1}, {cols - 1}); the transformer's axes_lens "
                         f"{list(axes_lens)} allow fewer: use shorter captions or smaller latents")
    cap_pad = np.zeros((batch, cmax, 1), np.float32)
    cap_valid = np.zeros((batch, cmax, 1), np.float32)
    cap_pos = np.zeros((batch, cmax, 3), np.int64)
    x_pos = np.zeros((batch, nx, 3), np.int64)
    grid_r, grid_c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    for i, (t, c) in enumerate(zip(lengths, caps)):
        cap_pad[i, t:c] = 1
        cap_valid[i, :c] = 1
        cap_pos[i, :c, 0] = 1 + np.arange(c)
        x_pos[i, :n] = np.stack([np.full(n, c + 1), grid_r.ravel(), grid_c.ravel()], axis=1)
    x_cos, x_sin = _rotary(x_pos, axes_dims, theta)                       # (B, Nx, d)
    cap_cos, cap_sin = _rotary(cap_pos, axes_dims, theta)                 # (B, Cmax, d)
    cap_cos, cap_sin = cap_cos * cap_valid, cap_sin * cap_valid           # batch padding: zero table
    cap_bias = np.where(cap_valid[:, None, None, :, 0] > 0, 0.0, -np.inf).astype(np.float32)
    return (cap_pad, cap_valid, cap_bias, x_cos[:, :, None], x_sin[:, :, None], cap_cos[:, :, None],
            cap_sin[:, :, None])


def pack_captions(captions: Sequence[np.ndarray]) -> np.ndarray:
    """Per-sample caption features (T_i, F) -> (B, Cmax, F) float32: sample i's tokens first, then
    zeros (the rows past T_i are replaced by the pad token or masked out inside)."""
    cmax = max(padded(len(c)) for c in captions)
    packed = np.zeros((len(captions), cmax, captions[0].shape[1]), np.float32)
    for i, caption in enumerate(captions):
        packed[i, :len(caption)] = caption
    return packed


class CaptionTextBackbone:
    """Text as Z-Image takes it: per-sample caption features (T_i, cap_feat_dim), given as a list or
    padded (B, T, cap_feat_dim) with encoder_attention_mask (B, T); no pooled vector. The host
    inputs depend on (H, W, the caption lengths)."""

    text_inputs: ClassVar[Tuple[str, ...]] = ("encoder_hidden_states",)
    optional_text_inputs: ClassVar[Tuple[str, ...]] = ("encoder_attention_mask",)

    @classmethod
    def from_reward_config(cls, config: Any):
        return cls(config.backbone, config.visual_head_idx, config.text_head_idx)

    def check_text(self, batch: int, encoder_hidden_states: Any, pooled_projections: Any = None,
                   encoder_attention_mask: Any = None, check_values: bool = True) -> Dict[str, Any]:
        captions = variable_length_text(encoder_hidden_states, encoder_attention_mask, pooled_projections, batch,
                                        self.config.cap_feat_dim, check_values)
        return {"encoder_hidden_states": captions}

    def text_tensors(self, text: Mapping[str, Any], height: int, width: int) -> Tuple[Tuple[Tensor, ...], Tuple]:
        captions: Sequence[np.ndarray] = text["encoder_hidden_states"]
        return (Tensor(pack_captions(captions)),), (height, width, tuple(len(c) for c in captions))

    def noise_groups(self, text: Mapping[str, Any]) -> List[bytes]:
        """Equal caption features mean the same prompt."""
        return [np.asarray(t).tobytes() for t in text["encoder_hidden_states"]]


class SwiGLU(nn.Cell):
    """Z-Image's FeedForward: w2(silu(w1 x) * w3 x), no biases."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = Linear(dim, hidden, bias=False)
        self.w2 = Linear(hidden, dim, bias=False)
        self.w3 = Linear(dim, hidden, bias=False)

    def construct(self, x: Tensor) -> Tensor:
        return self.w2(ops.silu(self.w1(x)) * self.w3(x))


class ZImageBlock(nn.Cell):
    """One ZImageTransformerBlock: RMS-normed self-attention with rotary q/k and a SwiGLU, each
    sandwiched between two RMSNorms; with `modulation`, scaled by 1 + scale and gated by
    tanh(gate) from Linear(adaln) (no SiLU before it)."""

    def __init__(self, c: ZImageBackboneConfig, modulation: bool):
        super().__init__()
        dim = c.dim
        self.modulation = modulation
        self.attention = Attention(dim, c.n_heads, joint=False, qk_norm="rms_norm" if c.qk_norm else None,
                                   eps=QK_NORM_EPS, bias=False)
        self.feed_forward = SwiGLU(dim, int(dim / 3 * 8))
        self.attention_norm1 = RMSNorm(dim, c.norm_eps)
        self.ffn_norm1 = RMSNorm(dim, c.norm_eps)
        self.attention_norm2 = RMSNorm(dim, c.norm_eps)
        self.ffn_norm2 = RMSNorm(dim, c.norm_eps)
        if modulation:
            self.adaLN_modulation = nn.SequentialCell([Linear(c.temb_dim, 4 * dim)])

    def construct(self, x: Tensor, key_bias: Optional[Tensor], rotary, adaln: Optional[Tensor] = None) -> Tensor:
        """x (B, L, D), key_bias (B, 1, 1, L) or None, rotary (cos, sin) (B, L, 1, d), adaln (B, A)."""
        if not self.modulation:
            x = x + self.attention_norm2(self.attention(self.attention_norm1(x), None, rotary, key_bias))
            return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))
        scale_msa, gate_msa, scale_mlp, gate_mlp = mint.chunk(self.adaLN_modulation(adaln), 4, dim=1)  # (B, D)
        scaled = self.attention_norm1(x) * ops.expand((1.0 + scale_msa)[:, None], x)
        attn = self.attention_norm2(self.attention(scaled, None, rotary, key_bias))
        x = x + ops.expand(ops.tanh(gate_msa)[:, None], x) * attn
        ff = self.ffn_norm2(self.feed_forward(self.ffn_norm1(x) * ops.expand((1.0 + scale_mlp)[:, None], x)))
        return x + ops.expand(ops.tanh(gate_mlp)[:, None], x) * ff


class TimestepEmbedder(nn.Cell):
    """sinusoid(t) (cos first, 256 channels) -> mlp.0 -> SiLU -> mlp.2: (B,) -> (B, A)."""

    def __init__(self, out_dim: int):
        super().__init__()
        self.time_proj = Timesteps(256)
        self.mlp = nn.SequentialCell([Linear(256, TIME_EMBED_HIDDEN), SiLU(), Linear(TIME_EMBED_HIDDEN, out_dim)])

    def construct(self, t: Tensor, dtype) -> Tensor:
        return self.mlp(self.time_proj(t).astype(dtype))


class ZImageBackbone(CaptionTextBackbone, nn.Cell):
    """Refiners and main layers 1..depth of a Z-Image transformer, returning temb and the tapped
    image and caption parts of the unified sequence (depth k >= 1: after main layer k)."""

    def __init__(self, bb: ZImageBackboneConfig, visual_taps: Tuple[int, ...], text_taps: Tuple[int, ...]):
        super().__init__()
        self.config = bb
        self.visual_taps = tuple(visual_taps)
        self.text_taps = tuple(text_taps)
        self.t_scale = bb.t_scale
        dim = bb.dim
        patch, frames = bb.PATCH
        self.patch_key = f"{patch}-{frames}"
        self.all_x_embedder = nn.CellDict({self.patch_key: Linear(frames * patch * patch * bb.in_channels, dim)})
        self.noise_refiner = nn.CellList([ZImageBlock(bb, modulation=True) for _ in range(bb.n_refiner_layers)])
        self.context_refiner = nn.CellList([ZImageBlock(bb, modulation=False) for _ in range(bb.n_refiner_layers)])
        self.t_embedder = TimestepEmbedder(bb.temb_dim)
        self.cap_embedder = nn.SequentialCell([RMSNorm(bb.cap_feat_dim, bb.norm_eps), Linear(bb.cap_feat_dim, dim)])
        self.x_pad_token = Parameter(initializer("zeros", (1, dim), ms.float32), name="x_pad_token")
        self.cap_pad_token = Parameter(initializer("zeros", (1, dim), ms.float32), name="cap_pad_token")
        depth = max(self.visual_taps + self.text_taps)
        self.layers = nn.CellList([ZImageBlock(bb, modulation=True) for _ in range(depth)])

    def host_inputs(self, height: int, width: int, lengths: Tuple[int, ...]) -> Tuple[np.ndarray, ...]:
        """The tables of `zimage_host_inputs` for latents (height, width) and caption lengths."""
        if height % 2 or width % 2:
            raise InputError(f"latents height and width must be multiples of the patch size 2, got {height}x{width}")
        c = self.config
        return zimage_host_inputs(height, width, tuple(lengths), tuple(c.axes_dims), tuple(c.axes_lens),
                                  c.rope_theta)

    def construct(self, latents: Tensor, timestep: Tensor, caption: Tensor, cap_pad: Tensor, cap_valid: Tensor,
                  cap_bias: Tensor, x_cos: Tensor, x_sin: Tensor, cap_cos: Tensor, cap_sin: Tensor):
        """latents (B, C, H, W), timestep (B,) = sigma * 1000, caption (B, Cmax, cap_feat_dim) (rows past
        T_i ignored), tables from host_inputs -> temb (B, A), visual taps ((B, Nx, D), ...), text taps
        ((B, Cmax, D), ...)."""
        dtype = latents.dtype
        t = (1000.0 - timestep.astype(ms.float32)) / 1000.0 * self.t_scale        # (B,)
        adaln = self.t_embedder(t, dtype)                                         # (B, A)

        x = self.all_x_embedder[self.patch_key](ops.patchify(latents, 2, channels_last=True))   # (B, N, D)
        batch, n, dim = x.shape
        nx = x_cos.shape[1]
        if nx > n:
            x = mint.cat([x, mint.broadcast_to(self.x_pad_token, (batch, nx - n, dim))], dim=1)   # (B, Nx, D)
        x_rotary = (x_cos, x_sin)
        for layer in self.noise_refiner:
            x = layer(x, None, x_rotary, adaln)

        pad, valid = cap_pad.astype(dtype), cap_valid.astype(dtype)
        cap = self.cap_embedder(caption.astype(dtype))                            # (B, Cmax, D)
        cap = (cap * (1.0 - pad) + ops.expand(self.cap_pad_token[None], cap) * pad) * valid
        cap_rotary = (cap_cos, cap_sin)
        for layer in self.context_refiner:
            cap = layer(cap, cap_bias, cap_rotary, None)
        cap = cap * valid                                 # the reference re-pads with zeros after the refiner

        unified = mint.cat([x, cap], dim=1)                                       # (B, Nx + Cmax, D)
        rotary = (mint.cat([x_cos, cap_cos], dim=1), mint.cat([x_sin, cap_sin], dim=1))
        bias = mint.cat([mint.zeros((batch, 1, 1, nx), dtype=ms.float32), cap_bias], dim=-1)
        visual, text = (), ()
        for i, layer in enumerate(self.layers):
            unified = layer(unified, bias, rotary, adaln)
            if i + 1 in self.visual_taps:
                visual = visual + (unified[:, :nx],)
            if i + 1 in self.text_taps:
                text = text + (unified[:, nx:],)
        return adaln, visual, text
