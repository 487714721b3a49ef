"""The model a Diffusion-RM training run trains: the base transformer cut as DiffusionRM cuts it, the
reward head, and separate trainable LoRA factors, as the reference builds it (HKUST-C4G/diffusion-rm,
diffusion_rm/models/sd3_rm.py SD3RewardModel.__init__ and reward_head.py; facts in our words):

* LoRA (peft) on every attention projection of the cut: to_q, to_k, to_v, to_out.0, add_q_proj,
  add_k_proj, add_v_proj, to_add_out (so SD3.5's attn2 too), except the last block's add_* and
  to_add_out unless the text stream is tapped at the last block; Z-Image: to_q, to_k, to_v, to_out.0
  of every layer. init_lora_weights "gaussian": A ~ N(0, 1/r), B = 0; true: A ~ U(+-1/sqrt(in)), B = 0.
* The head at torch's defaults (Linear: U(+-1/sqrt(in)) for weight and bias; RMSNorm weights 1),
  query tokens and layer embeddings N(0, 0.02^2), the last Linear of every FiLM cond_mlp and of every
  value gate zero.
* Trained: the LoRA factors, every head parameter and eta3 / eta4 (use_lora); the whole model
  (use_lora false, freeze_backbone false); the head alone (freeze_backbone).

A run starts from the base transformer (a fresh head and LoRA), or from a reference checkpoint
folder (backbone_lora/ + rm_head.pt, the LoRA kept as separate factors, not merged).
"""

from __future__ import annotations

import copy
import os
import tempfile
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np
import mindspore as ms
from mindspore import Parameter

from ..core.errors import CheckpointError, ConfigError
from ..core.weights import check_key_sets, load_parameters
from ..io.files import read_config_file, write_json
from ..io.lora import LoraAdapter, LoraSettings
from ..io.safetensors_file import SafetensorsFile
from ..io.torch_file import write_state_dict
from ..rewards.diffusion_rm import DiffusionRM
from ..rewards.diffusion_rm import conversion
from ..rewards.diffusion_rm.config import RewardModelConfig

SD3_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
ZIMAGE_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
HEAD = "reward_head."
ADAPTER_PREFIX = "base_model.model."


def train_mode(model_section: Mapping, source: str) -> str:
    """"lora", "full" or "head" from the config's use_lora / freeze_backbone (the checkpoint modes)."""
    return conversion.checkpoint_mode({"model": dict(model_section)}, source)


