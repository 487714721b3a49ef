"""The released ImageReward.pt -> an ms_rm converted folder, tensor by tensor.

ImageReward.pt is the state dict of the package's ImageReward module: `blip.visual_encoder.*`
(the ViT), `blip.text_encoder.*` (the text encoder), `blip.vision_proj.*` / `blip.text_proj.*`
(BLIP's contrastive projections, which the reward never uses), possibly the text encoder's
integer `embeddings.position_ids` buffer, and `mlp.layers.*`. Every key is either read into the
model (the `blip.` prefix dropped) or declared unused with a reason; any other key, a missing one,
or a shape the config does not predict is a one-line CheckpointError naming the checkpoint's keys.
The file is read through torch's memory map one tensor at a time (ms_rm.io.torch_file), so a
full-size conversion holds about one tensor in memory.

The config: ms_rm's own JSON (ImageRewardConfig.to_dict), or BLIP's `med_config.json` (the
BertConfig the package builds its text encoder from), or none. Without ms_rm's JSON the sizes
are read off the checkpoint's shapes (`infer_config`): the ViT's width, depth, patch, image size
and MLP ratio; the text encoder's vocabulary, width, depth, intermediate width and positions;
the MLP's widths. What the shapes do not fix comes from med_config.json (the text encoder's
heads, LayerNorm eps, pad id; its sizes must agree with the shapes) or, without it, BLIP's
values: 64-wide heads (ViT-B 768/12, ViT-L 1024/16, BERT-base 768/12), eps 1e-12, pad id 0. The
ViT's heads are always width / 64, as the package's create_vit builds them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np

from ...core.config import get_value, positive
from ...core.errors import CheckpointError, ConfigError
from ...core.weights import check_key_sets
from ...io.converted import write_converted
from ...io.files import check_new_output, read_config_file
from ...io.torch_file import TorchStateFile
from ..diffusion_rm.conversion import OUT_DTYPES
from .config import ImageRewardConfig, TextConfig, VisionConfig

logger = logging.getLogger(__name__)

ParameterShapes = Callable[[ImageRewardConfig], Dict[str, Tuple[int, ...]]]

PREFIXES = {"blip.visual_encoder.": "visual_encoder.", "blip.text_encoder.": "text_encoder.", "mlp.": "mlp."}
POSITION_IDS = "blip.text_encoder.embeddings.position_ids"
UNUSED = {
    "blip.vision_proj.": "BLIP's image-text contrastive projection of the image: not part of the reward",
    "blip.text_proj.": "BLIP's image-text contrastive projection of the text: not part of the reward",
    POSITION_IDS: "the index buffer 0..P-1 (checked): positions are taken in order",
}


def model_name(key: str) -> Optional[str]:
    """The model parameter that checkpoint key `key` fills, or None."""
    for prefix, ours in PREFIXES.items():
        if key.startswith(prefix):
            return ours + key[len(prefix):]
    return None


def checkpoint_key(name: str) -> str:
    """The checkpoint key that fills model parameter `name` (model_name's inverse)."""
    for prefix, ours in PREFIXES.items():
        if name.startswith(ours):
            return prefix + name[len(ours):]
    raise ValueError(f"no checkpoint prefix for parameter '{name}'")


def unused_reason(key: str, table: Mapping[str, str] = UNUSED) -> Optional[str]:
    """Why checkpoint key `key` is not used (a `table` entry: the key itself, or a prefix ending in
    "."), or None."""
    for start, reason in table.items():
        if key == start or start.endswith(".") and key.startswith(start):
            return reason
    return None


# --- the config: ms_rm's JSON, BLIP's med_config.json, or the checkpoint's shapes ------------------

VISION, TEXT = "blip.visual_encoder.", "blip.text_encoder."
HEAD_WIDTH = 64                   # BLIP's ViTs (base 768/12, large 1024/16) and bert-base (768/12)
# med_config.json's sizes -> (the TextConfig field, what in the checkpoint gives it): checked against the shapes
MED_SIZES = {"vocab_size": ("vocab_size", "embeddings.word_embeddings.weight"),
             "hidden_size": ("width", "embeddings.word_embeddings.weight"),
             "num_hidden_layers": ("layers", "encoder.layer.N"),
             "intermediate_size": ("intermediate", "encoder.layer.0.intermediate.dense.weight"),
             "max_position_embeddings": ("max_positions", "embeddings.position_embeddings.weight")}


def _shape(source: TorchStateFile, key: str, ndim: int, what: str = "ImageReward.pt") -> Tuple[int, ...]:
    if key not in source:
        raise CheckpointError(f"{source.path}: no tensor '{key}', which gives the model's sizes. Is this "
                              f"{what}? (or pass --config with ms_rm's config JSON of the model)")
    shape = tuple(source.shape(key))
    if len(shape) != ndim:
        raise CheckpointError(f"{source.path}: tensor '{key}' has shape {shape}, expected {ndim} dimensions")
    return shape


def _count(source: TorchStateFile, prefix: str) -> int:
    """How many numbered blocks `prefix`N. the checkpoint holds (0..N-1, none skipped)."""
    found = {int(k[len(prefix):].split(".", 1)[0]) for k in source.keys()
             if k.startswith(prefix) and k[len(prefix):].split(".", 1)[0].isdigit()}
    if found != set(range(len(found))) or not found:
        raise CheckpointError(f"{source.path}: blocks '{prefix}N' are {sorted(found)}, expected 0..N-1")
    return len(found)


def _med_values(med: Mapping[str, Any], source: str) -> Dict[str, Any]:
    """From BLIP's med_config.json (a BertConfig): the text encoder's settings the shapes do not fix,
    and its sizes (checked against the shapes later). Its encoder_width is not read: BLIP_Pretrain
    replaces it with the ViT's width."""
    if get_value(med, "model_type", str, source, "bert") != "bert":
        raise ConfigError(f"{source}: model_type {med['model_type']!r} is not 'bert' (BLIP's med_config.json)")
    if not get_value(med, "add_cross_attention", bool, source, True):
        raise ConfigError(f"{source}: add_cross_attention is false; ImageReward's text encoder attends to the image")
    act = get_value(med, "hidden_act", str, source, "gelu")
    if act != "gelu":
        raise ConfigError(f"{source}: hidden_act {act!r} is not supported; ImageReward's BERT uses 'gelu' (erf)")
    kind = get_value(med, "position_embedding_type", str, source, "absolute")
    if kind != "absolute":
        raise ConfigError(f"{source}: position_embedding_type {kind!r} is not supported; ms_rm's is 'absolute'")
    values = {"heads": positive(get_value(med, "num_attention_heads", int, source), "num_attention_heads", source),
              "eps": get_value(med, "layer_norm_eps", float, source, TextConfig.eps),
              "pad_token_id": get_value(med, "pad_token_id", int, source, TextConfig.pad_token_id)}
    for key, (name, _) in MED_SIZES.items():
        if key in med:
            values[name] = get_value(med, key, int, source)
    return values


def infer_towers(source: TorchStateFile, med: Optional[Mapping[str, Any]] = None,
                 med_source: str = "med_config.json", vision_prefix: str = VISION, text_prefix: str = TEXT,
                 what: str = "ImageReward.pt") -> Tuple[VisionConfig, TextConfig]:
    """The BLIP towers' configs the checkpoint's shapes determine (the ViT under `vision_prefix`, the
    text encoder under `text_prefix`), with what they do not from BLIP's med_config.json `med` (or
    BLIP's values); a size med_config.json gives that the shapes contradict is a ConfigError."""
    VISION, TEXT = vision_prefix, text_prefix
    width, _, patch, patch_w = _shape(source, VISION + "patch_embed.proj.weight", 4, what)
    tokens = _shape(source, VISION + "pos_embed", 3, what)[1]
    side = int(round((tokens - 1) ** 0.5))
    if patch != patch_w or side * side != tokens - 1:
        raise CheckpointError(f"{source.path}: '{VISION}patch_embed.proj.weight' {(width, 3, patch, patch_w)} and "
                              f"'{VISION}pos_embed' ({tokens} tokens) are not a square image of square patches")
    mlp_width = _shape(source, VISION + "blocks.0.mlp.fc1.weight", 2, what)[0]
    vision = VisionConfig(image_size=side * patch, patch_size=patch, width=width,
                          layers=_count(source, VISION + "blocks."), heads=max(1, width // HEAD_WIDTH),
                          mlp_ratio=mlp_width / width)
    vocab, text_width = _shape(source, TEXT + "embeddings.word_embeddings.weight", 2, what)
    sizes = {"vocab_size": vocab, "width": text_width,
             "layers": _count(source, TEXT + "encoder.layer."),
             "intermediate": _shape(source, TEXT + "encoder.layer.0.intermediate.dense.weight", 2, what)[0],
             "max_positions": _shape(source, TEXT + "embeddings.position_embeddings.weight", 2, what)[0]}
    given = _med_values(med, med_source) if med is not None else {}
    for key, (name, where) in MED_SIZES.items():
        if name in given and given[name] != sizes[name]:
            raise ConfigError(f"{med_source}: {key} is {given[name]}, but the checkpoint {source.path} has "
                              f"{sizes[name]} ('{TEXT}{where}'); pass the med_config.json of this checkpoint, "
                              "or none (the sizes are read off the checkpoint)")
    text = TextConfig(**sizes, heads=given.get("heads", max(1, text_width // HEAD_WIDTH)),
                      eps=given.get("eps", TextConfig.eps),
                      pad_token_id=given.get("pad_token_id", TextConfig.pad_token_id))
    return vision, text


def infer_config(source: TorchStateFile, med: Optional[Mapping[str, Any]] = None,
                 med_source: str = "med_config.json") -> ImageRewardConfig:
    """The config the checkpoint's shapes determine, with what they do not from BLIP's med_config.json
    `med` (or BLIP's values); a size med_config.json gives that the shapes contradict is a ConfigError."""
    vision, text = infer_towers(source, med, med_source)
    layers = sorted(int(k.split(".")[2]) for k in source.keys()
                    if k.startswith("mlp.layers.") and k.endswith(".weight"))
    widths = [_shape(source, f"mlp.layers.{i}.weight", 2)[0] for i in layers]
    if not widths or widths[-1] != 1:
        raise CheckpointError(f"{source.path}: the MLP's layers 'mlp.layers.N.weight' must end with one output, "
                              f"got widths {widths}")
    config = ImageRewardConfig(vision=vision, text=text, mlp_widths=tuple(widths[:-1]))
    logger.info("%s: sizes from the checkpoint's shapes%s: %s", source.path,
                f" and {med_source}" if med is not None else "", config.to_dict())
    return config


def _is_med_config(d: Mapping[str, Any]) -> bool:
    """A BertConfig (BLIP's med_config.json) rather than ms_rm's own config JSON."""
    return "format" not in d and ("model_type" in d or "hidden_size" in d or "num_attention_heads" in d)


def resolve_config(config: Any, source: TorchStateFile) -> ImageRewardConfig:
    """An ImageRewardConfig; ms_rm's config dict or JSON file (its to_dict form); BLIP's
    med_config.json (a dict or file) with the sizes from the checkpoint; or None: the sizes from
    the checkpoint, the rest BLIP's."""
    if isinstance(config, ImageRewardConfig):
        return config
    if config is None:
        return infer_config(source)
    d, where = (config, "config") if isinstance(config, Mapping) else (read_config_file(config), str(config))
    if _is_med_config(d):
        return infer_config(source, d, where)
    return ImageRewardConfig.from_dict(d, where)


@dataclass
class ConversionPlan:
    """Every model parameter's key in the checkpoint, and every other key with its reason.

    ImageReward.pt's plan; another BLIP checkpoint (the BLIP score's model_large.pth) subclasses it
    with its own keys (model_name, checkpoint_key, unused_reason, POSITION_IDS, HINT), how its file
    is opened (open_source) and how its config is found (resolve_config)."""

    source: TorchStateFile
    config: Any
    keys: Dict[str, str] = field(default_factory=dict)           # model name -> checkpoint key
    shapes: Dict[str, Tuple[int, ...]] = field(default_factory=dict)
    unused: Dict[str, str] = field(default_factory=dict)         # checkpoint key -> reason

    POSITION_IDS = POSITION_IDS
    HINT = "Is this ImageReward.pt, and does the config (--config) describe it?"

    model_name = staticmethod(model_name)
    checkpoint_key = staticmethod(checkpoint_key)
    unused_reason = staticmethod(unused_reason)
    resolve_config = staticmethod(resolve_config)

    @classmethod
    def open_source(cls, path: str) -> TorchStateFile:
        return TorchStateFile(path, non_float_ok=lambda key: cls.unused_reason(key) is not None)

    @classmethod
    def build(cls, path: str, parameter_shapes: ParameterShapes, config: Any = None) -> "ConversionPlan":
        source = cls.open_source(path)
        try:
            cfg = cls.resolve_config(config, source)
            plan = cls(source, cfg, shapes=parameter_shapes(cfg))
            plan._account()
        except BaseException:
            source.close()
            raise
        return plan

    def _account(self) -> None:
        hint = self.HINT
        expected = {self.checkpoint_key(name) for name in self.shapes}
        found = {}
        for key in self.source.keys():
            if key in expected:
                found[self.model_name(key)] = key
                continue
            reason = self.unused_reason(key)
            if reason is None:
                found[key] = key          # reported as unexpected below
            else:
                self.unused[key] = reason
        check_key_sets(expected, found.values(), self.source.path, hint)
        if self.POSITION_IDS in self.unused:
            ids = np.asarray(self.source.read(self.POSITION_IDS)).reshape(-1)
            if not np.array_equal(ids, np.arange(ids.size)):
                raise CheckpointError(f"{self.source.path}: buffer '{self.POSITION_IDS}' is not 0..{ids.size - 1}; "
                                      "ms_rm takes text positions in order only")
        self.keys = found
        problems = [f"'{key}' has shape {self.source.shape(key)}, the model expects {self.shapes[name]}"
                    for name, key in found.items() if tuple(self.source.shape(key)) != self.shapes[name]]
        if problems:
            more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
            raise CheckpointError(f"{self.source.path}: " + "; ".join(problems[:3]) + more + f". {hint}")

    @property
    def names(self) -> List[str]:
        return list(self.shapes)

    def out_dtype(self, name: str, dtype: str) -> np.dtype:
        if dtype not in OUT_DTYPES:
            raise ConfigError(f"dtype must be one of {sorted(OUT_DTYPES)}, got {dtype!r}")
        return OUT_DTYPES[dtype] or self.source.dtype(self.keys[name])

    def tensor(self, name: str, dtype: str = "keep") -> np.ndarray:
        """Parameter `name`, read and checked finite, cast to `dtype`."""
        key, out = self.keys[name], self.out_dtype(name, dtype)
        stored = self.source.read(key)
        if not np.isfinite(stored.astype(np.float32)).all():
            raise CheckpointError(f"{self.source.path}: tensor '{key}' has NaN/Inf values")
        return stored if stored.dtype == out else stored.astype(out)

    def close(self) -> None:
        self.source.close()


def convert(src: str, out: str, parameter_shapes: ParameterShapes, config: Any = None, dtype: str = "keep",
            force: bool = False, progress: bool = True, plan_class: type = ConversionPlan) -> str:
    """ImageReward.pt `src` (or, with another `plan_class`, its checkpoint) -> converted folder `out`
    (written atomically); its path."""
    out = check_new_output(out, force)
    plan = plan_class.build(src, parameter_shapes, config)
    try:
        specs = [(name, plan.out_dtype(name, dtype), plan.shapes[name]) for name in plan.names]
        if plan.unused:
            logger.info("%s: %d tensors not used (see manifest.json)", src, len(plan.unused))
        return write_converted(
            out, config=plan.config.to_dict(), specs=specs, produce=lambda name: plan.tensor(name, dtype),
            describe=lambda name: {"shape": list(plan.shapes[name]), "from": plan.keys[name]},
            sources=[plan.source.path], manifest={"dtype": dtype, "unused": {"checkpoint": plan.unused}},
            force=force, progress=progress)
    finally:
        plan.close()
