"""The diffusion transformers' configs: diffusers' transformer config.json, validated.

One class per family, all with the same surface (`from_diffusers`, `to_dict`, `inner_dim`,
`temb_dim`, `latent_channels`, `text_width` (the width of a text token's features), `max_cut`,
`min_tap`, `time_conventions`, `family`); each keeps diffusers' own field names (SD3 and FLUX's
`joint_attention_dim` and `pooled_projection_dim`, Z-Image's `cap_feat_dim`, ...) and no others;
defaults are diffusers' own. What text a backbone takes is the backbone's to say (the Backbone
protocol, ms_rm.backbones.protocol), not its config's. Every problem raises ConfigError naming the
file and the key.
"""

from __future__ import annotations

import dataclasses
import math
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
    min_tap: ClassVar[int] = 0                       # the shallowest depth a reward head may tap (0: the embedded input)
    time_conventions: ClassVar[Tuple[str, ...]] = ("reference",)    # how it may take the time (see TIME_SCALES)

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def temb_dim(self) -> int:
        """Width of the time embedding the backbone returns (the reward head's t_embed_dim)."""
        return self.inner_dim

    @property
    def max_cut_note(self) -> str:
        """Why `max_cut` is what it is, for errors."""
        return f" (the base transformer's {self.max_cut} blocks)"

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
    out_channels: Optional[int] = None       # None: in_channels (what the full transformer predicts)
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
    def text_width(self) -> int:
        return self.joint_attention_dim

    @property
    def max_cut(self) -> int:
        """The deepest usable cut: diffusers' last SD3 block has no text output."""
        return self.num_layers - 1

    @property
    def max_cut_note(self) -> str:
        return f": the base transformer has {self.num_layers} blocks and its last one has no text output"

    @classmethod
    def from_diffusers(cls, d: Mapping, source: str = "transformer config") -> "SD3BackboneConfig":
        sizes = cls._sizes(d, source)
        config = cls(pos_embed_max_size=get_value(d, "pos_embed_max_size", int, source, cls.pos_embed_max_size),
                     dual_attention_layers=int_tuple(d, "dual_attention_layers", source, ()),
                     qk_norm=get_value(d, "qk_norm", str, source, None),
                     out_channels=get_value(d, "out_channels", int, source, None),
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
    time_conventions: ClassVar[Tuple[str, ...]] = ("reference", "diffusers")
    SIZE_KEYS: ClassVar[Tuple[str, ...]] = (
        "num_layers", "num_attention_heads", "attention_head_dim", "in_channels", "patch_size",
        "joint_attention_dim", "pooled_projection_dim")

    @property
    def latent_channels(self) -> int:
        return self.in_channels // 4

    @property
    def text_width(self) -> int:
        return self.joint_attention_dim

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


@dataclass(frozen=True)
class ZImageBackboneConfig(BackboneConfigBase):
    """diffusers ZImageTransformer2DModel config (Z-Image, Z-Image-Turbo).

    One stream of `dim`-wide tokens: noise and context refiners, then `n_layers` main layers over
    [image, caption]. Only the 2x2 (x 1 frame) patching exists in the released models, and it is
    the one the reference calls. diffusers builds k and v with n_heads heads whatever
    n_kv_heads says; it is read and kept, not used.
    """

    all_patch_size: Tuple[int, ...] = (2,)
    all_f_patch_size: Tuple[int, ...] = (1,)
    in_channels: int = 16
    dim: int = 3840
    n_layers: int = 30
    n_refiner_layers: int = 2
    n_heads: int = 30
    n_kv_heads: int = 30
    norm_eps: float = 1e-5
    qk_norm: bool = True
    cap_feat_dim: int = 2560
    rope_theta: float = 256.0
    t_scale: float = 1000.0
    axes_dims: Tuple[int, ...] = (32, 48, 48)
    axes_lens: Tuple[int, ...] = (1024, 512, 512)
    family: str = field(default="zimage", init=False)

    CLASS_NAME: ClassVar[str] = "ZImageTransformer2DModel"
    SIZE_KEYS: ClassVar[Tuple[str, ...]] = ("in_channels", "dim", "n_layers", "n_heads", "n_kv_heads",
                                            "cap_feat_dim")
    ADALN_DIM: ClassVar[int] = 256          # diffusers' ADALN_EMBED_DIM
    PATCH: ClassVar[Tuple[int, int]] = (2, 1)
    SEQ_MULTIPLE: ClassVar[int] = 32        # diffusers' SEQ_MULTI_OF: image and caption padded to it
    min_tap: ClassVar[int] = 1              # the reference taps after main layers 1..n only

    @property
    def inner_dim(self) -> int:
        return self.dim

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def temb_dim(self) -> int:
        """The adaLN input min(dim, 256): what the reference returns as temb."""
        return min(self.dim, self.ADALN_DIM)

    @property
    def latent_channels(self) -> int:
        return self.in_channels

    @property
    def text_width(self) -> int:
        return self.cap_feat_dim

    @property
    def max_cut(self) -> int:
        return self.n_layers

    @classmethod
    def from_diffusers(cls, d: Mapping, source: str = "transformer config") -> "ZImageBackboneConfig":
        sizes = cls._sizes(d, source)
        refiners = get_value(d, "n_refiner_layers", int, source, cls.n_refiner_layers)
        if not 0 <= refiners <= MAX_SIZE:
            raise ConfigError(f"{source}: n_refiner_layers must be in 0..{MAX_SIZE}, got {refiners}")
        floats = {}
        for key in ("norm_eps", "rope_theta", "t_scale"):
            value = get_value(d, key, float, source, getattr(cls, key))
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{source}: {key} must be a positive finite number, got {value}")
            floats[key] = value
        config = cls(all_patch_size=int_tuple(d, "all_patch_size", source, cls.all_patch_size),
                     all_f_patch_size=int_tuple(d, "all_f_patch_size", source, cls.all_f_patch_size),
                     n_refiner_layers=refiners, qk_norm=get_value(d, "qk_norm", bool, source, True),
                     axes_dims=int_tuple(d, "axes_dims", source, cls.axes_dims),
                     axes_lens=int_tuple(d, "axes_lens", source, cls.axes_lens), **floats, **sizes)
        config.validate(source)
        return config

    def validate(self, source: str) -> None:
        super().validate(source)
        if self.PATCH not in zip(self.all_patch_size, self.all_f_patch_size):
            raise ConfigError(f"{source}: all_patch_size {list(self.all_patch_size)} / all_f_patch_size "
                              f"{list(self.all_f_patch_size)} lack the 2 x 1 patching the reward model runs")
        if self.dim % self.n_heads:
            raise ConfigError(f"{source}: dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if (len(self.axes_dims) != 3 or sum(self.axes_dims) != self.head_dim
                or any(a <= 0 or a % 2 for a in self.axes_dims)):
            raise ConfigError(f"{source}: axes_dims {list(self.axes_dims)} must be three positive even sizes "
                              f"summing to the head width dim / n_heads = {self.head_dim}")
        if len(self.axes_lens) != 3 or any(not 0 < n <= 1 << 20 for n in self.axes_lens):
            raise ConfigError(f"{source}: axes_lens {list(self.axes_lens)} must be three positive lengths")


# FLUX's time conventions, and what each multiplies time_text_embed's time and guidance inputs by:
# "reference" as the upstream FLUX reward model calls it, "diffusers" as FluxTransformer2DModel.forward.
TIME_SCALES = {"reference": 1.0, "diffusers": 1000.0}

BackboneConfig = Union[SD3BackboneConfig, FluxBackboneConfig, ZImageBackboneConfig]
BACKBONE_CONFIGS = {"sd3": SD3BackboneConfig, "flux": FluxBackboneConfig, "zimage": ZImageBackboneConfig}
_BY_CLASS_NAME = {cls.CLASS_NAME: cls for cls in BACKBONE_CONFIGS.values()}


def backbone_from_diffusers(d: Mapping, source: str) -> BackboneConfig:
    """The backbone config of a diffusers transformer config, by its _class_name."""
    name = d.get("_class_name", SD3BackboneConfig.CLASS_NAME)
    if not isinstance(name, str) or name not in _BY_CLASS_NAME:
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
