"""The BLIP score's configuration: BLIP's ViT, BLIP's text encoder in text-only mode, the two
contrastive projections.

The defaults are what the image-reward package's `BLIPScore` builds (`BLIP_Pretrain(image_size=224,
vit='large', med_config)`, `embed_dim=256`) and loads BLIP's released `model_large.pth` into: ViT-L/16
at 224 px, BERT-base with 30524 tokens (bert-base-uncased plus [DEC] and [ENC]), prompts of 35
tokens. The towers' configs are ImageReward's (ms_rm.rewards.imagereward.config).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from ...core.config import get_value, no_unknown, positive
from ...core.errors import ConfigError
from ..imagereward.config import TextConfig, VisionConfig, tower_problems, tower_sections

FORMAT_NAME = "ms_rm.blip_score"
FORMAT_VERSION = 1
EMBED_DIM = 256                   # BLIP_Pretrain's embed_dim: vision_proj and text_proj's output


@dataclass(frozen=True)
class BLIPScoreConfig:
    vision: VisionConfig = VisionConfig()
    text: TextConfig = TextConfig()
    embed_dim: int = EMBED_DIM
    max_length: int = 35                                    # prompt tokens ([CLS] ... [SEP], padded)

    def __post_init__(self):
        problems = tower_problems(self.vision, self.text, self.max_length)
        if not self.embed_dim > 0:
            problems.append(f"embed_dim must be positive, got {self.embed_dim}")
        if problems:
            raise ConfigError("BLIP score config: " + "; ".join(problems))

    def to_dict(self) -> dict:
        return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
                "vision": dataclasses.asdict(self.vision), "text": dataclasses.asdict(self.text),
                "embed_dim": self.embed_dim, "max_length": self.max_length}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str) -> "BLIPScoreConfig":
        """A config written by to_dict (ConfigError naming `source` and the key)."""
        no_unknown(d, ("format", "format_version", "vision", "text", "embed_dim", "max_length"), source)
        if d.get("format") != FORMAT_NAME:
            raise ConfigError(f"{source}: key 'format' must be {FORMAT_NAME!r}, got {d.get('format')!r}")
        if d.get("format_version") != FORMAT_VERSION:
            raise ConfigError(f"{source}: format_version {d.get('format_version')!r} is not {FORMAT_VERSION}; "
                              "convert again with this ms_rm")
        parts = tower_sections(d, source)
        return cls(vision=parts["vision"], text=parts["text"],
                   embed_dim=positive(get_value(d, "embed_dim", int, source, EMBED_DIM), "embed_dim", source),
                   max_length=positive(get_value(d, "max_length", int, source, 35), "max_length", source))


def tiny_config(vocab_size: int = 64) -> BLIPScoreConfig:
    """A small model for tests and parity."""
    return BLIPScoreConfig(vision=VisionConfig(image_size=32, patch_size=8, width=64, layers=2, heads=4),
                           text=TextConfig(vocab_size=vocab_size, width=96, layers=2, heads=3, intermediate=64,
                                           max_positions=40),
                           embed_dim=48)
