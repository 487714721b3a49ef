"""Parity of the generator: ms_rm's full SD3 transformer and sampler against diffusers.

Harness cases, fp32, on a tiny random SD3.5-style transformer (the parity cases' TINY_SD35: dual
attention, RMS qk-norm, the last block context_pre_only) saved with diffusers' `save_pretrained`
and loaded by `SD3Generator.from_pretrained`:

* sd3-transformer: temb, the image and the text stream after every block and the velocity of
  `SD3Generator.predict_velocity`, vs diffusers' SD3Transformer2DModel (block outputs through
  forward hooks);
* sd3-sampling: latents after step 1, 2 and all 4 of `StableDiffusion3Pipeline(latents=noise,
  output_type="latent")` without and with classifier-free guidance (4.5), plus 3-step trajectories
  with Flow-GRPO's `sde_step_with_logprob` (sde_type "sde" and "cps"; ms_rm_parity.flow_grpo_step:
  Flow-GRPO's own function or the one derived from it) and the log-probability of every step;
* sd3-lora: a peft LoRA (rank 4 on to_q/k/v/to_out.0, random factors) on the transformer: the
  velocity with the adapter merged (`lora_mode="merge"`) and with separate factors ("train")
  against peft's model, and the gradient of sum(w * Euler step output) with respect to every
  LoRA factor against torch autograd;
* sd3-vae-decode: diffusers' AutoencoderKL.decode of scaled latents (z / scaling + shift) and the
  pipeline's image postprocessing, against ms_rm's VAE decoder, latents 4x4 and 3x5.
"""

from __future__ import annotations

import tempfile
from typing import Dict, List

import numpy as np
import torch

from .cases import SCHEDULER, TINY_SD35
from .compare import compare_stages
from .exact64 import run_float64
from .harness import FP32_BOUND, Report, environment, measured_stages
from .reference import as_torch
from .scales import MATRIX_SCALE

GENERATOR_CASES = {
    "sd3-transformer": "full SD3.5-style transformer (last block context_pre_only, norm_out, proj_out) vs diffusers: "
                       "temb, every block's image and text stream, velocity",
    "sd3-sampling": "StableDiffusion3Pipeline latents after steps 1, 2, 4 (guidance 1 and 4.5) and Flow-GRPO SDE "
                    "and CPS trajectories with their log-probabilities",
    "sd3-lora": "peft LoRA on the transformer: velocity merged and separate, and the gradient of one step's output "
                "w.r.t. every LoRA factor vs torch autograd",
    "sd3-vae-decode": "SD3 VAE decoder vs diffusers AutoencoderKL.decode and the pipeline's [0, 1] images",
    "sd3-transformer-large-weights": "sd3-transformer with every matrix and RMS qk-norm weight 3x: SiLU / GELU "
                                     "inputs beyond 20, attention logits beyond 30",
    "sd3-vae-decode-large-weights": "sd3-vae-decode with every kernel, matrix and GroupNorm weight 3x: SiLU inputs "
                                    "beyond 15, attention logits beyond 100",
}
LARGE = "-large-weights"          # a case of that name: the weights x MATRIX_SCALE, bounded by the measured policy
LATENT_HW = (16, 12)
TEXT_TOKENS = 7
STEPS = 4
SDE_STEPS = 3


def build_transformer(seed: int, matrix_scale: float = 1.0, norm_scale: float = 1.0, reference_init: bool = False):
    """A random diffusers SD3Transformer2DModel (TINY_SD35): builders.randomize_'s values, the
    matrices x `matrix_scale`, the RMS qk-norm weights x `norm_scale` (the large-weight case: the
    qk-norms would undo the projections' scale in the attention logits); `reference_init`: torch's
    default init kept (diffusers has none of its own for it; ms_rm_parity.scales compares the two)."""
    from diffusers import SD3Transformer2DModel

    from .builders import randomize_
    from .scales import scale_norms_

    torch.manual_seed(seed)
    config = {k: v for k, v in TINY_SD35.items() if not k.startswith("_")}
    transformer = SD3Transformer2DModel(**config).eval()
    if not reference_init:
        randomize_(transformer, seed, matrix_scale=matrix_scale)
        scale_norms_(transformer, norm_scale, ("RMSNorm",))
    return transformer


def _reference(seed: int, folder: str, matrix_scale: float = 1.0):
    """A random diffusers transformer (build_transformer; the large-weight case's norms scaled as its
    matrices) saved under `folder` (transformer/, scheduler/)."""
    import json
    import os

    transformer = build_transformer(seed, matrix_scale, norm_scale=matrix_scale)
    transformer.save_pretrained(os.path.join(folder, "transformer"))
    os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
    with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(SCHEDULER, f)
    return transformer


