"""peft LoRA adapters, merged into base weights in MindSpore; and written (save_lora, write_adapter).

An adapter folder holds `adapter_config.json` and `adapter_model.safetensors` with keys
`base_model.model.{module}.lora_A.weight` (r, in) and `...lora_B.weight` (out, r). The merged
weight is W' = W + scale * B @ A with scale = alpha / r, or alpha / sqrt(r) with use_rslora;
r and alpha come from rank_pattern / alpha_pattern when a pattern matches the module. The
product runs in float32 in MindSpore; the caller casts the result to the output dtype.

Which modules are adapted follows peft's rules: target_modules as a regex (full match) or a
list (exact name or '.'-suffix, so `to_q` also hits `attn2.to_q`); exclude_modules likewise.
Anything this module does not implement (DoRA, trained biases, layer selection, saved
modules, other adapter types) is refused with an error that names the setting.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Tuple, Union

import numpy as np
from mindspore import Tensor, mint

from ..core.config import is_int, is_number
from ..core.errors import CheckpointError, ConfigError
from .files import atomic_folder, read_config_file, write_json
from .safetensors_file import SafetensorsFile, SafetensorsWriter

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_KEY = re.compile(r"base_model\.model\.(.+)\.lora_([AB])\.weight")

# adapter_config.json settings that change the math; each must be off for a plain LoRA merge.
_REFUSED = {
    "use_dora": "DoRA adapters (use_dora) are not supported",
    "lora_bias": "trained LoRA biases (lora_bias) are not supported",
    "use_qalora": "QA-LoRA adapters (use_qalora) are not supported",
    "fan_in_fan_out": "fan_in_fan_out adapters (Conv1D-style weights) are not supported",
    "layers_to_transform": "layers_to_transform is not supported",
    "layer_replication": "layer_replication is not supported",
    "modules_to_save": "adapters that save whole modules (modules_to_save) are not supported",
    "trainable_token_indices": "trainable_token_indices is not supported",
    "target_parameters": "target_parameters (LoRA on raw parameters) is not supported",
}


@dataclass(frozen=True)
class LoraSettings:
    """The parts of a peft LoraConfig that decide which modules merge and with what scale."""

    r: int
    lora_alpha: float
    target_modules: Union[str, Tuple[str, ...]]
    exclude_modules: Union[None, str, Tuple[str, ...]] = None
    rank_pattern: Tuple[Tuple[str, int], ...] = ()
    alpha_pattern: Tuple[Tuple[str, float], ...] = ()
    use_rslora: bool = False

    @classmethod
    def from_dict(cls, d: Mapping, source: str) -> "LoraSettings":
        peft_type = d.get("peft_type", "LORA")
        if peft_type != "LORA":
            raise ConfigError(f"{source}: peft_type '{peft_type}' is not supported (only LORA)")
        for key, message in _REFUSED.items():
            if d.get(key):
                raise ConfigError(f"{source}: {message}")
        if d.get("bias", "none") != "none":
            raise ConfigError(f"{source}: bias='{d['bias']}' (trained biases) is not supported; only 'none'")

        def names(key, allow_none):
            value = d.get(key)
            if value is None and allow_none:
                return None
            if isinstance(value, str):
                return value
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                return tuple(value)
            raise ConfigError(f"{source}: {key} must be a regex string or a list of names, got {value!r}")

        def pattern(key, kind):
            value = d.get(key) or {}
            if not isinstance(value, dict) or not all(isinstance(v, kind) and not isinstance(v, bool)
                                                      for v in value.values()):
                raise ConfigError(f"{source}: {key} must map module names to numbers, got {value!r}")
            return tuple(value.items())

        r, alpha = d.get("r"), d.get("lora_alpha")
        if not is_int(r, 1):
            raise ConfigError(f"{source}: r must be a positive integer, got {r!r}")
        if not is_number(alpha):
            raise ConfigError(f"{source}: lora_alpha must be a number, got {alpha!r}")
        use_rslora = d.get("use_rslora", False)
        if not isinstance(use_rslora, bool):
            raise ConfigError(f"{source}: use_rslora must be true or false, got {use_rslora!r}")
        return cls(r=r, lora_alpha=float(alpha), target_modules=names("target_modules", False),
                   exclude_modules=names("exclude_modules", True),
                   rank_pattern=pattern("rank_pattern", int), alpha_pattern=pattern("alpha_pattern", (int, float)),
                   use_rslora=use_rslora)

    def targets(self, module: str) -> bool:
        """Whether peft puts a LoRA on `module` (its name inside the wrapped model)."""
        if self.exclude_modules:
            if isinstance(self.exclude_modules, str):
                if re.fullmatch(self.exclude_modules, module):
                    return False
            elif module in self.exclude_modules or any(module.endswith("." + e) for e in self.exclude_modules):
                return False
        if isinstance(self.target_modules, str):
            return re.fullmatch(self.target_modules, module) is not None
        return module in self.target_modules or any(module.endswith("." + t) for t in self.target_modules)

    @staticmethod
    def _pattern_value(patterns, module: str, default):
        for key, value in patterns:                 # peft: first key that matches as a '.'-suffix regex
            if re.match(rf"(.*\.)?({key})$", module):
                return value
        return default

    def rank_alpha_scale(self, module: str) -> Tuple[int, float, float]:
        r = self._pattern_value(self.rank_pattern, module, self.r)
        alpha = self._pattern_value(self.alpha_pattern, module, self.lora_alpha)
        scale = alpha / math.sqrt(r) if self.use_rslora else alpha / r
        return r, alpha, scale


class LoraAdapter:
    """A peft adapter folder: settings plus the A/B factors of each adapted module."""

    def __init__(self, folder: str):
        self.folder = os.fspath(folder)
        config_path = os.path.join(self.folder, ADAPTER_CONFIG)
        weights_path = os.path.join(self.folder, ADAPTER_WEIGHTS)
        if not os.path.isfile(weights_path) and os.path.isfile(os.path.join(self.folder, "adapter_model.bin")):
            raise CheckpointError(f"{self.folder}: holds adapter_model.bin (a pickle); only "
                                  "adapter_model.safetensors is read: re-save with safe_serialization=True")
        self.settings = LoraSettings.from_dict(read_config_file(config_path), config_path)
        self.file = SafetensorsFile(weights_path)
        self.config_path, self.weights_path = config_path, weights_path
        factors: Dict[str, Dict[str, str]] = {}
        for key in self.file.keys():
            match = _KEY.fullmatch(key)
            if not match:
                raise CheckpointError(f"{weights_path}: tensor '{key}' is not a LoRA factor "
                                      "(expected base_model.model.<module>.lora_A/lora_B.weight): "
                                      "DoRA, biases and other adapter tensors are not supported")
            factors.setdefault(match.group(1), {})[match.group(2)] = key
        half = sorted(m for m, ab in factors.items() if len(ab) != 2)
        if half:
            raise CheckpointError(f"{weights_path}: modules with only one of lora_A/lora_B: {half[:5]}")
        self.modules: Dict[str, Tuple[str, str]] = {m: (ab["A"], ab["B"]) for m, ab in factors.items()}

    def check_module(self, module: str, weight_shape: Tuple[int, ...]) -> Tuple[int, float, float]:
        """Check module's factors against the settings and the base weight; -> (r, alpha, scale)."""
        if not self.settings.targets(module):
            raise CheckpointError(f"{self.weights_path}: holds a LoRA for '{module}', which "
                                  f"{self.config_path} does not target (target_modules / exclude_modules)")
        a_key, b_key = self.modules[module]
        r, alpha, scale = self.settings.rank_alpha_scale(module)
        out_dim, in_dim = weight_shape
        for key, expected in ((a_key, (r, in_dim)), (b_key, (out_dim, r))):
            if self.file.shape(key) != expected:
                raise CheckpointError(f"{self.weights_path}: '{key}' has shape {self.file.shape(key)}, "
                                      f"expected {expected} (rank {r} from {ADAPTER_CONFIG}, base weight "
                                      f"{tuple(weight_shape)})")
        return r, alpha, scale

    def delta(self, module: str, scale: float) -> np.ndarray:
        """scale * B @ A in float32, computed in MindSpore."""
        a_key, b_key = self.modules[module]
        factors = []
        for key in (a_key, b_key):
            values = self.file.read(key).astype(np.float32)
            if not np.isfinite(values).all():
                raise CheckpointError(f"{self.weights_path}: tensor '{key}' has NaN/Inf values")
            factors.append(Tensor(values))
        return (mint.matmul(factors[1], factors[0]) * scale).asnumpy()

    def close(self) -> None:
        self.file.close()


