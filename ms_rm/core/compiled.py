"""The execution mode of ms_rm's models, and their compiled calls.

Every model runs its tensor program either compiled with `ms.jit` ("graph", the default:
compiled once per input shape and reused) or eagerly ("pynative"), with the same numbers.
The global MindSpore execution mode is never touched.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Dict, Iterator, Tuple

import numpy as np
import mindspore as ms
from mindspore import nn
from mindspore.nn.utils import no_init_parameters

from . import ops
from .compile_cache import jit
from .errors import InputError
from .weights import load_parameters, random_parameter

MODES = ("graph", "pynative")


def check_mode(value: str) -> str:
    """An execution mode: "graph" (compiled with ms.jit) or "pynative" (eager)."""
    if value not in MODES:
        raise InputError(f"mode must be one of {MODES}, got {value!r}")
    return value


class CompiledCell(nn.Cell):
    """A Cell whose methods run compiled or eagerly by its `mode`: `self.run("method", *args)`."""

    def __init__(self, mode: str = "graph"):
        super().__init__()
        self.mode = mode
        self._compiled: Dict[str, Any] = {}          # method name -> its ms.jit function

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        self._mode = check_mode(value)

    def recompile(self) -> None:
        """Forget every compiled call, after the model's structure changed (new LoRA factors, ...).
        MindSpore keys its own graph cache on the cell's creation time, so that is renewed too:
        otherwise a new ms.jit of the same method would reuse the graph compiled before."""
        self._compiled.clear()
        object.__setattr__(self, "_create_time", time.time_ns())

    def run(self, name: str, *args):
        """Method `name` on args: through ms.jit in graph mode (one compiled function per method;
        MindSpore caches one graph per input shape; compile_cache.jit), eagerly in PyNative mode."""
        if self._mode == "pynative":
            return self(*args) if name == "construct" else getattr(self, name)(*args)
        if name not in self._compiled:
            self._compiled[name] = jit(getattr(self, name), self, name=name)
        return self._compiled[name](*args)

    # --- construction and weights ------------------------------------------------------------
    @contextlib.contextmanager
    def parameters_in(self, dtype: ms.Type = ms.float32) -> Iterator[None]:
        """Build the model's cells inside this block: their parameters get no initial values
        (every one is filled later, from a checkpoint or `randomize`) and are cast to the compute
        dtype of `dtype` on this device (ops.compute_dtype: bf16 computes in fp32 on the CPU),
        which becomes `self.compute_dtype`."""
        self.compute_dtype = ops.compute_dtype(dtype)
        with no_init_parameters():
            yield
        for param in self.get_parameters():
            param.set_dtype(self.compute_dtype)

    @classmethod
    def parameter_shapes(cls, config: Any) -> Dict[str, Tuple[int, ...]]:
        """{parameter name: shape} of the model `config` describes (no weights are allocated)."""
        return {p.name: tuple(p.shape) for p in cls(config).get_parameters()}

    def load_state_dict(self, tensors, source: str = "state dict") -> None:
        """Fill every parameter from a name -> array mapping, strictly (weights.load_parameters)."""
        load_parameters(self, lambda name: np.asarray(tensors[name]), tensors.keys(), source)

    def randomize(self, seed: int = 0):
        """Random weights of realistic scale (weights.random_parameter by parameter name), one tensor
        at a time; returns the model."""
        shapes = {p.name: p.shape for p in self.get_parameters()}
        load_parameters(self, lambda name: random_parameter(name, shapes[name], seed), shapes,
                        f"random weights (seed {seed})")
        return self
