"""The reward models, one package each, and their registry.

Each implements the RewardModel protocol (ms_rm.rewards.base). `REWARD_MODELS` maps registry
names to classes; `load_reward_model(path)` loads any converted folder by the format its
manifest records.
"""

from typing import Dict, Type

import mindspore as ms

from ..core.errors import CheckpointError
from ..io.converted import manifest_format
from .base import INPUT_KINDS, RewardModel
from .diffusion_rm import DiffusionRM
from .imagereward import ImageReward

REWARD_MODELS: Dict[str, Type[RewardModel]] = {cls.name: cls for cls in (DiffusionRM, ImageReward)}
_BY_FORMAT = {cls.format_name: cls for cls in REWARD_MODELS.values()}


def load_reward_model(path: str, dtype: ms.Type = ms.float32, mode: str = "graph", verify: bool = False):
    """The reward model in a converted folder, of whichever registered kind its manifest names."""
    fmt = manifest_format(path)
    if fmt not in _BY_FORMAT:
        raise CheckpointError(f"{path}: holds a '{fmt}' model, which this ms_rm does not know (it reads "
                              f"{sorted(_BY_FORMAT)}); upgrade ms_rm")
    return _BY_FORMAT[fmt].from_pretrained(path, dtype=dtype, mode=mode, verify=verify)


__all__ = ["RewardModel", "REWARD_MODELS", "INPUT_KINDS", "DiffusionRM", "ImageReward", "load_reward_model"]
