"""The pieces of Diffusion-RM's preference training that are formulas: the losses, the draw of u, the
learning-rate schedule. Facts from the reference (HKUST-C4G/diffusion-rm, diffusion_rm/train/engine.py
TrainingEngine.compute_loss and timestep_sampling, scripts/train_sd3.py), in our words:

Losses of the chosen and rejected scores s_c, s_r (B, out), delta = s_c - s_r, by `model_type`:
* "bt":                 mean(-logsigmoid(delta))
* "bt-margin":          mean(-logsigmoid(delta - 1))
* "thurstone":          var = 2 sigma^2 + 0.05 (per side, sigma the pair's noise level),
                        p = Phi(delta / sqrt(var + var + 1e-6)), mean(1 - sqrt(p + 1e-6))
* "thurstone-constant": the same with var = 0.5

u per pair, by `t_weighting_scheme` (its parameter `t_weighting_scheme_param`, numbers joined by "_"):
uniform U(0, 1); logit_normal "m_s": sigmoid(N(m, s)); mode "s": 1 - x - s (cos(pi x / 2)^2 - 1 + x)
with x ~ U(0, 1); power "k": U(0, 1)^k; beta "a_b": Beta(a, b); constant "c": c.
"""

from __future__ import annotations

import math
from typing import Tuple

import numpy as np
from mindspore import Tensor, ops

from ..core import ops as msops
from ..core.config import is_number
from ..core.errors import ConfigError

LOSSES = ("thurstone", "thurstone-constant", "bt", "bt-margin")
WEIGHTING_SCHEMES = ("uniform", "logit_normal", "mode", "power", "beta", "constant")
LR_SCHEDULES = ("constant", "cosine")
BT_MARGIN = 1.0
THURSTONE_SCALE, THURSTONE_MIN_VAR, THURSTONE_CONSTANT_VAR, EPS = 2.0, 0.05, 0.5, 1e-6


def check_loss(kind: str, source: str = "model.model_type") -> str:
    if kind not in LOSSES:
        raise ConfigError(f"{source}: '{kind}' is not a loss; one of {LOSSES}")
    return kind


def log_sigmoid(x: Tensor) -> Tensor:
    """log(sigmoid(x)) = min(x, 0) - log1p(exp(-|x|)), exact for large |x| (torch's formula)."""
    return ops.minimum(x, ops.zeros_like(x)) - msops.log1p(msops.exp(-ops.abs(x)))


def normal_cdf(x: Tensor) -> Tensor:
    """Phi(x) = 0.5 (1 + erf(x / sqrt(2))), as torch.distributions.Normal(0, 1).cdf."""
    return 0.5 * (1 + ops.erf(x / math.sqrt(2)))


def preference_loss(kind: str, chosen: Tensor, rejected: Tensor, sigma: Tensor) -> Tensor:
    """The loss `kind` (one of LOSSES, checked by check_loss) of scores chosen, rejected (B, out) at the
    pairs' noise levels sigma (B,). Traceable by ms.jit."""
    delta = chosen - rejected
    if kind == "bt":
        return -log_sigmoid(delta).mean()
    if kind == "bt-margin":
        return -log_sigmoid(delta - BT_MARGIN).mean()
    if kind == "thurstone":
        var = THURSTONE_SCALE * sigma.reshape(-1, 1).astype(delta.dtype) ** 2 + THURSTONE_MIN_VAR     # (B, 1)
        p = normal_cdf(delta / ops.sqrt(var + var + EPS))
    else:                                   # "thurstone-constant" (kind is checked where it is read: check_loss)
        var = THURSTONE_CONSTANT_VAR
        p = normal_cdf(delta / (var + var + EPS) ** 0.5)
    return (1.0 - ops.sqrt(p + EPS)).mean()


# --- u ----------------------------------------------------------------------------------------------
def _parameters(scheme: str, param, count: int, source: str) -> Tuple[float, ...]:
    text = str(param)
    try:
        values = tuple(float(v) for v in text.split("_"))
    except ValueError:
        values = ()
    if len(values) != count or not all(math.isfinite(v) for v in values):
        form = {1: "a number", 2: "two numbers joined by '_' (e.g. 0_1)"}[count]
        raise ConfigError(f"{source}: t_weighting_scheme_param {param!r} must be {form} for '{scheme}'")
    return values


def check_weighting(scheme: str, param, source: str = "training") -> None:
    """ConfigError unless `scheme` and its parameter can draw u."""
    if scheme not in WEIGHTING_SCHEMES:
        raise ConfigError(f"{source}: t_weighting_scheme '{scheme}' is not one of {WEIGHTING_SCHEMES}")
    counts = {"logit_normal": 2, "beta": 2, "mode": 1, "power": 1, "constant": 1}
    if scheme in counts:
        values = _parameters(scheme, param, counts[scheme], source)
        if scheme == "constant" and not 0 <= values[0] <= 1:
            raise ConfigError(f"{source}: the constant u {values[0]} must lie in [0, 1]")
        if scheme == "beta" and min(values) <= 0:
            raise ConfigError(f"{source}: Beta parameters must be positive, got {values}")


def sample_u(rng: np.random.Generator, scheme: str, param, batch: int, source: str = "training") -> np.ndarray:
    """One u per pair (batch,), float32, drawn from `rng` by the weighting scheme."""
    check_weighting(scheme, param, source)
    if scheme == "uniform":
        u = rng.random(batch)
    elif scheme == "logit_normal":
        mean, std = _parameters(scheme, param, 2, source)
        u = 1.0 / (1.0 + np.exp(-rng.normal(mean, std, batch)))
    elif scheme == "mode":
        (scale,) = _parameters(scheme, param, 1, source)
        x = rng.random(batch)
        u = 1 - x - scale * (np.cos(math.pi * x / 2) ** 2 - 1 + x)
    elif scheme == "power":
        (power,) = _parameters(scheme, param, 1, source)
        u = rng.random(batch) ** power
    elif scheme == "beta":
        a, b = _parameters(scheme, param, 2, source)
        u = rng.beta(a, b, batch)
    else:
        u = np.full(batch, _parameters(scheme, param, 1, source)[0])
    return np.clip(u, 0.0, 1.0).astype(np.float32)


# --- learning rate --------------------------------------------------------------------------------
def learning_rate(base: float, schedule: str, step: int, warmup: int, total: int) -> float:
    """The rate of optimizer step `step` (0-based): "constant" (the reference ignores warmup then), or
    "cosine" with linear warmup (transformers' get_cosine_schedule_with_warmup, half a cycle)."""
    if schedule == "constant":
        return base
    if schedule != "cosine":
        raise ConfigError(f"training.lr_scheduler '{schedule}' is not one of {LR_SCHEDULES}")
    if step < warmup:
        return base * step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return base * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def number(value, source: str, minimum: float = None) -> float:
    """A config number, also written as a string ("5e-5": the reference's yaml reads its rate with eval)."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(f"{source}: {value!r} is not a number") from None
    if not is_number(value) or (minimum is not None and value < minimum):
        raise ConfigError(f"{source}: expected a number{'' if minimum is None else f' >= {minimum}'}, got {value!r}")
    return float(value)

