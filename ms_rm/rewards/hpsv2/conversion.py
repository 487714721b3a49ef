"""An open_clip ViT CLIP checkpoint (HPSv2's HPS_v2_compressed.pt / HPS_v2.1_compressed.pt, or any
open_clip state dict of that architecture) -> an ms_rm converted folder, tensor by tensor.

The file: a state dict, or a training checkpoint holding it under 'state_dict' (what HPSv2
releases: its img_score.py calls `model.load_state_dict(checkpoint['state_dict'])`); keys may carry
DistributedDataParallel's 'module.' prefix (open_clip's load_checkpoint strips it; so does ms_rm,
when every key has it). Read with weights_only=True through ms_rm.io.torch_file.

The names, open_clip's -> ms_rm's CLIP (ms_rm.rewards.clip.model, transformers' names):

    visual.conv1.weight                    vision_model.embeddings.patch_embedding.weight
    visual.class_embedding                 vision_model.embeddings.class_embedding
    visual.positional_embedding            vision_model.embeddings.position_embedding.weight
    visual.ln_pre / ln_post                vision_model.pre_layrnorm / post_layernorm
    visual.proj (width, embed)             visual_projection.weight, transposed
    [visual.]transformer.resblocks.N.      {vision,text}_model.encoder.layers.N.
        ln_1 / ln_2                            layer_norm1 / layer_norm2
        attn.in_proj_weight (3D, D), _bias     self_attn.q_proj / k_proj / v_proj (rows 0:D, D:2D, 2D:3D)
        attn.out_proj                          self_attn.out_proj
        mlp.c_fc / mlp.c_proj                  mlp.fc1 / mlp.fc2
    token_embedding.weight                 text_model.embeddings.token_embedding.weight
    positional_embedding                   text_model.embeddings.position_embedding.weight
    ln_final                               text_model.final_layer_norm
    text_projection (width, embed)         text_projection.weight, transposed
    logit_scale                            logit_scale

Every ms_rm parameter is filled and every checkpoint tensor is used; the only tensor that may be
left is the text tower's causal `attn_mask` buffer (checked to be open_clip's mask, then unused:
ms_rm builds the same mask). A missing key, an unexpected one or a shape the config does not
predict is a one-line CheckpointError naming the checkpoint's own keys.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np

from ...core.errors import CheckpointError, ConfigError
from ...core.weights import check_key_sets
from ...io.converted import write_converted
from ...io.files import check_new_output, read_config_file
from ...io.torch_file import TorchStateFile
from ..clip.config import CLIPConfig
from ..diffusion_rm.conversion import OUT_DTYPES
from .config import VIT_H_14, clip_config, to_dict

logger = logging.getLogger(__name__)

STATE_KEY = "state_dict"
DDP_PREFIX = "module."
ATTN_MASK = "attn_mask"
UNUSED = {ATTN_MASK: "the text tower's causal mask buffer (checked): ms_rm builds the same mask"}
# (open_clip's block part, ms_rm's); the attention's in_proj is split below
_BLOCK = (("ln_1.", "layer_norm1."), ("ln_2.", "layer_norm2."), ("attn.out_proj.", "self_attn.out_proj."),
          ("mlp.c_fc.", "mlp.fc1."), ("mlp.c_proj.", "mlp.fc2."))
_QKV = ("q_proj", "k_proj", "v_proj")

# How one parameter comes from its key: None (as stored), "T" (transposed) or (part, parts) (rows)
Transform = Any


def parameter_map(config: CLIPConfig) -> Dict[str, Tuple[str, Transform]]:
    """{ms_rm parameter: (open_clip key, transform)} for the model `config` describes."""
    out: Dict[str, Tuple[str, Transform]] = {}
    v, t = "vision_model.", "text_model."
    out[v + "embeddings.patch_embedding.weight"] = ("visual.conv1.weight", None)
    out[v + "embeddings.class_embedding"] = ("visual.class_embedding", None)
    out[v + "embeddings.position_embedding.weight"] = ("visual.positional_embedding", None)
    for ours, theirs in (("pre_layrnorm.", "ln_pre."), ("post_layernorm.", "ln_post.")):
        for p in ("weight", "bias"):
            out[v + ours + p] = ("visual." + theirs + p, None)
    out["visual_projection.weight"] = ("visual.proj", "T")
    out[t + "embeddings.token_embedding.weight"] = ("token_embedding.weight", None)
    out[t + "embeddings.position_embedding.weight"] = ("positional_embedding", None)
    for p in ("weight", "bias"):
        out[t + "final_layer_norm." + p] = ("ln_final." + p, None)
    out["text_projection.weight"] = ("text_projection", "T")
    out["logit_scale"] = ("logit_scale", None)
    for ours_tower, theirs_tower, layers in ((v, "visual.transformer.resblocks.", config.vision.tower.num_hidden_layers),
                                             (t, "transformer.resblocks.", config.text.tower.num_hidden_layers)):
        for n in range(layers):
            ours, theirs = f"{ours_tower}encoder.layers.{n}.", f"{theirs_tower}{n}."
            for their_part, our_part in _BLOCK:
                for p in ("weight", "bias"):
                    out[ours + our_part + p] = (theirs + their_part + p, None)
            for i, proj in enumerate(_QKV):
                out[f"{ours}self_attn.{proj}.weight"] = (theirs + "attn.in_proj_weight", (i, 3))
                out[f"{ours}self_attn.{proj}.bias"] = (theirs + "attn.in_proj_bias", (i, 3))
    return out


def source_shape(shape: Tuple[int, ...], transform: Transform) -> Tuple[int, ...]:
    """The checkpoint shape that gives a parameter of `shape` under `transform`."""
    if transform == "T":
        return tuple(reversed(shape))
    if isinstance(transform, tuple):
        return (shape[0] * transform[1],) + tuple(shape[1:])
    return tuple(shape)


def apply(array: np.ndarray, transform: Transform) -> np.ndarray:
    if transform == "T":
        return np.ascontiguousarray(array.T)
    if isinstance(transform, tuple):
        part, parts = transform
        rows = array.shape[0] // parts
        return np.ascontiguousarray(array[part * rows:(part + 1) * rows])
    return array


def causal_mask(length: int) -> np.ndarray:
    """open_clip's attn_mask: -inf above the diagonal, 0 on and below it."""
    return np.triu(np.full((length, length), -np.inf, dtype=np.float32), k=1)