# --- writing adapters ----------------------------------------------------------------------------
def write_adapter(folder: str, factors: Mapping[str, np.ndarray], rank: int, alpha: float, targets,
                  exclude=None, init_lora_weights=True) -> None:
    """adapter_config.json + adapter_model.safetensors (peft's format) into an open folder; factors:
    {base_model.model.{module}.lora_A/B.weight: array} (a generator's lora_state())."""
    write_json(os.path.join(folder, ADAPTER_CONFIG), {
        "peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": sorted(set(targets)),
        "exclude_modules": None if exclude is None else sorted(set(exclude)), "lora_dropout": 0.0, "bias": "none",
        "use_rslora": False, "use_dora": False,
        "fan_in_fan_out": False, "init_lora_weights": init_lora_weights, "rank_pattern": {}, "alpha_pattern": {},
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None, "task_type": None,
        "inference_mode": True, "base_model_name_or_path": None, "revision": None})
    write_arrays(os.path.join(folder, ADAPTER_WEIGHTS), {k: np.asarray(v).astype(np.float32) for k, v in factors.items()})


def write_arrays(path: str, arrays: Dict[str, np.ndarray]) -> None:
    """Arrays by name as one safetensors file."""
    writer = SafetensorsWriter(path, [(k, v.dtype, v.shape) for k, v in arrays.items()])
    for key, value in arrays.items():
        writer.write(key, value)
    writer.close()


def save_lora(generator: Any, folder: str, rank: int, alpha: float, targets, force: bool = True) -> str:
    """The generator's LoRA factors as a peft adapter folder (adapter_config.json +
    adapter_model.safetensors), which peft's PeftModel.from_pretrained loads; atomically."""
    with atomic_folder(folder, force=force) as out:
        write_adapter(out, generator.lora_state(), rank, alpha, targets)
    return folder
