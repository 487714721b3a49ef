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
import logging
import math
import os
from dataclasses import dataclass
from typing import Any, List, Mapping, Optional, Tuple, Union

from ...backbones.config import TIME_SCALES, BackboneConfig, backbone_from_diffusers, backbone_from_dict, cut_streams
from ...core.config import MAX_SIZE, get_value, int_tuple, no_unknown, positive
from ...core.errors import ConfigError
from ...core.flow_match import SchedulerConfig
from ...io.files import read_config_file

logger = logging.getLogger(__name__)

FORMAT_NAME = "ms_rm.diffusion_rm"
FORMAT_VERSION = 1
U_CONVENTIONS = ("sigma", "index")
# How a FLUX backbone's time_text_embed receives the time and the guidance: "reference" as the
# upstream FLUX reward model calls it (sigma in [0, 1] and the guidance as they are), "diffusers"
# as FluxTransformer2DModel.forward does (both multiplied by 1000). SD3 has one way only.
TIME_CONVENTIONS = tuple(TIME_SCALES)
REFERENCE_FLUX_GUIDANCE = 3.5         # the upstream FLUX reward model embeds this guidance, always


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
            width=get_value(d, "width", int, source, defaults.width),
            out_dim=positive(get_value(d, "out_dim", int, source, defaults.out_dim), "out_dim", source),
            num_queries=positive(get_value(d, "num_queries", int, source, defaults.num_queries),
                                  "num_queries", source),
            num_attn_heads=positive(get_value(d, "num_attn_heads", int, source, defaults.num_attn_heads),
                                     "num_attn_heads", source),
            dropout=get_value(d, "dropout", float, source, defaults.dropout),
            use_proj_in=get_value(d, "use_proj_in", bool, source, defaults.use_proj_in),
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
    time_convention: str = "reference"          # FLUX only: see TIME_CONVENTIONS

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

    def block_streams(self) -> List[Tuple[bool, bool]]:
        """(image_out, context_out) of each block of the cut: whether its outputs are read."""
        return cut_streams(self.visual_head_idx, self.text_head_idx)

    def problem(self) -> Optional[str]:
        """What is wrong with this combination of settings, or None."""
        n = self.num_transformer_layers
        top = self.backbone.max_cut
        if not 1 <= n <= top:
            return f"num_transformer_layers ({n}) must be in 1..{top}{self.backbone.max_cut_note}"
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
            if taps[0] < self.backbone.min_tap:        # Z-Image: after main layers 1..n only
                return (f"{key} {list(taps)}: the Z-Image reference collects taps after main layers 1..{n} only, "
                        "not at depth 0")
        if self.width % self.head.num_attn_heads:
            return (f"reward_head width {self.width} is not divisible by num_attn_heads "
                    f"{self.head.num_attn_heads}")
        if self.width < 4:
            return f"reward_head width {self.width} is too small (the adapters output width // 4)"
        if self.u_convention not in U_CONVENTIONS:
            return f"u_convention '{self.u_convention}' must be one of {U_CONVENTIONS}"
        if self.time_convention not in TIME_CONVENTIONS:
            return f"time_convention '{self.time_convention}' must be one of {TIME_CONVENTIONS}"
        if self.time_convention not in self.backbone.time_conventions:
            return f"time_convention '{self.time_convention}' applies to FLUX backbones only"
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
                                                        "scheduler_config.json"),
                       time_convention: str = "reference") -> "RewardModelConfig":
        """The reference's files -> a config. A FLUX backbone that embeds guidance gets the
        reference's guidance 3.5 unless model.guidance_scale says otherwise (the upstream config
        has no such key: its model hard-codes 3.5)."""
        rm_src, tr_src, sc_src = sources
        backbone = backbone_from_diffusers(transformer_config, tr_src)
        fields = reference_model_fields(rm_config, rm_src)
        if fields["guidance_scale"] is None and getattr(backbone, "guidance_embeds", False):
            fields["guidance_scale"] = REFERENCE_FLUX_GUIDANCE
            logger.info("%s [model]: no guidance_scale: embedding the reference's guidance %s", rm_src,
                        REFERENCE_FLUX_GUIDANCE)
        return cls._build(f"{rm_src} [model]", backbone=backbone, **fields,
                          scheduler=SchedulerConfig.from_diffusers(scheduler_config, sc_src),
                          u_convention=u_convention, time_convention=time_convention)

    def reference_differences(self, rm_config: Mapping, source: str) -> List[str]:
        """What a reference config (its `model` and `training` sections) says differently from this
        config, one "key: reference value vs ours" line each; empty when they agree. The backbone,
        scheduler and conventions come from other files and flags and are not compared."""
        theirs = reference_model_fields(rm_config, source)
        if theirs["guidance_scale"] is None and getattr(self.backbone, "guidance_embeds", False):
            theirs["guidance_scale"] = REFERENCE_FLUX_GUIDANCE
        return [f"{key}: {value!r} there, {getattr(self, key)!r} in the converted config"
                for key, value in theirs.items() if value != getattr(self, key)]

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
            "time_convention": self.time_convention,
        }

    @classmethod
    def from_dict(cls, d: Mapping, source: str = "ms_rm config") -> "RewardModelConfig":
        fmt = d.get("format")
        if fmt != FORMAT_NAME:
            raise ConfigError(f"{source}: 'format' is {fmt!r}, expected '{FORMAT_NAME}' "
                              "(is this a reference config? use RewardModelConfig.from_reference)")
        version = get_value(d, "format_version", int, source)
        if version != FORMAT_VERSION:
            raise ConfigError(f"{source}: format_version {version} is not supported by this ms_rm "
                              f"(reads version {FORMAT_VERSION}); upgrade ms_rm or re-convert")
        no_unknown(d, _CONFIG_KEYS, source)
        bb = get_value(d, "backbone", dict, source)
        backbone = backbone_from_dict(bb, f"{source} [backbone]")
        head_d = get_value(d, "reward_head", dict, source)
        no_unknown(head_d, {f.name for f in dataclasses.fields(HeadConfig)}, f"{source} [reward_head]")
        sched_d = get_value(d, "scheduler", dict, source)
        no_unknown(sched_d, {f.name for f in dataclasses.fields(SchedulerConfig)}, f"{source} [scheduler]")
        return cls._build(
            source,
            backbone=backbone,
            num_transformer_layers=get_value(d, "num_transformer_layers", int, source),
            visual_head_idx=int_tuple(d, "visual_head_idx", source),
            text_head_idx=int_tuple(d, "text_head_idx", source),
            head=HeadConfig.from_dict(head_d, f"{source} [reward_head]"),
            use_logistic=get_value(d, "use_logistic", bool, source),
            add_noise=get_value(d, "add_noise", bool, source),
            scheduler=SchedulerConfig.from_diffusers(sched_d, f"{source} [scheduler]"),
            u_convention=get_value(d, "u_convention", str, source),
            guidance_scale=get_value(d, "guidance_scale", float, source, None),
            # Folders converted before the key existed computed FLUX's temb as diffusers' forward does.
            time_convention=get_value(d, "time_convention", str, source,
                                      "diffusers" if backbone.family == "flux" else "reference"),
        )

    def replace(self, **changes) -> "RewardModelConfig":
        return dataclasses.replace(self, **changes)


