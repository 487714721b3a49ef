"""One reward-feedback (ReFL) step on latents, as the reference recipe takes it
(HKUST-C4G/diffusion-rm flow-grpo-rm/scripts/train_sd3_refl_rm.py, in our words):

    x_t = the latents after step k of the sampler (run without gradient, guided as configured)
    v = transformer(x_t, t_k, prompt)               (conditional only, carrying gradient)
    x0_hat = x_t - sigma_k v
    loss = 2 - mean(Diffusion-RM reward of x0_hat at its u)      (no VAE decode)

Gradients reach the generator's LoRA factors only, through the frozen reward model.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import numpy as np
import mindspore as ms
from mindspore import Tensor

from ..core.errors import InputError

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
