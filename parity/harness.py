"""Run the torch reference and ms_rm on identical weights, inputs and noise; compare every stage.

Tolerance policy (enforced here, documented in the README). ms_rm is always compared with
torch fp32, by max relative error (max|diff| / max|ref|), and each stage's bound is measured:

* bound(stage) = max(FP32_BOUND, FACTOR[dtype] x the dtype noise of torch itself at that stage
  or any earlier one in data-flow order), with FP32_BOUND = 1e-5.
* fp32: torch's own noise is torch fp32 against torch float64 (same weights and inputs). It is
  1e-7 to 2e-6 on well-conditioned stages, so their bound is 1e-5; an output that cancels (a
  reward of 0.06 summed from activations of 1) has a higher floor, and the report names it.
  FACTOR 5: ms_rm's own fp32 noise is measured at 1.6x torch's (median; p90 2.4x, max 3.8x,
  every case, two seeds: MindSpore's CPU exp is up to 76 ulp off), and comparing with torch
  fp32 adds torch's noise to ours: |ms - t32| <= |ms - t64| + |t32 - t64| <= (4 + 1) x floor.
* bf16 / fp16: torch's own noise is torch at that precision against torch fp32, and torch fp32
  is exact at that scale: FACTOR 2 (ms_rm measured at up to 1.65x torch's). On the CPU
  MindSpore has no bf16 compute: "bf16" there means bf16-stored weights computed in fp32, and
  the report says so.

The running maximum matters for the last stages: a reward of two numbers gives a noisy
estimate of torch's own error, while it carries the noise of the taps it is computed from.
"""

from __future__ import annotations

import copy
import os
import platform
import tempfile
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from .cases import Case
from .exact64 import float64_sinusoids
from .compare import FACTOR, FP32_BOUND, StageResult, compare_stages, first_failure, policy_bound, stages_as_numpy

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


VARIABLE_TEXT_STEP = 30        # random variable-length text: sample i has `tokens - 30 i` tokens (at least 1)


@dataclass
class Inputs:
    latents: np.ndarray                  # (B, C, H, W)
    encoder_hidden_states: np.ndarray    # (B, T, J)
    pooled_projections: Optional[np.ndarray]   # (B, P); None for Z-Image
    noise: np.ndarray                    # (B, C, H, W), or (K, B, C, H, W) with an ensemble
    u: Sequence[float]                   # one per sample
    ensemble: Optional[Sequence[float]] = None
    encoder_attention_mask: Optional[np.ndarray] = None     # (B, T), 1 = token: variable-length text

    @classmethod
    def random(cls, batch: int, channels: int, hw, tokens: int, joint_dim: int, pooled_dim: Optional[int],
               u: Sequence[float], seed: int, ensemble=None) -> "Inputs":
        """Random inputs; without a pooled width (Z-Image) the text is variable-length: sample i
        has max(1, tokens - 30 i) tokens, zero-padded, with its mask."""
        rng = np.random.default_rng(seed)
        shape = (batch, channels) + tuple(hw)
        draw = lambda *s: rng.standard_normal(s, dtype=np.float32)
        latents, ehs = draw(*shape), draw(batch, tokens, joint_dim)
        pooled = mask = None
        if pooled_dim is None:
            mask = np.zeros((batch, tokens), np.float32)
            for i in range(batch):
                mask[i, :max(1, tokens - VARIABLE_TEXT_STEP * i)] = 1
            ehs *= mask[:, :, None]
        else:
            pooled = draw(batch, pooled_dim)
        noise = draw(*((len(ensemble),) + shape if ensemble else shape))
        u = list(u) * batch if len(u) == 1 else list(u)[:batch]
        return cls(latents, ehs, pooled, noise, u, ensemble, mask)

    @classmethod
    def load(cls, path: str, u: Sequence[float], seed: int) -> "Inputs":
        with np.load(path) as data:
            missing = [k for k in ("latents", "encoder_hidden_states") if k not in data]
            if missing:
                raise ValueError(f"{path}: missing arrays {missing}")
            arrays = {k: np.asarray(data[k], dtype=np.float32) for k in data.files}
        latents = arrays["latents"]
        noise = arrays.get("noise")
        if noise is None:
            noise = np.random.default_rng(seed).standard_normal(latents.shape, dtype=np.float32)
        u = list(u) * latents.shape[0] if len(u) == 1 else list(u)
        return cls(latents, arrays["encoder_hidden_states"], arrays.get("pooled_projections"), noise, u,
                   encoder_attention_mask=arrays.get("encoder_attention_mask"))

    def torch_text(self, put):
        """encoder_hidden_states and pooled_projections as the torch side takes them: per-sample
        (T_i, J) tensors for masked text, as the reference pipeline strips the padding."""
        if self.encoder_attention_mask is None:
            ehs = put(self.encoder_hidden_states)
        else:
            ehs = [put(e[m.astype(bool)]) for e, m in zip(self.encoder_hidden_states, self.encoder_attention_mask)]
        return ehs, None if self.pooled_projections is None else put(self.pooled_projections)


