"""What to build: a CLIP model's configuration, read from a Hugging Face `CLIPModel` folder.

`config.json` holds `projection_dim`, `logit_scale_init_value`, `text_config` and
`vision_config`; a key a config leaves out takes transformers' default (CLIPTextConfig,
CLIPVisionConfig), so folders saved by any transformers version read the same. Other keys
(training settings, token ids of the tokenizer, ...) are ignored. `preprocessor_config.json`
(CLIPImageProcessor's settings, in the model folder or a folder of its own) gives the image
preprocessing; a folder without one is an error, never a silent fall back to defaults (an
empty `{}` file is CLIPImageProcessor's defaults at the vision tower's image size).

Every problem raises ConfigError naming the file and the key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Tuple

from ...core.config import get_value, positive
from ...core.errors import ConfigError
from ...io.files import read_json

# hidden_act values and the activation each one is (transformers' ACT2FN names).
ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# transformers' eos_token_id 2 is the legacy value of configs saved before its PR #24773: the
# pooled token is then the position of the highest token id (the end token in CLIP's vocabulary).
LEGACY_EOS_TOKEN_ID = 2


@dataclass(frozen=True)
class TowerConfig:
    """One tower's transformer: width, depth, heads, MLP width, activation, LayerNorm eps."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    hidden_act: str
    layer_norm_eps: float

    @classmethod
    def from_dict(cls, d: Mapping, defaults: "TowerConfig", source: str) -> "TowerConfig":
        config = cls(
            hidden_size=positive(get_value(d, "hidden_size", int, source, defaults.hidden_size), "hidden_size", source),
            num_hidden_layers=positive(get_value(d, "num_hidden_layers", int, source, defaults.num_hidden_layers),
                                       "num_hidden_layers", source),
            num_attention_heads=positive(get_value(d, "num_attention_heads", int, source,
                                                   defaults.num_attention_heads), "num_attention_heads", source),
            intermediate_size=positive(get_value(d, "intermediate_size", int, source, defaults.intermediate_size),
                                       "intermediate_size", source),
            hidden_act=get_value(d, "hidden_act", str, source, defaults.hidden_act),
            layer_norm_eps=get_value(d, "layer_norm_eps", float, source, defaults.layer_norm_eps),
        )
        if config.hidden_size % config.num_attention_heads:
            raise ConfigError(f"{source}: hidden_size {config.hidden_size} is not divisible by num_attention_heads "
                              f"{config.num_attention_heads}")
        if config.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"{source}: hidden_act {config.hidden_act!r} is not supported; expected one of "
                              f"{sorted(ACTIVATIONS)}")
        if not 0 < config.layer_norm_eps < 1:
            raise ConfigError(f"{source}: layer_norm_eps must lie in (0, 1), got {config.layer_norm_eps}")
        return config

    @property
    def activation(self) -> str:
        return ACTIVATIONS[self.hidden_act]


@dataclass(frozen=True)
class TextConfig:
    tower: TowerConfig
    vocab_size: int = 49408
    max_position_embeddings: int = 77
    eos_token_id: int = 49407


@dataclass(frozen=True)
class VisionConfig:
    tower: TowerConfig
    image_size: int = 224
    patch_size: int = 32
    num_channels: int = 3

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


# transformers 4.57's CLIPTextConfig / CLIPVisionConfig defaults (CLIP ViT-B/32).
TEXT_DEFAULTS = TowerConfig(hidden_size=512, num_hidden_layers=12, num_attention_heads=8, intermediate_size=2048,
                            hidden_act="quick_gelu", layer_norm_eps=1e-5)
VISION_DEFAULTS = TowerConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                              hidden_act="quick_gelu", layer_norm_eps=1e-5)


@dataclass(frozen=True)
class CLIPConfig:
    text: TextConfig
    vision: VisionConfig
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592

    @classmethod
    def from_dict(cls, d: Mapping, source: str) -> "CLIPConfig":
        text_d, vision_d = (get_value(d, key, dict, source, {}) for key in ("text_config", "vision_config"))
        text_source, vision_source = f"{source} [text_config]", f"{source} [vision_config]"
        text = TextConfig(
            tower=TowerConfig.from_dict(text_d, TEXT_DEFAULTS, text_source),
            vocab_size=positive(get_value(text_d, "vocab_size", int, text_source, 49408), "vocab_size",
                                text_source, limit=1 << 22),
            max_position_embeddings=positive(get_value(text_d, "max_position_embeddings", int, text_source, 77),
                                             "max_position_embeddings", text_source),
            eos_token_id=get_value(text_d, "eos_token_id", int, text_source, 49407))
        vision = VisionConfig(
            tower=TowerConfig.from_dict(vision_d, VISION_DEFAULTS, vision_source),
            image_size=positive(get_value(vision_d, "image_size", int, vision_source, 224), "image_size", vision_source),
            patch_size=positive(get_value(vision_d, "patch_size", int, vision_source, 32), "patch_size", vision_source),
            num_channels=positive(get_value(vision_d, "num_channels", int, vision_source, 3), "num_channels",
                                  vision_source))
        if vision.image_size % vision.patch_size:
            raise ConfigError(f"{vision_source}: image_size {vision.image_size} is not a multiple of patch_size "
                              f"{vision.patch_size}")
        if vision.num_channels != 3:
            raise ConfigError(f"{vision_source}: num_channels must be 3 (RGB images), got {vision.num_channels}")
        return cls(text=text, vision=vision,
                   projection_dim=positive(get_value(d, "projection_dim", int, source, 512), "projection_dim", source),
                   logit_scale_init_value=get_value(d, "logit_scale_init_value", float, source, 2.6592))


