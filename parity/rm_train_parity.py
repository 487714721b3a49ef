"""Parity of Diffusion-RM training steps (ms_rm.training) with the reference's own
`TrainingEngine.train_step` (HKUST-C4G/diffusion-rm, diffusion_rm/train/engine.py, imported from a
checkout of that repository, which is not on PyPI: MS_RM_DIFFUSION_RM_SRC, default the checkout's
.deps/diffusion-rm).

What runs on the torch side is the engine's code: its compute_loss, its noising and sigma lookup, its
accelerate backward / clip_grad_norm_ / optimizer.step, with torch.optim.AdamW built as
scripts/train_sd3.py builds it. Shims, and why:
* `wandb` (imported by the engine, used only by the script's logging) cannot be installed here: an
  empty module stands in for it;
* the model is the parity harness's torch reward model of the tiny-sd35 case (diffusers'
  SD3Transformer2DModel cut, peft LoRA loaded from backbone_lora/, the head from rm_head.pt) behind
  the two calls the engine makes (`encode_prompt`, `model(latents=, timesteps=, ...)`): the
  reference's SD3RewardModel needs a whole StableDiffusion3Pipeline with three text encoders;
  `encode_prompt` returns fixed random embeddings of the batch's prompts;
* the engine's draws (its `timestep_sampling` and `torch.randn_like`) return the u and the noise
  ms_rm's run gets through its `draws` hook.

Both sides start from the same reference checkpoint and take 3 steps. Compared per step: the loss,
both scores, every gradient before clipping, the gradient norm, and the parameter update (after -
before, all trained parameters as one vector: AdamW turns the rounding noise of near-zero gradients
into real steps, so the vector, not each element, is what the policy bounds); torch fp32 against
torch float64 gives the reference's own noise (the tolerance policy).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import types
from typing import Dict, List
from unittest import mock

import numpy as np
import torch

from .exact64 import run_float64

STEPS, BATCH, LR = 3, 2, 1e-3
RM_TRAIN_CASES = {
    "rm-train-thurstone": ("3 training steps, Thurstone loss, uniform u", "thurstone", "uniform", "0", True),
    "rm-train-thurstone-constant": ("3 steps, Thurstone loss with constant variance", "thurstone-constant", "uniform",
                                    "0", True),
    "rm-train-bt": ("3 steps, Bradley-Terry loss", "bt", "uniform", "0", True),
    "rm-train-bt-margin": ("3 steps, Bradley-Terry loss with margin 1", "bt-margin", "uniform", "0", True),
    "rm-train-no-noise": ("3 steps, Thurstone, training.add_noise false (clean latents at u's timestep)", "thurstone",
                          "uniform", "0", False),
    "rm-train-logit-normal": ("3 steps, Thurstone, u from the logit-normal weighting 0_1", "thurstone",
                              "logit_normal", "0_1", True),
}


def reference_source() -> str:
    """The diffusion-rm checkout holding diffusion_rm/train/engine.py; ImportError when absent."""
    root = os.environ.get("MS_RM_DIFFUSION_RM_SRC") or os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".deps", "diffusion-rm")
    if not os.path.isfile(os.path.join(root, "diffusion_rm", "train", "engine.py")):
        raise ImportError(f"the reference's training engine is not at {root}/diffusion_rm/train/engine.py: put a "
                          "checkout of HKUST-C4G/diffusion-rm there (or set MS_RM_DIFFUSION_RM_SRC)")
    return root


def training_engine():
    """The reference's TrainingEngine class, executed from its checkout's engine.py alone (the package's
    __init__ pulls its inferencer and text encoders), with an empty `wandb` module while it imports."""
    path = os.path.join(reference_source(), "diffusion_rm", "train", "engine.py")
    if "ms_rm_reference_engine" not in sys.modules:
        spec = importlib.util.spec_from_file_location("ms_rm_reference_engine", path)
        module = importlib.util.module_from_spec(spec)
        had_wandb = "wandb" in sys.modules
        sys.modules.setdefault("wandb", types.ModuleType("wandb"))
        try:
            spec.loader.exec_module(module)
        finally:
            if not had_wandb:
                del sys.modules["wandb"]         # diffusers and accelerate probe for it later
        sys.modules["ms_rm_reference_engine"] = module
    return sys.modules["ms_rm_reference_engine"].TrainingEngine


class EngineModel(torch.nn.Module):
    """The torch reward model behind the engine's two calls."""

    def __init__(self, inner, embeddings: Dict[str, np.ndarray], pooled: Dict[str, np.ndarray], dtype):
        super().__init__()
        self.inner, self.dtype = inner, dtype
        self.embeddings, self.pooled = embeddings, pooled

    def encode_prompt(self, prompts):
        put = lambda rows: torch.from_numpy(np.stack(rows)).to(self.dtype)
        return {"encoder_hidden_states": put([self.embeddings[p] for p in prompts]),
                "pooled_projections": put([self.pooled[p] for p in prompts])}

    def forward(self, latents, timesteps, encoder_hidden_states, pooled_projections, **unused):
        temb, visual, text = self.inner.backbone(latents.to(self.dtype), encoder_hidden_states, pooled_projections,
                                                 timesteps)
        return self.inner.squash(self.inner.reward_head(visual, text, temb))


