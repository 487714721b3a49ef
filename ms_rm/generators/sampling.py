"""The steps a flow-matching sampler takes, in MindSpore: the deterministic Euler (ODE) step of
diffusers' FlowMatchEulerDiscreteScheduler.step, and the SDE step with its log-probability that
Flow-GRPO samples with (and a GRPO trainer re-evaluates).

SDE step (Flow-GRPO, `sde_step_with_logprob`; a = noise_level, 0.7 there), with dt = sigma_next -
sigma < 0 and sigma_max the schedule's second sigma:

    std = a * sqrt(sigma / (1 - (sigma_max if sigma == 1 else sigma)))
    mean = x (1 + std^2 dt / (2 sigma)) + v (1 + std^2 (1 - sigma) / (2 sigma)) dt
    x_next = mean + std sqrt(-dt) eps
    log_prob = mean over all but the batch axis of
               -(x_next - mean)^2 / (2 std^2 (-dt)) - log(std sqrt(-dt)) - log(sqrt(2 pi))

x_next enters log_prob without gradient; the gradient flows through the mean (into v).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import mindspore as ms
from mindspore import Tensor, mint

from ..core import ops

FLOW_GRPO_NOISE_LEVEL = 0.7
_LOG_SQRT_2PI = math.log(math.sqrt(2 * math.pi))


def euler_step(sample: Tensor, velocity: Tensor, sigma: Tensor, sigma_next: Tensor) -> Tensor:
    """x + (sigma_next - sigma) * v in float32, cast to v's dtype (diffusers' step). sigma, sigma_next:
    float32 scalars or (B, 1, 1, 1)."""
    return (sample.astype(ms.float32) + (sigma_next - sigma) * velocity).astype(velocity.dtype)


def sde_step(sample: Tensor, velocity: Tensor, sigma: Tensor, sigma_next: Tensor, sigma_max: float,
             noise: Optional[Tensor] = None, prev_sample: Optional[Tensor] = None,
             noise_level: float = FLOW_GRPO_NOISE_LEVEL) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """One SDE step: -> (x_next, log_prob (B,), mean, std * sqrt(-dt)). Pass `noise` (eps, shaped
    like the sample) to sample x_next, or `prev_sample` to evaluate the log-probability of a
    step already taken (a GRPO trainer's recomputation)."""
    x = sample.astype(ms.float32)
    v = velocity.astype(ms.float32)
    dt = sigma_next - sigma
    std = mint.sqrt(sigma / (1 - mint.where(sigma == 1, Tensor(sigma_max, ms.float32), sigma))) * noise_level
    mean = x * (1 + std ** 2 / (2 * sigma) * dt) + v * (1 + std ** 2 * (1 - sigma) / (2 * sigma)) * dt
    spread = std * mint.sqrt(-dt)
    if prev_sample is None:
        prev_sample = mean + spread * noise
    diff = ms.ops.stop_gradient(prev_sample.astype(ms.float32)) - mean
    log_prob = -(diff ** 2) / (2 * spread ** 2) - ops.log(spread) - _LOG_SQRT_2PI
    log_prob = log_prob.reshape(log_prob.shape[0], -1).mean(axis=1)
    return prev_sample, log_prob, mean, spread
