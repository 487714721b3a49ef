"""ImageReward (THUDM, the `image-reward` package): BLIP ViT + BLIP text encoder + MLP, in MindSpore."""

from .config import ImageRewardConfig, TextConfig, VisionConfig, tiny_config
from .model import ImageReward
from .tokenizer import ImageRewardTokenizer

__all__ = ["ImageReward", "ImageRewardConfig", "ImageRewardTokenizer", "TextConfig", "VisionConfig", "tiny_config"]
