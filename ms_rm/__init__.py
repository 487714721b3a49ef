"""ms_rm: MindSpore-native diffusion reward models (Diffusion-RM / DiNa-LRM).

`import ms_rm` needs MindSpore, numpy and safetensors only; it never imports torch (nor mindone).
"""

import logging

from .config import HeadConfig, RewardModelConfig, SchedulerConfig, SD3BackboneConfig, load_config
from .errors import CheckpointError, ConfigError, InputError, MissingDependencyError, MsRmError
from .model import DiffusionRM
from .scorers import DiffusionRMFluxScorer, DiffusionRMScorer, DiffusionRMSD3Scorer, MultiScorer

__version__ = "0.1.0"

__all__ = [
    "DiffusionRM", "DiffusionRMScorer", "DiffusionRMSD3Scorer", "DiffusionRMFluxScorer", "MultiScorer",
    "RewardModelConfig", "SD3BackboneConfig", "HeadConfig", "SchedulerConfig",
    "load_config", "MsRmError", "ConfigError", "CheckpointError", "InputError",
    "MissingDependencyError", "__version__",
]

logging.getLogger(__name__).addHandler(logging.NullHandler())