@dataclass
class Report:
    case: str
    description: str
    mode: str
    dtype: str
    seed: int
    stages: List[StageResult]
    notes: List[str] = field(default_factory=list)
    environment: Dict[str, str] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.stages)

    @property
    def first_failure(self) -> Optional[str]:
        failure = first_failure(self.stages)
        return None if failure is None else failure.stage

    def to_dict(self) -> dict:
        return {"case": self.case, "description": self.description, "mode": self.mode, "dtype": self.dtype,
                "seed": self.seed, "passed": self.passed, "first_failure": self.first_failure,
                "stages": [r.to_dict() for r in self.stages], "notes": self.notes,
                "environment": self.environment}


def environment(ms_device: str, torch_device: str) -> Dict[str, str]:
    import diffusers
    import mindspore
    import peft

    import ms_rm

    return {"ms_rm": ms_rm.__version__, "mindspore": mindspore.__version__, "torch": torch.__version__,
            "diffusers": diffusers.__version__, "peft": peft.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "machine": platform.machine(),
            "mindspore_device": ms_device, "torch_device": torch_device}


# --- the two sides -----------------------------------------------------------------------------
def torch_stages(model, rm_config: dict, scheduler_config: dict, inputs: Inputs, u_convention: str,
                 dtype: torch.dtype = torch.float32, device: str = "cpu") -> Dict[str, np.ndarray]:
    from .reference import as_torch, lookup_u

    model = model.to(device=device, dtype=dtype)
    cfg = rm_config["model"]
    add_noise = (rm_config.get("training") or {}).get("add_noise", True)
    put = lambda a: as_torch(a).to(device)
    sigma, timestep = lookup_u(scheduler_config, inputs.u, u_convention)
    ehs, pooled = inputs.torch_text(put)
    with torch.no_grad():
        noise = inputs.noise[0] if inputs.ensemble else inputs.noise
        out = model.stages(put(inputs.latents), put(noise), sigma.to(device), timestep.to(device),
                           ehs, pooled, add_noise, dtype, cfg["visual_head_idx"], cfg["text_head_idx"])
        if inputs.ensemble:
            levels = [lookup_u(scheduler_config, [u] * len(inputs.u), u_convention) for u in inputs.ensemble]
            out["ensemble_reward"] = model.ensemble(
                put(inputs.latents), [put(n) for n in inputs.noise], [s.to(device) for s, _ in levels],
                [t.to(device) for _, t in levels], ehs, pooled, add_noise, dtype)
    return out


def ms_stages(model, inputs: Inputs) -> Dict[str, np.ndarray]:
    noise = inputs.noise[0] if inputs.ensemble else inputs.noise
    mask = inputs.encoder_attention_mask
    out = stages_as_numpy(model.reward_stages(inputs.latents, inputs.encoder_hidden_states,
                                              inputs.pooled_projections, u=inputs.u, noise=noise,
                                              encoder_attention_mask=mask))
    if inputs.ensemble:
        out["ensemble_reward"] = stages_as_numpy({"r": model.reward_ensemble(
            inputs.latents, inputs.encoder_hidden_states, inputs.pooled_projections,
            us=list(inputs.ensemble), noise=inputs.noise, encoder_attention_mask=mask)})["r"]
    return out


def bounds_for(dtype: str, reference: Dict[str, np.ndarray], torch_run: Dict[str, np.ndarray]) -> Dict[str, float]:
    """Per-stage bounds under the tolerance policy, from torch's own dtype noise: `torch_run`
    (torch at the checked precision) against `reference` (torch one precision up)."""
    bounds, budget = {"default": FP32_BOUND}, 0.0
    for r in compare_stages(torch_run, reference, {"default": np.inf}):     # data-flow order
        budget = max(budget, r.max_rel)
        bounds[r.stage] = policy_bound(budget, dtype)
    return bounds


def _fp32_epsilon_norms_(model) -> None:
    """Pin eps=None RMSNorms to float32's epsilon, what they use in fp32, before a float64 run."""
    for module in model.modules():
        if isinstance(module, torch.nn.RMSNorm) and module.eps is None:
            module.eps = float(torch.finfo(torch.float32).eps)


