"""The optimizer the reference trainers use, in MindSpore: torch's AdamW after global-norm clipping,
and an exponential moving average of the trained parameters. Shared by every ms_rm trainer.

torch.optim.AdamW on the CPU runs its single-tensor path; per parameter p with gradient g, step t:

    g = g * min(max_norm / (||all g||_2 + 1e-6), 1)        (clip_grad_norm_, before the step)
    p = p * (1 - lr * weight_decay)                         (decoupled decay)
    m = m + (1 - beta1) * (g - m)                           (lerp)
    v = v * beta2 + (1 - beta2) * g * g                     (addcmul)
    p = p + (-lr / (1 - beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)   (addcdiv)

with the bias corrections computed on the host in double precision, as torch does. MindSpore's own
AdamWeightDecay has no bias correction; this is written out so the numbers are torch's. The update
is one compiled graph for the whole run (the step's scalars are tensor inputs, not constants).
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Mapping, Sequence, Tuple

import numpy as np
import mindspore as ms
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops

from ..core.compile_cache import jit
from ..core.config import is_number
from ..core.errors import CheckpointError, ConfigError


class _Update(nn.Cell):
    """Clip the gradients by their global norm and take one AdamW step, in one graph."""

    def __init__(self, params: Sequence[Parameter]):
        super().__init__()
        self.params = ParameterTuple(params)
        self.exp_avg = ParameterTuple([Parameter(Tensor(np.zeros(p.shape, np.float32), p.dtype),
                                                 name=f"exp_avg.{p.name}") for p in params])
        self.exp_avg_sq = ParameterTuple([Parameter(Tensor(np.zeros(p.shape, np.float32), p.dtype),
                                                    name=f"exp_avg_sq.{p.name}") for p in params])

    def construct(self, grads, max_norm, decay, one_minus_beta1, beta2, one_minus_beta2, step_size_neg,
                  bias_correction2_sqrt, eps):
        norms = [ops.sqrt((g * g).sum()) for g in grads]
        total = ops.sqrt((ops.stack(norms) ** 2).sum())                     # torch: vector_norm(stack(norms))
        coef = ops.clamp(max_norm / (total + 1e-6), max=1.0)
        for p, m, v, g in zip(self.params, self.exp_avg, self.exp_avg_sq, grads):
            g = g * coef
            p_decayed = p * decay
            m_new = m + one_minus_beta1 * (g - m)
            v_new = v * beta2 + one_minus_beta2 * g * g
            denom = ops.sqrt(v_new) / bias_correction2_sqrt + eps
            ops.assign(m, m_new)
            ops.assign(v, v_new)
            ops.assign(p, p_decayed + step_size_neg * m_new / denom)
        return total


class AdamW:
    """torch.optim.AdamW (+ clip_grad_norm_) over `params`; `step(grads)` returns the gradient norm
    before clipping. max_grad_norm <= 0 turns clipping off (the norm is still returned)."""

    def __init__(self, params: Sequence[Parameter], lr: float, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01, max_grad_norm: float = 1.0):
        for name, value in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay)):
            if not is_number(value) or value < 0:
                raise ConfigError(f"AdamW {name} must be a non-negative number, got {value!r}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ConfigError(f"AdamW betas must lie in [0, 1), got {betas!r}")
        if not params:
            raise ConfigError("AdamW: no parameters to train")
        self.params: List[Parameter] = list(params)
        self.lr, self.betas, self.eps, self.weight_decay = float(lr), tuple(betas), float(eps), float(weight_decay)
        self.max_grad_norm = float(max_grad_norm)
        self.steps = 0
        self._update = _Update(self.params)
        self._compiled = jit(self._update.construct, self._update, name="adamw_step")

    def step(self, grads: Sequence[Tensor]) -> float:
        if len(grads) != len(self.params):
            raise ConfigError(f"AdamW: {len(grads)} gradients for {len(self.params)} parameters")
        self.steps += 1
        beta1, beta2 = self.betas
        bias_correction1 = 1 - beta1 ** self.steps                          # host doubles, as torch's
        bias_correction2 = 1 - beta2 ** self.steps
        max_norm = self.max_grad_norm if self.max_grad_norm > 0 else float("inf")
        f32 = lambda x: Tensor(np.float32(x))
        total = self._compiled(ms.mutable(tuple(grads)), f32(max_norm), f32(1 - self.lr * self.weight_decay), f32(1 - beta1),
                               f32(beta2), f32(1 - beta2), f32(-(self.lr / bias_correction1)),
                               f32(bias_correction2 ** 0.5), f32(self.eps))
        return float(total.asnumpy())

    # --- state --------------------------------------------------------------------------------------
    def state(self) -> Dict[str, np.ndarray]:
        """The moments by name (exp_avg.<param>, exp_avg_sq.<param>) and the step count."""
        state = {p.name: p.asnumpy() for p in (*self._update.exp_avg, *self._update.exp_avg_sq)}
        state["step"] = np.array(self.steps, np.int64)
        return state

    def load_state(self, state: Mapping[str, np.ndarray], source: str) -> None:
        """Restore `state()` (from `source`, for messages), strictly."""
        moments = {p.name: p for p in (*self._update.exp_avg, *self._update.exp_avg_sq)}
        expected = set(moments) | {"step"}
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or extra:
            raise CheckpointError(f"{source}: the optimizer state does not match the trained parameters "
                                  f"(missing {missing[:5]}, unexpected {extra[:5]}): was it saved by this run?")
        for name, param in moments.items():
            value = np.asarray(state[name])
            if tuple(value.shape) != tuple(param.shape):
                raise CheckpointError(f"{source}: '{name}' has shape {value.shape}, the parameter {tuple(param.shape)}")
            param.set_data(Tensor(value, param.dtype))
        self.steps = int(state["step"])


class EMA:
    """An exponential moving average of parameters: ema = decay * ema + (1 - decay) * p after each
    optimizer step (what the reference's TrainingEngine._ema_update means to compute); `swapped()`
    puts the averages in place for evaluation and restores the trained values after."""

    def __init__(self, params: Sequence[Parameter], decay: float):
        if not is_number(decay) or not 0 <= decay < 1:
            raise ConfigError(f"ema_decay must lie in [0, 1), got {decay!r}")
        self.params, self.decay = list(params), float(decay)
        self.values = [p.asnumpy().astype(np.float32) for p in self.params]

    def update(self) -> None:
        d = np.float32(self.decay)
        self.values = [e * d + (np.float32(1) - d) * p.asnumpy().astype(np.float32)
                       for e, p in zip(self.values, self.params)]

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        trained = [p.asnumpy() for p in self.params]
        for p, e in zip(self.params, self.values):
            p.set_data(Tensor(e, p.dtype))
        try:
            yield
        finally:
            for p, t in zip(self.params, trained):
                p.set_data(Tensor(t, p.dtype))

    def state(self) -> Dict[str, np.ndarray]:
        return {f"ema.{p.name}": v for p, v in zip(self.params, self.values)}

    def load_state(self, state: Mapping[str, np.ndarray], source: str) -> None:
        keys = [f"ema.{p.name}" for p in self.params]
        missing = [k for k in keys if k not in state]
        if missing:
            raise CheckpointError(f"{source}: no EMA values for {missing[:5]} (the run was saved without EMA?)")
        self.values = [np.asarray(state[k], np.float32) for k in keys]