def lora_settings(model_section: Mapping, family: str, source: str) -> LoraSettings:
    """The reference's peft LoraConfig for a run config's `model` section."""
    lora = model_section.get("lora_config")
    if not isinstance(lora, Mapping) or "r" not in lora or "lora_alpha" not in lora:
        raise ConfigError(f"{source} [model]: use_lora needs lora_config with r and lora_alpha")
    if family == "zimage":
        targets, exclude = ZIMAGE_TARGETS, None
    else:
        n = model_section["num_transformer_layers"]
        exclude = tuple(f"transformer_blocks.{n - 1}.attn.{m}"
                        for m in ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"))
        if model_section.get("use_text_features", True) and list(model_section["text_head_idx"])[-1] == n:
            exclude = None
        targets = SD3_TARGETS
    return LoraSettings.from_dict({"r": lora["r"], "lora_alpha": lora["lora_alpha"], "target_modules": list(targets),
                                   "exclude_modules": None if exclude is None else list(exclude)},
                                  f"{source} [model.lora_config]")


def lora_init(model_section: Mapping) -> object:
    init = (model_section.get("lora_config") or {}).get("init_lora_weights", True)
    if init not in (True, "gaussian"):
        raise ConfigError(f"model.lora_config.init_lora_weights {init!r}: only true (peft's default) and "
                          "'gaussian' are supported")
    return init


def reference_head_init(shapes: Mapping[str, Tuple[int, ...]], seed: int) -> Dict[str, np.ndarray]:
    """A fresh head at the reference's initialisation (module notes), keyed as rm_head.pt keys it."""
    rng = np.random.default_rng([seed, 1])
    out = {}
    for name, shape in shapes.items():
        key = name[len(HEAD):]
        module, leaf = key.rsplit(".", 1) if "." in key else ("", key)
        if leaf in ("query_tokens", "layer_embed"):
            out[key] = (rng.standard_normal(shape) * 0.02).astype(np.float32)
        elif module.endswith(("cond_mlp.2", "gate_vis.2", "gate_text.2")):
            out[key] = np.zeros(shape, np.float32)
        elif "norm" in module.rsplit(".", 1)[-1]:
            out[key] = np.ones(shape, np.float32)
        else:
            fan_in = shapes[f"{HEAD}{module}.weight"][1]
            bound = 1.0 / np.sqrt(fan_in)
            out[key] = rng.uniform(-bound, bound, shape).astype(np.float32)
    return out


@dataclass
class Trainee:
    """The model being trained, what of it is trained and its LoRA (None without one)."""

    model: DiffusionRM
    mode: str                                        # lora, full or head
    lora: Optional[LoraSettings]
    init_lora_weights: object
    adapted: List[str]                               # modules with LoRA factors, backbone-relative names

    def trained(self) -> List[Parameter]:
        params = list(self.model.get_parameters())
        if self.mode == "full":
            return [p for p in params if not p.name.endswith((".lora_A", ".lora_B"))]
        chosen = [p for p in params if p.name.startswith(HEAD) or p.name in ("eta3", "eta4")]
        if self.mode == "lora":
            chosen = [p for p in params if p.name.endswith((".lora_A", ".lora_B"))] + chosen
        return chosen

    def lora_state(self) -> Dict[str, np.ndarray]:
        """The factors under peft's saved names (base_model.model.<module>.lora_A.weight)."""
        return {f"{ADAPTER_PREFIX}{p.name[len('backbone.'):]}.weight": p.asnumpy()
                for p in self.model.get_parameters() if p.name.endswith((".lora_A", ".lora_B"))}

    def head_state(self) -> Dict[str, np.ndarray]:
        """The head by rm_head.pt's keys, and eta3 / eta4 (which the reference's LoRA checkpoints lack)."""
        return {(p.name[len(HEAD):] if p.name.startswith(HEAD) else p.name): p.asnumpy()
                for p in self.model.get_parameters() if p.name.startswith(HEAD) or p.name in ("eta3", "eta4")}


def _linears(model: DiffusionRM) -> Dict[str, object]:
    return {name: cell for name, cell in model.backbone.cells_and_names() if name and hasattr(cell, "add_lora")}


def attach_lora(model: DiffusionRM, settings: LoraSettings, factors) -> List[str]:
    """LoRA factors on every backbone Linear the settings target: factors(module, out, in, r) -> (A, B)."""
    adapted = []
    for module, cell in _linears(model).items():
        if not settings.targets(module):
            continue
        r, _, scale = settings.rank_alpha_scale(module)
        out_features, in_features = cell.weight.shape
        a, b = factors(module, out_features, in_features, r)
        cell.add_lora(a, b, scale, f"backbone.{module}")
        adapted.append(module)
    if not adapted:
        raise ConfigError(f"no Linear of the backbone matches the LoRA targets {settings.target_modules}")
    model.recompile()
    return adapted


def fresh_factors(init, seed: int):
    rng = np.random.default_rng([seed, 2])

    def factors(module, out_features, in_features, r):
        if init == "gaussian":
            a = rng.standard_normal((r, in_features)) / r
        else:
            bound = 1.0 / np.sqrt(in_features)
            a = rng.uniform(-bound, bound, (r, in_features))
        return a.astype(np.float32), np.zeros((out_features, r), np.float32)
    return factors


def adapter_factors(adapter: LoraAdapter, settings: LoraSettings):
    """factors() reading an adapter folder's A and B; every module the settings target must be there."""
    def factors(module, out_features, in_features, r):
        if module not in adapter.modules:
            raise CheckpointError(f"{adapter.weights_path}: no LoRA factors for '{module}', which the run's LoRA "
                                  "targets: the adapter was trained with other settings")
        adapter.check_module(module, (out_features, in_features))
        a_key, b_key = adapter.modules[module]
        return adapter.file.read(a_key).astype(np.float32), adapter.file.read(b_key).astype(np.float32)
    return factors


def build_trainee(run_config: Mapping, transformer: str, scheduler: str, *, start: Optional[str] = None,
                  start_config: Optional[str] = None, head_state: Optional[str] = None, seed: int = 0,
                  dtype: ms.Type = ms.float32, mode: str = "graph", source: str = "config") -> Trainee:
    """The model of a run. start: a reference checkpoint folder to continue from (its config.json
    beside it, or `start_config`), else a fresh head and LoRA; head_state: a safetensors file of the
    head (and eta3 / eta4) to load instead of the start's rm_head.pt (ms_rm's resume: exact values)."""
    model_section = run_config.get("model")
    if not isinstance(model_section, Mapping):
        raise ConfigError(f"{source}: missing the 'model' section")
    trained = train_mode(model_section, source)
    with tempfile.TemporaryDirectory(prefix="ms_rm_init_") as staging:
        if start is None:
            start, start_config = _fresh_checkpoint(run_config, transformer, scheduler, staging, seed, source)
        sources = conversion.open_reference(start, transformer, scheduler, start_config)
        try:
            _check_same_model(run_config, sources, source)
            plan = conversion.ConversionPlan.build(sources, DiffusionRM.parameter_shapes)
            for tensor in plan.tensors:
                tensor.lora = None                   # factors stay separate: the base weights load unmerged
            model = DiffusionRM(plan.config, dtype=dtype, mode=mode)
            load_parameters(model, lambda name: plan.tensor(name), plan.names, sources.checkpoint_dir)
            settings, init, adapted = None, None, []
            if trained == "lora":
                family = plan.config.backbone.family
                settings = lora_settings(model_section, family, source)
                init = lora_init(model_section)
                factors = (adapter_factors(sources.lora, settings) if sources.lora is not None
                           else fresh_factors(init, seed))
                adapted = attach_lora(model, settings, factors)
        finally:
            sources.close()
    trainee = Trainee(model, trained, settings, init, adapted)
    if head_state is not None:
        _load_head(trainee, head_state)
    return trainee


def _fresh_checkpoint(run_config, transformer, scheduler, staging, seed, source) -> Tuple[str, str]:
    """A head-mode reference checkpoint in `staging` holding the fresh head: the base transformer then
    loads through the converter's plan (every key of it used or declared unused)."""
    config = copy.deepcopy(dict(run_config))
    config["model"] = dict(config["model"], use_lora=False, freeze_backbone=True)
    transformer_dir = conversion._find_diffusers_folder(os.fspath(transformer), "config.json", "transformer",
                                                        "transformer", "--transformer")
    scheduler_path = scheduler if os.path.isfile(scheduler) else os.path.join(
        conversion._find_diffusers_folder(scheduler, "scheduler_config.json", "scheduler", "scheduler",
                                          "--scheduler"), "scheduler_config.json")
    rm_config = RewardModelConfig.from_reference(config, read_config_file(os.path.join(transformer_dir, "config.json")),
                                                 read_config_file(scheduler_path), "sigma",
                                                 (source, transformer_dir, scheduler_path))
    shapes = {k: v for k, v in DiffusionRM.parameter_shapes(rm_config).items() if k.startswith(HEAD)}
    checkpoint = os.path.join(staging, "checkpoint")
    os.makedirs(checkpoint)
    write_state_dict(os.path.join(checkpoint, "rm_head.pt"), reference_head_init(shapes, seed))
    config_path = os.path.join(staging, "config.json")
    write_json(config_path, config)
    return checkpoint, config_path


def _check_same_model(run_config: Mapping, sources: "conversion.ReferenceSources", source: str) -> None:
    """The starting checkpoint's config must describe the model the run config does."""
    ours, theirs = run_config.get("model", {}), sources.rm_config.get("model", {})
    keys = ("num_transformer_layers", "visual_head_idx", "text_head_idx", "reward_head", "use_logistic")
    differ = [f"{k}: {theirs.get(k)!r} there, {ours.get(k)!r} here" for k in keys if ours.get(k) != theirs.get(k)]
    if differ:
        raise ConfigError(f"{sources.config_path}: the starting checkpoint is another model than {source} describes "
                          f"({'; '.join(differ)}): start from a checkpoint of this model, or fix the config")


def _load_head(trainee: Trainee, path: str) -> None:
    names = [p.name for p in trainee.model.get_parameters() if p.name.startswith(HEAD) or p.name in ("eta3", "eta4")]
    file = SafetensorsFile(path)
    try:
        key = lambda name: name[len(HEAD):] if name.startswith(HEAD) else name
        check_key_sets({key(n) for n in names}, set(file.keys()), path, "was it saved by this run?")
        for param in trainee.model.get_parameters():
            if param.name in names:
                values = file.read(key(param.name))
                if tuple(values.shape) != tuple(param.shape):
                    raise CheckpointError(f"{path}: '{key(param.name)}' has shape {values.shape}, the model "
                                          f"{tuple(param.shape)}")
                param.set_data(ms.Tensor(values.astype(np.float32), param.dtype))
    finally:
        file.close()