def resolve_model_config(model_config: Any) -> Tuple[Dict[str, Any], str]:
    """(the open_clip model config dict, where it came from): None is ViT-H-14 (HPSv2's); a dict;
    or a JSON file (open_clip's model_configs/*.json, or an open_clip_config.json with 'model_cfg')."""
    if model_config is None:
        return dict(VIT_H_14), "ViT-H-14 (open_clip's, HPSv2's model)"
    if isinstance(model_config, Mapping):
        d, where = dict(model_config), "model_config"
    else:
        d, where = read_config_file(model_config), str(model_config)
    if "model_cfg" in d and "embed_dim" not in d:               # open_clip_config.json of a hub folder
        d = d["model_cfg"]
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: 'model_cfg' must be a JSON object")
    return d, where


@dataclass
class ConversionPlan:
    """Every ms_rm parameter's checkpoint key and transform, and every other key with its reason."""

    source: TorchStateFile
    model_config: Dict[str, Any]
    config: CLIPConfig
    shapes: Dict[str, Tuple[int, ...]]
    prefix: str = ""
    params: Dict[str, Tuple[str, Transform]] = field(default_factory=dict)   # ms_rm name -> (file key, transform)
    unused: Dict[str, str] = field(default_factory=dict)                    # file key -> reason

    @classmethod
    def build(cls, path: str, parameter_shapes: Callable[[CLIPConfig], Dict[str, Tuple[int, ...]]],
              model_config: Any = None) -> "ConversionPlan":
        d, where = resolve_model_config(model_config)
        config = clip_config(d, where)
        source = TorchStateFile(path, non_float_ok=lambda key: False, entry=STATE_KEY, entry_required=False)
        try:
            keys = source.keys()
            prefix = DDP_PREFIX if keys and all(k.startswith(DDP_PREFIX) for k in keys) else ""
            plan = cls(source, d, config, parameter_shapes(config), prefix)
            plan._account()
        except BaseException:
            source.close()
            raise
        return plan

    def _account(self) -> None:
        hint = ("Is this an open_clip ViT CLIP checkpoint (HPS_v2_compressed.pt), and does the model config "
                "(--model-config, default ViT-H-14) describe it?")
        mapping = parameter_map(self.config)
        if set(mapping) != set(self.shapes):          # the map and the model must agree: a bug if not
            raise AssertionError(sorted(set(mapping) ^ set(self.shapes))[:5])
        p = self.prefix
        expected = {p + key for key, _ in mapping.values()}
        found = []
        for key in self.source.keys():
            bare = key[len(p):]
            if key not in expected and bare in UNUSED:
                self.unused[key] = UNUSED[bare]
            else:
                found.append(key)
        check_key_sets(expected, found, self.source.path, hint)
        problems = []
        for name, (key, transform) in mapping.items():
            want = source_shape(self.shapes[name], transform)
            have = tuple(self.source.shape(p + key))
            if have != want and f"'{p + key}'" not in " ".join(problems):
                problems.append(f"'{p + key}' has shape {have}, the model config predicts {want}")
        if problems:
            more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
            raise CheckpointError(f"{self.source.path}: " + "; ".join(problems[:3]) + more + f". {hint}")
        if p + ATTN_MASK in self.unused:
            mask = self.source.read(p + ATTN_MASK)
            length = self.config.text.max_position_embeddings
            if mask.shape != (length, length) or not np.array_equal(mask.astype(np.float32), causal_mask(length)):
                raise CheckpointError(f"{self.source.path}: buffer '{p + ATTN_MASK}' is not open_clip's causal mask "
                                      f"({length}x{length}, -inf above the diagonal); ms_rm builds that mask only")
        self.params = {name: (p + key, transform) for name, (key, transform) in mapping.items()}

    def out_dtype(self, name: str, dtype: str) -> np.dtype:
        if dtype not in OUT_DTYPES:
            raise ConfigError(f"dtype must be one of {sorted(OUT_DTYPES)}, got {dtype!r}")
        return OUT_DTYPES[dtype] or self.source.dtype(self.params[name][0])

    def tensor(self, name: str, dtype: str = "keep") -> np.ndarray:
        """Parameter `name`, read, transformed, checked finite, cast to `dtype`."""
        key, transform = self.params[name]
        out = self.out_dtype(name, dtype)
        stored = self.source.read(key)
        if not np.isfinite(stored.astype(np.float32)).all():
            raise CheckpointError(f"{self.source.path}: tensor '{key}' has NaN/Inf values")
        array = apply(stored, transform)
        return array if array.dtype == out else array.astype(out)

    def describe(self, name: str) -> dict:
        key, transform = self.params[name]
        entry = {"shape": list(self.shapes[name]), "from": key}
        if transform == "T":
            entry["transposed"] = True
        elif isinstance(transform, tuple):
            entry["rows"] = f"{_QKV[transform[0]][0]} of q/k/v"
        return entry

    @property
    def names(self) -> List[str]:
        return list(self.shapes)

    def close(self) -> None:
        self.source.close()


def convert(src: str, out: str, parameter_shapes, model_config: Optional[Any] = None, dtype: str = "keep",
            force: bool = False, progress: bool = True) -> str:
    """open_clip checkpoint `src` -> converted folder `out` (written atomically); its path."""
    out = check_new_output(out, force)
    plan = ConversionPlan.build(src, parameter_shapes, model_config)
    try:
        specs = [(name, plan.out_dtype(name, dtype), plan.shapes[name]) for name in plan.names]
        unused = {"checkpoint": plan.unused}
        if plan.source.outer:
            unused["outside_state_dict"] = {k: f"a {v} beside '{STATE_KEY}': not weights"
                                            for k, v in plan.source.outer.items()}
            logger.info("%s: entries beside '%s' not read: %s", src, STATE_KEY, sorted(plan.source.outer))
        return write_converted(
            out, config=to_dict(plan.model_config), specs=specs, produce=lambda name: plan.tensor(name, dtype),
            describe=plan.describe, sources=[plan.source.path],
            manifest={"dtype": dtype, "ddp_prefix_stripped": bool(plan.prefix), "unused": unused},
            force=force, progress=progress)
    finally:
        plan.close()
