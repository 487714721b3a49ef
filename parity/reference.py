"""The torch reference of Diffusion-RM, for parity.

* The backbone is diffusers' own SD3Transformer2DModel, cut after N blocks (wrapped by peft
  when a LoRA is active), so every number on this side comes from diffusers' code. FLUX and
  Z-Image run diffusers' modules the way the upstream reward models call them (FluxCut,
  ZImageCut: written by us from the reference's model files, whose conventions they state).
* The reward head is ours, written in torch from the spec (the Diffusion-RM spec,
  section 3) with the module names of the released `rm_head.pt`, so reference checkpoints
  load into it unchanged.
* The u -> sigma lookup reads diffusers' FlowMatchEulerDiscreteScheduler table.

Shapes: B batch, N image tokens, T text tokens, D backbone width, W head width, Q queries.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


# --- reward head ---------------------------------------------------------------------------
class FiLMLayerAdapter(nn.Module):
    def __init__(self, dim: int, width: int, use_proj_in: bool, temb_dim: int):
        super().__init__()
        self.proj_in = nn.Linear(dim, width) if (use_proj_in or dim != width) else nn.Identity()
        self.layer_embed = nn.Parameter(torch.zeros(1, 1, width))
        self.cond_mlp = nn.Sequential(nn.Linear(temb_dim, 2 * width), nn.SiLU(), nn.Linear(2 * width, 2 * width))
        self.proj = nn.Linear(width, width // 4)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        x = self.proj_in(x)                                            # (B, L, W)
        gamma, beta = self.cond_mlp(temb).chunk(2, dim=-1)             # (B, W) each
        x = x * (1 + gamma[:, None]) + beta[:, None]
        return self.proj(x + self.layer_embed)                         # (B, L, W/4)


class CrossAttnBlockVGated(nn.Module):
    def __init__(self, width: int, heads: int, use_text: bool, gated: bool, dropout: float = 0.0):
        super().__init__()
        self.heads = heads
        self.norm_q = nn.RMSNorm(width)     # eps=None: machine epsilon of the input dtype
        self.norm_v = nn.RMSNorm(width)
        self.norm_t = nn.RMSNorm(width) if use_text else None
        self.to_q = nn.Linear(width, width)
        self.to_k_vis = nn.Linear(width, width)
        self.to_v_vis = nn.Linear(width, width)
        self.to_k_text = nn.Linear(width, width) if use_text else None
        self.to_v_text = nn.Linear(width, width) if use_text else None
        self.to_out = nn.Sequential(nn.Linear(width, width), nn.Dropout(dropout))

        def gate():
            return nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 1))

        self.gate_vis = gate() if gated else None
        self.gate_text = gate() if (gated and use_text) else None

    def _attend(self, q, k, v):
        b = q.shape[0]
        split = lambda x: x.view(b, x.shape[1], self.heads, -1).transpose(1, 2)   # (B, H, L, d)
        out = F.scaled_dot_product_attention(split(q), split(k), split(v))
        return out.transpose(1, 2).reshape(b, q.shape[1], -1)

    def _branch(self, q, context, to_k, to_v, gate):
        value = to_v(context)
        if gate is not None:
            value = value * torch.sigmoid(gate(context))               # (B, L, 1) gate
        return self._attend(q, to_k(context), value)

    def forward(self, queries, visual, text=None):
        q = self.to_q(self.norm_q(queries))
        out = self._branch(q, self.norm_v(visual), self.to_k_vis, self.to_v_vis, self.gate_vis)
        if self.to_k_text is not None and text is not None:
            out = out + self._branch(q, self.norm_t(text), self.to_k_text, self.to_v_text, self.gate_text)
        return queries + self.to_out(out)


class RewardHead(nn.Module):
    def __init__(self, dim: int, n_visual: int, n_text: int, width: int = -1, out_dim: int = 1,
                 num_queries: int = 4, num_attn_heads: int = 8, dropout: float = 0.0,
                 use_proj_in: bool = False, temb_dim: Optional[int] = None, **ignored):
        super().__init__()
        width = dim if width == -1 else width
        features = width // 4
        temb_dim = temb_dim or dim           # the upstream models pass t_embed_dim = their temb width
        self.layer_adapters_visual = nn.ModuleList(
            [FiLMLayerAdapter(dim, width, use_proj_in, temb_dim) for _ in range(n_visual)])
        self.layer_adapters_text = nn.ModuleList(
            [FiLMLayerAdapter(dim, width, use_proj_in, temb_dim) for _ in range(n_text)])
        self.agg_visual = nn.Linear(n_visual * features, width)
        self.agg_text = nn.Linear(n_text * features, width)
        self.query_tokens = nn.Parameter(torch.zeros(1, num_queries, width))
        self.attn1 = CrossAttnBlockVGated(width, num_attn_heads, use_text=True, gated=True, dropout=dropout)
        self.attn2 = CrossAttnBlockVGated(width, num_attn_heads, use_text=False, gated=False, dropout=dropout)
        self.norm_ff = nn.RMSNorm(width)
        self.ff = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width),
                                nn.Dropout(dropout))
        self.head = nn.Linear(width, out_dim)

    def view_tokens(self, visual: Sequence[torch.Tensor], text: Sequence[torch.Tensor], temb):
        vis = torch.cat([a(x, temb) for a, x in zip(self.layer_adapters_visual, visual)], dim=-1)
        txt = torch.cat([a(x, temb) for a, x in zip(self.layer_adapters_text, text)], dim=-1)
        return self.agg_visual(vis), self.agg_text(txt)                # (B, Nv, W), (B, Nt, W)

    def pool(self, visual_tokens, text_tokens):
        queries = self.query_tokens.expand(visual_tokens.shape[0], -1, -1)
        queries = self.attn1(queries, visual_tokens, text_tokens)
        queries = self.attn2(queries, visual_tokens)
        queries = queries + self.ff(self.norm_ff(queries))
        return self.head(queries).mean(dim=1)                          # (B, out_dim)

    def forward(self, visual, text, temb):
        return self.pool(*self.view_tokens(visual, text, temb))


# --- backbone: diffusers' transformer cut after N blocks ------------------------------------
class SD3Cut(nn.Module):
    """pos_embed, time_text_embed, context_embedder and transformer_blocks[:N] of a diffusers
    SD3Transformer2DModel, returning temb and the streams at the tap depths."""

    def __init__(self, transformer, num_layers: int, visual_taps: Sequence[int], text_taps: Sequence[int]):
        super().__init__()
        self.pos_embed = transformer.pos_embed
        self.time_text_embed = transformer.time_text_embed
        self.context_embedder = transformer.context_embedder
        self.transformer_blocks = nn.ModuleList(transformer.transformer_blocks[:num_layers])
        self.visual_taps, self.text_taps = list(visual_taps), list(text_taps)

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep):
        hidden = self.pos_embed(hidden_states)
        temb = self.time_text_embed(timestep, pooled_projections)
        context = self.context_embedder(encoder_hidden_states)
        visual = [hidden] if 0 in self.visual_taps else []
        text = [context] if 0 in self.text_taps else []
        for i, block in enumerate(self.transformer_blocks):
            context, hidden = block(hidden_states=hidden, encoder_hidden_states=context, temb=temb)
            if i + 1 in self.visual_taps:
                visual.append(hidden)
            if i + 1 in self.text_taps:
                text.append(context)
        return temb, visual, text


REFERENCE_FLUX_GUIDANCE = 3.5        # the upstream FLUX reward model's hard-coded guidance


class FluxCut(nn.Module):
    """The double-stream part of a diffusers FluxTransformer2DModel, cut after N blocks.

    Takes SD3-style inputs (16-channel latents, timestep = sigma * 1000), packs them 2x2 with zero
    text ids and (0, row, col) image ids, and calls diffusers' modules block by block. The time
    and guidance reach `time_text_embed` by `time_convention`:
    * "reference", written from the upstream FLUX reward model (HKUST-C4G/diffusion-rm,
      diffusion_rm/models/flux_rm.py, FLUXBackbone.forward and FLUXRewardModel.forward): the
      scheduler timestep / 1000 in float32, cast to the hidden dtype, and the guidance as a
      one-element tensor, neither multiplied by 1000; the guidance is 3.5 whatever the config
      says (that code hard-codes it);
    * "diffusers": FluxPipeline's t / 1000 and a full guidance vector, both multiplied by 1000 in
      the hidden dtype as FluxTransformer2DModel.forward does.
    """

    def __init__(self, transformer, num_layers: int, visual_taps: Sequence[int], text_taps: Sequence[int],
                 guidance_scale: Optional[float], time_convention: str = "reference"):
        super().__init__()
        self.time_convention = time_convention
        self.x_embedder = transformer.x_embedder
        self.time_text_embed = transformer.time_text_embed
        self.context_embedder = transformer.context_embedder
        self.pos_embed = transformer.pos_embed
        self.transformer_blocks = nn.ModuleList(transformer.transformer_blocks[:num_layers])
        self.visual_taps, self.text_taps = list(visual_taps), list(text_taps)
        if not transformer.config.guidance_embeds:
            self.guidance_scale = None
        elif time_convention == "reference":
            self.guidance_scale = REFERENCE_FLUX_GUIDANCE
        else:
            self.guidance_scale = guidance_scale

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep):
        b, c, h, w = hidden_states.shape
        packed = hidden_states.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
        packed = packed.reshape(b, (h // 2) * (w // 2), c * 4)               # FluxPipeline._pack_latents
        image_ids = torch.zeros(h // 2, w // 2, 3)
        image_ids[..., 1] += torch.arange(h // 2)[:, None]
        image_ids[..., 2] += torch.arange(w // 2)[None, :]
        text_ids = torch.zeros(encoder_hidden_states.shape[1], 3)
        hidden = self.x_embedder(packed)
        if self.time_convention == "reference":
            timestep = (timestep.float() / 1000.0).to(hidden.dtype)
            guidance = torch.tensor([self.guidance_scale or 0.0]).to(hidden.dtype)     # shape (1,), broadcast
        else:
            timestep = (timestep.to(packed.dtype) / 1000).to(hidden.dtype) * 1000    # pipeline t / 1000, model x 1000
            guidance = torch.full([1], self.guidance_scale or 0.0, dtype=torch.float32).expand(b)
            guidance = guidance.to(hidden.dtype) * 1000
        if self.guidance_scale is not None:
            temb = self.time_text_embed(timestep, guidance, pooled_projections)
        else:
            temb = self.time_text_embed(timestep, pooled_projections)
        context = self.context_embedder(encoder_hidden_states)
        rotary = self.pos_embed(torch.cat((text_ids, image_ids.reshape(-1, 3)), dim=0))
        visual = [hidden] if 0 in self.visual_taps else []
        text = [context] if 0 in self.text_taps else []
        for i, block in enumerate(self.transformer_blocks):
            context, hidden = block(hidden_states=hidden, encoder_hidden_states=context, temb=temb,
                                    image_rotary_emb=rotary)
            if i + 1 in self.visual_taps:
                visual.append(hidden)
            if i + 1 in self.text_taps:
                text.append(context)
        return temb, visual, text


class ZImageCut(nn.Module):
    """A diffusers ZImageTransformer2DModel run as the upstream Z-Image reward model runs it
    (HKUST-C4G/diffusion-rm, diffusion_rm/models/zimage_rm.py ZImageRewardModel.forward and
    zimage_transformers.py ZImageBackbone.forward), written by us from those steps:

    t = (1000 - timestep) / 1000, times t_scale, through t_embedder: temb (the adaLN input).
    Latents become one-frame images; diffusers' patchify_and_embed pads image and caption tokens to
    multiples of 32 and builds their RoPE position ids; the embedded pads become x_pad_token /
    cap_pad_token; batches are zero-padded with boolean key masks; noise refiner on the images,
    context refiner on the captions, then the main layers on [image_i, caption_i] of each sample.
    After main layer k in the taps: the visual tap is each sample's first len(image_i) rows and
    the text tap every row after them (batch padding included), each zero-padded across the batch.

    The module holds what the reference's backbone holds (all_final_layer too), so its state dict
    has the keys of a reference full_model.pt.
    """

    def __init__(self, transformer, num_layers: int, visual_taps: Sequence[int], text_taps: Sequence[int]):
        super().__init__()
        for name in ("all_x_embedder", "all_final_layer", "noise_refiner", "context_refiner", "t_embedder",
                     "cap_embedder"):
            setattr(self, name, getattr(transformer, name))
        self.x_pad_token = transformer.x_pad_token
        self.cap_pad_token = transformer.cap_pad_token
        self.layers = nn.ModuleList(transformer.layers[:num_layers])
        self.t_scale = transformer.t_scale
        self.rope_embedder = transformer.rope_embedder                      # not a module: no parameters
        self.patchify_and_embed = transformer.patchify_and_embed           # diffusers' own method
        self.visual_taps, self.text_taps = list(visual_taps), list(text_taps)

    @staticmethod
    def _batch(rows: List[torch.Tensor]):
        """Zero-padded (B, L, ...) and the boolean key mask (B, L) of per-sample sequences."""
        from torch.nn.utils.rnn import pad_sequence

        mask = torch.zeros(len(rows), max(len(r) for r in rows), dtype=torch.bool)
        for i, r in enumerate(rows):
            mask[i, :len(r)] = True
        return pad_sequence(rows, batch_first=True, padding_value=0.0), mask

    def _embed(self, tokens: List[torch.Tensor], pads: List[torch.Tensor], embedder, pad_token, pos_ids):
        lengths = [len(t) for t in tokens]
        flat = embedder(torch.cat(tokens, dim=0))
        flat[torch.cat(pads)] = pad_token
        freqs = self.rope_embedder(torch.cat(pos_ids, dim=0)).split(lengths, dim=0)
        return list(flat.split(lengths, dim=0)), list(freqs)

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep):
        t = (1000 - timestep) / 1000.0 * self.t_scale
        adaln = self.t_embedder(t)
        images = list(hidden_states.unsqueeze(2).unbind(dim=0))             # (C, 1, H, W) each
        x, caps, _, x_pos, cap_pos, x_pads, cap_pads = self.patchify_and_embed(
            images, list(encoder_hidden_states), 2, 1)
        x, x_freqs = self._embed(x, x_pads, self.all_x_embedder["2-1"], self.x_pad_token, x_pos)
        adaln = adaln.type_as(x[0])
        x_lens = [len(r) for r in x]
        x, x_mask = self._batch(x)
        x_freqs = self._batch(x_freqs)[0]
        for layer in self.noise_refiner:
            x = layer(x, x_mask, x_freqs, adaln)
        caps, cap_freqs = self._embed(caps, cap_pads, self.cap_embedder, self.cap_pad_token, cap_pos)
        cap_lens = [len(r) for r in caps]
        cap, cap_mask = self._batch(caps)
        cap_freqs_b = self._batch(cap_freqs)[0]
        for layer in self.context_refiner:
            cap = layer(cap, cap_mask, cap_freqs_b)
        unified, mask = self._batch([torch.cat([x[i, :x_lens[i]], cap[i, :cap_lens[i]]]) for i in range(len(x_lens))])
        freqs = self._batch([torch.cat([x_freqs[i, :x_lens[i]], cap_freqs[i]]) for i in range(len(x_lens))])[0]
        visual, text = [], []
        for k, layer in enumerate(self.layers, start=1):
            unified = layer(unified, mask, freqs, adaln)
            if k in self.visual_taps:
                visual.append(self._batch([unified[i, :n] for i, n in enumerate(x_lens)])[0])
            if k in self.text_taps:
                text.append(self._batch([unified[i, n:] for i, n in enumerate(x_lens)])[0])
        return adaln, visual, text


def transformer_class(config: dict):
    """diffusers' transformer class for a config, and the cut that wraps it."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, ZImageTransformer2DModel

    name = config.get("_class_name", "SD3Transformer2DModel")
    if name == "FluxTransformer2DModel":
        return FluxTransformer2DModel, FluxCut
    if name == "ZImageTransformer2DModel":
        return ZImageTransformer2DModel, ZImageCut
    return SD3Transformer2DModel, SD3Cut


