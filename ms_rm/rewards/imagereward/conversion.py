"""The released ImageReward.pt -> an ms_rm converted folder, tensor by tensor.

ImageReward.pt is the state dict of the package's ImageReward module: `blip.visual_encoder.*`
(the ViT), `blip.text_encoder.*` (the text encoder), `blip.vision_proj.*` / `blip.text_proj.*`
(BLIP's contrastive projections, which the reward never uses), possibly the text encoder's
integer `embeddings.position_ids` buffer, and `mlp.layers.*`. Every key is either read into the
model (the `blip.` prefix dropped) or declared unused with a reason; any other key, a missing one,
or a shape the config does not predict is a one-line CheckpointError. The file is read through
torch's memory map one tensor at a time (ms_rm.io.torch_file), so a full-size conversion holds
about one tensor in memory.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from ...core.errors import CheckpointError, ConfigError
from ...core.weights import check_key_sets
from ...io.converted import write_converted
from ...io.files import check_new_output, read_config_file
from ...io.torch_file import TorchStateFile
from ..diffusion_rm.conversion import OUT_DTYPES
from .config import ImageRewardConfig

logger = logging.getLogger(__name__)

ParameterShapes = Callable[[ImageRewardConfig], Dict[str, Tuple[int, ...]]]

PREFIXES = {"blip.visual_encoder.": "visual_encoder.", "blip.text_encoder.": "text_encoder.", "mlp.": "mlp."}
POSITION_IDS = "blip.text_encoder.embeddings.position_ids"
UNUSED = {
    "blip.vision_proj.": "BLIP's image-text contrastive projection of the image: not part of the reward",
    "blip.text_proj.": "BLIP's image-text contrastive projection of the text: not part of the reward",
    POSITION_IDS: "the index buffer 0..P-1 (checked): positions are taken in order",
}


def model_name(key: str) -> Optional[str]:
    """The model parameter that checkpoint key `key` fills, or None."""
    for prefix, ours in PREFIXES.items():
        if key.startswith(prefix):
            return ours + key[len(prefix):]
    return None


def unused_reason(key: str) -> Optional[str]:
    for start, reason in UNUSED.items():
        if key == start or start.endswith(".") and key.startswith(start):
            return reason
    return None


def load_config(config: Any) -> ImageRewardConfig:
    """None (the released model), an ImageRewardConfig, a dict or a JSON file in its to_dict form."""
    if config is None:
        return ImageRewardConfig()
    if isinstance(config, ImageRewardConfig):
        return config
    if isinstance(config, dict):
        return ImageRewardConfig.from_dict(config, "config")
    return ImageRewardConfig.from_dict(read_config_file(config), str(config))


@dataclass
class ConversionPlan:
    """Every model parameter's key in the checkpoint, and every other key with its reason."""

    source: TorchStateFile
    config: ImageRewardConfig
    keys: Dict[str, str] = field(default_factory=dict)           # model name -> checkpoint key
    shapes: Dict[str, Tuple[int, ...]] = field(default_factory=dict)
    unused: Dict[str, str] = field(default_factory=dict)         # checkpoint key -> reason

    @classmethod
    def build(cls, path: str, parameter_shapes: ParameterShapes, config: Any = None) -> "ConversionPlan":
        cfg = load_config(config)
        source = TorchStateFile(path, non_float_ok=lambda key: unused_reason(key) is not None)
        try:
            plan = cls(source, cfg, shapes=parameter_shapes(cfg))
            plan._account()
        except BaseException:
            source.close()
            raise
        return plan

    def _account(self) -> None:
        hint = "Is this ImageReward.pt, and does the config (--config) describe it?"
        found = {}
        for key in self.source.keys():
            name = model_name(key)
            if name in self.shapes:
                found[name] = key
                continue
            reason = unused_reason(key)
            if reason is None:
                found[key] = key          # reported as unexpected below
            else:
                self.unused[key] = reason
        check_key_sets(self.shapes, found, self.source.path, hint)
        if POSITION_IDS in self.unused:
            ids = np.asarray(self.source.read(POSITION_IDS)).reshape(-1)
            if not np.array_equal(ids, np.arange(ids.size)):
                raise CheckpointError(f"{self.source.path}: buffer '{POSITION_IDS}' is not 0..{ids.size - 1}; ms_rm "
                                      "takes text positions in order only")
        self.keys = found
        problems = [f"'{key}' has shape {self.source.shape(key)}, the model expects {self.shapes[name]}"
                    for name, key in found.items() if tuple(self.source.shape(key)) != self.shapes[name]]
        if problems:
            more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
            raise CheckpointError(f"{self.source.path}: " + "; ".join(problems[:3]) + more + f". {hint}")

    @property
    def names(self) -> List[str]:
        return list(self.shapes)

    def out_dtype(self, name: str, dtype: str) -> np.dtype:
        if dtype not in OUT_DTYPES:
            raise ConfigError(f"dtype must be one of {sorted(OUT_DTYPES)}, got {dtype!r}")
        return OUT_DTYPES[dtype] or self.source.dtype(self.keys[name])

    def tensor(self, name: str, dtype: str = "keep") -> np.ndarray:
        """Parameter `name`, read and checked finite, cast to `dtype`."""
        key, out = self.keys[name], self.out_dtype(name, dtype)
        stored = self.source.read(key)
        if not np.isfinite(stored.astype(np.float32)).all():
            raise CheckpointError(f"{self.source.path}: tensor '{key}' has NaN/Inf values")
        return stored if stored.dtype == out else stored.astype(out)

    def close(self) -> None:
        self.source.close()


def convert(src: str, out: str, parameter_shapes: ParameterShapes, config: Any = None, dtype: str = "keep",
            force: bool = False, progress: bool = True) -> str:
    """ImageReward.pt `src` -> converted folder `out` (written atomically); its path."""
    out = check_new_output(out, force)
    plan = ConversionPlan.build(src, parameter_shapes, config)
    try:
        specs = [(name, plan.out_dtype(name, dtype), plan.shapes[name]) for name in plan.names]
        if plan.unused:
            logger.info("%s: %d tensors not used (see manifest.json)", src, len(plan.unused))
        return write_converted(
            out, config=plan.config.to_dict(), specs=specs, produce=lambda name: plan.tensor(name, dtype),
            describe=lambda name: {"shape": list(plan.shapes[name]), "from": plan.keys[name]},
            sources=[plan.source.path], manifest={"dtype": dtype, "unused": {"checkpoint": plan.unused}},
            force=force, progress=progress)
    finally:
        plan.close()
