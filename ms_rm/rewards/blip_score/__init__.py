"""The BLIP score (the image-reward package's `BLIPScore` baseline) on BLIP's released
model_large.pth, in MindSpore: the cosine of BLIP's contrastive image and text features, on
ImageReward's towers (ms_rm.rewards.imagereward)."""

from .config import BLIPScoreConfig, tiny_config
from .model import BLIPScore

__all__ = ["BLIPScore", "BLIPScoreConfig", "tiny_config"]
