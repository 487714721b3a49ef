"""Reference-format Diffusion-RM checkpoints -> MindSpore, in memory or on disk.

The reference files (the Diffusion-RM spec, section 4: checkpoint layout): a model or run directory with
`config.json` and a checkpoint folder in one of three modes, the base SD3 transformer as a
diffusers folder (safetensors, maybe sharded), and the scheduler config.

* `open_reference` finds and opens them, with errors that name the missing file.
* `ConversionPlan` decides, for every parameter of the model, which tensor feeds it and which
  LoRA delta is merged into it, and accounts for every key of every source (used, or unused
  for a stated reason) - all from headers, before any tensor data is read.
* `plan.tensor(name, dtype)` then produces one parameter at a time; `convert` streams them
  into a new converted folder (ms_rm.io.converted writes it), and `DiffusionRM.from_reference`
  loads them straight into a model. Both go through this one plan.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from ...backbones.sd3_transformer import POSITION_TABLE_KEY, sd3_position_rows
from ...core.errors import CheckpointError, ConfigError
from ...core.weights import check_key_sets
from ...io.converted import write_converted
from ...io.files import check_new_output, find_weights, read_config_file
from ...io.lora import LoraAdapter
from ...io.safetensors_file import ShardedSafetensors, open_safetensors
from ...io.tensor_source import TensorSource
from ...io.torch_file import TorchStateFile
from .config import RewardModelConfig

logger = logging.getLogger(__name__)

ParameterShapes = Callable[[RewardModelConfig], Dict[str, Tuple[int, ...]]]   # config -> {name: shape}

# --- which source keys the model reads ---------------------------------------------------------------
# Keys are in the model's namespace (`backbone.*`, `reward_head.*`, `eta3`, `eta4`), the namespace of
# a reference full_model.pt; a diffusers transformer's keys get `backbone.` first. A key the model
# does not read is an error unless `unused_reason` names why it is not needed.

BACKBONE = "backbone."
_BLOCK = re.compile(r"backbone\.transformer_blocks\.(\d+)\.(.+)")
_ZIMAGE_LAYER = re.compile(r"backbone\.layers\.(\d+)\.")


def unused_reason(key: str, config: RewardModelConfig) -> Optional[str]:
    """Why the model does not read checkpoint tensor `key`, or None if it should."""
    if key == "backbone.pos_embed.pos_embed":
        return ("fixed sin-cos position table: ms_rm computes the crop it needs, rounded to this "
                "table's stored dtype (checked against it at conversion)")
    if key.startswith(("backbone.norm_out.", "backbone.proj_out.")):
        return "output layers of the full transformer, not part of the cut"
    if key.startswith("backbone.single_transformer_blocks."):
        return "FLUX single-stream block: the cut keeps double-stream blocks only"
    if key.startswith("backbone.all_final_layer."):
        return "Z-Image output layer, not part of the cut"
    layer = _ZIMAGE_LAYER.match(key)
    if layer and int(layer.group(1)) >= config.last_depth:
        return f"Z-Image layer {layer.group(1)} lies after the deepest tap (depth {config.last_depth})"
    match = _BLOCK.match(key)
    if not match:
        return None
    index, rest = int(match.group(1)), match.group(2)
    if index >= config.last_depth:
        return f"block {index} lies after the deepest tap (depth {config.last_depth})"
    image_out, context_out = config.block_streams()[index]
    if not image_out and rest.startswith(("attn2.", "ff.")):
        return f"block {index}'s image output is not tapped"
    if not context_out and rest.startswith(("ff_context.", "attn.to_add_out.")):
        return f"block {index}'s text output is not tapped"
    return None


# --- the reference files ------------------------------------------------------------------------------

LORA, FULL, HEAD = "lora", "full", "head"
MODE_FILES = {
    LORA: ("backbone_lora/adapter_config.json", "backbone_lora/adapter_model.safetensors", "rm_head.pt"),
    FULL: ("full_model.pt",),
    HEAD: ("rm_head.pt",),
}
MODE_MEANING = {
    LORA: "use_lora=true, freeze_backbone=false: base transformer + LoRA + head",
    FULL: "use_lora=false, freeze_backbone=false: the whole reward model in full_model.pt",
    HEAD: "freeze_backbone=true: base transformer untouched + head",
}
HEAD_PREFIX = "reward_head."
LOGISTIC_DEFAULTS = {"eta3": 0.0, "eta4": 0.15}     # the reference's init values
TABLE_EPS = {"float32": 2.0 ** -23, "bfloat16": 2.0 ** -7, "float16": 2.0 ** -10}
OUT_DTYPES = {"keep": None, "fp32": np.dtype("float32"), "bf16": np.dtype("bfloat16"),
              "fp16": np.dtype("float16")}
TRANSFORMER_WEIGHTS = ("diffusion_pytorch_model.safetensors.index.json",
                       "diffusion_pytorch_model.safetensors")


def checkpoint_mode(rm_config: dict, source: str) -> str:
    model = rm_config.get("model")
    if not isinstance(model, dict):
        raise ConfigError(f"{source}: missing required key 'model'")
    flags = {}
    for key in ("use_lora", "freeze_backbone"):
        value = model.get(key, False)
        if not isinstance(value, bool):
            raise ConfigError(f"{source} [model]: key '{key}' must be bool, got {value!r}")
        flags[key] = value
    if flags["freeze_backbone"]:
        return HEAD
    return LORA if flags["use_lora"] else FULL


def _find_diffusers_folder(path: str, marker: str, subfolder: str, what: str, flag: str) -> str:
    """`path` itself, or its `subfolder` when given a pipeline root, holding `marker`."""
    if os.path.isfile(os.path.join(path, marker)):
        return path
    if os.path.isfile(os.path.join(path, subfolder, marker)):
        return os.path.join(path, subfolder)
    raise CheckpointError(f"{path}: no {marker} here or in {subfolder}/; {flag} must point to the "
                          f"diffusers {what} folder (or the pipeline folder holding it)")


@dataclass
class ReferenceSources:
    """The reference files of one conversion, opened."""

    config_path: str
    checkpoint_dir: str
    mode: str
    rm_config: dict
    transformer_dir: str
    transformer_config: dict
    scheduler_path: str
    scheduler_config: dict
    transformer: Optional[ShardedSafetensors] = None     # not read in full mode
    transformer_index: Optional[str] = None
    head: Optional[TorchStateFile] = None
    full: Optional[TorchStateFile] = None
    lora: Optional[LoraAdapter] = None

    def files(self) -> List[str]:
        """Every file this conversion reads, for the manifest."""
        paths = [self.config_path, os.path.join(self.transformer_dir, "config.json"), self.scheduler_path]
        if self.transformer is not None:
            paths += ([self.transformer_index] if self.transformer_index else []) + \
                     [f.path for f in self.transformer.files]
        if self.lora is not None:
            paths += [self.lora.config_path, self.lora.weights_path]
        for state in (self.head, self.full):
            if state is not None:
                paths.append(state.path)
        return paths

    def close(self) -> None:
        for source in (self.transformer, self.head, self.full, self.lora):
            if source is not None:
                source.close()


def open_reference(src: str, transformer: str, scheduler: str, config: Optional[str] = None) -> ReferenceSources:
    """Find and open a reference checkpoint.

    src: the model directory holding config.json and checkpoint/ (the released layout), or,
    with `config` given, the checkpoint folder itself (a run's checkpoints/step_N).
    transformer: the diffusers transformer folder (or the pipeline folder holding transformer/).
    scheduler: the scheduler folder, its scheduler_config.json, or the pipeline folder.
    """
    src = os.fspath(src)
    if not os.path.isdir(src):
        raise CheckpointError(f"{src}: not a directory")
    if config is None:
        config_path = os.path.join(src, "config.json")
        checkpoint_dir = os.path.join(src, "checkpoint")
        if not os.path.isfile(config_path):
            raise CheckpointError(f"{src}: no config.json; pass the model directory (config.json + "
                                  "checkpoint/), or a checkpoint folder with --config")
        if not os.path.isdir(checkpoint_dir):
            hint = (" This looks like a training run: pass a checkpoints/step_N folder as SRC and the "
                    "run's config.json with --config.") if os.path.isdir(os.path.join(src, "checkpoints")) else ""
            raise CheckpointError(f"{src}: no checkpoint/ folder next to config.json.{hint}")
    else:
        config_path, checkpoint_dir = os.fspath(config), src
    rm_config = read_config_file(config_path)
    mode = checkpoint_mode(rm_config, config_path)
    missing = [f for f in MODE_FILES[mode] if not os.path.isfile(os.path.join(checkpoint_dir, f))]
    if missing:
        raise CheckpointError(f"{checkpoint_dir}: missing {', '.join(missing)}: {config_path} says "
                              f"{MODE_MEANING[mode]}")

    transformer_dir = _find_diffusers_folder(os.fspath(transformer), "config.json", "transformer",
                                             "transformer", "--transformer")
    transformer_config = read_config_file(os.path.join(transformer_dir, "config.json"))
    scheduler = os.fspath(scheduler)
    scheduler_path = scheduler if os.path.isfile(scheduler) else os.path.join(
        _find_diffusers_folder(scheduler, "scheduler_config.json", "scheduler", "scheduler", "--scheduler"),
        "scheduler_config.json")
    sources = ReferenceSources(config_path, checkpoint_dir, mode, rm_config, transformer_dir,
                               transformer_config, scheduler_path, read_config_file(scheduler_path))
    try:
        if mode in (LORA, HEAD):
            path = find_weights(transformer_dir, TRANSFORMER_WEIGHTS, "transformer")
            sources.transformer = open_safetensors(path)
            sources.transformer_index = path if path.endswith(".index.json") else None
            sources.head = TorchStateFile(os.path.join(checkpoint_dir, "rm_head.pt"))
        if mode == LORA:
            sources.lora = LoraAdapter(os.path.join(checkpoint_dir, "backbone_lora"))
        if mode == FULL:
            sources.full = TorchStateFile(os.path.join(checkpoint_dir, "full_model.pt"))
    except BaseException:
        sources.close()
        raise
    return sources


@dataclass
class TensorPlan:
    """Where one model parameter comes from."""

    name: str
    shape: Tuple[int, ...]
    origin: str                               # "transformer", "head", "full" or "default"
    key: Optional[str] = None                 # the key in that source
    lora_module: Optional[str] = None
    lora: Optional[Tuple[int, float, float]] = None   # rank, alpha, scale
    default: Optional[float] = None

    def describe(self) -> dict:
        d = {"shape": list(self.shape), "from": self.origin if self.key is None else f"{self.origin}:{self.key}"}
        if self.lora is not None:
            d["lora"] = {"module": self.lora_module, "rank": self.lora[0], "alpha": self.lora[1],
                         "scale": self.lora[2]}
        if self.default is not None:
            d["default"] = self.default
        return d


@dataclass
class ConversionPlan:
    """Every parameter's source, checked against every source's keys and shapes."""

    sources: ReferenceSources
    config: RewardModelConfig
    tensors: List[TensorPlan] = field(default_factory=list)
    unused: Dict[str, Dict[str, str]] = field(default_factory=dict)    # source label -> key -> reason
    notes: List[str] = field(default_factory=list)
    by_name: Dict[str, TensorPlan] = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, sources: ReferenceSources, parameter_shapes: ParameterShapes,
              u_convention: str = "sigma", time_convention: str = "reference") -> "ConversionPlan":
        """The plan for the model that `parameter_shapes(config)` describes (the model class
        defines its parameter names and shapes; the plan never builds a model itself)."""

        transformer_src = os.path.join(sources.transformer_dir, "config.json")
        config = RewardModelConfig.from_reference(
            sources.rm_config, sources.transformer_config, sources.scheduler_config, u_convention,
            (sources.config_path, transformer_src, sources.scheduler_path), time_convention)
        plan = cls(sources, config)
        if config.backbone.family == "sd3":
            plan._check_position_table()
        expected = parameter_shapes(plan.config)
        if sources.mode == FULL:
            plan._plan_full(expected)
        else:
            plan._plan_split(expected)
        if sources.lora is not None:
            plan._plan_lora(expected)
        plan._check_shapes()
        plan.by_name = {t.name: t for t in plan.tensors}
        return plan

    # --- planning ------------------------------------------------------------------------
    def _check_position_table(self) -> None:
        """Find the stored position table's dtype (the model rounds its positions to it), after
        checking sampled rows against the table diffusers computes for this config."""
        full = self.sources.mode == FULL
        source = self.sources.full if full else self.sources.transformer
        key = (BACKBONE if full else "") + POSITION_TABLE_KEY
        bb = self.config.backbone
        if key not in source:
            self.notes.append(f"no stored position table ({key}): positions are float32")
            return
        where = f"{source.path if full else source.source(key)}: '{key}'"
        size, dim = bb.pos_embed_max_size, bb.inner_dim
        if tuple(source.shape(key)) != (1, size * size, dim):
            raise CheckpointError(f"{where} has shape {tuple(source.shape(key))}, expected {(1, size * size, dim)} "
                                  "from the transformer config (pos_embed_max_size, width): does the transformer "
                                  "config.json match these weights?")
        dtype = source.dtype(key)
        if dtype.name not in TABLE_EPS:
            raise CheckpointError(f"{where} has dtype {dtype}, expected float32, bfloat16 or float16")
        centre = size // 2 * size + size // 2
        crop = centre + np.arange(-8, 8)[:, None] * size + np.arange(-8, 8)[None, :]   # centre 16x16
        rows = np.unique(np.concatenate([np.linspace(0, size * size - 1, 97).astype(np.int64), crop.ravel()]))
        rows = rows[(rows >= 0) & (rows < size * size)]
        stored = source.read_rows(key, rows).astype(np.float32)
        exact = sd3_position_rows(rows, dim, size, bb.sample_size // bb.patch_size).astype(np.float32)
        expected = exact.astype(dtype).astype(np.float32)
        worst = float(np.abs(stored - expected).max())
        if worst > TABLE_EPS[dtype.name] * float(np.abs(exact).max()) + 1e-6:
            raise CheckpointError(f"{where} is not the sin-cos table diffusers computes from the transformer "
                                  f"config (max difference {worst:.3g}); do sample_size, patch_size and the width "
                                  "match these weights?")
        self.config = self.config.replace(backbone=dataclasses.replace(bb, position_table_dtype=dtype.name))

    def _account(self, label: str, path: str, keys, to_model, expected, hint: str) -> None:
        """Keys of one source: each maps to a model parameter or has an unused reason."""
        unused, unexpected = {}, []
        for key in keys:
            name = to_model(key)
            if name in expected:
                continue
            reason = unused_reason(name, self.config)
            if reason is None:
                unexpected.append(name)
            else:
                unused[key] = reason
        if unexpected:
            check_key_sets(set(), unexpected, path, hint)
        if unused:
            self.unused[label] = unused

    def _plan_full(self, expected) -> None:
        full = self.sources.full
        hint = ("Do config.json's num_transformer_layers, visual_head_idx, text_head_idx, reward_head "
                "and use_logistic, and the transformer config, match this checkpoint?")
        self._account("full", full.path, full.keys(), lambda k: k, expected, hint)
        missing = sorted(set(expected) - set(full.keys()))
        if missing:
            check_key_sets(missing, (), full.path, hint)
        self.tensors = [TensorPlan(name, shape, "full", name) for name, shape in expected.items()]

    def _plan_split(self, expected) -> None:
        transformer, head = self.sources.transformer, self.sources.head
        t_hint = "Do the transformer folder and config.json's num_transformer_layers match these weights?"
        self._account("transformer", transformer.files[0].path, transformer.keys(), lambda k: BACKBONE + k,
                      expected, t_hint)
        h_hint = "Do config.json's visual_head_idx, text_head_idx and reward_head match this head?"
        head_names = {HEAD_PREFIX + k for k in head.keys()}
        check_key_sets({n for n in expected if n.startswith(HEAD_PREFIX)}, head_names, head.path, h_hint)
        missing = sorted(n for n in expected if n.startswith(BACKBONE) and n[len(BACKBONE):] not in transformer)
        if missing:
            check_key_sets(missing, (), transformer.files[0].path, t_hint)
        for name, shape in expected.items():
            if name.startswith(BACKBONE):
                self.tensors.append(TensorPlan(name, shape, "transformer", name[len(BACKBONE):]))
            elif name.startswith(HEAD_PREFIX):
                self.tensors.append(TensorPlan(name, shape, "head", name[len(HEAD_PREFIX):]))
            else:                                   # eta3 / eta4: not saved in this mode
                value = LOGISTIC_DEFAULTS[name]
                self.tensors.append(TensorPlan(name, shape, "default", default=value))
                self.notes.append(f"{name} = {value}: the reference's init value ({self.sources.mode} "
                                  "checkpoints do not save it, so the reference evaluates it at init)")

    def _plan_lora(self, expected) -> None:
        adapter = self.sources.lora
        by_name = {t.name: t for t in self.tensors}
        settings = adapter.settings
        unused = {}
        for module in sorted(adapter.modules):
            name = f"{BACKBONE}{module}.weight"
            if name not in by_name:
                reason = unused_reason(name, self.config)
                if reason is None:
                    raise CheckpointError(f"{adapter.weights_path}: holds a LoRA for '{module}', which the "
                                          "model does not have")
                unused[module] = reason
                continue
            if len(by_name[name].shape) != 2:
                raise CheckpointError(f"{adapter.weights_path}: LoRA on '{module}', which is not a Linear "
                                      f"layer (weight shape {by_name[name].shape}), is not supported")
            by_name[name].lora_module = module
            by_name[name].lora = adapter.check_module(module, by_name[name].shape)
        # Every Linear the settings target must have its factors (peft saves them all).
        lacking = sorted(t.name[len(BACKBONE):-len(".weight")] for t in self.tensors
                         if t.name.startswith(BACKBONE) and t.name.endswith(".weight") and len(t.shape) == 2
                         and t.lora is None and settings.targets(t.name[len(BACKBONE):-len(".weight")]))
        if lacking:
            raise CheckpointError(f"{adapter.weights_path}: {adapter.config_path} targets {len(lacking)} "
                                  f"modules that have no LoRA factors: {lacking[:6]}")
        if unused:
            self.unused["lora"] = unused

    def _source(self, origin: str) -> TensorSource:
        return {"transformer": self.sources.transformer, "head": self.sources.head,
                "full": self.sources.full}[origin]

    def _source_path(self, plan: TensorPlan) -> str:
        return self._source(plan.origin).source(plan.key)

    def _check_shapes(self) -> None:
        problems = []
        for t in self.tensors:
            if t.origin == "default":
                continue
            source = self._source(t.origin)
            shape, dtype = tuple(source.shape(t.key)), source.dtype(t.key)
            if shape != t.shape:
                problems.append(f"'{t.key}' in {self._source_path(t)} has shape {shape}, the model expects {t.shape}")
            elif dtype.kind != "f" and dtype.name != "bfloat16":
                problems.append(f"'{t.key}' in {self._source_path(t)} has dtype {dtype}, expected a float")
        if problems:
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            raise CheckpointError("; ".join(problems[:5]) + more + ". Does the config (transformer "
                                  "config.json, config.json's model section) match these weights?")

    # --- producing tensors ---------------------------------------------------------------
    @property
    def names(self) -> List[str]:
        return [t.name for t in self.tensors]

    def out_dtype(self, plan: TensorPlan, dtype: str) -> np.dtype:
        if dtype not in OUT_DTYPES:
            raise ConfigError(f"dtype must be one of {sorted(OUT_DTYPES)}, got {dtype!r}")
        if OUT_DTYPES[dtype] is not None:
            return OUT_DTYPES[dtype]
        return np.dtype("float32") if plan.origin == "default" else self._source(plan.origin).dtype(plan.key)

    def tensor(self, name: str, dtype: str = "keep") -> np.ndarray:
        """Parameter `name`: read, checked finite, LoRA merged in float32, cast to `dtype`."""
        plan = self.by_name[name]
        out = self.out_dtype(plan, dtype)
        if plan.origin == "default":
            return np.asarray(plan.default, dtype=out).reshape(plan.shape)
        where = f"{self._source_path(plan)}: tensor '{plan.key}'"
        stored = self._source(plan.origin).read(plan.key)
        values = stored.astype(np.float32)
        if not np.isfinite(values).all():
            raise CheckpointError(f"{where} has {int(values.size - np.isfinite(values).sum())} NaN/Inf values")
        if plan.lora is None and stored.dtype == out:
            return stored
        if plan.lora is not None:
            values = values + self.sources.lora.delta(plan.lora_module, plan.lora[2])
        with np.errstate(over="ignore"):                    # overflow is checked right below
            result = values.astype(out)
        if not np.isfinite(result.astype(np.float32)).all():
            merged = " LoRA-merged" if plan.lora is not None else ""
            raise CheckpointError(f"{where}: the{merged} values overflow {out}")
        return result

    def nbytes(self, dtype: str) -> int:
        return sum(int(np.prod(t.shape, dtype=np.int64)) * self.out_dtype(t, dtype).itemsize for t in self.tensors)


# --- writing a converted folder ------------------------------------------------------------------------

def convert(src: str, transformer: str, scheduler: str, out: str, parameter_shapes: ParameterShapes,
            config: Optional[str] = None, dtype: str = "keep", u_convention: str = "sigma",
            force: bool = False, progress: bool = True, time_convention: str = "reference") -> str:
    """Convert a reference checkpoint into a converted folder `out` (ms_rm.io.converted); returns
    its path. Nothing is written unless the whole plan checks out; nothing is left on failure."""
    out = check_new_output(out, force)
    sources = open_reference(src, transformer, scheduler, config)
    try:
        plan = ConversionPlan.build(sources, parameter_shapes, u_convention, time_convention)
        specs = [(t.name, plan.out_dtype(t, dtype), t.shape) for t in plan.tensors]   # validates dtype first
        for label, keys in plan.unused.items():
            reasons = set(keys.values())
            logger.info("%s: %d tensors not used (%s)", label, len(keys),
                        next(iter(reasons)) if len(reasons) == 1 else "see manifest.json")
        for note in plan.notes:
            logger.info("%s", note)
        lora = sources.lora
        return write_converted(
            out, config=plan.config.to_dict(), specs=specs, produce=lambda name: plan.tensor(name, dtype),
            describe=lambda name: plan.by_name[name].describe(), sources=sources.files(),
            manifest={
                "mode": sources.mode, "dtype": dtype, "u_convention": plan.config.u_convention,
                "time_convention": plan.config.time_convention,
                "lora": None if lora is None else {
                    "adapter_config": os.path.abspath(lora.config_path),
                    "merged_modules": sum(t.lora is not None for t in plan.tensors),
                    "merge": "W + scale * B @ A in float32 (MindSpore), then cast to the output dtype"},
                "notes": plan.notes,
                "unused": plan.unused,
            },
            force=force, progress=progress)
    finally:
        sources.close()
