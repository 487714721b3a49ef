"""The built-in parity cases: one line each, tiny models built on the spot.

Every case builds a random reference model (diffusers transformer + our torch head [+ peft
LoRA]), saves it in the reference's on-disk formats, converts it with ms_rm, and compares the
two sides stage by stage on the same inputs and the same noise.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

# A tiny SD3.5-Medium: dual attention in the first blocks, RMS qk-norm. D = 4 heads x 16.
TINY_SD35 = {"_class_name": "SD3Transformer2DModel", "sample_size": 32, "patch_size": 2, "in_channels": 16,
             "num_layers": 4, "attention_head_dim": 16, "num_attention_heads": 4, "joint_attention_dim": 48,
             "caption_projection_dim": 64, "pooled_projection_dim": 40, "out_channels": 16,
             "pos_embed_max_size": 24, "dual_attention_layers": [0, 1, 2], "qk_norm": "rms_norm"}
TINY_SD3 = dict(TINY_SD35, dual_attention_layers=[], qk_norm=None)
# SD3.5-Medium's real width, heads, embedding sizes and position table; 3 blocks instead of 24.
SD35M_WIDTH = {"_class_name": "SD3Transformer2DModel", "sample_size": 128, "patch_size": 2, "in_channels": 16,
               "num_layers": 3, "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096,
               "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "out_channels": 16,
               "pos_embed_max_size": 384, "dual_attention_layers": [0, 1, 2], "qk_norm": "rms_norm"}
MODEL = {"num_transformer_layers": 3, "visual_head_idx": [1, 2, 3], "text_head_idx": [1, 2, 3],
         "use_logistic": False, "use_text_features": True, "lora_config": {"r": 4, "lora_alpha": 8},
         "reward_head": {"width": -1, "out_dim": 1, "num_queries": 4, "num_attn_heads": 4, "dropout": 0.0,
                         "use_proj_in": False}}
SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
# A tiny FLUX.1-dev: guidance embedding, 3-axis RoPE (sizes sum to the head width 16). D = 4 x 16.
TINY_FLUX_DEV = {"_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": 64, "num_layers": 3,
                 "num_single_layers": 1, "attention_head_dim": 16, "num_attention_heads": 4, "joint_attention_dim": 48,
                 "pooled_projection_dim": 40, "guidance_embeds": True, "axes_dims_rope": [4, 6, 6]}
TINY_FLUX_SCHNELL = dict(TINY_FLUX_DEV, guidance_embeds=False)
# FLUX.1's scheduler shifts dynamically: its __init__ table is unshifted.
FLUX_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
                  "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
                  "max_image_seq_len": 4096}

# A tiny Z-Image: refiners, RMS qk-norm, 3-axis RoPE (8 + 20 + 20 = head width 48), caption width 48.
# D = 288 = 6 x 48, wider than temb (min(dim, 256) = 256) as in the release; axes_lens leave room for
# captions up to 158 padded tokens.
TINY_ZIMAGE = {"_class_name": "ZImageTransformer2DModel", "all_patch_size": [2], "all_f_patch_size": [1],
               "in_channels": 16, "dim": 288, "n_layers": 4, "n_refiner_layers": 2, "n_heads": 6, "n_kv_heads": 6,
               "norm_eps": 1e-5, "qk_norm": True, "cap_feat_dim": 48, "rope_theta": 256.0, "t_scale": 1000.0,
               "axes_dims": [8, 20, 20], "axes_lens": [160, 32, 32]}
ZIMAGE_HEAD = {"reward_head": {"width": 48, "num_attn_heads": 4, "use_proj_in": True}}


@dataclass(frozen=True)
class Case:
    name: str
    description: str
    transformer: dict = field(default_factory=lambda: TINY_SD35)
    model: dict = field(default_factory=dict)          # overrides of MODEL
    mode: str = "lora"                                 # checkpoint mode: lora, full, head
    lora: dict = field(default_factory=dict)           # overrides of the reference's LoraConfig
    add_noise: bool = True
    u: Tuple[float, ...] = (0.4, 0.9)
    u_convention: str = "sigma"
    time_convention: str = "reference"                 # FLUX: ms-rm convert --time-convention, FluxCut's too
    ensemble: Optional[Tuple[float, ...]] = None       # noise levels of reward_ensemble
    latent_hw: Tuple[int, int] = (16, 12)
    text_tokens: int = 7                               # Z-Image: sample i gets max(1, text_tokens - 30 i)
    batch: int = 2
    base_dtype: str = "fp32"                           # dtype the transformer is saved in
    shard_size: Optional[str] = None                   # diffusers max_shard_size
    storage: str = "keep"                              # ms-rm convert --dtype
    scheduler: dict = field(default_factory=lambda: SCHEDULER)
    slow: bool = False
    reward_model: str = "diffusion-rm"                 # the registry name (ms_rm.REWARD_MODELS) it covers
    matrix_scale: float = 1.0                          # the backbone's matrices x this (builders.randomize_)
    qk_norm_scale: float = 1.0                         # its RMS qk-norm weights x this (builders.build_reference)

    def rm_config(self) -> dict:
        model = copy.deepcopy(MODEL)
        for key, value in self.model.items():
            if isinstance(value, dict):
                model[key] = dict(model[key], **value)
            else:
                model[key] = value
        return {"model": model, "training": {"add_noise": self.add_noise}}


CASES: Dict[str, Case] = {c.name: c for c in [
    Case("tiny-sd35", "SD3.5-style (dual attention, RMS qk-norm), LoRA checkpoint"),
    Case("tiny-sd35-large-weights", "tiny-sd35 with every backbone matrix 3x the builder's N(0, 1/fan_in) (5.2x "
         "torch's default init, which diffusers keeps) and the RMS qk-norm weights 3x (which would otherwise keep "
         "the attention logits where they were): activations, modulations and logits reach the large inputs of "
         "every op", matrix_scale=3.0, qk_norm_scale=3.0),
    Case("tiny-sd3", "SD3-style (no dual attention, no qk-norm), full_model.pt", transformer=TINY_SD3, mode="full"),
    Case("logistic", "logistic squash, eta3/eta4 read from full_model.pt", model={"use_logistic": True}, mode="full"),
    Case("logistic-lora", "logistic squash, eta3/eta4 at init (LoRA checkpoints lack them)",
         model={"use_logistic": True}),
    Case("depth0-tap", "taps at depth 0 (embedded input), frozen backbone: rm_head.pt only",
         model={"visual_head_idx": [0, 2, 3], "text_head_idx": [0, 3]}, mode="head"),
    Case("last-block-visual", "deepest tap visual only: the last block skips its text stream and the "
         "reference's LoRA excludes its add_*/to_add_out",
         model={"visual_head_idx": [1, 3], "text_head_idx": [2]}),
    Case("ensemble", "three noise levels, tokens of all levels pooled in one head pass", ensemble=(0.2, 0.5, 0.7)),
    Case("lora-rslora-exclude", "rsLoRA, an exclude list, rank and alpha patterns",
         lora={"use_rslora": True, "rank_pattern": {"to_q": 2, "attn2.to_v": 6}, "alpha_pattern": {"add_k_proj": 3},
               "exclude_modules": ["transformer_blocks.0.attn.to_k", "transformer_blocks.2.attn.add_q_proj"]}),
    Case("index-u", "u convention 'index' (u=0.9 -> sigma 0.25)", u=(0.9, 0.99), u_convention="index"),
    Case("no-noise", "training.add_noise=false: clean latents go in at the timestep of u", add_noise=False),
    Case("bf16-sharded", "bf16 base transformer in shards, merged LoRA stored fp32",
         base_dtype="bf16", shard_size="60KB", storage="fp32"),
    Case("sd35m-width", "SD3.5-M width and heads (1536 = 24 x 64, 8 head heads), 2 blocks, 8x8 latents",
         transformer=SD35M_WIDTH, latent_hw=(8, 8), text_tokens=11,
         model={"num_transformer_layers": 2, "visual_head_idx": [1, 2], "text_head_idx": [2],
                "lora_config": {"r": 8, "lora_alpha": 16}, "reward_head": {"num_attn_heads": 8}},
         batch=1, slow=True),
    Case("tiny-flux-dev", "FLUX.1-dev-style as the upstream FLUX reward model computes it (sigma and guidance 3.5 "
         "unscaled, no guidance key in the config), RoPE, text-first joint attention, LoRA",
         transformer=TINY_FLUX_DEV, scheduler=FLUX_SCHEDULER, latent_hw=(8, 12)),
    Case("tiny-flux-dev-diffusers", "FLUX.1-dev-style under diffusers' convention (time and guidance 4.0 x 1000), "
         "LoRA with the upstream FLUX exclude list (text not tapped at the last block)",
         transformer=TINY_FLUX_DEV, scheduler=FLUX_SCHEDULER, latent_hw=(8, 12), time_convention="diffusers",
         model={"guidance_scale": 4.0, "visual_head_idx": [1, 3], "text_head_idx": [2]}, u=(0.3, 0.7)),
    Case("tiny-zimage", "Z-Image-style as the upstream Z-Image reward model computes it: refiners, image and "
         "caption padded to 32 with learned pad tokens, captions of 37 and 7 tokens in one batch, t = 1 - sigma, "
         "LoRA on every attention (refiners included), proj_in head, temb 256 narrower than the tokens (288)",
         transformer=TINY_ZIMAGE, latent_hw=(8, 12), text_tokens=37, model=ZIMAGE_HEAD),
    Case("tiny-zimage-full", "Z-Image-style, full_model.pt (all_final_layer declared unused), deepest tap visual "
         "only, 16x16 latents (64 image tokens, no image pad), captions of 32 and 2 tokens",
         transformer=TINY_ZIMAGE, mode="full", latent_hw=(16, 16), text_tokens=32,
         model=dict(ZIMAGE_HEAD, visual_head_idx=[1, 3], text_head_idx=[2]), u=(0.2, 0.7)),
    Case("tiny-zimage-large-weights", "tiny-zimage with every backbone matrix and RMS qk-norm weight 3x the "
         "builder's: its tanh gates, SiLU / SwiGLU and attention logits reach large inputs", transformer=TINY_ZIMAGE,
         latent_hw=(8, 12), text_tokens=37, model=ZIMAGE_HEAD, matrix_scale=3.0, qk_norm_scale=3.0),
    Case("tiny-flux-schnell", "FLUX.1-schnell-style (no guidance embedding), full_model.pt, deepest tap visual only",
         transformer=TINY_FLUX_SCHNELL, mode="full", scheduler=FLUX_SCHEDULER,
         model={"visual_head_idx": [1, 3], "text_head_idx": [2]}),
]}
