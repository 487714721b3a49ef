"""What to build: the reward model's configuration, validated.

Three sources feed one `RewardModelConfig`:

* the reference run's `config.json` (a dump of the training YAML; `model.*` and
  `training.add_noise` are read), the diffusers transformer `config.json` and the scheduler
  config, through `RewardModelConfig.from_reference`;
* our own converted-model config (`ms_rm_config.json`, versioned), through `from_dict`;
* a config file of either kind on disk, through `load_config`.

Every problem raises `ConfigError` naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Tuple, Union

from .errors import ConfigError

logger = logging.getLogger(__name__)

FORMAT_NAME = "ms_rm.diffusion_rm"
FORMAT_VERSION = 1
U_CONVENTIONS = ("sigma", "index")

_MISSING = object()


def _get(d: Mapping, key: str, kind, source: str, default=_MISSING):
    """d[key] checked against `kind` (a type or tuple of types); ConfigError names source and key."""
    if key not in d or d[key] is None and default is not _MISSING:
        if default is _MISSING:
            raise ConfigError(f"{source}: missing required key '{key}'")
        return default
    value = d[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    # bool is an int in Python; never accept it where a number is meant, nor a number for a bool.
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        ok, value = True, float(value)
    if not ok:
        names = "/".join(k.__name__ for k in kinds)
        raise ConfigError(f"{source}: key '{key}' must be {names}, got {value!r}")
    return value


def _int_tuple(d: Mapping, key: str, source: str, default=_MISSING) -> Tuple[int, ...]:
    value = _get(d, key, (list, tuple), source, default)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ConfigError(f"{source}: key '{key}' must be a list of integers, got {value!r}")
    return tuple(value)


MAX_SIZE = 1 << 16     # no width, head count, length or channel count of these models comes near it


def _positive(value: int, key: str, source: str, limit: int = MAX_SIZE) -> int:
    if not 0 < value <= limit:
        raise ConfigError(f"{source}: key '{key}' must be in 1..{limit}, got {value}")
    return value


def _no_unknown(d: Mapping, known, source: str) -> None:
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise ConfigError(f"{source}: unknown keys {unknown}; expected only {sorted(known)}")


@dataclass(frozen=True)
class SchedulerConfig:
    """The parts of diffusers' FlowMatchEulerDiscreteScheduler config that shape its training table."""

    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False

    @classmethod
    def from_diffusers(cls, d: Mapping, source: str = "scheduler config") -> "SchedulerConfig":
        name = d.get("_class_name", "FlowMatchEulerDiscreteScheduler")
        if name != "FlowMatchEulerDiscreteScheduler":
            raise ConfigError(f"{source}: _class_name is '{name}'; Diffusion-RM's noise table needs "
                              "FlowMatchEulerDiscreteScheduler")
        # Only these three enter the table built in the scheduler's __init__; the others
        # (shift_terminal, karras/exponential/beta sigmas, ...) act in set_timesteps only.
        steps = _get(d, "num_train_timesteps", int, source, 1000)
        if not 1 <= steps <= 100_000:
            raise ConfigError(f"{source}: num_train_timesteps must be in 1..100000, got {steps}")
        shift = _get(d, "shift", float, source, 1.0)
        if not (math.isfinite(shift) and 0 < shift <= 1e4):
            raise ConfigError(f"{source}: shift must be a finite number in (0, 1e4], got {shift}")
        return cls(num_train_timesteps=steps, shift=shift,
                   use_dynamic_shifting=_get(d, "use_dynamic_shifting", bool, source, False))


