"""The steps a flow-matching sampler takes, in MindSpore: the deterministic Euler (ODE) step of
diffusers' FlowMatchEulerDiscreteScheduler.step, and the two stochastic steps with their
log-probability that Flow-GRPO samples with (and a GRPO trainer re-evaluates): its
`sde_step_with_logprob` (flow_grpo/diffusers_patch/sd3_sde_with_logprob.py, yifan123/flow_grpo
54809b5) with sde_type "sde" or "cps".

With a = noise_level (0.7 in Flow-GRPO), dt = sigma_next - sigma < 0 and sigma_max the
schedule's second sigma:

  "sde":  std_dev_t = a * sqrt(sigma / (1 - (sigma_max if sigma == 1 else sigma)))
          mean = x (1 + std_dev_t^2 dt / (2 sigma)) + v (1 + std_dev_t^2 (1 - sigma) / (2 sigma)) dt
          x_next = mean + std_dev_t sqrt(-dt) eps                       noise_std = std_dev_t sqrt(-dt)
          log_prob = -(x_next - mean)^2 / (2 noise_std^2) - log(noise_std) - log(sqrt(2 pi))
  "cps":  std_dev_t = sigma_next sin(a pi / 2)
          x0 = x - sigma v,  x1 = x + (1 - sigma) v                     (the predicted image and noise)
          mean = x0 (1 - sigma_next) + x1 sqrt(sigma_next^2 - std_dev_t^2)
          x_next = mean + std_dev_t eps                                 noise_std = std_dev_t
          log_prob = -(x_next - mean)^2                                 (no constants, as Flow-GRPO)

log_prob is averaged over all but the batch axis; x_next enters it without gradient, so the
gradient flows through the mean (into v). Note that Flow-GRPO's fourth output, std_dev_t, is the
std of the step's noise only for "cps": for "sde" that std is std_dev_t sqrt(-dt). `StepResult`
carries both, under explicit names.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import mindspore as ms
from mindspore import Tensor, mint

from ..core import ops
from ..core.errors import ConfigError, InputError

FLOW_GRPO_NOISE_LEVEL = 0.7
SDE_TYPES = ("sde", "cps")
_LOG_SQRT_2PI = math.log(math.sqrt(2 * math.pi))


class StepResult(NamedTuple):
    """One stochastic step. The first four fields are Flow-GRPO's four outputs, in its order and
    under its names; `noise_std` is the std of prev_sample around prev_sample_mean."""

    prev_sample: Tensor         # x_next (B, C, H, W), float32
    log_prob: Tensor            # (B,)
    prev_sample_mean: Tensor    # (B, C, H, W); gradients flow through it
    std_dev_t: Tensor           # Flow-GRPO's std_dev_t: "sde" without the sqrt(-dt) factor
    noise_std: Tensor           # std_dev_t * sqrt(-dt) for "sde", std_dev_t for "cps"


def check_sde_type(sde_type: str) -> str:
    if sde_type not in SDE_TYPES:
        raise ConfigError(f"sde_type must be 'sde' or 'cps' (Flow-GRPO's two steps), got {sde_type!r}")
    return sde_type


def euler_step(sample: Tensor, velocity: Tensor, sigma: Tensor, sigma_next: Tensor) -> Tensor:
    """x + (sigma_next - sigma) * v in float32, cast to v's dtype (diffusers' step). sigma, sigma_next:
    float32 scalars or (B, 1, 1, 1)."""
    return (sample.astype(ms.float32) + (sigma_next - sigma) * velocity).astype(velocity.dtype)


def sde_step(sample: Tensor, velocity: Tensor, sigma: Tensor, sigma_next: Tensor, sigma_max: float,
             noise: Optional[Tensor] = None, prev_sample: Optional[Tensor] = None,
             noise_level: float = FLOW_GRPO_NOISE_LEVEL, sde_type: str = "sde") -> StepResult:
    """One stochastic step of `sde_type` ("sde" or "cps", see the module docstring), in float32.
    sigma, sigma_next: float32 (B, 1, 1, 1) (or scalars); sigma_max: the schedule's second sigma
    (used by "sde" at sigma = 1). Pass `noise` (eps, shaped like the sample) to sample
    prev_sample, or `prev_sample` to evaluate the log-probability of a step already taken (a GRPO
    trainer's recomputation)."""
    check_sde_type(sde_type)
    if (noise is None) == (prev_sample is None):
        raise InputError("sde_step needs exactly one of noise (to sample a step) or prev_sample (to evaluate "
                         "the log-probability of a step taken)")
    x = sample.astype(ms.float32)
    v = velocity.astype(ms.float32)
    if sde_type == "sde":
        dt = sigma_next - sigma
        std_dev_t = mint.sqrt(sigma / (1 - mint.where(sigma == 1, Tensor(sigma_max, ms.float32), sigma))) * noise_level
        mean = x * (1 + std_dev_t ** 2 / (2 * sigma) * dt) + v * (1 + std_dev_t ** 2 * (1 - sigma) / (2 * sigma)) * dt
        noise_std = std_dev_t * mint.sqrt(-dt)
    else:
        std_dev_t = sigma_next * math.sin(noise_level * math.pi / 2)
        predicted_x0 = x - sigma * v
        predicted_noise = x + v * (1 - sigma)
        mean = predicted_x0 * (1 - sigma_next) + predicted_noise * mint.sqrt(sigma_next ** 2 - std_dev_t ** 2)
        noise_std = std_dev_t
    if prev_sample is None:
        prev_sample = mean + noise_std * noise
    diff = ms.ops.stop_gradient(prev_sample.astype(ms.float32)) - mean
    if sde_type == "sde":
        log_prob = -(diff ** 2) / (2 * noise_std ** 2) - ops.log(noise_std) - _LOG_SQRT_2PI
    else:
        log_prob = -(diff ** 2)
    log_prob = log_prob.reshape(log_prob.shape[0], -1).mean(axis=1)
    return StepResult(prev_sample.astype(ms.float32), log_prob, mean, std_dev_t, noise_std)
