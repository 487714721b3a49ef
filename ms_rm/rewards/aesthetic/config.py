"""The aesthetic predictor's configuration: the CLIP vision tower, its projection, the MLP widths
and the image preprocessing, as a converted folder's ms_rm_config.json stores them.

`clip` is the CLIP folder's config.json as it was read (parsed by ms_rm.rewards.clip.config:
the vision tower and projection_dim are used, the text tower's settings are not);
`image_processing` its preprocessor_config.json (CLIPImageProcessor's settings, which
Flow-GRPO-MS's CLIPProcessor applies); `mlp_widths` the MLP's hidden widths, read off the `.pth`
(the released sac+logos+ava1-l14-linearMSE.pth: 1024, 128, 64, 16; its input width is the CLIP
projection_dim, 768 for ViT-L/14, its output 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Tuple

from ...core.config import get_value, int_tuple, no_unknown
from ...core.errors import ConfigError
from ..clip.config import CLIPConfig, ImageProcessing

FORMAT_NAME = "ms_rm.aesthetic"
FORMAT_VERSION = 1
RELEASED_MLP_WIDTHS = (1024, 128, 64, 16)        # sac+logos+ava1-l14-linearMSE.pth, input 768


@dataclass(frozen=True)
class AestheticConfig:
    clip: CLIPConfig
    processing: ImageProcessing
    mlp_widths: Tuple[int, ...] = RELEASED_MLP_WIDTHS
    clip_dict: Mapping[str, Any] = None              # config.json as read (what to_dict writes back)
    processing_dict: Mapping[str, Any] = None        # preprocessor_config.json as read

    @property
    def in_width(self) -> int:
        """The MLP's input width: the CLIP projection_dim."""
        return self.clip.projection_dim

    @classmethod
    def build(cls, clip_dict: Mapping, processing_dict: Mapping, mlp_widths, source: str) -> "AestheticConfig":
        clip = CLIPConfig.from_dict(clip_dict, f"{source} [clip]")
        processing = ImageProcessing.from_dict(processing_dict, clip.vision.image_size, f"{source} [image_processing]")
        widths = tuple(mlp_widths)
        if not widths or any(not isinstance(w, int) or isinstance(w, bool) or w < 1 for w in widths):
            raise ConfigError(f"{source}: mlp_widths must be positive integers, got {list(mlp_widths)}")
        return cls(clip=clip, processing=processing, mlp_widths=widths, clip_dict=dict(clip_dict),
                   processing_dict=dict(processing_dict))

    def to_dict(self) -> dict:
        return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "clip": dict(self.clip_dict),
                "image_processing": dict(self.processing_dict), "mlp_widths": list(self.mlp_widths)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str) -> "AestheticConfig":
        no_unknown(d, ("format", "format_version", "clip", "image_processing", "mlp_widths"), source)
        if d.get("format") != FORMAT_NAME:
            raise ConfigError(f"{source}: key 'format' must be {FORMAT_NAME!r}, got {d.get('format')!r}")
        if d.get("format_version") != FORMAT_VERSION:
            raise ConfigError(f"{source}: format_version {d.get('format_version')!r} is not {FORMAT_VERSION}; "
                              "convert again with this ms_rm")
        return cls.build(get_value(d, "clip", dict, source), get_value(d, "image_processing", dict, source),
                         int_tuple(d, "mlp_widths", source), source)