def _inputs(seed: int, batch: int = 2):
    rng = np.random.default_rng(seed + 100)
    draw = lambda *shape: rng.standard_normal(shape, dtype=np.float32)
    cfg = TINY_SD35
    return {"noise": draw(batch, cfg["in_channels"], *LATENT_HW),
            "ehs": draw(batch, TEXT_TOKENS, cfg["joint_attention_dim"]), "pooled": draw(batch, cfg["pooled_projection_dim"]),
            "neg": draw(batch, TEXT_TOKENS, cfg["joint_attention_dim"]), "neg_pooled": draw(batch, cfg["pooled_projection_dim"])}


def diffusers_block_states(transformer, latents, timestep, ehs, pooled, dtype=torch.float32) -> Dict[str, np.ndarray]:
    """diffusers' forward, called as Flow-GRPO calls it, with temb, the image stream ("block_k") and
    the text stream ("block_k_text"; none from the last, context_pre_only block) captured by
    forward hooks, in data-flow order, and the velocity."""
    captured: Dict[str, torch.Tensor] = {}
    hooks = [transformer.time_text_embed.register_forward_hook(lambda m, i, o: captured.__setitem__("temb", o))]

    def keep(k, outputs):
        text, image = outputs
        captured[f"block_{k}"] = image
        if text is not None:
            captured[f"block_{k}_text"] = text

    for k, block in enumerate(transformer.transformer_blocks):
        hooks.append(block.register_forward_hook(lambda m, i, o, k=k: keep(k + 1, o)))
    try:
        with torch.no_grad():
            velocity = transformer(hidden_states=as_torch(latents, dtype), timestep=as_torch(timestep, dtype),
                                   encoder_hidden_states=as_torch(ehs, dtype),
                                   pooled_projections=as_torch(pooled, dtype)).sample
    finally:
        for hook in hooks:
            hook.remove()
    ref = {k: v.numpy() for k, v in captured.items()}
    ref["velocity"] = velocity.numpy()
    return ref if dtype == torch.float32 else {k: v.astype(np.float64) for k, v in ref.items()}


def block_state_stages(out) -> Dict[str, np.ndarray]:
    """SD3Generator.predict_velocity(..., output_block_states=True) under diffusers_block_states' names."""
    ours = {"temb": out["temb"].asnumpy()}
    for k, image in enumerate(out["image_states"]):
        ours[f"block_{k + 1}"] = image.asnumpy()
        if k < len(out["text_states"]):
            ours[f"block_{k + 1}_text"] = out["text_states"][k].asnumpy()
    ours["velocity"] = out["velocity"].asnumpy()
    return ours


def _transformer_stages(transformer, generator, a, float64: bool = False) -> Dict[str, Dict[str, np.ndarray]]:
    """Block states and velocity; `float64`: also diffusers' run in float64 ("ref64"), for the
    measured bounds of the large-weight case."""
    import copy

    timestep = np.array([1000.0, 437.5], np.float32)
    ref = diffusers_block_states(transformer, a["noise"], timestep, a["ehs"], a["pooled"])
    out = generator.predict_velocity(hidden_states=a["noise"], timestep=timestep, encoder_hidden_states=a["ehs"],
                                     pooled_projections=a["pooled"], output_block_states=True)
    stages = {"ours": block_state_stages(out), "ref": ref}
    if float64:
        stages["ref64"] = run_float64(lambda dtype: diffusers_block_states(
            copy.deepcopy(transformer).to(dtype), a["noise"], timestep, a["ehs"], a["pooled"], dtype))
    return stages


