"""LoRA adapters in the two formats users share, merged into base weights in MindSpore; and
written in either (save_lora, write_adapter, write_diffusers_lora).

* peft: an adapter folder holds `adapter_config.json` and `adapter_model.safetensors` with keys
  `base_model.model.{module}.lora_A.weight` (r, in) and `...lora_B.weight` (out, r).
* diffusers: `pytorch_lora_weights.safetensors` (StableDiffusion3Pipeline.save_lora_weights),
  keys `transformer.{module}.lora_A.weight` / `...lora_B.weight`, no config file: the settings
  are the file's `lora_adapter_metadata` (a LoraConfig as JSON, keys prefixed "transformer.")
  when it has one, else what diffusers derives: the rank from the shapes, alpha = rank (scale 1)
  when every module has one rank.
  `LoraAdapter` reads a folder holding it or the file itself.

The merged weight is W' = W + scale * B @ A with scale = alpha / r, or alpha / sqrt(r) with
use_rslora; r and alpha come from rank_pattern / alpha_pattern when a pattern matches the module.
The product runs in float32 in MindSpore; the caller casts the result to the output dtype.

Which modules are adapted follows peft's rules: target_modules as a regex (full match) or a
list (exact name or '.'-suffix, so `to_q` also hits `attn2.to_q`); exclude_modules likewise.
Anything this module does not implement (DoRA, trained biases, layer selection, saved
modules, other adapter types) is refused with an error that names the setting.
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import numpy as np
from mindspore import Tensor, mint

from ..core.config import is_int, is_number
from ..core.errors import CheckpointError, ConfigError
from .files import atomic_folder, read_config_file, write_json
from .safetensors_file import SafetensorsFile, SafetensorsWriter

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"     # what StableDiffusion3Pipeline.save_lora_weights writes
DIFFUSERS_METADATA = "lora_adapter_metadata"               # its safetensors metadata key: a LoraConfig as JSON
TRANSFORMER_PREFIX = "transformer."
LORA_FORMATS = (f"a peft adapter folder ({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS}), a diffusers LoRA folder "
                f"({DIFFUSERS_WEIGHTS}, as StableDiffusion3Pipeline.save_lora_weights writes) "
                "or that .safetensors file")
_KEY = re.compile(r"base_model\.model\.(.+)\.lora_([AB])\.weight")
_DIFFUSERS_KEY = re.compile(r"transformer\.(.+)\.lora_([AB])\.weight")

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


def locate_lora(path: str) -> Tuple[str, str, Optional[str]]:
    """(format "peft" or "diffusers", the weights file, the peft config file or None) of a LoRA
    path; anything else is refused with one line naming the formats read."""
    path = os.fspath(path)
    if os.path.isdir(path):
        config, weights = os.path.join(path, ADAPTER_CONFIG), os.path.join(path, ADAPTER_WEIGHTS)
        if os.path.isfile(config):
            if not os.path.isfile(weights) and os.path.isfile(os.path.join(path, "adapter_model.bin")):
                raise CheckpointError(f"{path}: holds adapter_model.bin (a pickle); only adapter_model.safetensors "
                                      "is read: re-save with safe_serialization=True")
            return "peft", weights, config
        if os.path.isfile(os.path.join(path, DIFFUSERS_WEIGHTS)):
            return "diffusers", os.path.join(path, DIFFUSERS_WEIGHTS), None
        if os.path.isfile(os.path.join(path, "pytorch_lora_weights.bin")):
            raise CheckpointError(f"{path}: holds pytorch_lora_weights.bin (a pickle); only {DIFFUSERS_WEIGHTS} "
                                  "is read: re-save with safe_serialization=True")
    elif os.path.isfile(path) and path.endswith(".safetensors"):
        folder = os.path.dirname(path)
        if os.path.basename(path) == ADAPTER_WEIGHTS and os.path.isfile(os.path.join(folder, ADAPTER_CONFIG)):
            return "peft", path, os.path.join(folder, ADAPTER_CONFIG)
        return "diffusers", path, None
    what = "no such file or folder" if not os.path.exists(path) else "no LoRA there"
    raise CheckpointError(f"{path}: {what}; a LoRA is read from {LORA_FORMATS}")


class LoraAdapter:
    """A LoRA in either format users share: its settings and the A/B factors of each adapted
    module, by the module's name inside the transformer.

    * peft adapter folder: settings from adapter_config.json, factors in adapter_model.safetensors
      as base_model.model.{module}.lora_A/B.weight.
    * diffusers (pytorch_lora_weights.safetensors, a folder holding it or the file itself, as
      StableDiffusion3Pipeline.save_lora_weights writes it): factors transformer.{module}.lora_A/B.weight;
      settings from the file's lora_adapter_metadata when it carries one (the LoraConfig diffusers'
      training scripts save, its keys prefixed "transformer."), else as diffusers derives them from
      the shapes (`_diffusers_settings`).
    """

    def __init__(self, path: str):
        self.path = os.fspath(path)
        self.format, self.weights_path, self.config_path = locate_lora(self.path)
        settings, self.settings_source = None, self.config_path        # where the settings come from, for messages
        if self.config_path is not None:
            settings = LoraSettings.from_dict(read_config_file(self.config_path), self.config_path)
        self.file = SafetensorsFile(self.weights_path)
        try:
            self.modules = self._factors()
            if settings is None:
                settings, self.settings_source = self._diffusers_settings()
        except BaseException:
            self.file.close()
            raise
        self.settings = settings

    def _factors(self) -> Dict[str, Tuple[str, str]]:
        """module -> (lora_A key, lora_B key), every tensor of the file accounted for."""
        pattern = _KEY if self.format == "peft" else _DIFFUSERS_KEY
        factors: Dict[str, Dict[str, str]] = {}
        for key in self.file.keys():
            match = pattern.fullmatch(key)
            if not match:
                raise CheckpointError(f"{self.weights_path}: tensor '{key}' {self._not_a_factor(key)}")
            factors.setdefault(match.group(1), {})[match.group(2)] = key
        if not factors:
            raise CheckpointError(f"{self.weights_path}: holds no LoRA factors")
        half = sorted(m for m, ab in factors.items() if len(ab) != 2)
        if half:
            raise CheckpointError(f"{self.weights_path}: modules with only one of lora_A/lora_B: {half[:5]}")
        return {m: (ab["A"], ab["B"]) for m, ab in factors.items()}

    def _not_a_factor(self, key: str) -> str:
        if self.format == "peft":
            return ("is not a LoRA factor (expected base_model.model.<module>.lora_A/lora_B.weight): DoRA, biases "
                    "and other adapter tensors are not supported")
        if key.startswith(("text_encoder.", "text_encoder_2.")):
            return "is a text encoder's LoRA: ms_rm applies a LoRA to the SD3 transformer only"
        if _KEY.fullmatch(key):
            return f"is a peft adapter's: pass its folder, with its {ADAPTER_CONFIG}"
        return ("is not a transformer LoRA factor in diffusers' format (transformer.<module>.lora_A/lora_B.weight, "
                "as StableDiffusion3Pipeline.save_lora_weights writes): other trainers' key formats (kohya's "
                "lora_unet_*, lora_down / lora_up), DoRA and biases are not read")

    def _diffusers_settings(self) -> Tuple[LoraSettings, str]:
        """(settings, where they come from) of a diffusers file: its lora_adapter_metadata, as diffusers'
        load_lora_adapter reads it, else what diffusers' get_peft_kwargs derives from the lora_B shapes
        in the file's (sorted) key order: r = the most common rank (ties: the first), rank_pattern the
        modules of other ranks, lora_alpha = the rank of the first module for every module, every
        module in the file targeted. With one rank throughout that is alpha = r, scale 1; with mixed
        ranks diffusers' scale is first rank / rank, reproduced here as it is."""
        raw = self.file.metadata.get(DIFFUSERS_METADATA)
        if raw is not None:
            source = f"{self.weights_path} ({DIFFUSERS_METADATA})"
            try:
                packed = json.loads(raw)
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{source}: not valid JSON ({e})") from None
            config = {k[len(TRANSFORMER_PREFIX):]: v for k, v in packed.items()
                      if k.startswith(TRANSFORMER_PREFIX)} if isinstance(packed, dict) else {}
            if config:
                return LoraSettings.from_dict(config, source), source
        ranks = {}
        for key in sorted(k for k in self.file.keys() if k.endswith(".lora_B.weight")):
            if len(self.file.shape(key)) != 2:
                raise CheckpointError(f"{self.weights_path}: '{key}' has shape {self.file.shape(key)}: a LoRA factor "
                                      "is a matrix")
            ranks[_DIFFUSERS_KEY.fullmatch(key).group(1)] = self.file.shape(key)[1]
        r = collections.Counter(ranks.values()).most_common()[0][0]
        source = f"{self.weights_path} (no {DIFFUSERS_METADATA}: settings from the lora_B shapes, as diffusers)"
        config = {"r": r, "lora_alpha": next(iter(ranks.values())), "target_modules": sorted(ranks),
                  "rank_pattern": {f"^{m}": rank for m, rank in ranks.items() if rank != r}}
        return LoraSettings.from_dict(config, source), source

    def check_module(self, module: str, weight_shape: Tuple[int, ...]) -> Tuple[int, float, float]:
        """Check module's factors against the settings and the base weight; -> (r, alpha, scale)."""
        if not self.settings.targets(module):
            raise CheckpointError(f"{self.weights_path}: holds a LoRA for '{module}', which "
                                  f"{self.settings_source} does not target (target_modules / exclude_modules)")
        a_key, b_key = self.modules[module]
        r, alpha, scale = self.settings.rank_alpha_scale(module)
        out_dim, in_dim = weight_shape
        for key, expected in ((a_key, (r, in_dim)), (b_key, (out_dim, r))):
            if self.file.shape(key) != expected:
                raise CheckpointError(f"{self.weights_path}: '{key}' has shape {self.file.shape(key)}, "
                                      f"expected {expected} (rank {r} from {self.settings_source}, base weight "
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
LORA_WRITE_FORMATS = ("peft", "diffusers")


def adapter_config(rank: int, alpha: float, targets, exclude=None, init_lora_weights=True) -> dict:
    """The LoraConfig of a plain LoRA, as peft writes it: adapter_config.json, and diffusers'
    lora_adapter_metadata."""
    return {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": sorted(set(targets)),
            "exclude_modules": None if exclude is None else sorted(set(exclude)), "lora_dropout": 0.0, "bias": "none",
            "use_rslora": False, "use_dora": False,
            "fan_in_fan_out": False, "init_lora_weights": init_lora_weights, "rank_pattern": {}, "alpha_pattern": {},
            "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None, "task_type": None,
            "inference_mode": True, "base_model_name_or_path": None, "revision": None}


def write_adapter(folder: str, factors: Mapping[str, np.ndarray], rank: int, alpha: float, targets,
                  exclude=None, init_lora_weights=True) -> None:
    """adapter_config.json + adapter_model.safetensors (peft's format) into an open folder; factors:
    {base_model.model.{module}.lora_A/B.weight: array} (a generator's lora_state())."""
    write_json(os.path.join(folder, ADAPTER_CONFIG), adapter_config(rank, alpha, targets, exclude, init_lora_weights))
    write_arrays(os.path.join(folder, ADAPTER_WEIGHTS), {k: np.asarray(v).astype(np.float32) for k, v in factors.items()})


def write_diffusers_lora(folder: str, factors: Mapping[str, np.ndarray], rank: int, alpha: float, targets,
                         exclude=None) -> None:
    """pytorch_lora_weights.safetensors (diffusers' format, what StableDiffusion3Pipeline.save_lora_weights
    writes) into an open folder, the settings as its lora_adapter_metadata (as diffusers' training
    scripts save them: alpha survives); factors as write_adapter's."""
    config = adapter_config(rank, alpha, targets, exclude)
    metadata = {"format": "pt", DIFFUSERS_METADATA: json.dumps({TRANSFORMER_PREFIX + k: v for k, v in config.items()},
                                                               indent=2, sort_keys=True)}
    arrays = {}
    for key, value in factors.items():
        module, factor = _KEY.fullmatch(key).groups()
        arrays[f"{TRANSFORMER_PREFIX}{module}.lora_{factor}.weight"] = np.asarray(value).astype(np.float32)
    write_arrays(os.path.join(folder, DIFFUSERS_WEIGHTS), arrays, metadata)


def write_arrays(path: str, arrays: Dict[str, np.ndarray], metadata: Optional[Mapping[str, str]] = None) -> None:
    """Arrays by name as one safetensors file."""
    writer = SafetensorsWriter(path, [(k, v.dtype, v.shape) for k, v in arrays.items()], metadata)
    for key, value in arrays.items():
        writer.write(key, value)
    writer.close()


def save_lora(generator: Any, folder: str, rank: int, alpha: float, targets, force: bool = True,
              lora_format: str = "peft") -> str:
    """The generator's LoRA factors as a new folder, atomically: a peft adapter folder
    (adapter_config.json + adapter_model.safetensors, which peft's PeftModel.from_pretrained loads)
    or, lora_format="diffusers", pytorch_lora_weights.safetensors (which StableDiffusion3Pipeline
    .load_lora_weights loads)."""
    if lora_format not in LORA_WRITE_FORMATS:
        raise ConfigError(f"lora_format must be 'peft' or 'diffusers', got {lora_format!r}")
    write = write_adapter if lora_format == "peft" else write_diffusers_lora
    with atomic_folder(folder, force=force) as out:
        write(out, generator.lora_state(), rank, alpha, targets)
    return folder