def widths(transformer) -> Tuple[int, int]:
    """(token width, temb width) of a diffusers transformer: the reward head's token_dim and t_embed_dim."""
    from diffusers import ZImageTransformer2DModel

    if isinstance(transformer, ZImageTransformer2DModel):
        return transformer.dim, min(transformer.dim, 256)
    return transformer.inner_dim, transformer.inner_dim


def cut_backbone(transformer, model_cfg: dict, time_convention: str = "reference"):
    """The reward model's backbone: the cut of `transformer` that the reference config describes
    (FLUX: with the time convention asked for, see FluxCut)."""
    from diffusers import FluxTransformer2DModel, ZImageTransformer2DModel

    args = (transformer, model_cfg["num_transformer_layers"], model_cfg["visual_head_idx"], model_cfg["text_head_idx"])
    if isinstance(transformer, FluxTransformer2DModel):
        return FluxCut(*args, model_cfg.get("guidance_scale"), time_convention)
    if isinstance(transformer, ZImageTransformer2DModel):
        return ZImageCut(*args)
    return SD3Cut(*args)


class TorchRewardModel(nn.Module):
    """backbone (maybe peft-wrapped) + reward_head (+ eta3, eta4): the reference's module layout,
    so its state dict has the keys of a reference full_model.pt."""

    def __init__(self, backbone: nn.Module, reward_head: RewardHead, use_logistic: bool):
        super().__init__()
        self.backbone = backbone
        self.reward_head = reward_head
        self.use_logistic = use_logistic
        if use_logistic:
            self.eta3 = nn.Parameter(torch.tensor(0.0))
            self.eta4 = nn.Parameter(torch.tensor(0.15))

    def squash(self, raw):
        if not self.use_logistic:
            return raw
        return (2.0 - (-2.0)) / (1 + torch.exp(-(raw - self.eta3) / (torch.abs(self.eta4) + 1e-6))) + (-2.0)

    def features(self, latents, noise, sigma, timestep, encoder_hidden_states, pooled_projections,
                 add_noise: bool, dtype: torch.dtype):
        x = latents.float()
        if add_noise:
            s = sigma.float().view(-1, 1, 1, 1)
            x = (1.0 - s) * x + s * noise.float()
        if isinstance(encoder_hidden_states, (list, tuple)):          # Z-Image: one (T_i, F) per sample
            encoder_hidden_states = [e.to(dtype) for e in encoder_hidden_states]
        else:
            encoder_hidden_states = encoder_hidden_states.to(dtype)
        pooled = None if pooled_projections is None else pooled_projections.to(dtype)
        return self.backbone(x.to(dtype), encoder_hidden_states, pooled, timestep)

    def stages(self, latents, noise, sigma, timestep, encoder_hidden_states, pooled_projections,
               add_noise: bool = True, dtype: torch.dtype = torch.float32,
               visual_taps: Sequence[int] = (), text_taps: Sequence[int] = ()) -> Dict[str, np.ndarray]:
        """Every stage as float32 numpy arrays, named as DiffusionRM.reward_stages names them."""
        temb, visual, text = self.features(latents, noise, sigma, timestep, encoder_hidden_states,
                                           pooled_projections, add_noise, dtype)
        raw = self.reward_head(visual, text, temb)
        out = {"sigma": sigma, "timestep": timestep, "temb": temb}
        out.update({f"visual_tap_{k}": t for k, t in zip(visual_taps, visual)})
        out.update({f"text_tap_{k}": t for k, t in zip(text_taps, text)})
        out.update(raw=raw, reward=self.squash(raw))
        return {k: v.detach().float().cpu().numpy() for k, v in out.items()}

    def ensemble(self, latents, noises, sigmas, timesteps, encoder_hidden_states, pooled_projections,
                 add_noise: bool = True, dtype: torch.dtype = torch.float32) -> np.ndarray:
        """forward_ensemble: per level tokens with that level's temb, concatenated, pooled once."""
        vis_all, txt_all = [], []
        for noise, sigma, timestep in zip(noises, sigmas, timesteps):
            temb, visual, text = self.features(latents, noise, sigma, timestep, encoder_hidden_states,
                                               pooled_projections, add_noise, dtype)
            vis, txt = self.reward_head.view_tokens(visual, text, temb)
            vis_all.append(vis)
            txt_all.append(txt)
        raw = self.reward_head.pool(torch.cat(vis_all, dim=1), torch.cat(txt_all, dim=1))
        return self.squash(raw).detach().float().cpu().numpy()


