"""Parity of one ReFL step (ms_rm.training.refl) with the same recipe in torch: diffusers'
SD3Transformer2DModel with a peft LoRA (random factors), the same x_t, step and prompt embeddings.

* sd3-refl (latent ReFL): the torch reward model of the tiny-sd35 parity case (diffusers backbone +
  our torch head, loaded from its reference checkpoint) and the same reward noise; the loss
  2 - mean(reward(x_t - sigma v)).
* sd3-pixel-refl (ImageReward's ReFL): diffusers' AutoencoderKL decode of x_t - sigma v (latents /
  scaling + shift, as the pipeline), (image / 2 + 0.5).clamp(0, 1), the ReFL transform (torch's
  antialiased bicubic interpolate, center crop, CLIP normalise; see ms_rm_parity.imagereward) and
  the image-reward package's own ImageReward.score_gard (tiny ViT + BERT, random MLP); the loss
  relu(2 - reward).mean() x grad_scale, as the package's ReFL.py.

Compared: the loss and its gradient with respect to every LoRA factor (torch autograd), under the
tolerance policy's bounds (torch fp32 against float64)."""

from __future__ import annotations

import copy
import os
from typing import Dict, List

import numpy as np
import torch

from .exact64 import run_float64

REFL_CASES = {"sd3-refl": "one ReFL step: loss 2 - mean(Diffusion-RM reward of x_t - sigma v) and its gradient w.r.t. "
                          "every LoRA factor of the generator, vs diffusers + peft + the torch reward model",
              "sd3-pixel-refl": "one pixel ReFL step: loss relu(2 - ImageReward(decode(x_t - sigma v))).mean() x "
                                "grad_scale and its gradient w.r.t. every LoRA factor, vs diffusers + peft + "
                                "AutoencoderKL + the image-reward package"}
GRAD_SCALE = 1e-3                 # the package's ReFL.py default


def _lora_transformer(folder: str, seed: int):
    """The tiny diffusers transformer saved under folder/pipeline and a peft LoRA on it (random
    factors, rank 4 on to_q/k/v/to_out.0) saved under folder/lora."""
    from peft import LoraConfig, get_peft_model

    from ms_rm.core.weights import random_parameter

    from .generator import _reference

    transformer = _reference(seed, os.path.join(folder, "pipeline"))
    peft_model = get_peft_model(copy.deepcopy(transformer), LoraConfig(r=4, lora_alpha=8,
                                                                       target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.from_numpy(random_parameter(name, p.shape, seed + 1)))
    peft_model.save_pretrained(os.path.join(folder, "lora"))
    return peft_model


def _torch_gradients(net, loss) -> Dict[str, np.ndarray]:
    loss.backward()
    out = {"loss": loss}
    out.update({"grad:" + n[len("base_model.model."):].replace(".default.weight", ""): p.grad
                for n, p in net.named_parameters() if "lora_" in n})
    return {k: t.detach().double().numpy() for k, t in out.items()}


def _ours(generator, loss, grads) -> Dict[str, np.ndarray]:
    out = {"loss": loss.asnumpy()}
    out.update({"grad:" + p.name[len("transformer."):]: g.asnumpy() for p, g in zip(generator.lora_parameters(), grads)})
    return out


def _stages(folder: str, mode: str, seed: int):
    from ms_rm import DiffusionRM, SD3Generator
    from ms_rm.training.refl import ReFLObjective, refl_loss_and_grads

    from .cases import CASES
    from .generator import _inputs
    from .harness import prepare_case
    from .reference import load_reference_model, lookup_u

    peft_model = _lora_transformer(folder, seed)
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
        return _torch_gradients(net, 2.0 - rm.squash(rm.reward_head(visual, text, temb)).mean())

    generator = SD3Generator.from_pretrained(os.path.join(folder, "pipeline"), lora=os.path.join(folder, "lora"),
                                             lora_mode="train", mode=mode)
    model = DiffusionRM.from_pretrained(case.converted["fp32"], mode=mode)
    loss, grads = refl_loss_and_grads(ReFLObjective(generator, model), x_t, timestep, sigma, a["ehs"], a["pooled"], u,
                                      rm_noise, graph=mode == "graph")
    return _ours(generator, loss, grads), torch_run(torch.float32), run_float64(torch_run)


def _pixel_stages(folder: str, mode: str, seed: int):
    from ms_rm import SD3Generator
    from ms_rm.vae.decoder import load_vae_decoder
    from ms_rm.rewards.imagereward import ImageReward, tiny_config
    from ms_rm.training.refl import PixelReFLObjective, refl_loss_and_grads

    from .generator import _inputs
    from .imagereward import tiny_inputs, torch_refl_transform
    from .imagereward_reference import build_reference, save_checkpoint
    from .vae_reference import build_reference_vae, tiny_vae_config

    peft_model = _lora_transformer(folder, seed)
    torch.manual_seed(seed)                  # the VAE's default init, which build_reference_vae perturbs
    vae = build_reference_vae(tiny_vae_config(), seed=seed)
    vae.save_pretrained(os.path.join(folder, "vae"), safe_serialization=True)
    config = tiny_config()
    reward_model = build_reference(config, seed)
    converted = ImageReward.convert(save_checkpoint(reward_model, os.path.join(folder, "ImageReward.pt")),
                                    os.path.join(folder, "imagereward"), config=config, progress=False)
    a = _inputs(seed)
    x_t, timestep, sigma = a["noise"], 700.0, 0.7
    _, _, ids, mask = tiny_inputs(config, seed, batch=x_t.shape[0])
    scale, shift = vae.config.scaling_factor, vae.config.shift_factor

    def torch_run(dtype) -> Dict[str, np.ndarray]:
        net, decoder, rm = (copy.deepcopy(m).to(dtype) for m in (peft_model, vae, reward_model))
        put = lambda array: torch.from_numpy(np.asarray(array)).to(dtype)
        v = net(hidden_states=put(x_t), encoder_hidden_states=put(a["ehs"]), pooled_projections=put(a["pooled"]),
                timestep=torch.full((x_t.shape[0],), timestep)).sample
        x0_hat = put(x_t) - torch.tensor(sigma, dtype=dtype) * v
        image = decoder.decode(x0_hat / scale + shift).sample
        image = (image / 2 + 0.5).clamp(0, 1)
        rewards = rm.score_gard(torch.from_numpy(ids), torch.from_numpy(mask),
                                torch_refl_transform(image, config.vision.image_size))
        return _torch_gradients(net, torch.nn.functional.relu(-rewards + 2).mean() * GRAD_SCALE)

    generator = SD3Generator.from_pretrained(os.path.join(folder, "pipeline"), lora=os.path.join(folder, "lora"),
                                             lora_mode="train", mode=mode)
    objective = PixelReFLObjective(generator, load_vae_decoder(os.path.join(folder, "vae"), mode=mode),
                                   ImageReward.from_pretrained(converted, mode=mode), grad_scale=GRAD_SCALE)
    loss, grads = refl_loss_and_grads(objective, x_t, timestep, sigma, a["ehs"], a["pooled"], ids, mask,
                                      graph=mode == "graph")
    return _ours(generator, loss, grads), torch_run(torch.float32), run_float64(torch_run)


def run_refl_case(name: str, modes: List[str], dtype: str, seed: int, ms_device: str, torch_device: str):
    from .harness import measured_reports

    stages = _pixel_stages if name == "sd3-pixel-refl" else _stages
    return measured_reports(name, REFL_CASES[name], modes, dtype, seed, ms_device, torch_device, stages)
