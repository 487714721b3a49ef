"""LoRA files as the torch side writes and reads them, for ms_rm's LoRA readers and writer.

* `lora_models`: one random LoRA on the tiny SD3 transformer in both of the ways users make one:
  diffusers' `transformer.add_adapter(LoraConfig)` (its training scripts' route) and peft's
  `get_peft_model`, with the same factors (random, B not zero: every factor matters).
* `save_diffusers_lora`: diffusers' own `StableDiffusion3Pipeline.save_lora_weights` of the
  first (`pytorch_lora_weights.safetensors`), with the `lora_adapter_metadata` its training
  scripts add (`transformer_lora_adapter_metadata=` the LoraConfig) or without it; peft's
  `save_pretrained` of the second writes the adapter folder.
* `diffusers_loaded`: a copy of the base transformer with a diffusers LoRA file loaded as
  `StableDiffusion3Pipeline.load_lora_weights` loads it (`lora_state_dict` with its metadata, then
  `load_lora_into_transformer`): what diffusers makes of the file.
* `torch_velocity`: the velocity of any of these at given inputs.
"""

from __future__ import annotations

import copy
from typing import Dict, Tuple

import numpy as np
import torch

from .reference import as_torch


def lora_models(transformer, config, seed: int) -> Tuple[torch.nn.Module, torch.nn.Module]:
    """(transformer + diffusers' add_adapter(config), peft's get_peft_model(transformer, config)),
    both with the same random factors."""
    from peft import get_peft_model

    from ms_rm.core.weights import random_parameter

    adapted = copy.deepcopy(transformer)
    adapted.add_adapter(copy.deepcopy(config))
    peft_model = get_peft_model(copy.deepcopy(transformer), copy.deepcopy(config))
    with torch.no_grad():
        values: Dict[str, torch.Tensor] = {}
        for name, p in adapted.named_parameters():
            if "lora_" in name:
                values[name] = torch.from_numpy(random_parameter(name, p.shape, seed))
                p.copy_(values[name])
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(values[name[len("base_model.model."):]])
    return adapted, peft_model


def save_diffusers_lora(adapted, folder: str, metadata: bool) -> None:
    """StableDiffusion3Pipeline.save_lora_weights of the adapted transformer's LoRA into `folder`;
    `metadata`: with its LoraConfig as the file's lora_adapter_metadata."""
    from diffusers import StableDiffusion3Pipeline
    from peft.utils import get_peft_model_state_dict

    extra = {"transformer_lora_adapter_metadata": adapted.peft_config["default"].to_dict()} if metadata else {}
    StableDiffusion3Pipeline.save_lora_weights(folder, transformer_lora_layers=get_peft_model_state_dict(adapted),
                                               **extra)


def diffusers_loaded(transformer, path: str) -> torch.nn.Module:
    """A copy of `transformer` with the LoRA file or folder at `path` loaded as
    StableDiffusion3Pipeline.load_lora_weights loads it."""
    from diffusers import StableDiffusion3Pipeline

    model = copy.deepcopy(transformer)
    state_dict, metadata = StableDiffusion3Pipeline.lora_state_dict(path, return_lora_metadata=True)
    StableDiffusion3Pipeline.load_lora_into_transformer(state_dict, transformer=model, metadata=metadata)
    return model


def torch_velocity(model, inputs, timestep: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(hidden_states=as_torch(inputs["noise"]), timestep=as_torch(timestep),
                     encoder_hidden_states=as_torch(inputs["ehs"]),
                     pooled_projections=as_torch(inputs["pooled"])).sample.numpy()