def policy_bounds(torch_model, rm_config, scheduler_config, inputs: Inputs, u_convention: str, dtype: str,
                  torch_device: str = "cpu", torch32: Optional[Dict[str, np.ndarray]] = None) -> Dict[str, float]:
    """The tolerance policy's bound for every stage of these inputs at `dtype` (see the module notes):
    from torch fp32 against float64 (fp32), or torch at `dtype` against torch fp32."""
    run = lambda model, d: torch_stages(model, rm_config, scheduler_config, inputs, u_convention, TORCH_DTYPES[d],
                                        torch_device)
    torch32 = run(torch_model, "fp32") if torch32 is None else torch32
    if dtype == "fp32":
        model64 = copy.deepcopy(torch_model)
        _fp32_epsilon_norms_(model64)
        with float64_sinusoids():                    # float64 all through (ms_rm_parity.exact64)
            return bounds_for(dtype, run(model64, "fp64"), torch32)
    return bounds_for(dtype, torch32, run(copy.deepcopy(torch_model), dtype))


def measured_stages(ours: Dict[str, np.ndarray], torch32: Dict[str, np.ndarray],
                    torch64: Dict[str, np.ndarray]) -> List[StageResult]:
    """ours against torch fp32, each stage bounded by the tolerance policy from torch fp32's own
    error against float64 (bounds_for); the stages are ours, in their order."""
    bounds = bounds_for("fp32", {k: torch64[k] for k in ours}, {k: torch32[k] for k in ours})
    return compare_stages(ours, {k: torch32[k] for k in ours}, bounds)


def measured_reports(name: str, description: str, modes: List[str], dtype: str, seed: int, ms_device: str,
                     torch_device: str, stages) -> List[Report]:
    """One report per mode of an fp32 case whose `stages(folder, mode, seed)` returns (ours, torch
    fp32, torch float64) for measured_stages, computed in a fresh temporary folder."""
    if dtype != "fp32":
        raise ValueError(f"the {name} case compares fp32 only, not {dtype}")
    reports = []
    for mode in modes:
        with tempfile.TemporaryDirectory() as folder:
            results = measured_stages(*stages(folder, mode, seed))
        reports.append(Report(name, description, mode, dtype, seed, results,
                              environment=environment(ms_device, torch_device)))
    return reports


def compare_sides(ms_model, torch_model, rm_config, scheduler_config, inputs: Inputs, u_convention: str,
                  dtype: str, torch_device: str) -> List[StageResult]:
    torch32 = torch_stages(torch_model, rm_config, scheduler_config, inputs, u_convention, torch.float32,
                           torch_device)
    bounds = policy_bounds(torch_model, rm_config, scheduler_config, inputs, u_convention, dtype, torch_device,
                           torch32)
    return compare_stages(ms_stages(ms_model, inputs), torch32, bounds)


# --- built-in cases and user checkpoints -------------------------------------------------------
@dataclass
class PreparedCase:
    case: Case
    paths: "object"              # ms_rm_parity.checkpoints.ReferencePaths
    converted: Dict[str, str]    # storage dtype -> converted checkpoint directory


def save_case_reference(case: Case, folder: str, seed: int = 0):
    """The case's random reference model, saved as the reference saves it (the case's checkpoint
    mode, base dtype and shard size) under `folder`; its ReferencePaths."""
    from .builders import build_reference, lora_kwargs
    from .checkpoints import round_to_, save_reference

    rm_config = case.rm_config()
    lora = lora_kwargs(rm_config, case.transformer, **case.lora) if case.mode == "lora" else None
    reference = build_reference(rm_config, case.transformer, case.scheduler, seed=seed, lora=lora,
                                time_convention=case.time_convention, matrix_scale=case.matrix_scale,
                                qk_norm_scale=case.qk_norm_scale)
    base_dtype = TORCH_DTYPES[case.base_dtype]
    if base_dtype != torch.float32:
        round_to_(reference.transformer, base_dtype)
    return save_reference(reference, folder, case.mode, base_dtype, case.shard_size)


def prepare_case(case: Case, workdir: str, seed: int = 0) -> PreparedCase:
    """Build the case's random reference model, save it as the reference saves, and convert it."""
    from ms_rm import DiffusionRM

    paths = save_case_reference(case, os.path.join(workdir, "reference"), seed)
    out = os.path.join(workdir, f"converted-{case.storage}")
    DiffusionRM.convert(paths.src, paths.transformer, paths.scheduler, out, dtype=case.storage,
                        u_convention=case.u_convention, time_convention=case.time_convention, progress=False)
    return PreparedCase(case, paths, {"fp32": out})