def reference_model_fields(rm_config: Mapping, rm_src: str) -> dict:
    """The fields of a RewardModelConfig that the reference's own config file sets (its `model`
    and `training` sections): layers, taps, head, use_logistic, add_noise, guidance (None when
    the file has none)."""
    model = get_value(rm_config, "model", dict, rm_src)
    model_src = f"{rm_src} [model]"
    if "use_t_embed" in model and model["use_t_embed"] is False:
        logger.warning("%s: use_t_embed=false has no effect: the reference RewardHead swallows it "
                       "and always conditions on temb; ms_rm does the same", model_src)
    training = rm_config.get("training") or {}
    if not isinstance(training, Mapping):
        raise ConfigError(f"{rm_src}: key 'training' must be a mapping, got {training!r}")
    return dict(
        guidance_scale=get_value(model, "guidance_scale", float, model_src, None),
        num_transformer_layers=get_value(model, "num_transformer_layers", int, model_src),
        visual_head_idx=int_tuple(model, "visual_head_idx", model_src),
        text_head_idx=int_tuple(model, "text_head_idx", model_src),
        head=HeadConfig.from_dict(get_value(model, "reward_head", dict, model_src, {}), f"{model_src} [reward_head]"),
        use_logistic=get_value(model, "use_logistic", bool, model_src, False),
        add_noise=get_value(training, "add_noise", bool, f"{rm_src} [training]", True),
    )


_CONFIG_KEYS = ("format", "format_version", "backbone", "num_transformer_layers", "visual_head_idx",
                "text_head_idx", "reward_head", "use_logistic", "add_noise", "scheduler", "u_convention",
                "guidance_scale", "time_convention")


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