# --- noise levels, as the reference code computes them ----------------------------------------
def scheduler_table(scheduler_config: dict):
    """(sigmas, timesteps) of diffusers' FlowMatchEulerDiscreteScheduler built from the config."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    return scheduler.sigmas, scheduler.timesteps


def lookup_u(scheduler_config: dict, u: Sequence[float], convention: str):
    """The reference's u -> (sigma, timestep): nearest sigma ("sigma") or row int(u*n) ("index")."""
    sigmas, timesteps = scheduler_table(scheduler_config)
    u = torch.tensor(list(u), dtype=torch.float32)
    if convention == "sigma":
        idx = torch.argmin((sigmas[None, :] - u[:, None]).abs(), dim=1)
    else:
        idx = (u * len(sigmas)).long()
    return sigmas[idx], timesteps[idx]


def as_torch(array: np.ndarray, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    return tensor if dtype is None else tensor.to(dtype)


# --- loading a reference checkpoint the way the reference's inferencer does ------------------
def load_reference_model(src: str, transformer_dir: str, scheduler_path: str, config: Optional[str] = None,
                         time_convention: str = "reference"):
    """(TorchRewardModel, rm_config, scheduler_config) from reference-format files on disk.

    diffusers loads the base transformer, peft loads the adapter (active, not merged), the head
    and full_model.pt load with load_state_dict(strict=True); in LoRA and head mode eta3/eta4
    stay at their init values, as in the reference.
    """
    import json
    import os

    from ms_rm.io.files import read_config_file
    from ms_rm.rewards.diffusion_rm.conversion import FULL, LORA, checkpoint_mode

    config_path = config or os.path.join(src, "config.json")
    ckpt = src if config else os.path.join(src, "checkpoint")
    rm_config = read_config_file(config_path)
    mode = checkpoint_mode(rm_config, config_path)
    if os.path.isdir(os.path.join(transformer_dir, "transformer")) and \
            not os.path.isfile(os.path.join(transformer_dir, "config.json")):
        transformer_dir = os.path.join(transformer_dir, "transformer")
    if os.path.isdir(scheduler_path):
        scheduler_path = os.path.join(scheduler_path, "scheduler_config.json")
    with open(scheduler_path) as f:
        scheduler_config = json.load(f)
    with open(os.path.join(transformer_dir, "config.json")) as f:
        cls, _ = transformer_class(json.load(f))
    if mode == FULL:
        transformer = cls.from_config(cls.load_config(transformer_dir))
    else:
        transformer = cls.from_pretrained(transformer_dir, torch_dtype=torch.float32)
    model_cfg = rm_config["model"]
    backbone = cut_backbone(transformer, model_cfg, time_convention)
    if mode == LORA:
        from peft import PeftModel

        backbone = PeftModel.from_pretrained(backbone, os.path.join(ckpt, "backbone_lora"))
    dim, temb_dim = widths(transformer)
    head = RewardHead(dim, len(model_cfg["visual_head_idx"]), len(model_cfg["text_head_idx"]),
                      temb_dim=temb_dim, **dict(model_cfg.get("reward_head", {})))
    model = TorchRewardModel(backbone, head, model_cfg.get("use_logistic", False))
    if mode == FULL:
        model.load_state_dict(torch.load(os.path.join(ckpt, "full_model.pt"), map_location="cpu",
                                         weights_only=True))
    else:
        state = torch.load(os.path.join(ckpt, "rm_head.pt"), map_location="cpu", weights_only=True)
        head.load_state_dict({k: v.float() for k, v in state.items()})
    return model.float().eval(), rm_config, scheduler_config