def run_prepared(prepared: PreparedCase, mode: str = "graph", dtype: str = "fp32", seed: int = 0,
                 ms_device: str = "CPU", torch_device: str = "cpu") -> Report:
    import mindspore as ms

    from ms_rm import DiffusionRM

    from .reference import load_reference_model

    case, paths = prepared.case, prepared.paths
    if dtype not in prepared.converted:
        out = os.path.join(os.path.dirname(prepared.converted["fp32"]), f"converted-{dtype}")
        DiffusionRM.convert(paths.src, paths.transformer, paths.scheduler, out, dtype=dtype,
                            u_convention=case.u_convention, time_convention=case.time_convention, progress=False)
        prepared.converted[dtype] = out
    ms_dtype = {"fp32": ms.float32, "bf16": ms.bfloat16, "fp16": ms.float16}[dtype]
    ms_model = DiffusionRM.from_pretrained(prepared.converted[dtype], dtype=ms_dtype, mode=mode, verify=True)
    torch_model, rm_config, scheduler_config = load_reference_model(paths.src, paths.transformer, paths.scheduler,
                                                                    time_convention=case.time_convention)
    bb = ms_model.config.backbone
    inputs = Inputs.random(case.batch, bb.latent_channels, case.latent_hw, case.text_tokens, bb.text_width,
                           getattr(bb, "pooled_projection_dim", None), case.u, seed, case.ensemble)
    stages = compare_sides(ms_model, torch_model, rm_config, scheduler_config, inputs, case.u_convention,
                           dtype, torch_device)
    return Report(case.name, case.description, mode, dtype, seed, stages,
                  _precision_notes(dtype, ms_model, stages), environment(ms_device, torch_device))


def _precision_notes(dtype: str, ms_model, stages: List[StageResult]) -> List[str]:
    import mindspore as ms

    raised = [f"{r.stage} {r.bound:.1e}" for r in stages if r.bound > FP32_BOUND]
    if dtype == "fp32":
        return [f"bound raised by torch's own fp32 noise (fp32 vs float64, x{FACTOR[dtype]:g}): " + ", ".join(raised)] \
            if raised else []
    computed = {ms.float32: "fp32", ms.float16: "fp16", ms.bfloat16: "bf16"}[ms_model.compute_dtype]
    note = (f"ms_rm: {dtype}-stored weights computed in {computed}; torch: {dtype} weights and compute. "
            f"Bound per stage: {FACTOR[dtype]:g} x torch-{dtype}'s own error vs torch fp32 (floor {FP32_BOUND:g}).")
    if computed != dtype:
        note += f" (The MindSpore {ms.get_context('device_target')} backend has no {dtype} compute.)"
    return [note]


def run_case(case: Case, modes: Sequence[str] = ("graph",), dtype: str = "fp32", seed: int = 0,
             ms_device: str = "CPU", torch_device: str = "cpu") -> List[Report]:
    with tempfile.TemporaryDirectory(prefix=f"ms_rm-parity-{case.name}-") as workdir:
        prepared = prepare_case(case, workdir, seed)
        return [run_prepared(prepared, mode, dtype, seed, ms_device, torch_device) for mode in modes]


def run_checkpoint(src: str, transformer: str, scheduler: str, converted: str, config: Optional[str] = None,
                   inputs_path: Optional[str] = None, u: Sequence[float] = (0.4,), batch: int = 1,
                   latent_hw=(64, 64), text_tokens: int = 333, modes: Sequence[str] = ("graph",),
                   dtype: str = "fp32", seed: int = 0, ms_device: str = "CPU", torch_device: str = "cpu"
                   ) -> List[Report]:
    """A user's reference checkpoint against its ms-rm convert output, on generated or given inputs."""
    import mindspore as ms

    from ms_rm import DiffusionRM

    from .reference import load_reference_model

    from ms_rm import load_config
    from ms_rm.io.converted import CONFIG_FILE

    converted_config = load_config(os.path.join(converted, CONFIG_FILE))     # its conventions
    torch_model, rm_config, scheduler_config = load_reference_model(src, transformer, scheduler, config,
                                                                    converted_config.time_convention)
    ms_dtype = {"fp32": ms.float32, "bf16": ms.bfloat16, "fp16": ms.float16}[dtype]
    reports = []
    for mode in modes:
        ms_model = DiffusionRM.from_pretrained(converted, dtype=ms_dtype, mode=mode)
        bb = ms_model.config.backbone
        if inputs_path:
            inputs = Inputs.load(inputs_path, u, seed)
        else:
            inputs = Inputs.random(batch, bb.latent_channels, latent_hw, text_tokens, bb.text_width,
                                   getattr(bb, "pooled_projection_dim", None), u, seed)
        stages = compare_sides(ms_model, torch_model, rm_config, scheduler_config, inputs,
                               ms_model.config.u_convention, dtype, torch_device)
        reports.append(Report(f"checkpoint:{os.path.basename(os.path.normpath(src))}",
                              f"{src} vs {converted}", mode, dtype, seed, stages,
                              _precision_notes(dtype, ms_model, stages), environment(ms_device, torch_device)))
    return reports
