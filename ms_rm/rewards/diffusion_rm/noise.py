"""From u to a noise level, and the noise itself.

The table is the one diffusers' FlowMatchEulerDiscreteScheduler builds in __init__
(ms_rm.core.flow_match.training_table). Two conventions turn u into a row:

* "sigma" (the released DiNa-LRM code): the row whose sigma is nearest to u. u is the noise
  level itself: 0.1 almost clean, 0.9 almost pure noise.
* "index" (older training runs, the Flow-GRPO-MS integration): row int(u * n) of the
  descending table, so u = 0.9 gives sigma 0.25 at shift 3, and u = 1.0 is out of range.

Noise is drawn on the host with numpy, so a seed gives the same noise on every device. Where it
comes from is a NoisePolicy: the model holds one (fresh noise, unseeded) for calls that pass neither
noise nor seed; a scorer holds its own (fresh or fixed, seeded, several draws, shared per prompt,
per sample) and passes what it draws to the model's `prepare`.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple, Union

import numpy as np

from ...core.config import is_int
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
        if not is_int(seed, 0):
            raise InputError(f"seed must be a non-negative integer, got {seed!r}")
        rng = np.random.default_rng(int(seed))
    elif rng is None:
        rng = np.random.default_rng()
    return rng.standard_normal(shape, dtype=np.float32)


NOISE_POLICIES = ("fresh", "fixed")


class NoisePolicy:
    """Where a reward call's noise comes from.

    noise="fresh": new noise on every call, from a generator seeded once with `seed` when given (a
    reproducible sequence); noise="fixed": the same noise on every call (drawn from `seed`).
    num_draws, levels: the leading axes of `draw` (independent draws to average, noise levels of an
    ensemble).
    """

    def __init__(self, seed: Optional[int] = None, noise: str = "fresh", num_draws: int = 1, levels: int = 1):
        if noise not in NOISE_POLICIES:
            raise ConfigError(f"noise must be one of {NOISE_POLICIES}, got {noise!r}")
        if noise == "fixed" and seed is None:
            raise ConfigError("noise='fixed' needs a seed")
        if not is_int(num_draws, 1):
            raise ConfigError(f"num_noise_draws must be a positive integer, got {num_draws!r}")
        self.seed, self.noise, self.num_draws, self.levels = seed, noise, num_draws, levels
        self._rng = np.random.default_rng(seed)

    def _stream(self) -> np.random.Generator:
        return np.random.default_rng(self.seed) if self.noise == "fixed" else self._rng

    def sample(self, shape: Tuple[int, ...]) -> np.ndarray:
        """Noise of exactly `shape` (one draw), float32."""
        return self._stream().standard_normal(tuple(shape), dtype=np.float32)

    def draw(self, shape: Tuple[int, ...], groups: Optional[Sequence[Any]] = None,
             sample_ids: Optional[Sequence[int]] = None) -> np.ndarray:
        """Noise for one call of a batch `shape` (B, C, H, W): (num_draws, levels, B, C, H, W).

        `groups` (one key per sample) makes samples with equal keys share their noise.
        `sample_ids` (one integer per sample) draws each sample's noise from (seed, id) instead: the
        same for a sample whatever the batch, its position in it or the other samples (a sharded
        run then scores exactly as one process does).
        """
        batch = shape[0]
        lead = (self.num_draws, self.levels)
        if sample_ids is not None:
            if groups is not None:
                raise ConfigError("sample_ids and shared noise per group (groups / common_noise) exclude each other")
            if self.seed is None:
                raise ConfigError("per-sample noise (sample_ids) needs the scorer's seed")
            if len(sample_ids) != batch:
                raise InputError(f"sample_ids must have one id per sample ({batch}), got {len(sample_ids)}")
            per_sample = lead + tuple(shape[1:])
            return np.stack([np.random.default_rng([self.seed, int(i)]).standard_normal(per_sample, dtype=np.float32)
                             for i in sample_ids], axis=2)
        rng = self._stream()
        if groups is None:
            return rng.standard_normal(lead + tuple(shape), dtype=np.float32)
        if len(groups) != batch:
            raise InputError(f"groups must have one key per sample ({batch}), got {len(groups)}")
        keys = {}
        index = np.array([keys.setdefault(g, len(keys)) for g in groups])
        unique = rng.standard_normal(lead + (len(keys),) + tuple(shape[1:]), dtype=np.float32)
        return unique[:, :, index]
