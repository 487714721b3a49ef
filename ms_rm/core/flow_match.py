"""Flow matching as diffusers' FlowMatchEulerDiscreteScheduler does it: its config, its training
table (what u indexes), the schedule of an inference run (`set_timesteps`), and the steps.

* Training table (built in the scheduler's __init__, float32, descending): s = linspace(1, n, n)
  reversed / n, sigma = shift*s / (1 + (shift-1)*s) unless the scheduler shifts dynamically,
  timestep = sigma * n.
* Inference schedule (`set_timesteps(N)` without dynamic shifting): timesteps linspace(n *
  sigma_max, n * sigma_min, N) in float64 over the training table's ends, sigma = t / n, shifted
  (again), rounded to float32; or custom sigmas (float32, shifted); a terminal sigma 0 appended;
  timesteps = sigma * n in float32.
* Euler (ODE) step: x + (sigma_next - sigma) * v, in float32. The stochastic steps Flow-GRPO samples
  with ("sde" and "cps"): see ms_rm.generators.sampling.sde_step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Tuple

import numpy as np

from .config import get_value, is_int
from .errors import ConfigError, InputError

MAX_INFERENCE_STEPS = 10_000


@dataclass(frozen=True)
class SchedulerConfig:
    """The parts of diffusers' FlowMatchEulerDiscreteScheduler config that shape its training table."""

    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False

    @classmethod
    def from_diffusers(cls, d: Mapping, source: str = "scheduler config") -> "SchedulerConfig":
        name = d.get("_class_name", "FlowMatchEulerDiscreteScheduler")
        if name != "FlowMatchEulerDiscreteScheduler":
            raise ConfigError(f"{source}: _class_name is '{name}'; Diffusion-RM's noise table needs "
                              "FlowMatchEulerDiscreteScheduler")
        # Only these three enter the table built in the scheduler's __init__; the others
        # (shift_terminal, karras/exponential/beta sigmas, ...) act in set_timesteps only.
        steps = get_value(d, "num_train_timesteps", int, source, 1000)
        if not 1 <= steps <= 100_000:
            raise ConfigError(f"{source}: num_train_timesteps must be in 1..100000, got {steps}")
        shift = get_value(d, "shift", float, source, 1.0)
        if not (math.isfinite(shift) and 0 < shift <= 1e4):
            raise ConfigError(f"{source}: shift must be a finite number in (0, 1e4], got {shift}")
        return cls(num_train_timesteps=steps, shift=shift,
                   use_dynamic_shifting=get_value(d, "use_dynamic_shifting", bool, source, False))



def training_table(config: SchedulerConfig) -> Tuple[np.ndarray, np.ndarray]:
    """The scheduler's training table: sigmas (n,) and timesteps (n,), float32, descending."""
    n = config.num_train_timesteps
    steps = np.linspace(1, n, n, dtype=np.float32)[::-1].copy()
    sigmas = steps / np.float32(n)
    if not config.use_dynamic_shifting:
        # Python scalars as torch treats them: shift - 1 is formed in double, each scalar is
        # then rounded to float32 for the elementwise float32 arithmetic.
        sigmas = np.float32(config.shift) * sigmas / (np.float32(1.0) + np.float32(config.shift - 1.0) * sigmas)
    sigmas = sigmas.astype(np.float32)
    return sigmas, (sigmas * np.float32(n)).astype(np.float32)


def inference_schedule(config: SchedulerConfig, num_inference_steps: Optional[int] = None,
                       sigmas: Optional[Sequence[float]] = None) -> Tuple[np.ndarray, np.ndarray]:
    """What `set_timesteps(num_inference_steps, sigmas=sigmas)` makes: sigmas (N + 1,) ending in 0
    and timesteps (N,), float32."""
    if config.use_dynamic_shifting:
        raise ConfigError("this scheduler shifts dynamically (use_dynamic_shifting): its schedule depends on the "
                          "image size (mu), which SD3 / SD3.5 schedulers do not use; not supported")
    n = config.num_train_timesteps
    if sigmas is None:
        if not is_int(num_inference_steps, 1, MAX_INFERENCE_STEPS):
            raise InputError(f"num_inference_steps must be an integer in 1..{MAX_INFERENCE_STEPS}, "
                             f"got {num_inference_steps!r}")
        table, _ = training_table(config)
        sigma_max, sigma_min = float(table[0]), float(table[-1])
        timesteps = np.linspace(sigma_max * n, sigma_min * n, int(num_inference_steps))
        values = timesteps / n
    else:
        values = np.asarray(sigmas, dtype=np.float64).astype(np.float32)
        if values.ndim != 1 or values.size == 0 or not np.isfinite(values).all() or (values <= 0).any() \
                or (values > 1).any():
            raise InputError(f"sigmas must be a non-empty list of noise levels in (0, 1], got {list(sigmas)!r}")
        if num_inference_steps is not None and num_inference_steps != values.size:
            raise InputError(f"num_inference_steps {num_inference_steps} differs from the {values.size} sigmas given")
    values = (config.shift * values / (1 + (config.shift - 1) * values)).astype(np.float32)
    timesteps = (values * np.float32(n)).astype(np.float32)
    return np.concatenate([values, np.zeros(1, np.float32)]), timesteps