@dataclass(frozen=True)
class ImageProcessing:
    """CLIPImageProcessor's settings: resize the shortest edge (bicubic), center crop, rescale to
    [0, 1], normalise with mean / std; non-RGB PIL images converted to RGB."""

    shortest_edge: int
    crop_size: Tuple[int, int]              # (height, width)
    mean: Tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: Tuple[float, float, float] = OPENAI_CLIP_STD
    do_convert_rgb: bool = True

    @classmethod
    def from_dict(cls, d: Mapping, image_size: int, source: str) -> "ImageProcessing":
        for key, wanted in (("do_resize", True), ("do_center_crop", True), ("do_rescale", True),
                            ("do_normalize", True)):
            if get_value(d, key, bool, source, wanted) != wanted:
                raise ConfigError(f"{source}: {key}={not wanted} is not supported (ms_rm's CLIP preprocessing "
                                  "always resizes, center-crops, rescales and normalises, as CLIPImageProcessor's "
                                  "defaults do)")
        resample = get_value(d, "resample", int, source, 3)
        if resample != 3:
            raise ConfigError(f"{source}: resample {resample} is not supported; ms_rm resizes bicubic (3)")
        rescale = get_value(d, "rescale_factor", float, source, 1 / 255)
        if abs(rescale - 1 / 255) > 1e-12:
            raise ConfigError(f"{source}: rescale_factor must be 1/255, got {rescale}")
        size = get_value(d, "size", (dict, int), source, {"shortest_edge": image_size})
        if isinstance(size, int):
            size = {"shortest_edge": size}
        if set(size) != {"shortest_edge"}:
            raise ConfigError(f"{source}: size must be {{'shortest_edge': N}} (CLIP's policy), got {size}")
        shortest = positive(get_value(size, "shortest_edge", int, source), "size.shortest_edge", source)
        crop = get_value(d, "crop_size", (dict, int), source, {"height": image_size, "width": image_size})
        crop = (crop, crop) if isinstance(crop, int) else (get_value(crop, "height", int, source),
                                                             get_value(crop, "width", int, source))
        if crop != (image_size, image_size):
            raise ConfigError(f"{source}: crop_size {crop} differs from the vision tower's image_size {image_size}")
        if shortest < max(crop):
            raise ConfigError(f"{source}: size.shortest_edge {shortest} is smaller than crop_size {crop}")
        mean, std = (tuple(float(v) for v in get_value(d, key, list, source, list(default)))
                     for key, default in (("image_mean", OPENAI_CLIP_MEAN), ("image_std", OPENAI_CLIP_STD)))
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ConfigError(f"{source}: image_mean and image_std must hold 3 values (std > 0), got {mean}, {std}")
        return cls(shortest_edge=shortest, crop_size=crop, mean=mean, std=std,
                   do_convert_rgb=get_value(d, "do_convert_rgb", bool, source, True))


CONFIG_FILE = "config.json"
PREPROCESSOR_FILE = "preprocessor_config.json"


def load_clip_config(folder: str) -> CLIPConfig:
    path = os.path.join(folder, CONFIG_FILE)
    return CLIPConfig.from_dict(read_json(path, "CLIPModel config"), path)


def load_image_processing(folder: str, image_size: int) -> ImageProcessing:
    """The folder's preprocessor_config.json (a key it leaves out: CLIPImageProcessor's default
    at `image_size`); ConfigError when the folder has none."""
    path = os.path.join(folder, PREPROCESSOR_FILE)
    if not os.path.isfile(path):
        raise ConfigError(f"{folder}: no {PREPROCESSOR_FILE} (CLIPImageProcessor's settings); pass the folder "
                          "CLIPImageProcessor.save_pretrained wrote as image_processor_path (--image-processor), "
                          "or write {} to that file for CLIPImageProcessor's defaults at the model's image size")
    return ImageProcessing.from_dict(read_json(path, "image processor config"), image_size, path)
