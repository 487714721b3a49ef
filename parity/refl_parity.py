"""Parity of one ReFL step (ms_rm.training.refl) with the same recipe in torch: diffusers'
SD3Transformer2DModel with a peft LoRA (random factors), the torch reward model of the tiny-sd35
parity case (diffusers backbone + our torch head, loaded from its reference checkpoint), the same
x_t, step, prompt embeddings and reward noise. Compared: the loss 2 - mean(reward(x_t - sigma v))
and its gradient with respect to every LoRA factor (torch autograd), under the tolerance policy's
bounds (torch fp32 against float64)."""

from __future__ import annotations

import copy
import os
import tempfile
from typing import Dict, List

import numpy as np
import torch

REFL_CASES = {"sd3-refl": "one ReFL step: loss 2 - mean(Diffusion-RM reward of x_t - sigma v) and its gradient w.r.t. "
                          "every LoRA factor of the generator, vs diffusers + peft + the torch reward model"}


def _stages(folder: str, mode: str, seed: int):
    from peft import LoraConfig, get_peft_model

    from ms_rm import DiffusionRM, SD3Generator
    from ms_rm.core.weights import random_parameter
    from ms_rm.training.refl import ReFLObjective, refl_loss_and_grads

    from .cases import CASES
    from .generator import _inputs, _reference
    from .harness import prepare_case
    from .reference import load_reference_model, lookup_u

    transformer = _reference(seed, os.path.join(folder, "pipeline"))
    peft_model = get_peft_model(copy.deepcopy(transformer), LoraConfig(r=4, lora_alpha=8,
                                                                       target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.from_numpy(random_parameter(name, p.shape, seed + 1)))
    peft_model.save_pretrained(os.path.join(folder, "lora"))
    case = prepare_case(CASES["tiny-sd35"], os.path.join(folder, "rm"), seed)
    torch_rm, rm_config, scheduler_config = load_reference_model(case.paths.src, case.paths.transformer,
                                                                 case.paths.scheduler)
    a = _inputs(seed)
    x_t, timestep, sigma, u = a["noise"], 700.0, 0.7, 0.4
    rm_noise = np.random.default_rng(seed + 5).standard_normal(x_t.shape, dtype=np.float32)
    rm_sigma, rm_timestep = lookup_u(scheduler_config, [u] * x_t.shape[0], "sigma")

    def torch_run(dtype) -> Dict[str, np.ndarray]:
        net, rm = copy.deepcopy(peft_model).to(dtype), copy.deepcopy(torch_rm).to(dtype)
        put = lambda array: torch.from_numpy(np.asarray(array)).to(dtype)
        v = net(hidden_states=put(x_t), encoder_hidden_states=put(a["ehs"]), pooled_projections=put(a["pooled"]),
                timestep=torch.full((x_t.shape[0],), timestep)).sample
        x0_hat = put(x_t) - torch.tensor(sigma, dtype=dtype) * v
        temb, visual, text = rm.features(x0_hat, put(rm_noise), rm_sigma, rm_timestep, put(a["ehs"]), put(a["pooled"]),
                                         True, dtype)
        loss = 2.0 - rm.squash(rm.reward_head(visual, text, temb)).mean()
        loss.backward()
        out = {"loss": loss}
        out.update({"grad:" + n[len("base_model.model."):].replace(".default.weight", ""): p.grad
                    for n, p in net.named_parameters() if "lora_" in n})
        return {k: t.detach().double().numpy() for k, t in out.items()}

    generator = SD3Generator.from_pretrained(os.path.join(folder, "pipeline"), lora=os.path.join(folder, "lora"),
                                             lora_mode="train", mode=mode)
    model = DiffusionRM.from_pretrained(case.converted["fp32"], mode=mode)
    loss, grads = refl_loss_and_grads(ReFLObjective(generator, model), x_t, timestep, sigma, a["ehs"], a["pooled"], u,
                                      rm_noise, graph=mode == "graph")
    ours = {"loss": loss.asnumpy()}
    ours.update({"grad:" + p.name[len("transformer."):]: g.asnumpy() for p, g in zip(generator.lora_parameters(), grads)})
    return ours, torch_run(torch.float32), torch_run(torch.float64)


def run_refl_case(name: str, modes: List[str], dtype: str, seed: int, ms_device: str, torch_device: str):
    from .harness import Report, environment, measured_stages

    if dtype != "fp32":
        raise ValueError(f"the ReFL case compares fp32 only, not {dtype}")
    reports = []
    for mode in modes:
        with tempfile.TemporaryDirectory() as folder:
            results = measured_stages(*_stages(folder, mode, seed))
        reports.append(Report(name, REFL_CASES[name], mode, dtype, seed, results,
                              environment=environment(ms_device, torch_device)))
    return reports
