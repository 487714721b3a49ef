"""Writing a reference model in the reference's on-disk formats, as users hold them.

    ROOT/model/config.json                      the reference run config (mode flags set)
    ROOT/model/checkpoint/...                   backbone_lora/ + rm_head.pt | full_model.pt | rm_head.pt
    ROOT/transformer/                           diffusers save_pretrained (maybe sharded, maybe bf16)
    ROOT/scheduler/scheduler_config.json
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass

import torch

from .builders import Reference

MODES = ("lora", "full", "head")


@dataclass
class ReferencePaths:
    src: str            # model directory: config.json + checkpoint/
    transformer: str
    scheduler: str


def round_to_(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Round every parameter to `dtype` precision in place (keeping float32 storage), so a float32
    reference computes with exactly the values a `dtype` checkpoint stores."""
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(param.to(dtype).float())


def save_reference(reference: Reference, root: str, mode: str, base_dtype: torch.dtype = torch.float32,
                   shard_size: str = None, head_dtype: torch.dtype = torch.float32) -> ReferencePaths:
    """Write `reference` under `root` in checkpoint mode `mode` (lora, full or head)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}")
    if (mode == "lora") != (reference.lora_config is not None):
        raise ValueError("lora mode needs a reference built with a LoRA, and only it")
    model_dir = os.path.join(root, "model")
    ckpt = os.path.join(model_dir, "checkpoint")
    os.makedirs(ckpt, exist_ok=True)
    rm_config = copy.deepcopy(reference.rm_config)
    rm_config["model"].update(use_lora=mode == "lora", freeze_backbone=mode == "head")
    if mode == "lora":
        rm_config["model"].setdefault("lora_config", {"r": reference.lora_config["r"],
                                                      "lora_alpha": reference.lora_config["lora_alpha"]})
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump(rm_config, f, indent=2)

    head_state = {k: v.to(head_dtype) for k, v in reference.model.reward_head.state_dict().items()}
    if mode == "lora":
        reference.model.backbone.save_pretrained(os.path.join(ckpt, "backbone_lora"))
        torch.save(head_state, os.path.join(ckpt, "rm_head.pt"))
    elif mode == "head":
        torch.save(head_state, os.path.join(ckpt, "rm_head.pt"))
    else:
        torch.save(reference.model.state_dict(), os.path.join(ckpt, "full_model.pt"))

    transformer_dir = os.path.join(root, "transformer")
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    copy.deepcopy(reference.transformer).to(base_dtype).save_pretrained(transformer_dir, **kwargs)
    scheduler_dir = os.path.join(root, "scheduler")
    os.makedirs(scheduler_dir, exist_ok=True)
    with open(os.path.join(scheduler_dir, "scheduler_config.json"), "w") as f:
        json.dump(reference.scheduler_config, f, indent=2)
    return ReferencePaths(model_dir, transformer_dir, scheduler_dir)
