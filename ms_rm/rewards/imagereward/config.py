"""ImageReward's configuration: BLIP's ViT, BLIP's text encoder (BERT with cross-attention), the MLP.

The defaults are the released model (THUDM ImageReward-v1.0, the `image-reward` package): ViT-L/16
at 224 px, BERT-base with 30524 tokens (bert-base-uncased plus [DEC] and [ENC]) and encoder width
1024, the MLP 768 -> 1024 -> 128 -> 64 -> 16 -> 1 and the package's reward normalisation. A
converted folder stores the config (`ms_rm_config.json`); tests build tiny ones.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Tuple

from ...core.config import MAX_SIZE, get_value, int_tuple, no_unknown, positive
from ...core.errors import ConfigError

FORMAT_NAME = "ms_rm.imagereward"
FORMAT_VERSION = 1

# The package's preprocessing (CLIP's statistics) and its reward normalisation.
PIXEL_MEAN = (0.48145466, 0.4578275, 0.40821073)
PIXEL_STD = (0.26862954, 0.26130258, 0.27577711)
REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@dataclass(frozen=True)
class VisionConfig:
    """BLIP's VisionTransformer (pre-norm blocks, fused qkv with bias, exact GELU, LayerNorm eps 1e-6)."""

    image_size: int = 224
    patch_size: int = 16
    width: int = 1024
    layers: int = 24
    heads: int = 16
    mlp_ratio: float = 4.0
    eps: float = 1e-6

    @property
    def tokens(self) -> int:
        """Class token + patches."""
        return 1 + (self.image_size // self.patch_size) ** 2

    @property
    def mlp_width(self) -> int:
        return int(self.width * self.mlp_ratio)          # the package's int(dim * mlp_ratio)


@dataclass(frozen=True)
class TextConfig:
    """BLIP's med BertModel (add_cross_attention, absolute positions, no token types, GELU (erf))."""

    vocab_size: int = 30524
    width: int = 768
    layers: int = 12
    heads: int = 12
    intermediate: int = 3072
    max_positions: int = 512
    eps: float = 1e-12
    pad_token_id: int = 0


def tower_problems(v: VisionConfig, t: TextConfig, max_length: int) -> List[str]:
    """What is wrong with a pair of BLIP towers and a prompt length (ImageReward's, the BLIP score's)."""
    problems = []
    if v.image_size % v.patch_size:
        problems.append(f"vision.image_size {v.image_size} is not a multiple of vision.patch_size {v.patch_size}")
    for name, width, heads in (("vision", v.width, v.heads), ("text", t.width, t.heads)):
        if width % heads:
            problems.append(f"{name}.width {width} is not a multiple of {name}.heads {heads}")
        elif not _power_of_two(width // heads):
            # ops.attention scales q by d^-0.5, exact (as the package scales the scores) for power-of-two d
            problems.append(f"{name} head width {width // heads} must be a power of two")
    if max_length > t.max_positions:
        problems.append(f"max_length {max_length} exceeds text.max_positions {t.max_positions}")
    return problems


def tower_sections(d: Mapping[str, Any], source: str) -> Dict[str, Any]:
    """{"vision": VisionConfig, "text": TextConfig} from a config dict's sections of those names."""
    parts = {}
    for key, kind in (("vision", VisionConfig), ("text", TextConfig)):
        section = get_value(d, key, dict, source)
        where = f"{source} [{key}]"
        fields = {f.name: f for f in dataclasses.fields(kind)}
        no_unknown(section, fields, where)
        values = {}
        for name, f in fields.items():
            value = get_value(section, name, type(f.default), where, f.default)
            if isinstance(value, int):
                value = positive(value, name, where, MAX_SIZE) if name != "pad_token_id" else value
            values[name] = value
        parts[key] = kind(**values)
    return parts


@dataclass(frozen=True)
class ImageRewardConfig:
    vision: VisionConfig = VisionConfig()
    text: TextConfig = TextConfig()
    mlp_widths: Tuple[int, ...] = (1024, 128, 64, 16)      # hidden widths; input text.width, output 1
    reward_mean: float = REWARD_MEAN
    reward_std: float = REWARD_STD
    max_length: int = 35                                    # prompt tokens ([CLS] ... [SEP], padded)

    def __post_init__(self):
        problems = tower_problems(self.vision, self.text, self.max_length)
        if not self.reward_std > 0:
            problems.append(f"reward_std must be positive, got {self.reward_std}")
        if problems:
            raise ConfigError("ImageReward config: " + "; ".join(problems))

    def to_dict(self) -> dict:
        return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
                "vision": dataclasses.asdict(self.vision), "text": dataclasses.asdict(self.text),
                "mlp_widths": list(self.mlp_widths), "reward_mean": self.reward_mean,
                "reward_std": self.reward_std, "max_length": self.max_length}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str) -> "ImageRewardConfig":
        """A config written by to_dict (ConfigError naming `source` and the key)."""
        no_unknown(d, ("format", "format_version", "vision", "text", "mlp_widths", "reward_mean", "reward_std",
                       "max_length"), source)
        if d.get("format") != FORMAT_NAME:
            raise ConfigError(f"{source}: key 'format' must be {FORMAT_NAME!r}, got {d.get('format')!r}")
        if d.get("format_version") != FORMAT_VERSION:
            raise ConfigError(f"{source}: format_version {d.get('format_version')!r} is not {FORMAT_VERSION}; "
                              "convert again with this ms_rm")
        parts = tower_sections(d, source)
        defaults = cls()
        return cls(vision=parts["vision"], text=parts["text"],
                   mlp_widths=int_tuple(d, "mlp_widths", source, defaults.mlp_widths),
                   reward_mean=get_value(d, "reward_mean", float, source, defaults.reward_mean),
                   reward_std=get_value(d, "reward_std", float, source, defaults.reward_std),
                   max_length=positive(get_value(d, "max_length", int, source, defaults.max_length), "max_length",
                                       source))


def tiny_config(vocab_size: int = 64) -> ImageRewardConfig:
    """A small model for tests and parity: the text width stays 768 (the package's MLP reads 768)."""
    return ImageRewardConfig(vision=VisionConfig(image_size=32, patch_size=8, width=64, layers=2, heads=4),
                             text=TextConfig(vocab_size=vocab_size, width=768, layers=2, heads=12, intermediate=64,
                                             max_positions=40))
