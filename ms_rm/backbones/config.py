"""The diffusion transformers' configs: diffusers' transformer config.json, validated.

One class per family, all with the same surface (`from_diffusers`, `to_dict`, `inner_dim`,
`latent_channels`, `max_cut`, `family`); defaults are diffusers' own. Every problem raises
ConfigError naming the file and the key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar, List, Mapping, Optional, Sequence, Tuple, Union

from ..core.config import MAX_SIZE, get_value, int_tuple, no_unknown, positive
from ..core.errors import ConfigError


@dataclass(frozen=True)
class BackboneConfigBase:
    """What every backbone config shares: heads x head width, diffusers' class name, the
    positive-integer settings read from config.json, and the round trip to a dict."""

    CLASS_NAME: ClassVar[str] = ""
    SIZE_KEYS: ClassVar[Tuple[str, ...]] = ()        # positive integers read from the diffusers config

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def _sizes(cls, d: Mapping, source: str) -> dict:
        """The class name checked, and SIZE_KEYS read (diffusers' defaults for absent keys)."""
        name = d.get("_class_name", cls.CLASS_NAME)
        if name != cls.CLASS_NAME:
            raise ConfigError(f"{source}: _class_name is '{name}', expected '{cls.CLASS_NAME}'")
        defaults = cls()
        return {key: positive(get_value(d, key, int, source, getattr(defaults, key)), key, source)
                for key in cls.SIZE_KEYS}

    def validate(self, source: str) -> None:
        if self.inner_dim > MAX_SIZE:
            raise ConfigError(f"{source}: num_attention_heads * attention_head_dim = {self.inner_dim} exceeds "
                              f"{MAX_SIZE}")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


@dataclass(frozen=True)
class SD3BackboneConfig(BackboneConfigBase):
    """diffusers SD3Transformer2DModel config (SD3 and SD3.5)."""

    num_layers: int = 18
    num_attention_heads: int = 18
    attention_head_dim: int = 64
    in_channels: int = 16
    patch_size: int = 2
    joint_attention_dim: int = 4096
    caption_projection_dim: int = 1152
    pooled_projection_dim: int = 2048
    pos_embed_max_size: int = 96
    sample_size: int = 128
    dual_attention_layers: Tuple[int, ...] = ()
    qk_norm: Optional[str] = None
    # Not a diffusers setting: the dtype the checkpoint stores the position table in (diffusers
    # loads the stored table back, so a bf16 checkpoint adds bf16-rounded positions).
    position_table_dtype: str = "float32"
    family: str = field(default="sd3", init=False)

    CLASS_NAME: ClassVar[str] = "SD3Transformer2DModel"
    SIZE_KEYS: ClassVar[Tuple[str, ...]] = (
        "num_layers", "num_attention_heads", "attention_head_dim", "in_channels", "patch_size",
        "joint_attention_dim", "caption_projection_dim", "pooled_projection_dim", "sample_size")

    @property
    def latent_channels(self) -> int:
        return self.in_channels

    @property
    def max_cut(self) -> int:
        """The deepest usable cut: diffusers' last SD3 block has no text output."""
        return self.num_layers - 1

    @classmethod
    def from_diffusers(cls, d: Mapping, source: str = "transformer config") -> "SD3BackboneConfig":
        sizes = cls._sizes(d, source)
        config = cls(pos_embed_max_size=get_value(d, "pos_embed_max_size", int, source, cls.pos_embed_max_size),
                     dual_attention_layers=int_tuple(d, "dual_attention_layers", source, ()),
                     qk_norm=get_value(d, "qk_norm", str, source, None),
                     position_table_dtype=get_value(d, "position_table_dtype", str, source, "float32"),
                     **sizes)
        config.validate(source)
        return config

    def validate(self, source: str) -> None:
        super().validate(source)
        if self.qk_norm not in (None, "rms_norm"):
            raise ConfigError(f"{source}: qk_norm '{self.qk_norm}' is not supported "
                              "(SD3 uses none, SD3.5 'rms_norm')")
        if self.caption_projection_dim != self.inner_dim:
            raise ConfigError(
                f"{source}: caption_projection_dim ({self.caption_projection_dim}) must equal "
                f"num_attention_heads * attention_head_dim ({self.inner_dim}) for joint attention")
        if not 0 < self.pos_embed_max_size <= MAX_SIZE:
            raise ConfigError(f"{source}: pos_embed_max_size must be in 1..{MAX_SIZE} (SD3 crops a "
                              f"fixed table), got {self.pos_embed_max_size}")
        if self.position_table_dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"{source}: position_table_dtype must be float32, bfloat16 or float16, "
                              f"got {self.position_table_dtype!r}")
        bad = [i for i in self.dual_attention_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ConfigError(f"{source}: dual_attention_layers {bad} outside 0..{self.num_layers - 1}")


@dataclass(frozen=True)
class FluxBackboneConfig(BackboneConfigBase):
    """diffusers FluxTransformer2DModel config (FLUX.1 dev and schnell).

    Only the double-stream blocks are used; latents are the 16-channel VAE latents, packed 2x2
    into in_channels = 64 inside the backbone.
    """

    num_layers: int = 19
    num_single_layers: int = 38
    num_attention_heads: int = 24
    attention_head_dim: int = 128
    in_channels: int = 64
    patch_size: int = 1
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = False
    axes_dims_rope: Tuple[int, ...] = (16, 56, 56)
    family: str = field(default="flux", init=False)

    CLASS_NAME: ClassVar[str] = "FluxTransformer2DModel"
    SIZE_KEYS: ClassVar[Tuple[str, ...]] = (
        "num_layers", "num_attention_heads", "attention_head_dim", "in_channels", "patch_size",
        "joint_attention_dim", "pooled_projection_dim")

    @property
    def latent_channels(self) -> int:
        return self.in_channels // 4

    @property
    def max_cut(self) -> int:
        return self.num_layers

    @classmethod
    def from_diffusers(cls, d: Mapping, source: str = "transformer config") -> "FluxBackboneConfig":
        sizes = cls._sizes(d, source)
        config = cls(num_single_layers=get_value(d, "num_single_layers", int, source, cls.num_single_layers),
                     guidance_embeds=get_value(d, "guidance_embeds", bool, source, False),
                     axes_dims_rope=int_tuple(d, "axes_dims_rope", source, cls.axes_dims_rope), **sizes)
        config.validate(source)
        return config

    def validate(self, source: str) -> None:
        super().validate(source)
        if self.patch_size != 1:
            raise ConfigError(f"{source}: patch_size {self.patch_size} is not supported (FLUX.1 packs 2x2 "
                              "latent patches itself and uses patch_size 1)")
        if self.in_channels % 4:
            raise ConfigError(f"{source}: in_channels {self.in_channels} must be 4 x the latent channels")
        if (len(self.axes_dims_rope) != 3 or sum(self.axes_dims_rope) != self.attention_head_dim
                or any(a <= 0 or a % 2 for a in self.axes_dims_rope)):
            raise ConfigError(f"{source}: axes_dims_rope {list(self.axes_dims_rope)} must be three positive even "
                              f"sizes summing to attention_head_dim {self.attention_head_dim}")


# FLUX's time conventions, and what each multiplies time_text_embed's time and guidance inputs by:
# "reference" as the upstream FLUX reward model calls it, "diffusers" as FluxTransformer2DModel.forward.
TIME_SCALES = {"reference": 1.0, "diffusers": 1000.0}

BackboneConfig = Union[SD3BackboneConfig, FluxBackboneConfig]
BACKBONE_CONFIGS = {"sd3": SD3BackboneConfig, "flux": FluxBackboneConfig}        # by family
_BY_CLASS_NAME = {cls.CLASS_NAME: cls for cls in BACKBONE_CONFIGS.values()}


def backbone_from_diffusers(d: Mapping, source: str) -> BackboneConfig:
    """The backbone config of a diffusers transformer config, by its _class_name."""
    name = d.get("_class_name", SD3BackboneConfig.CLASS_NAME)
    if name not in _BY_CLASS_NAME:
        raise ConfigError(f"{source}: _class_name '{name}' is not a supported backbone; expected one of "
                          f"{sorted(_BY_CLASS_NAME)}")
    return _BY_CLASS_NAME[name].from_diffusers(d, source)


def backbone_from_dict(d: Mapping, source: str) -> BackboneConfig:
    """A backbone config from its to_dict() form (the "family" key selects the class)."""
    family = get_value(d, "family", str, source)
    if family not in BACKBONE_CONFIGS:
        raise ConfigError(f"{source}: family '{family}' is not one of {sorted(BACKBONE_CONFIGS)}")
    cls = BACKBONE_CONFIGS[family]
    no_unknown(d, {f.name for f in dataclasses.fields(cls) if f.init} | {"family"}, source)
    return cls.from_diffusers({k: v for k, v in d.items() if k != "family"}, source)


def cut_streams(visual_taps: Sequence[int], text_taps: Sequence[int]) -> List[Tuple[bool, bool]]:
    """(image_out, context_out) of each block of a cut after the deepest tap: whether the block's
    image and text outputs are read. Every block but the deepest feeds the next one both
    streams; the deepest computes only the streams that are tapped at its depth."""
    depth = max(tuple(visual_taps) + tuple(text_taps))
    if depth == 0:                       # only the embedded inputs are tapped: no block is run
        return []
    return [(True, True)] * (depth - 1) + [(depth in visual_taps, depth in text_taps)]
