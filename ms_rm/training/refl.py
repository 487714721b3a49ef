"""One reward-feedback (ReFL) step on latents, as the reference recipe takes it
(HKUST-C4G/diffusion-rm flow-grpo-rm/scripts/train_sd3_refl_rm.py, in our words):

    x_t = the latents after step k of the sampler (run without gradient, guided as configured)
    v = transformer(x_t, t_k, prompt)               (conditional only, carrying gradient)
    x0_hat = x_t - sigma_k v
    loss = 2 - mean(Diffusion-RM reward of x0_hat at its u)      (no VAE decode)

Gradients reach the generator's LoRA factors only, through the frozen reward model.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn
from tqdm import tqdm

from ..core.errors import InputError
from ..io.files import atomic_folder, write_json
from ..io.safetensors_file import SafetensorsWriter

logger = logging.getLogger(__name__)

REFL_TARGET = 2.0                         # the reference's loss is 2 - mean(reward)


class ReFLObjective:
    """The loss of one ReFL step; differentiable with respect to the generator's LoRA factors.
    A plain callable, not a Cell: a Cell holding the two models would rename their parameters."""

    def __init__(self, generator: Any, reward_model: Any):
        self.generator = generator
        self.reward_model = reward_model

    def __call__(self, x_t, timestep, sigma, encoder_hidden_states, pooled, positions, rm_noise, rm_sigma,
                 rm_timestep, *rm_conditioning):
        v = self.generator.velocity(x_t, timestep, encoder_hidden_states, pooled, positions)   # (B, C, H, W)
        x0_hat = x_t - sigma * v
        reward = self.reward_model(x0_hat, rm_noise, rm_sigma, rm_timestep, *rm_conditioning)[-1]   # (B, 1)
        return REFL_TARGET - reward.mean()


def refl_loss_and_grads(objective: ReFLObjective, x_t, timestep: float, sigma: float, prompt_embeds,
                        pooled_prompt_embeds, u: float, rm_noise, graph: bool = True) -> Tuple[Tensor, Tuple]:
    """(loss, gradients of every LoRA factor of objective.generator) of one ReFL step at latents x_t
    (B, C, H, W) of sampler step (timestep, sigma). `rm_noise`: the reward model's noise at u."""
    generator, model = objective.generator, objective.reward_model
    params = generator.lora_parameters()
    if not params:
        raise InputError("the generator has no LoRA factors to train: add_lora or load an adapter with "
                         "lora_mode='train'")
    x = Tensor(np.asarray(x_t, np.float32))
    batch = x.shape[0]
    _, conditioning = model._prepare(x, prompt_embeds, pooled_prompt_embeds)
    rm_sigma, rm_timestep = model.noise_level(u, batch)
    args = (x, Tensor(np.full(batch, timestep, np.float32)), Tensor(np.float32(sigma)),
            Tensor(np.asarray(prompt_embeds, np.float32)), Tensor(np.asarray(pooled_prompt_embeds, np.float32)),
            Tensor(generator.transformer.positions(x.shape[2], x.shape[3])), Tensor(np.asarray(rm_noise, np.float32)),
            Tensor(rm_sigma), Tensor(rm_timestep)) + tuple(conditioning)
    grad_fn = ms.value_and_grad(objective.__call__, None, params)
    return (ms.jit(grad_fn) if graph else grad_fn)(*args)


# --- the training loop -------------------------------------------------------------------------------
@dataclass
class ReFLSettings:
    """The reference recipe's knobs (its defaults: 40 steps, the gradient step drawn in [30, 39])."""

    steps: int = 100                          # optimizer steps
    batch_size: int = 2                       # prompts per ReFL step
    grad_accumulation: int = 1
    num_inference_steps: int = 40
    step_range: Tuple[int, int] = (30, 39)    # the sampler step k whose x_t carries the gradient (inclusive)
    guidance_scale: float = 4.5
    lr: float = 1e-4
    u: float = 0.4
    seed: int = 0
    checkpoint_every: int = 0                 # 0: at the end only