def _sampling_stages(transformer, generator, a, seed: int) -> Dict[str, Dict[str, np.ndarray]]:
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from ms_rm.generators.sampling import FLOW_GRPO_NOISE_LEVEL, SDE_TYPES

    from .flow_grpo_step import drawn_noise, flow_grpo_function

    scheduler_config = {k: v for k, v in SCHEDULER.items() if not k.startswith("_")}
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**scheduler_config),
                                    vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                    text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    ref, ours = {}, {}
    for guidance in (1.0, 4.5):
        steps: List[np.ndarray] = []

        def keep(pipeline, i, t, kwargs):
            steps.append(kwargs["latents"].numpy().copy())
            return kwargs

        with torch.no_grad():
            pipe(prompt_embeds=as_torch(a["ehs"]), pooled_prompt_embeds=as_torch(a["pooled"]),
                 negative_prompt_embeds=as_torch(a["neg"]), negative_pooled_prompt_embeds=as_torch(a["neg_pooled"]),
                 latents=as_torch(a["noise"]), num_inference_steps=STEPS, guidance_scale=guidance,
                 height=LATENT_HW[0] * 8, width=LATENT_HW[1] * 8, output_type="latent", callback_on_step_end=keep)
        run = generator.generate(a["ehs"], a["pooled"], a["noise"], STEPS, guidance, a["neg"], a["neg_pooled"],
                                 return_trajectory=True)
        for k in (1, 2, STEPS):
            ref[f"g{guidance:g}_step_{k}"] = steps[k - 1]
            ours[f"g{guidance:g}_step_{k}"] = run["trajectory"][k].asnumpy()
    # The stochastic steps: Flow-GRPO samples without guidance in its rollouts' log-probabilities here
    # (guidance 1); the reference draws each step's noise from a generator, ms_rm is given it.
    for sde_type in SDE_TYPES:
        step_with_logprob, _ = flow_grpo_function(sde_type)
        scheduler = FlowMatchEulerDiscreteScheduler(**scheduler_config)
        scheduler.set_timesteps(SDE_STEPS)
        x = as_torch(a["noise"])
        noises = []
        with torch.no_grad():
            for i, t in enumerate(scheduler.timesteps):
                v = transformer(hidden_states=x, encoder_hidden_states=as_torch(a["ehs"]),
                                pooled_projections=as_torch(a["pooled"]), timestep=t.expand(x.shape[0])).sample
                noise, draws = drawn_noise(x.shape, seed * 10 + i)
                noises.append(noise)
                x, log_prob, _, _ = step_with_logprob(scheduler, v, t.expand(x.shape[0]), x, generator=draws,
                                                      noise_level=FLOW_GRPO_NOISE_LEVEL, sde_type=sde_type)
                ref[f"{sde_type}_step_{i + 1}"], ref[f"{sde_type}_log_prob_{i + 1}"] = x.numpy(), log_prob.numpy()
        run = generator.generate(a["ehs"], a["pooled"], a["noise"], SDE_STEPS, 1.0, sde=True, sde_type=sde_type,
                                 sde_noise=np.stack(noises), return_trajectory=True)
        for i in range(SDE_STEPS):
            ours[f"{sde_type}_step_{i + 1}"] = run["trajectory"][i + 1].asnumpy()
            ours[f"{sde_type}_log_prob_{i + 1}"] = run["log_probs"][i].asnumpy()
    return {"ours": ours, "ref": ref}


