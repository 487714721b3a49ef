"""Diffusion-RM (DiNa-LRM): a text-image reward computed in a diffusion generator's latent space.

config (what to build) -> noise (u -> sigma, timestep) -> head (the reward head) -> model
(DiffusionRM: backbone cut + head) ; conversion (the reference's files -> a plan -> a model or
a converted folder).
"""

from .config import FORMAT_NAME, HeadConfig, RewardModelConfig, SchedulerConfig, load_config
from .model import DiffusionRM
from .noise import NoiseSchedule, RECOMMENDED_U, recommended_u

__all__ = ["DiffusionRM", "RewardModelConfig", "HeadConfig", "SchedulerConfig", "load_config", "FORMAT_NAME",
           "NoiseSchedule", "RECOMMENDED_U", "recommended_u"]