def save_lora(generator: Any, folder: str, rank: int, alpha: float, targets, force: bool = True) -> str:
    """The generator's LoRA factors as a peft adapter folder (adapter_config.json +
    adapter_model.safetensors), which peft's PeftModel.from_pretrained loads; atomically."""
    state = generator.lora_state()
    with atomic_folder(folder, force=force) as out:
        write_json(os.path.join(out, "adapter_config.json"), {
            "peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": sorted(set(targets)),
            "exclude_modules": None, "lora_dropout": 0.0, "bias": "none", "use_rslora": False, "use_dora": False,
            "fan_in_fan_out": False, "init_lora_weights": True, "rank_pattern": {}, "alpha_pattern": {},
            "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None, "task_type": None,
            "inference_mode": True, "base_model_name_or_path": None, "revision": None})
        writer = SafetensorsWriter(os.path.join(out, "adapter_model.safetensors"),
                                   [(k, np.dtype("float32"), v.shape) for k, v in state.items()])
        for key, value in state.items():
            writer.write(key, value.astype(np.float32))
        writer.close()
    return folder


def train_refl(generator: Any, reward_model: Any, prompt_embeds, pooled_prompt_embeds, negative_prompt_embeds,
               negative_pooled_prompt_embeds, settings: ReFLSettings, out: str, lora: Tuple[int, float, Sequence[str]],
               latent_hw: Tuple[int, int] = (64, 64), progress: bool = True, start: int = 0,
               history: Optional[List[Dict]] = None) -> List[Dict]:
    """ReFL fine-tuning of the generator's LoRA factors on a pool of prompt embeddings (N, T, J).

    Each step: `batch_size` prompts drawn from the pool, initial noise, the sampler run without
    gradient to a step k drawn in `step_range`, one ReFL loss and gradient (refl_loss_and_grads),
    accumulated over `grad_accumulation` steps, then Adam. Logs the mean reward (2 - loss) per step;
    saves the LoRA (peft format) and state.json into `out` every `checkpoint_every` steps and at the end.
    `lora`: (rank, alpha, target modules) for the adapter config."""
    low, high = settings.step_range
    if not 0 <= low <= high < settings.num_inference_steps:
        raise InputError(f"step_range {settings.step_range} must lie in 0..{settings.num_inference_steps - 1}")
    if settings.grad_accumulation < 1 or settings.batch_size < 1 or settings.steps < 1:
        raise InputError("steps, batch_size and grad_accumulation must be positive")
    params = generator.lora_parameters()
    if not params:
        raise InputError("the generator has no LoRA factors to train: add_lora or load an adapter with lora_mode='train'")
    optimizer = nn.Adam(params, learning_rate=settings.lr)
    objective = ReFLObjective(generator, reward_model)
    embeds = [np.asarray(a, np.float32) for a in (prompt_embeds, pooled_prompt_embeds, negative_prompt_embeds,
                                                  negative_pooled_prompt_embeds)]
    history = list(history or [])
    sigmas, timesteps = generator.schedule(settings.num_inference_steps)
    channels = generator.config.in_channels
    accumulated = None
    bar = tqdm(range(start, settings.steps), desc="ReFL", disable=not progress)
    for step in bar:
        rng = np.random.default_rng([settings.seed, step])
        rows = rng.integers(0, embeds[0].shape[0], settings.batch_size)
        ehs, pooled, neg, neg_pooled = (a[rows] for a in embeds)
        noise = rng.standard_normal((settings.batch_size, channels) + tuple(latent_hw), dtype=np.float32)
        k = int(rng.integers(low, high + 1))
        x_t = generator.generate(ehs, pooled, noise, settings.num_inference_steps, settings.guidance_scale, neg,
                                 neg_pooled, stop_after=k).asnumpy()             # the latents after k steps
        rm_noise = rng.standard_normal(x_t.shape, dtype=np.float32)
        loss, grads = refl_loss_and_grads(objective, x_t, float(timesteps[k]), float(sigmas[k]), ehs, pooled,
                                          settings.u, rm_noise, graph=generator.mode == "graph")
        accumulated = grads if accumulated is None else tuple(a + g for a, g in zip(accumulated, grads))
        if (step + 1) % settings.grad_accumulation == 0:
            optimizer(tuple(g / settings.grad_accumulation for g in accumulated))
            accumulated = None
        history.append({"step": step + 1, "k": k, "loss": float(loss), "mean_reward": REFL_TARGET - float(loss)})
        bar.set_postfix(reward=f"{REFL_TARGET - float(loss):.4f}")
        if settings.checkpoint_every and (step + 1) % settings.checkpoint_every == 0 or step + 1 == settings.steps:
            save_lora(generator, out, *lora)
            write_json(os.path.join(out, "state.json"), {"step": step + 1, "history": history})
    logger.info("ReFL: %d steps; LoRA in %s", settings.steps, out)
    return history
