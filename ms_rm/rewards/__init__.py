"""The reward models, one package each, and their registry.

Each implements the RewardModel protocol (ms_rm.rewards.base). `REWARD_MODELS` maps registry
names to classes; `load_reward_model(path)` loads any converted folder by the format its
manifest records, and a folder without a manifest that a registered model reads as it is
(CLIP: a Hugging Face CLIPModel folder) by that model's `recognizes(path)`. The command line
(`ms-rm score --reward NAME`, `ms-rm convert --reward NAME`) is built over this registry.
"""

import os
from typing import Dict, Type

import mindspore as ms

from ..core.errors import CheckpointError
from ..io.converted import MANIFEST_FILE, manifest_format
from .aesthetic import Aesthetic
from .base import INPUT_KINDS, RewardModel
from .blip_score import BLIPScore
from .clip import CLIPModel
from .diffusion_rm import DiffusionRM
from .hpsv2 import HPSv2
from .imagereward import ImageReward

REWARD_MODELS: Dict[str, Type[RewardModel]] = {cls.name: cls for cls in (DiffusionRM, ImageReward, CLIPModel,
                                                                    Aesthetic, BLIPScore, HPSv2)}


def reward_model_class(path: str) -> Type[RewardModel]:
    """The registered class that reads the folder `path`: by its manifest's format, or, without a
    manifest, the model that recognises the folder (CheckpointError when none does)."""
    if not os.path.isfile(os.path.join(os.fspath(path), MANIFEST_FILE)):
        for cls in REWARD_MODELS.values():
            recognizes = getattr(cls, "recognizes", None)
            if recognizes is not None and recognizes(path):
                return cls
    fmt = manifest_format(path)                         # no manifest: its CheckpointError
    by_format = {cls.format_name: cls for cls in REWARD_MODELS.values()}
    if fmt not in by_format:
        raise CheckpointError(f"{path}: holds a '{fmt}' model, which this ms_rm does not know (it reads "
                              f"{sorted(by_format)}); upgrade ms_rm")
    return by_format[fmt]


def load_reward_model(path: str, dtype: ms.Type = ms.float32, mode: str = "graph", verify: bool = False):
    """The reward model in a converted folder (or a folder a registered model reads as it is), of
    whichever registered kind it holds."""
    return reward_model_class(path).from_pretrained(path, dtype=dtype, mode=mode, verify=verify)


__all__ = ["Aesthetic", "RewardModel", "REWARD_MODELS", "INPUT_KINDS", "BLIPScore", "CLIPModel", "DiffusionRM", "HPSv2",
           "ImageReward",
           "load_reward_model", "reward_model_class"]
