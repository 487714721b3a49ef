"""ms_rm: MindSpore-native reward models for diffusion generators.

`import ms_rm` needs MindSpore, numpy, safetensors, PyYAML and tqdm only; it never imports
torch (nor mindone). Layout (imports point one way, left to right):

    cli -> training / scoring / generators / search / flows -> rewards -> backbones / encoders -> vae -> core / io
"""

import logging

from .core.errors import CheckpointError, ConfigError, InputError, MissingDependencyError, MsRmError
from .rewards import REWARD_MODELS, RewardModel, load_reward_model
from .rewards.diffusion_rm import DiffusionRM, HeadConfig, RewardModelConfig, SchedulerConfig, load_config
from .backbones.config import FluxBackboneConfig, SD3BackboneConfig, ZImageBackboneConfig
from .generators.sd3_generator import SD3Generator
from .scoring import (SCORERS, DiffusionRMFluxScorer, DiffusionRMScorer, DiffusionRMSD3Scorer,
                      DiffusionRMZImageScorer, MultiScorer, PickScoreScorer, CLIPScorer)
from .version import __version__

__all__ = [
    "DiffusionRM", "RewardModel", "REWARD_MODELS", "load_reward_model",
    "DiffusionRMScorer", "DiffusionRMSD3Scorer", "DiffusionRMFluxScorer", "DiffusionRMZImageScorer", "MultiScorer",
    "PickScoreScorer", "CLIPScorer", "SCORERS", "SD3Generator",
    "RewardModelConfig", "SD3BackboneConfig", "FluxBackboneConfig", "ZImageBackboneConfig", "HeadConfig", "SchedulerConfig",
    "load_config", "MsRmError", "ConfigError", "CheckpointError", "InputError",
    "MissingDependencyError", "__version__",
]

logging.getLogger(__name__).addHandler(logging.NullHandler())