@dataclass(frozen=True)
class SD3BackboneConfig:
    """diffusers SD3Transformer2DModel config (SD3 and SD3.5); defaults are diffusers' own."""

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

    CLASS_NAME = "SD3Transformer2DModel"

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def latent_channels(self) -> int:
        return self.in_channels

    @property
    def max_cut(self) -> int:
        """The deepest usable cut: diffusers' last SD3 block has no text output."""
        return self.num_layers - 1

    @classmethod
    def from_diffusers(cls, d: Mapping, source: str = "transformer config") -> "SD3BackboneConfig":
        name = d.get("_class_name", cls.CLASS_NAME)
        if name != cls.CLASS_NAME:
            raise ConfigError(f"{source}: _class_name is '{name}', expected '{cls.CLASS_NAME}'")
        defaults = cls()
        ints = {}
        for key in ("num_layers", "num_attention_heads", "attention_head_dim", "in_channels",
                    "patch_size", "joint_attention_dim", "caption_projection_dim",
                    "pooled_projection_dim", "sample_size"):
            ints[key] = _positive(_get(d, key, int, source, getattr(defaults, key)), key, source)
        pos_max = _get(d, "pos_embed_max_size", int, source, defaults.pos_embed_max_size)
        qk_norm = _get(d, "qk_norm", str, source, None)
        config = cls(pos_embed_max_size=pos_max,
                     dual_attention_layers=_int_tuple(d, "dual_attention_layers", source, ()),
                     qk_norm=qk_norm, position_table_dtype=_get(d, "position_table_dtype", str, source, "float32"),
                     **ints)
        config.validate(source)
        return config

    def validate(self, source: str) -> None:
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
        if self.inner_dim > MAX_SIZE:
            raise ConfigError(f"{source}: num_attention_heads * attention_head_dim = {self.inner_dim} exceeds "
                              f"{MAX_SIZE}")
        if self.position_table_dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"{source}: position_table_dtype must be float32, bfloat16 or float16, "
                              f"got {self.position_table_dtype!r}")
        bad = [i for i in self.dual_attention_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ConfigError(f"{source}: dual_attention_layers {bad} outside 0..{self.num_layers - 1}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["dual_attention_layers"] = list(self.dual_attention_layers)
        return d


@dataclass(frozen=True)
class FluxBackboneConfig:
    """diffusers FluxTransformer2DModel config (FLUX.1 dev and schnell); defaults are diffusers' own.

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

    CLASS_NAME = "FluxTransformer2DModel"

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def latent_channels(self) -> int:
        return self.in_channels // 4

    @property
    def max_cut(self) -> int:
        return self.num_layers

    @classmethod
    def from_diffusers(cls, d: Mapping, source: str = "transformer config") -> "FluxBackboneConfig":
        name = d.get("_class_name", cls.CLASS_NAME)
        if name != cls.CLASS_NAME:
            raise ConfigError(f"{source}: _class_name is '{name}', expected '{cls.CLASS_NAME}'")
        defaults = cls()
        ints = {key: _positive(_get(d, key, int, source, getattr(defaults, key)), key, source)
                for key in ("num_layers", "num_attention_heads", "attention_head_dim", "in_channels", "patch_size",
                            "joint_attention_dim", "pooled_projection_dim")}
        single = _get(d, "num_single_layers", int, source, defaults.num_single_layers)
        config = cls(num_single_layers=single, guidance_embeds=_get(d, "guidance_embeds", bool, source, False),
                     axes_dims_rope=_int_tuple(d, "axes_dims_rope", source, defaults.axes_dims_rope), **ints)
        config.validate(source)
        return config

    def validate(self, source: str) -> None:
        if self.patch_size != 1:
            raise ConfigError(f"{source}: patch_size {self.patch_size} is not supported (FLUX.1 packs 2x2 "
                              "latent patches itself and uses patch_size 1)")
        if self.in_channels % 4:
            raise ConfigError(f"{source}: in_channels {self.in_channels} must be 4 x the latent channels")
        if self.inner_dim > MAX_SIZE:
            raise ConfigError(f"{source}: num_attention_heads * attention_head_dim = {self.inner_dim} exceeds "
                              f"{MAX_SIZE}")
        if (len(self.axes_dims_rope) != 3 or sum(self.axes_dims_rope) != self.attention_head_dim
                or any(a <= 0 or a % 2 for a in self.axes_dims_rope)):
            raise ConfigError(f"{source}: axes_dims_rope {list(self.axes_dims_rope)} must be three positive even "
                              f"sizes summing to attention_head_dim {self.attention_head_dim}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["axes_dims_rope"] = list(self.axes_dims_rope)
        return d


BackboneConfig = Union[SD3BackboneConfig, FluxBackboneConfig]
_BACKBONES = {"sd3": SD3BackboneConfig, "flux": FluxBackboneConfig}
_BY_CLASS_NAME = {cls.CLASS_NAME: cls for cls in _BACKBONES.values()}


def backbone_from_diffusers(d: Mapping, source: str) -> BackboneConfig:
    """The backbone config of a diffusers transformer config, by its _class_name."""
    name = d.get("_class_name", SD3BackboneConfig.CLASS_NAME)
    if name not in _BY_CLASS_NAME:
        raise ConfigError(f"{source}: _class_name '{name}' is not a supported backbone; expected one of "
                          f"{sorted(_BY_CLASS_NAME)}")
    return _BY_CLASS_NAME[name].from_diffusers(d, source)


@dataclass(frozen=True)
class HeadConfig:
    """The released RewardHead's settings (`model.reward_head` of the reference config)."""

    width: int = -1          # -1: the backbone width
    out_dim: int = 1
    num_queries: int = 4
    num_attn_heads: int = 8
    dropout: float = 0.0     # inactive at inference; kept so the config round-trips
    use_proj_in: bool = False

    @classmethod
    def from_dict(cls, d: Mapping, source: str) -> "HeadConfig":
        defaults = cls()
        config = cls(
            width=_get(d, "width", int, source, defaults.width),
            out_dim=_positive(_get(d, "out_dim", int, source, defaults.out_dim), "out_dim", source),
            num_queries=_positive(_get(d, "num_queries", int, source, defaults.num_queries),
                                  "num_queries", source),
            num_attn_heads=_positive(_get(d, "num_attn_heads", int, source, defaults.num_attn_heads),
                                     "num_attn_heads", source),
            dropout=_get(d, "dropout", float, source, defaults.dropout),
            use_proj_in=_get(d, "use_proj_in", bool, source, defaults.use_proj_in),
        )
        if config.width != -1 and not 0 < config.width <= MAX_SIZE:
            raise ConfigError(f"{source}: key 'width' must be -1 (backbone width) or in 1..{MAX_SIZE}, "
                              f"got {config.width}")
        return config


@dataclass(frozen=True)
class RewardModelConfig:
    """Everything needed to build a Diffusion-RM model and turn u into a noise level."""

    backbone: BackboneConfig
    num_transformer_layers: int
    visual_head_idx: Tuple[int, ...]
    text_head_idx: Tuple[int, ...]
    head: HeadConfig = HeadConfig()
    use_logistic: bool = False
    add_noise: bool = True
    scheduler: SchedulerConfig = SchedulerConfig()
    u_convention: str = "sigma"
    guidance_scale: Optional[float] = None      # FLUX.1-dev-style backbones embed it; None otherwise

    def __post_init__(self):
        problem = self.problem()
        if problem:
            raise ConfigError(problem)

    # --- derived facts -------------------------------------------------------------------
    @property
    def width(self) -> int:
        """Width W of the reward head."""
        return self.backbone.inner_dim if self.head.width == -1 else self.head.width

    @property
    def last_depth(self) -> int:
        """Depth of the deepest tap: blocks beyond it are never built."""
        return max(self.visual_head_idx + self.text_head_idx)

    def block_streams(self, index: int) -> Tuple[bool, bool]:
        """(image_out, context_out) of block `index` (0-based): whether the block's image and
        text outputs are read. Every block but the deepest feeds the next one both streams."""
        depth = self.last_depth
        if index + 1 < depth:
            return True, True
        return depth in self.visual_head_idx, depth in self.text_head_idx

    def problem(self) -> Optional[str]:
        """What is wrong with this combination of settings, or None."""
        n = self.num_transformer_layers
        top = self.backbone.max_cut
        if not 1 <= n <= top:
            why = (f": the base transformer has {self.backbone.num_layers} blocks and its last one has no text "
                   "output") if top < self.backbone.num_layers else f" (the base transformer's {top} blocks)"
            return f"num_transformer_layers ({n}) must be in 1..{top}{why}"
        needs_guidance = getattr(self.backbone, "guidance_embeds", False)
        if needs_guidance and (self.guidance_scale is None or not math.isfinite(self.guidance_scale)):
            return ("the backbone embeds a guidance scale (guidance_embeds): set model.guidance_scale to the value "
                    "the reward model was trained with (FLUX.1-dev samples with 3.5)")
        if not needs_guidance and self.guidance_scale is not None:
            return f"guidance_scale {self.guidance_scale} is set, but the backbone does not embed guidance"
        for key, taps in (("visual_head_idx", self.visual_head_idx), ("text_head_idx", self.text_head_idx)):
            if not taps:
                return f"{key} is empty; the reference needs at least one tap"
            if list(taps) != sorted(set(taps)):
                return (f"{key} {list(taps)} must be strictly increasing (the reference collects "
                        "taps in block order)")
            if taps[0] < 0 or taps[-1] > n:
                return f"{key} {list(taps)} must lie in 0..{n} (num_transformer_layers = {n})"
        if self.width % self.head.num_attn_heads:
            return (f"reward_head width {self.width} is not divisible by num_attn_heads "
                    f"{self.head.num_attn_heads}")
        if self.width < 4:
            return f"reward_head width {self.width} is too small (the adapters output width // 4)"
        if self.u_convention not in U_CONVENTIONS:
            return f"u_convention '{self.u_convention}' must be one of {U_CONVENTIONS}"
        return None

    @classmethod
    def _build(cls, source: str, **kwargs) -> "RewardModelConfig":
        try:
            return cls(**kwargs)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    # --- the reference's files ----------------------------------------------------------
    @classmethod
    def from_reference(cls, rm_config: Mapping, transformer_config: Mapping,
                       scheduler_config: Mapping, u_convention: str = "sigma",
                       sources: Tuple[str, str, str] = ("config.json", "transformer config.json",
                                                        "scheduler_config.json")) -> "RewardModelConfig":
        rm_src, tr_src, sc_src = sources
        model = _get(rm_config, "model", dict, rm_src)
        model_src = f"{rm_src} [model]"
        if "use_t_embed" in model and model["use_t_embed"] is False:
            logger.warning("%s: use_t_embed=false has no effect: the reference RewardHead swallows it "
                           "and always conditions on temb; ms_rm does the same", model_src)
        training = rm_config.get("training") or {}
        if not isinstance(training, Mapping):
            raise ConfigError(f"{rm_src}: key 'training' must be a mapping, got {training!r}")
        return cls._build(
            model_src,
            backbone=backbone_from_diffusers(transformer_config, tr_src),
            guidance_scale=_get(model, "guidance_scale", float, model_src, None),
            num_transformer_layers=_get(model, "num_transformer_layers", int, model_src),
            visual_head_idx=_int_tuple(model, "visual_head_idx", model_src),
            text_head_idx=_int_tuple(model, "text_head_idx", model_src),
            head=HeadConfig.from_dict(_get(model, "reward_head", dict, model_src, {}),
                                      f"{model_src} [reward_head]"),
            use_logistic=_get(model, "use_logistic", bool, model_src, False),
            add_noise=_get(training, "add_noise", bool, f"{rm_src} [training]", True),
            scheduler=SchedulerConfig.from_diffusers(scheduler_config, sc_src),
            u_convention=u_convention,
        )

    # --- our own format -----------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "backbone": self.backbone.to_dict(),
            "num_transformer_layers": self.num_transformer_layers,
            "visual_head_idx": list(self.visual_head_idx),
            "text_head_idx": list(self.text_head_idx),
            "reward_head": dataclasses.asdict(self.head),
            "use_logistic": self.use_logistic,
            "add_noise": self.add_noise,
            "scheduler": dataclasses.asdict(self.scheduler),
            "u_convention": self.u_convention,
            "guidance_scale": self.guidance_scale,
        }

    @classmethod
    def from_dict(cls, d: Mapping, source: str = "ms_rm config") -> "RewardModelConfig":
        fmt = d.get("format")
        if fmt != FORMAT_NAME:
            raise ConfigError(f"{source}: 'format' is {fmt!r}, expected '{FORMAT_NAME}' "
                              "(is this a reference config? use RewardModelConfig.from_reference)")
        version = _get(d, "format_version", int, source)
        if version != FORMAT_VERSION:
            raise ConfigError(f"{source}: format_version {version} is not supported by this ms_rm "
                              f"(reads version {FORMAT_VERSION}); upgrade ms_rm or re-convert")
        _no_unknown(d, _CONFIG_KEYS, source)
        bb = _get(d, "backbone", dict, source)
        family = _get(bb, "family", str, f"{source} [backbone]")
        if family not in _BACKBONES:
            raise ConfigError(f"{source} [backbone]: family '{family}' is not one of {sorted(_BACKBONES)}")
        bb_cls = _BACKBONES[family]
        bb_fields = {f.name for f in dataclasses.fields(bb_cls) if f.init}
        _no_unknown(bb, bb_fields | {"family"}, f"{source} [backbone]")
        backbone = bb_cls.from_diffusers({k: v for k, v in bb.items() if k != "family"},
                                         f"{source} [backbone]")
        head_d = _get(d, "reward_head", dict, source)
        _no_unknown(head_d, {f.name for f in dataclasses.fields(HeadConfig)}, f"{source} [reward_head]")
        sched_d = _get(d, "scheduler", dict, source)
        _no_unknown(sched_d, {f.name for f in dataclasses.fields(SchedulerConfig)}, f"{source} [scheduler]")
        return cls._build(
            source,
            backbone=backbone,
            num_transformer_layers=_get(d, "num_transformer_layers", int, source),
            visual_head_idx=_int_tuple(d, "visual_head_idx", source),
            text_head_idx=_int_tuple(d, "text_head_idx", source),
            head=HeadConfig.from_dict(head_d, f"{source} [reward_head]"),
            use_logistic=_get(d, "use_logistic", bool, source),
            add_noise=_get(d, "add_noise", bool, source),
            scheduler=SchedulerConfig.from_diffusers(sched_d, f"{source} [scheduler]"),
            u_convention=_get(d, "u_convention", str, source),
            guidance_scale=_get(d, "guidance_scale", float, source, None),
        )

    def replace(self, **changes) -> "RewardModelConfig":
        return dataclasses.replace(self, **changes)


_CONFIG_KEYS = ("format", "format_version", "backbone", "num_transformer_layers", "visual_head_idx",
                "text_head_idx", "reward_head", "use_logistic", "add_noise", "scheduler", "u_convention",
                "guidance_scale")


def read_config_file(path: Union[str, os.PathLike]) -> dict:
    """A JSON or YAML config file as a dict; ConfigError names the file on any problem."""
    path = os.fspath(path)
    try:
        with open(path, "r", encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read config file ({e})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as json_error:
        if path.endswith(".json"):
            raise ConfigError(f"{path}: invalid JSON ({json_error})") from None
        import yaml  # YAML only for non-.json files: the reference also dumps its training YAML

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: neither valid JSON nor YAML ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def load_config(path: Union[str, os.PathLike]) -> RewardModelConfig:
    """Our own converted-model config (ms_rm_config.json) from disk."""
    return RewardModelConfig.from_dict(read_config_file(path), os.fspath(path))


def config_from_any(value: Any) -> RewardModelConfig:
    """A RewardModelConfig from a RewardModelConfig, a dict in our format, or a path to one."""
    if isinstance(value, RewardModelConfig):
        return value
    if isinstance(value, Mapping):
        return RewardModelConfig.from_dict(value)
    if isinstance(value, (str, os.PathLike)):
        return load_config(value)
    raise ConfigError(f"expected a RewardModelConfig, a dict or a config path, got {type(value).__name__}")
