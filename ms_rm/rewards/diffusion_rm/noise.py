"""From u to a noise level, and the noise itself.

The table is the one diffusers' FlowMatchEulerDiscreteScheduler builds in __init__
(ms_rm.core.flow_match.training_table). Two conventions turn u into a row:

* "sigma" (the released DiNa-LRM code): the row whose sigma is nearest to u. u is the noise
  level itself: 0.1 almost clean, 0.9 almost pure noise.
* "index" (older training runs, the Flow-GRPO-MS integration): row int(u * n) of the
  descending table, so u = 0.9 gives sigma 0.25 at shift 3, and u = 1.0 is out of range.

Noise is drawn on the host with numpy, so a seed gives the same noise on every device.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import numpy as np

from ...core.errors import ConfigError, InputError
from ...core.flow_match import SchedulerConfig, training_table
from .config import U_CONVENTIONS

ArrayLike = Union[float, Sequence[float], np.ndarray]

# The recommended u, the one default per kind of input and u convention: latents a sampler
# produced are scored at u = 0.4, clean images encoded from disk at u = 0.1 (sigma convention,
# spec section 3); 0.9 is the Flow-GRPO-MS integration's level under the index convention.
RECOMMENDED_U = {("latents", "sigma"): 0.4, ("latents", "index"): 0.9, ("images", "sigma"): 0.1}


def recommended_u(inputs: str, convention: str) -> float:
    """The default u for `inputs` ("latents" from a sampler, or "images" from disk) under a u
    convention; ConfigError when there is none (images under the index convention)."""
    if (inputs, convention) not in RECOMMENDED_U:
        raise ConfigError(f"no recommended u for {inputs} under the '{convention}' u convention: pass u explicitly")
    return RECOMMENDED_U[(inputs, convention)]


class NoiseSchedule:
    """The scheduler's training table and the u -> (sigma, timestep) lookup."""

    def __init__(self, config: SchedulerConfig):
        self.num_train_timesteps = config.num_train_timesteps
        self.sigmas, self.timesteps = training_table(config)          # (n,) each, descending

    def index(self, u: np.ndarray, convention: str) -> np.ndarray:
        """Table rows (int64) for u values (float32 array), by convention."""
        if convention == "sigma":
            return np.argmin(np.abs(self.sigmas[None, :] - u[:, None]), axis=1)
        if convention == "index":
            rows = (u * np.float32(self.num_train_timesteps)).astype(np.int64)   # truncation, like .long()
            if (rows >= self.num_train_timesteps).any():
                raise InputError(f"u={float(u.max())} is out of range for the 'index' convention: "
                                 f"int(u * {self.num_train_timesteps}) must be below "
                                 f"{self.num_train_timesteps}, so u must be < 1")
            return rows
        raise InputError(f"u_convention must be one of {U_CONVENTIONS}, got {convention!r}")

    def lookup(self, u: ArrayLike, batch: int, convention: str) -> Tuple[np.ndarray, np.ndarray]:
        """u (a number or B values in [0, 1]) -> sigma (B,), timestep (B,), both float32."""
        rows = self.index(check_u(u, batch), convention)
        return self.sigmas[rows], self.timesteps[rows]


def check_u(u: ArrayLike, batch: int) -> np.ndarray:
    """u as a float32 array of `batch` values in [0, 1]; InputError otherwise."""
    try:
        values = np.asarray(u, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(f"u must be a number or a sequence of numbers, got {u!r}") from None
    if values.ndim == 0:
        values = np.full(batch, values)
    if values.shape != (batch,):
        raise InputError(f"u must be a number or have one value per sample ({batch}), "
                         f"got shape {values.shape}")
    if not np.isfinite(values).all() or (values < 0).any() or (values > 1).any():
        raise InputError(f"u must lie in [0, 1], got {values.tolist()}")
    return values.astype(np.float32)


def draw_noise(shape: Tuple[int, ...], seed: Optional[int] = None,
               rng: Optional[np.random.Generator] = None) -> np.ndarray:
    """Standard normal float32 noise: from `seed` if given (deterministic), else from `rng`."""
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise InputError(f"seed must be a non-negative integer, got {seed!r}")
        rng = np.random.default_rng(int(seed))
    elif rng is None:
        rng = np.random.default_rng()
    return rng.standard_normal(shape, dtype=np.float32)