def _lora_stages(transformer, folder: str, mode: str, seed: int, a) -> Dict[str, Dict[str, np.ndarray]]:
    import copy
    import os

    from mindspore import Tensor
    from peft import LoraConfig, get_peft_model

    from ms_rm.core.weights import random_parameter
    from ms_rm.generators.sd3_generator import SD3Generator

    model = get_peft_model(copy.deepcopy(transformer), LoraConfig(r=4, lora_alpha=8,
                                                                  target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():             # peft starts lora_B at zero: make every factor matter
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.from_numpy(random_parameter(name, p.shape, seed + 1)))
    adapter = os.path.join(folder, "lora")
    model.save_pretrained(adapter)
    x, timestep = a["noise"], np.array([700.0, 700.0], np.float32)
    sigma, sigma_next = np.float32(0.7), np.float32(0.3)
    weight = np.random.default_rng(seed + 3).standard_normal(x.shape, dtype=np.float32)

    def torch_run(dtype: torch.dtype) -> Dict[str, np.ndarray]:
        net = copy.deepcopy(model).to(dtype)
        put = lambda array: as_torch(array).to(dtype)
        v = net(hidden_states=put(x), encoder_hidden_states=put(a["ehs"]), pooled_projections=put(a["pooled"]),
                timestep=as_torch(timestep)).sample
        loss = ((put(x) + (torch.tensor(sigma_next, dtype=dtype) - torch.tensor(sigma, dtype=dtype)) * v)
                * put(weight)).sum()
        loss.backward()
        out = {"velocity_merged": v, "velocity_separate": v, "step_scalar": loss}
        out.update({"grad:" + n[len("base_model.model."):].replace(".default.weight", ""): p.grad
                    for n, p in net.named_parameters() if "lora_" in n})
        return {k: t.detach().float().numpy() for k, t in out.items()}

    args = [Tensor(x), Tensor(timestep), Tensor(a["ehs"]), Tensor(a["pooled"])]
    merged = SD3Generator.from_pretrained(folder, lora=adapter, mode=mode)
    separate = SD3Generator.from_pretrained(folder, lora=adapter, lora_mode="train", mode=mode)
    positions = Tensor(merged.transformer.positions(*LATENT_HW))
    value, grads = separate.lora_gradients("weighted_step", *args, positions, Tensor(sigma), Tensor(sigma_next),
                                           Tensor(weight))
    ours = {"velocity_merged": merged.run("velocity", *args, positions).asnumpy(),
            "velocity_separate": separate.run("velocity", *args, positions).asnumpy(),
            "step_scalar": value.asnumpy()}
    ours.update({"grad:" + p.name[len("transformer."):]: g.asnumpy()
                 for p, g in zip(separate.lora_parameters(), grads)})
    # The gradients sum over every token: their bound is the tolerance policy's, from torch's own
    # fp32 error against float64 (ms_rm_parity.harness.measured_stages).
    return {"ours": ours, "ref": torch_run(torch.float32), "ref64": run_float64(torch_run)}


def _decode_stages(seed: int, mode: str, folder: str, scale: float = 1.0) -> Dict[str, Dict[str, np.ndarray]]:
    """Decoded pixels and images; at a large `scale` (kernels, matrices, GroupNorms) also the
    decode in float64 ("ref64"), for the measured bounds."""
    from ms_rm.vae.decoder import load_vae_decoder

    from .vae_reference import build_reference_vae, tiny_vae_config

    import copy

    reference = build_reference_vae(tiny_vae_config(), seed=seed, matrix_scale=scale, norm_scale=scale)
    reference64 = copy.deepcopy(reference).to(torch.float64) if scale != 1.0 else None
    reference.save_pretrained(folder, safe_serialization=True)
    ours = load_vae_decoder(folder, mode=mode)
    rng = np.random.default_rng(seed + 7)
    shift, factor = reference.config.shift_factor or 0.0, reference.config.scaling_factor
    out: Dict[str, Dict[str, np.ndarray]] = {"ours": {}, "ref": {}, "ref64": {}}
    for h, w in ((4, 4), (3, 5)):
        latents = rng.standard_normal((2, reference.config.latent_channels, h, w), dtype=np.float32)
        for side, model, dtype in (("ref", reference, torch.float32), ("ref64", reference64, torch.float64)):
            if model is not None:
                with torch.no_grad():
                    pixels = model.decode(as_torch(latents, dtype) / factor + shift).sample
                out[side].update({f"pixels_{h}x{w}": pixels.numpy(),
                                  f"images_{h}x{w}": (pixels / 2 + 0.5).clamp(0, 1).numpy()})
        ours_pixels = ours.decode(latents).asnumpy()
        out["ours"].update({f"pixels_{h}x{w}": ours_pixels, f"images_{h}x{w}": np.clip(ours_pixels / 2 + 0.5, 0, 1)})
    if reference64 is None:
        del out["ref64"]
    return out


def _results(stages: Dict[str, Dict[str, np.ndarray]]):
    """Under the tolerance policy: measured from torch's own float32 error where a float64 run is
    there (the large-weight cases), else the fixed floor FP32_BOUND."""
    if "ref64" in stages:
        return measured_stages(stages["ours"], stages["ref"], stages["ref64"])
    return compare_stages(stages["ours"], stages["ref"], {"default": FP32_BOUND})


def run_generator_case(name: str, modes: List[str], dtype: str, seed: int, ms_device: str,
                       torch_device: str) -> List[Report]:
    """One report per mode."""
    from ms_rm.generators.sd3_generator import SD3Generator

    if dtype != "fp32":
        raise ValueError(f"the generator cases compare fp32 only, not {dtype}")
    reports = []
    scale = MATRIX_SCALE if name.endswith(LARGE) else 1.0
    base = name.removesuffix(LARGE)
    if base == "sd3-vae-decode":
        for mode in modes:
            with tempfile.TemporaryDirectory() as folder:
                stages = _decode_stages(seed, mode, folder, scale)
            reports.append(Report(name, GENERATOR_CASES[name], mode, dtype, seed, _results(stages),
                                  environment=environment(ms_device, torch_device)))
        return reports
    with tempfile.TemporaryDirectory() as folder:
        transformer = _reference(seed, folder, scale)
        a = _inputs(seed)
        for mode in modes:
            if base == "sd3-lora":
                stages = _lora_stages(transformer, folder, mode, seed, a)
            else:
                generator = SD3Generator.from_pretrained(folder, mode=mode)
                stages = (_transformer_stages(transformer, generator, a, float64=scale != 1.0)
                          if base == "sd3-transformer" else _sampling_stages(transformer, generator, a, seed))
            reports.append(Report(name, GENERATOR_CASES[name], mode, dtype, seed, _results(stages),
                                  environment=environment(ms_device, torch_device)))
    return reports
