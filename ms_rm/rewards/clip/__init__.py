"""CLIP models (PickScore, CLIP score): transformers' CLIPModel in MindSpore, loaded from a
Hugging Face folder, with CLIPImageProcessor's preprocessing and CLIPTokenizer.

`CLIPModel` is the registered reward model "clip" (ms_rm.rewards.REWARD_MODELS): it reads the
Hugging Face folder as it is (no conversion), so `load_reward_model` recognises such a folder by
its config.json; the scorers (ms_rm.scoring.clip) add the preprocessing and the tokenizer.
"""

import mindspore as ms

from ...core.errors import ConfigError
from .config import CLIPConfig, ImageProcessing, load_clip_config, load_image_processing
from .loading import load_clip_model
from .model import CLIPModel
from .preprocess import load_tokenizer, pixel_values, resize_matrices, tokenize


def _from_pretrained(cls, path: str, dtype: ms.Type = ms.float32, mode: str = "graph",
                     verify: bool = False) -> CLIPModel:
    """The RewardModel protocol's loader: the Hugging Face CLIPModel folder `path`, strictly
    (load_clip_model). Defined here, beside the loader, because the loader imports the model."""
    if dtype != ms.float32:
        raise ConfigError(f"a CLIP model computes in float32 only, not {dtype}")
    if verify:
        raise ConfigError(f"{path}: a Hugging Face CLIPModel folder records no sha256 to verify against")
    return load_clip_model(path, mode=mode)


CLIPModel.from_pretrained = classmethod(_from_pretrained)

__all__ = ["CLIPConfig", "CLIPModel", "ImageProcessing", "load_clip_config", "load_clip_model",
           "load_image_processing", "load_tokenizer", "pixel_values", "resize_matrices", "tokenize"]
