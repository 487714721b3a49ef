"""Tiny random reference models, built on the spot (nothing is downloaded).

`build_reference` makes a diffusers SD3Transformer2DModel from a config, our torch head, and
optionally a peft LoRA, all with deterministic random weights of realistic scale
(ms_rm.core.weights.random_parameter: every parameter random, none left at a zero init).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np
import torch

from ms_rm.core.weights import random_parameter

from .reference import RewardHead, TorchRewardModel, cut_backbone, transformer_class, widths

QK_NORMS = ("norm_q", "norm_k", "norm_added_q", "norm_added_k")       # diffusers' attention qk-norm modules


def randomize_(module: torch.nn.Module, seed: int, prefix: str = "", matrix_scale: float = 1.0) -> None:
    """Overwrite every parameter of `module` with ms_rm's random_parameter values, named as the
    reward model names them (`prefix` + name), so ms_rm's `randomize(seed)` draws the same.
    `matrix_scale` multiplies the matrices (not the norm weights and biases): a model at a larger
    scale than the initialisers', whose activations reach the large inputs of every op."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            values = random_parameter(prefix + name, param.shape, seed)
            if matrix_scale != 1.0 and values.ndim >= 2:
                values = values * np.float32(matrix_scale)
            param.copy_(torch.from_numpy(values).to(param.dtype))


@dataclass
class Reference:
    """A torch reference model and the configs it was built from."""

    model: TorchRewardModel
    transformer: torch.nn.Module            # the whole diffusers transformer (blocks beyond N too)
    rm_config: dict                         # the reference's config.json content
    transformer_config: dict
    scheduler_config: dict
    lora_config: Optional[dict] = None      # peft LoraConfig kwargs, when a LoRA is active


def lora_kwargs(rm_config: dict, transformer_config: Optional[dict] = None, **overrides) -> dict:
    """peft LoraConfig kwargs the way the reference builds them from config.json: the last block's
    text projections excluded unless text is tapped there; for FLUX (flux_rm.py) also the entries
    `transformer_blocks.{0..3}.attn`, which under peft's matching rules exclude nothing. Z-Image
    (zimage_rm.py): to_q/k/v and to_out.0 of every layer, refiners included, nothing excluded."""
    model = rm_config["model"]
    lora = dict(r=model["lora_config"]["r"], lora_alpha=model["lora_config"]["lora_alpha"],
                init_lora_weights=model["lora_config"].get("init_lora_weights", True))
    if (transformer_config or {}).get("_class_name") == "ZImageTransformer2DModel":
        return {**lora, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"], "exclude_modules": [], **overrides}
    n = model["num_transformer_layers"]
    exclude = [f"transformer_blocks.{n - 1}.attn.{m}" for m in ("add_q_proj", "add_k_proj",
                                                                "add_v_proj", "to_add_out")]
    if (transformer_config or {}).get("_class_name") == "FluxTransformer2DModel":
        exclude += [f"transformer_blocks.{i}.attn" for i in range(4)]
    if model.get("use_text_features", True) and model["text_head_idx"][-1] == n:
        exclude = None
    targets = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
    return {**lora, "target_modules": targets, "exclude_modules": exclude, **overrides}


def build_reference(rm_config: dict, transformer_config: dict, scheduler_config: dict, seed: int = 0,
                    lora: Optional[dict] = None, time_convention: str = "reference",
                    matrix_scale: float = 1.0, qk_norm_scale: float = 1.0) -> Reference:
    """A random reference model. `lora`: LoraConfig kwargs (see lora_kwargs) to wrap the backbone;
    `matrix_scale`: the backbone's matrices that much larger (randomize_); `qk_norm_scale`: its
    attention's RMS qk-norm weights (norm_q, norm_k, norm_added_q, norm_added_k) that much larger,
    which the qk-norms would otherwise take out of the attention logits."""
    torch.manual_seed(seed)
    cls, _ = transformer_class(transformer_config)
    config = {k: v for k, v in transformer_config.items() if not k.startswith("_")}
    transformer = cls(**config).eval()
    randomize_(transformer, seed, prefix="backbone.", matrix_scale=matrix_scale)
    if qk_norm_scale != 1.0:
        with torch.no_grad():
            for name, module in transformer.named_modules():
                if name.endswith(QK_NORMS) and getattr(module, "weight", None) is not None:
                    module.weight.mul_(qk_norm_scale)
    model_cfg = rm_config["model"]
    # peft swaps the Linears it adapts in place: keep `transformer` plain by cutting a copy.
    backbone = cut_backbone(copy.deepcopy(transformer) if lora is not None else transformer, model_cfg,
                            time_convention)
    if lora is not None:
        from peft import LoraConfig, get_peft_model

        backbone = get_peft_model(backbone, LoraConfig(**lora))
        with torch.no_grad():     # peft starts B at zero: make every delta non-trivial
            for name, p in backbone.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.from_numpy(random_parameter(name, p.shape, seed + 1)))
    head_cfg = dict(model_cfg.get("reward_head", {}))
    dim, temb_dim = widths(transformer)
    head = RewardHead(dim, len(model_cfg["visual_head_idx"]), len(model_cfg["text_head_idx"]), temb_dim=temb_dim,
                      **head_cfg)
    model = TorchRewardModel(backbone, head, model_cfg.get("use_logistic", False)).eval()
    randomize_(head, seed, prefix="reward_head.")
    if model.use_logistic:
        with torch.no_grad():
            model.eta3.fill_(0.1)     # off their init values, so a checkpoint that drops them shows
            model.eta4.fill_(0.2)
    return Reference(model, transformer, copy.deepcopy(rm_config), dict(transformer_config),
                     dict(scheduler_config), lora)


def plain_state(reference: Reference) -> Dict[str, np.ndarray]:
    """The model's state dict as float32 numpy arrays, in the model namespace (no LoRA)."""
    if reference.lora_config is not None:
        raise ValueError("plain_state is for models without LoRA; convert LoRA checkpoints instead")
    return {k: v.detach().float().numpy() for k, v in reference.model.state_dict().items()}