def _data(seed: int, shape, steps: int, weighting: str, param: str):
    from ms_rm.training.preference import sample_u

    rng = np.random.default_rng(seed + 11)
    batches = []
    for _ in range(steps):
        batches.append({"prompt": [f"prompt {i}" for i in rng.integers(0, 3, BATCH)],
                        "chosen": rng.standard_normal((BATCH,) + shape, dtype=np.float32),
                        "rejected": rng.standard_normal((BATCH,) + shape, dtype=np.float32),
                        "u": sample_u(rng, weighting, param, BATCH),
                        "noise": rng.standard_normal((BATCH,) + shape, dtype=np.float32)})
    return batches


def _torch_name(name: str) -> str:
    """A parameter of EngineModel under ms_rm's name."""
    name = name[len("inner."):]
    if ".lora_" in name:
        name = name.replace("backbone.base_model.model.", "backbone.").replace(".default.weight", "")
    return name


def reference_engine(paths, scheduler_config, embeddings, pooled, loss: str, add_noise: bool, dtype, workdir: str):
    """The reference's TrainingEngine over the torch reward model of `paths` (a reference checkpoint),
    with the optimizer scripts/train_sd3.py builds: -> (engine, model, accelerator)."""
    from accelerate import Accelerator
    from diffusers import FlowMatchEulerDiscreteScheduler
    from omegaconf import OmegaConf

    from .reference import load_reference_model

    TrainingEngine = training_engine()
    inner, _, _ = load_reference_model(paths.src, paths.transformer, paths.scheduler)
    inner = inner.to(dtype)
    for name, p in inner.named_parameters():                    # what the reference trains (sd3_rm.py)
        p.requires_grad_(".lora_" in name or name.startswith("reward_head.") or name in ("eta3", "eta4"))
    model = EngineModel(inner, embeddings, pooled, dtype)
    accelerator = Accelerator(cpu=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = accelerator.prepare(torch.optim.AdamW(trainable, lr=LR, weight_decay=0.01))
    config = OmegaConf.create({
        "model": {"model_type": loss, "use_lora": True, "freeze_backbone": False},
        "training": {"max_grad_norm": 1.0, "add_noise": add_noise, "use_vae": False, "t_weighting_scheme": "uniform",
                     "t_weighting_scheme_param": 0.0},
        "paths": {"save_dir": os.path.join(workdir, "engine")}})
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(
        {k: v for k, v in scheduler_config.items() if not k.startswith("_")})
    return TrainingEngine(model, optimizer, None, config, noise_scheduler=scheduler, accelerator=accelerator), \
        model, accelerator


def engine_step(engine, batch, dtype):
    """One `engine.train_step` on `batch` (prompts, chosen, rejected, and the u and noise its draws
    return): -> its metrics."""
    noise = torch.from_numpy(batch["noise"]).to(dtype)
    engine.timestep_sampling = lambda *a, **kw: torch.from_numpy(batch["u"])
    with mock.patch.object(torch, "randn_like", lambda x, *a, **kw: noise):
        return engine.train_step({"prompt": list(batch["prompt"]),
                                  "latent_chosen": torch.from_numpy(batch["chosen"]).to(dtype),
                                  "latent_reject": torch.from_numpy(batch["rejected"]).to(dtype)})


def _engine_steps(paths, rm_config, scheduler_config, batches, embeddings, pooled, loss: str, add_noise: bool,
                  dtype, workdir: str) -> Dict[str, np.ndarray]:
    engine, model, accelerator = reference_engine(paths, scheduler_config, embeddings, pooled, loss, add_noise, dtype,
                                                  workdir)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    out: Dict[str, np.ndarray] = {}
    captured = {}
    clip = accelerator.clip_grad_norm_

    def clip_and_capture(parameters, max_norm, norm_type=2):
        captured.update({_torch_name(n): p.grad.detach().double().numpy().copy() for n, p in named})
        return clip(parameters, max_norm, norm_type)

    scores = {}
    forward = model.forward

    def recording_forward(*args, **kwargs):
        result = forward(*args, **kwargs)
        scores.setdefault("list", []).append(result.detach().double().numpy())
        return result

    for k, batch in enumerate(batches, start=1):
        before = {_torch_name(n): p.detach().double().numpy().copy() for n, p in named}
        scores.clear()
        with mock.patch.object(accelerator, "clip_grad_norm_", clip_and_capture), \
                mock.patch.object(model, "forward", recording_forward):
            metrics = engine_step(engine, batch, dtype)
        out.update({f"step{k}:update:{_torch_name(n)}": p.detach().double().numpy() - before[_torch_name(n)]
                    for n, p in named})
        out[f"step{k}:scores_chosen"], out[f"step{k}:scores_rejected"] = scores["list"]
        out[f"step{k}:loss"] = np.asarray(float(metrics["train/loss"]))
        out[f"step{k}:grad_norm"] = np.asarray(float(metrics["train/grad_norm"]))
        out.update({f"step{k}:grad:{n}": g for n, g in captured.items()})
    return out


def ms_trainer(paths, rm_config, loss: str, mode: str):
    """ms_rm's trainee from the reference checkpoint of `paths`, its compiled step and AdamW:
    -> (trained parameters, PreferenceStep, AdamW)."""
    from ms_rm.training.optim import AdamW
    from ms_rm.training.rm_model import build_trainee
    from ms_rm.training.rm_trainer import PreferenceStep

    trainee = build_trainee(rm_config, paths.transformer, paths.scheduler, start=os.path.join(paths.src, "checkpoint"),
                            start_config=os.path.join(paths.src, "config.json"), mode=mode)
    params = trainee.trained()
    return params, PreferenceStep(trainee, loss, params), AdamW(params, LR, weight_decay=0.01, max_grad_norm=1.0)


def text_of(batch, embeddings, pooled) -> Dict[str, np.ndarray]:
    return {"encoder_hidden_states": np.stack([embeddings[p] for p in batch["prompt"]]),
            "pooled_projections": np.stack([pooled[p] for p in batch["prompt"]])}


def _ms_steps(paths, rm_config, batches, embeddings, pooled, loss: str, mode: str) -> Dict[str, np.ndarray]:
    params, step, optimizer = ms_trainer(paths, rm_config, loss, mode)
    out: Dict[str, np.ndarray] = {}
    for k, batch in enumerate(batches, start=1):
        before = {p.name: p.asnumpy().astype(np.float64) for p in params}
        value, s_c, s_r, grads, _ = step(batch["chosen"], batch["rejected"], text_of(batch, embeddings, pooled),
                                         batch["u"], batch["noise"])
        out.update({f"step{k}:grad:{p.name}": g.asnumpy() for p, g in zip(params, grads)})
        out[f"step{k}:grad_norm"] = np.asarray(optimizer.step(grads))
        out.update({f"step{k}:update:{p.name}": p.asnumpy().astype(np.float64) - before[p.name] for p in params})
        out[f"step{k}:loss"] = value.asnumpy()
        out[f"step{k}:scores_chosen"], out[f"step{k}:scores_rejected"] = s_c.asnumpy(), s_r.asnumpy()
    return out


def _stages_of(name: str):
    _, loss, weighting, param, add_noise = RM_TRAIN_CASES[name]

    def stages(folder: str, mode: str, seed: int):
        from .cases import CASES
        from .harness import prepare_case

        training_engine()                                          # fail early when the reference is absent
        case = prepare_case(dataclass_replace(CASES["tiny-sd35"], add_noise=add_noise), os.path.join(folder, "rm"),
                            seed)
        with open(os.path.join(case.paths.src, "config.json")) as f:
            rm_config = json.load(f)
        with open(case.paths.scheduler if os.path.isfile(case.paths.scheduler) else
                  os.path.join(case.paths.scheduler, "scheduler_config.json")) as f:
            scheduler_config = json.load(f)
        rm_config["model"]["model_type"] = loss
        rng = np.random.default_rng(seed + 3)
        bb = CASES["tiny-sd35"].transformer
        embeddings = {f"prompt {i}": rng.standard_normal((7, bb["joint_attention_dim"]), dtype=np.float32)
                      for i in range(3)}
        pooled = {f"prompt {i}": rng.standard_normal((bb["pooled_projection_dim"],), dtype=np.float32)
                  for i in range(3)}
        shape = (bb["in_channels"],) + tuple(CASES["tiny-sd35"].latent_hw)
        batches = _data(seed, shape, STEPS, weighting, param)
        ours = _ms_steps(case.paths, rm_config, batches, embeddings, pooled, loss, mode)

        def torch_run(dtype):
            return _engine_steps(case.paths, rm_config, scheduler_config, batches, embeddings, pooled, loss,
                                 add_noise, dtype, folder)

        return _comparable(ours, torch_run(torch.float32), run_float64(torch_run))
    return stages


NULL_GRADIENT = 1e-9       # a gradient whose float64 max is below this x the largest is zero in exact arithmetic
SIGNIFICANT = 1e-3         # update elements whose float64 |gradient| is above this x their tensor's max


def _comparable(ours, torch32, torch64):
    """The stages in data-flow order, as the policy can bound them:
    * gradients that are zero in exact arithmetic (the attention's key biases: softmax does not see
      them) hold only rounding noise on every side; they go into `grads:all`, the whole gradient as
      one vector, and get no stage of their own (their relative error is noise over noise);
    * the update is compared on the elements whose float64 gradient is significant in its tensor (on
      the others AdamW's first steps are +-lr by the sign of rounding noise, on torch's fp32 run too),
      and as its norm; these stages come last, after every step's scores and gradients."""
    sides, norms, vectors = ({}, {}, {}), ({}, {}, {}), ({}, {}, {})
    for k in range(1, STEPS + 1):
        grads = [key for key in ours if key.startswith(f"step{k}:grad:")]
        scale = max(float(np.abs(torch64[key]).max()) for key in grads)
        null = [key for key in grads if float(np.abs(torch64[key]).max()) <= NULL_GRADIENT * scale]
        mask = np.concatenate([np.abs(torch64[key]).ravel() > SIGNIFICANT * max(float(np.abs(torch64[key]).max()), 1e-300)
                               for key in grads])
        updates = [key.replace(":grad:", ":update:") for key in grads]
        order = ([f"step{k}:scores_chosen", f"step{k}:scores_rejected", f"step{k}:loss"]
                 + [key for key in grads if key not in null] + [f"step{k}:grad_norm"])
        for side, out, norm, vector in zip((ours, torch32, torch64), sides, norms, vectors):
            out.update({key: side[key] for key in order})
            out[f"step{k}:grads:all"] = np.concatenate([side[key].ravel() for key in grads])
            update = np.concatenate([side[key].ravel() for key in updates])
            norm[f"step{k}:update norm"] = np.asarray(np.linalg.norm(update))
            vector[f"step{k}:update (significant gradients)"] = update[mask]
    for out, norm, vector in zip(sides, norms, vectors):   # last: AdamW's noise on small gradients must not
        out.update(norm)                                   # raise the bounds of the stages after it (the
        out.update(vector)                                 # policy's budget is cumulative)
    return sides


def dataclass_replace(case, **changes):
    import dataclasses

    return dataclasses.replace(case, **changes)


def run_rm_train_case(name: str, modes: List[str], dtype: str, seed: int, ms_device: str, torch_device: str):
    from .harness import measured_reports

    return measured_reports(name, RM_TRAIN_CASES[name][0], modes, dtype, seed, ms_device, torch_device,
                            _stages_of(name))

