"""`ms-rm bench` / `python -m ms_rm_parity.bench`: ms_rm's reward forward (and generation) against torch.

Each framework runs in its own child process (so each one's peak RSS is its own), on the same
machine, thread count, weights and inputs: random weights drawn per parameter name
(ms_rm.core.weights.random_parameter, so both sides hold the same numbers and their rewards must
agree) and seeded inputs.

* ms_rm: DiffusionRM.reward in graph mode (ms.jit), fp32.
* torch: diffusers' SD3Transformer2DModel cut after N blocks + our torch head, fp32, no_grad.
  Random weights are what a merged LoRA looks like: no adapter runs at forward time.

Generation (`--sizes generate-small generate-real`): SD3Generator.generate against diffusers'
StableDiffusion3Pipeline(latents=noise, output_type="latent") with the same random transformer (all
blocks of the config), embeddings and noise, GENERATE_STEPS steps with classifier-free guidance
4.5 (two transformer passes per step); the final latents must agree.

Training (`--sizes train-small train-real`): one Diffusion-RM training step, TRAIN_PAIRS preference
pairs (chosen and rejected: 2 x TRAIN_PAIRS transformer passes, forward and backward), Thurstone
loss, LoRA r=64 on the reference's targets, clip and AdamW, from one synthetic reference checkpoint
(ms_rm_parity.synthetic, written once): ms_rm's PreferenceStep + AdamW against the reference's own
TrainingEngine.train_step (ms_rm_parity.rm_train_parity); the first step's loss must agree. FLOPs
counted as 3 x the forward's (the backward twice the forward).

Reported per size: median and spread (min-max) of the timed runs after one warm-up call, the
first call (MindSpore compiles the graph there), ms/torch time ratio, peak RSS of each process,
achieved GFLOP/s from an analytic FLOP count (every matmul; elementwise work not counted),
and that as a share of a measured matmul peak (the FFN GEMM of the same size, in each
framework; the best of the two is the machine's peak).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

import numpy as np

from ms_rm_parity.peak_rss import peak_rss_bytes    # absolute: MindSpore's compilation cache parses the entry script

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "sd35m")


SIZE_NAMES = ("real", "small", "generate-small", "generate-real", "train-small", "train-real")


def _json(name: str) -> dict:
    path = os.path.join(CONFIGS, name)
    if not os.path.isfile(path):
        from ms_rm.core.errors import ConfigError
        raise ConfigError(f"the benchmark reads the released configs in a checkout's configs/sd35m/ and {path} is "
                         "not there: run it from a clone of ms_rm")
    with open(path) as f:
        return json.load(f)


def sizes() -> Dict[str, dict]:
    """The benchmarked configurations: reference config.json, transformer config, input sizes."""
    real = {"rm": _json("dina-lrm-12layers.json"), "transformer": _json("transformer_config.json"),
            "latent_hw": (64, 64), "text_tokens": 333}
    small_transformer = dict(real["transformer"], num_layers=5, num_attention_heads=8, caption_projection_dim=512,
                             dual_attention_layers=[0, 1, 2, 3], pos_embed_max_size=96, sample_size=64)
    small_rm = json.loads(json.dumps(real["rm"]))
    small_rm["model"].update(num_transformer_layers=4, visual_head_idx=[2, 4], text_head_idx=[2, 4])
    small = {"rm": small_rm, "transformer": small_transformer, "latent_hw": (32, 32), "text_tokens": 64}
    out = {"real": real, "small": small, "generate-small": dict(small, generate=True),
           "generate-real": dict(real, generate=True), "train-small": dict(small, train=True),
           "train-real": dict(real, train=True)}
    assert tuple(out) == SIZE_NAMES
    return out


GENERATE_STEPS = 2
TRAIN_PAIRS = 1
GENERATE_GUIDANCE = 4.5


def generate_flops(bb, height: int, width: int, text_tokens: int) -> int:
    """FLOPs of one generated sample: GENERATE_STEPS steps x 2 guided passes of every block (each
    block as in reward_flops), plus norm_out / proj_out."""
    d, p = bb.inner_dim, bb.patch_size
    n, t = (height // p) * (width // p), text_tokens
    flops = 2 * n * bb.in_channels * p * p * d + 2 * t * bb.joint_attention_dim * d
    flops += 2 * (256 * d + d * d) + 2 * (bb.pooled_projection_dim * d + d * d)
    for i in range(bb.num_layers):
        last = i == bb.num_layers - 1
        flops += 2 * d * (9 if i in bb.dual_attention_layers else 6) * d + 2 * d * (2 if last else 6) * d   # adaLN
        flops += 2 * (n + t) * d * 3 * d + 4 * (n + t) ** 2 * d + 2 * n * d * d + (0 if last else 2 * t * d * d)
        flops += 2 * n * d * 8 * d + (0 if last else 2 * t * d * 8 * d)                                      # FFNs
        if i in bb.dual_attention_layers:
            flops += 2 * n * d * 4 * d + 4 * n * n * d
    flops += 2 * d * 2 * d + 2 * n * d * p * p * bb.in_channels
    return 2 * GENERATE_STEPS * flops


def reward_flops(config, height: int, width: int, text_tokens: int) -> int:
    """Multiply-add FLOPs (2 per MAC) of one sample's reward: every matmul of backbone and head."""
    bb, head = config.backbone, config.head
    d, p = bb.inner_dim, bb.patch_size
    n, t = (height // p) * (width // p), text_tokens
    flops = 2 * n * bb.in_channels * p * p * d + 2 * t * bb.joint_attention_dim * d          # patch, context
    flops += 2 * (256 * d + d * d) + 2 * (bb.pooled_projection_dim * d + d * d)              # temb
    for i, (image_out, context_out) in enumerate(config.block_streams()):
        dual = i in bb.dual_attention_layers
        flops += 2 * d * d * (9 if dual else 6) + 2 * d * d * 6                                # adaLN
        flops += 2 * d * d * (4 * n + 3 * t + (t if context_out else 0))                       # qkv, outs
        flops += 4 * (n + t) ** 2 * d                                                          # joint attention
        if image_out:
            flops += 16 * n * d * d + (8 * n * d * d + 4 * n * n * d if dual else 0)           # ff, attn2
        if context_out:
            flops += 16 * t * d * d                                                            # ff_context
    w, f, q = config.width, config.width // 4, head.num_queries
    for taps, length in ((config.visual_head_idx, n), (config.text_head_idx, t)):
        per_tap = (2 * length * d * w if (head.use_proj_in or d != w) else 0) + 2 * (d * 2 * w + 4 * w * w) \
            + 2 * length * w * f
        flops += len(taps) * per_tap + 2 * length * len(taps) * f * w                          # adapters, agg
        flops += 2 * length * w * w * 3 + 2 * length * w + 4 * q * length * w                 # k, v, gate; attend
    flops += 2 * q * w * w * 2 + 2 * n * w * w * 2 + 4 * q * n * w + 2 * q * w * w * 2         # attn1 q/out, attn2
    flops += 16 * q * w * w + 2 * q * w * head.out_dim                                         # ffn, head
    return int(flops)


# --- children ---------------------------------------------------------------------------------
def _inputs(spec: dict, batch: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    h, w = spec["latent_hw"]
    tr = spec["transformer"]
    return (rng.standard_normal((batch, tr["in_channels"], h, w), dtype=np.float32),
            rng.standard_normal((batch, spec["text_tokens"], tr["joint_attention_dim"]), dtype=np.float32),
            rng.standard_normal((batch, tr["pooled_projection_dim"]), dtype=np.float32),
            rng.standard_normal((batch, tr["in_channels"], h, w), dtype=np.float32))


def _ms_worker(spec: dict, batch: int, runs: int, threads: int, cache_root: Optional[str] = None) -> dict:
    import mindspore as ms

    from ms_rm import DiffusionRM, RewardModelConfig
    from ms_rm.core.compile_cache import compile_cache_status, use_compile_cache

    ms.set_device("CPU")
    ms.set_context(runtime_num_threads=threads)
    use_compile_cache(cache_root)
    config = RewardModelConfig.from_reference(spec["rm"], spec["transformer"], _json("scheduler_config.json"))
    start = time.perf_counter()
    model = DiffusionRM(config).randomize(0)
    build = time.perf_counter() - start
    latents, ehs, pooled, noise = _inputs(spec, batch)

    def call():
        return model.reward(latents, ehs, pooled, u=0.4, noise=noise, check_values=False).asnumpy()

    return _timed(call, runs) | {"build_seconds": build, "compile_cache": compile_cache_status()}


def _torch_worker(spec: dict, batch: int, runs: int, threads: int) -> dict:
    import torch
    from diffusers import SD3Transformer2DModel

    from .builders import randomize_
    from .reference import RewardHead, TorchRewardModel, as_torch, cut_backbone, lookup_u

    torch.set_num_threads(threads)
    model_cfg = spec["rm"]["model"]
    start = time.perf_counter()
    cfg = {k: v for k, v in spec["transformer"].items() if not k.startswith("_")}
    cfg["num_layers"] = model_cfg["num_transformer_layers"] + 1        # diffusers' last block is text-less
    transformer = SD3Transformer2DModel(**cfg).eval()
    backbone = cut_backbone(transformer, model_cfg)
    del transformer                                                    # only the cut stays alive
    randomize_(backbone, 0, prefix="backbone.")
    head = RewardHead(cfg["num_attention_heads"] * cfg["attention_head_dim"], len(model_cfg["visual_head_idx"]),
                      len(model_cfg["text_head_idx"]), **model_cfg["reward_head"])
    randomize_(head, 0, prefix="reward_head.")
    model = TorchRewardModel(backbone, head, model_cfg.get("use_logistic", False)).eval()
    build = time.perf_counter() - start
    latents, ehs, pooled, noise = (as_torch(a) for a in _inputs(spec, batch))
    sigma, timestep = lookup_u(_json("scheduler_config.json"), [0.4] * batch, "sigma")

    def call():
        with torch.no_grad():
            temb, visual, text = model.features(latents, noise, sigma, timestep, ehs, pooled, True, torch.float32)
            return model.squash(model.reward_head(visual, text, temb)).numpy()

    return _timed(call, runs) | {"build_seconds": build}


def _ms_generate_worker(spec: dict, batch: int, runs: int, threads: int) -> dict:
    import mindspore as ms

    from ms_rm.backbones.config import SD3BackboneConfig
    from ms_rm.core.flow_match import SchedulerConfig
    from ms_rm.generators.sd3_generator import SD3Generator

    ms.set_device("CPU")
    ms.set_context(runtime_num_threads=threads)
    start = time.perf_counter()
    model = SD3Generator(SD3BackboneConfig.from_diffusers(spec["transformer"]),
                         SchedulerConfig.from_diffusers(_json("scheduler_config.json"))).randomize(0)
    build = time.perf_counter() - start
    latents, ehs, pooled, _ = _inputs(spec, batch)
    neg, neg_pooled = ehs[::-1].copy() * 0.5, pooled[::-1].copy() * 0.5

    def call():
        return model.generate(ehs, pooled, latents, GENERATE_STEPS, GENERATE_GUIDANCE, neg, neg_pooled).asnumpy()

    return _timed(call, runs) | {"build_seconds": build}


def _torch_generate_worker(spec: dict, batch: int, runs: int, threads: int) -> dict:
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    from .builders import randomize_
    from .reference import as_torch

    torch.set_num_threads(threads)
    start = time.perf_counter()
    transformer = SD3Transformer2DModel(**{k: v for k, v in spec["transformer"].items() if not k.startswith("_")})
    randomize_(transformer.eval(), 0, prefix="transformer.")
    scheduler = FlowMatchEulerDiscreteScheduler(**{k: v for k, v in _json("scheduler_config.json").items()
                                                   if not k.startswith("_")})
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=None, text_encoder=None,
                                    tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
                                    tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    build = time.perf_counter() - start
    latents, ehs, pooled, _ = _inputs(spec, batch)
    neg, neg_pooled = ehs[::-1].copy() * 0.5, pooled[::-1].copy() * 0.5
    h, w = spec["latent_hw"]

    def call():
        with torch.no_grad():
            return pipe(prompt_embeds=as_torch(ehs), pooled_prompt_embeds=as_torch(pooled),
                        negative_prompt_embeds=as_torch(neg), negative_pooled_prompt_embeds=as_torch(neg_pooled),
                        latents=as_torch(latents), num_inference_steps=GENERATE_STEPS, guidance_scale=GENERATE_GUIDANCE,
                        height=h * 8, width=w * 8, output_type="latent").images.numpy()

    return _timed(call, runs) | {"build_seconds": build}


def write_train_checkpoint(root: str, spec: dict):
    """The synthetic reference checkpoint both training workers start from (LoRA r=64)."""
    from .synthetic import write_reference

    return write_reference(root, "sd3", 64, transformer_config=spec["transformer"], rm_config=spec["rm"])


def _train_case(spec: dict, root: str):
    """(paths, rm config, scheduler config, one batch, prompt embeddings, pooled) of a training step."""
    import types

    paths = types.SimpleNamespace(src=os.path.join(root, "model"), transformer=os.path.join(root, "transformer"),
                                  scheduler=os.path.join(root, "scheduler"))
    with open(os.path.join(paths.src, "config.json")) as f:
        rm_config = json.load(f)
    rm_config["model"]["model_type"] = "thurstone"
    chosen, ehs, pooled, noise = _inputs(spec, TRAIN_PAIRS)
    rejected = np.flip(chosen, axis=0).copy() * 0.5
    prompts = [f"prompt {i}" for i in range(TRAIN_PAIRS)]
    batch = {"prompt": prompts, "chosen": chosen, "rejected": rejected, "noise": noise,
             "u": np.linspace(0.3, 0.6, TRAIN_PAIRS).astype(np.float32)}
    return (paths, rm_config, _json("scheduler_config.json"), batch, dict(zip(prompts, ehs)),
            dict(zip(prompts, pooled)))


def _ms_train_worker(spec: dict, batch: int, runs: int, threads: int, root: str) -> dict:
    import mindspore as ms

    from .rm_train_parity import ms_trainer, text_of

    ms.set_device("CPU")
    ms.set_context(runtime_num_threads=threads)
    paths, rm_config, _, data, embeddings, pooled = _train_case(spec, root)
    start = time.perf_counter()
    _, step, optimizer = ms_trainer(paths, rm_config, "thurstone", "graph")
    build = time.perf_counter() - start
    text = text_of(data, embeddings, pooled)

    def call():
        loss, _, _, grads, _ = step(data["chosen"], data["rejected"], text, data["u"], data["noise"])
        optimizer.step(grads)
        return loss.asnumpy()

    return _timed(call, runs) | {"build_seconds": build}


def _torch_train_worker(spec: dict, batch: int, runs: int, threads: int, root: str) -> dict:
    import torch

    from .rm_train_parity import engine_step, reference_engine

    torch.set_num_threads(threads)
    paths, _, scheduler_config, data, embeddings, pooled = _train_case(spec, root)
    start = time.perf_counter()
    engine, _, _ = reference_engine(paths, scheduler_config, embeddings, pooled, "thurstone", True, torch.float32,
                                    os.path.join(root, "engine"))
    build = time.perf_counter() - start
    return _timed(lambda: float(engine_step(engine, data, torch.float32)["train/loss"]), runs) | \
        {"build_seconds": build}


def _gemm_worker(framework: str, m: int, k: int, n: int, threads: int, runs: int = 5) -> dict:
    """GFLOP/s of (m, k) @ (k, n)^T through each framework's Linear, the spelling the models use."""
    a = np.random.default_rng(0).standard_normal((m, k), dtype=np.float32)
    w = np.random.default_rng(1).standard_normal((n, k), dtype=np.float32) / np.sqrt(k)
    if framework == "ms":
        import mindspore as ms

        from ms_rm.core.ops import linear as ms_rm_linear

        ms.set_device("CPU")
        ms.set_context(runtime_num_threads=threads)

        x, weight = ms.Tensor(a), ms.Tensor(w)

        def linear(x):
            return ms_rm_linear(x, weight)

        compiled = ms.jit(linear)
        call = lambda: compiled(x).asnumpy()
    else:
        import torch

        torch.set_num_threads(threads)
        x, weight = torch.from_numpy(a), torch.from_numpy(w)
        call = lambda: torch.nn.functional.linear(x, weight).numpy()
    timed = _timed(call, runs)
    return {"gflops": 2 * m * k * n / timed["median"] / 1e9}


def _timed(call, runs: int) -> dict:
    start = time.perf_counter()
    result = call()
    first = time.perf_counter() - start
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return {"first_call": first, "times": times, "median": float(np.median(times)),
            "reward": np.asarray(result, dtype=np.float64).ravel().tolist()}


def _child(args: List[str]) -> dict:
    """Run this module as a child with `args`; its JSON result, with its own peak RSS in bytes."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    try:
        status = subprocess.run([sys.executable, "-m", "ms_rm_parity.bench", "--child-out", out, *args],
                                cwd=os.path.dirname(CONFIGS.rstrip(os.sep)).rsplit(os.sep, 1)[0] or ".").returncode
        if status != 0:
            raise RuntimeError(f"benchmark child {args} failed with status {status}")
        with open(out) as f:
            return json.load(f)
    finally:
        os.remove(out)


# --- the report ---------------------------------------------------------------------------------
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16",     # x86
             "asimd", "sve", "sve2", "bf16", "i8mm")                                           # Arm


def cpu_info() -> dict:
    """The machine the figures come from: CPU model, architecture, cores and the vector and matrix
    instruction sets its kernels can use (from /proc/cpuinfo on Linux)."""
    import platform

    info = {"model": platform.processor() or "unknown", "machine": platform.machine(), "cores": os.cpu_count(),
            "isa": []}
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return info
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    info["model"] = fields.get("model name") or fields.get("Model") or fields.get("CPU part") or info["model"]
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    info["isa"] = [flag for flag in ISA_FLAGS if flag in flags]
    return info


def cpu_label(info: dict) -> str:
    return f"{info['model']} ({info['machine']}, {info['cores']} cores; {' '.join(info['isa']) or 'no ISA flags read'})"


def run(size_names: List[str], runs: int, threads: int, batches: Optional[List[int]] = None,
        compile_cache: bool = False) -> dict:
    from ms_rm import RewardModelConfig

    report = {"cpu": cpu_info(), "threads": threads, "sizes": {}}
    for name in size_names:
        spec = sizes()[name]
        config = RewardModelConfig.from_reference(spec["rm"], spec["transformer"], _json("scheduler_config.json"))
        h, w = spec["latent_hw"]
        tokens = (h // 2) * (w // 2) + spec["text_tokens"]
        d = config.backbone.inner_dim
        gemm = {fw: _child(["--gemm", fw, "--shape", str(tokens), str(d), str(4 * d), "--threads", str(threads)])["gflops"]
                for fw in ("torch", "ms")}
        if spec.get("generate"):
            from ms_rm.backbones.config import SD3BackboneConfig

            flops = generate_flops(SD3BackboneConfig.from_diffusers(spec["transformer"]), h, w, spec["text_tokens"])
        else:
            flops = reward_flops(config, h, w, spec["text_tokens"]) * (3 * 2 * TRAIN_PAIRS if spec.get("train") else 1)
        entry = {"flops": flops, "gemm_gflops": gemm, "runs": {}}
        with tempfile.TemporaryDirectory(prefix="ms_rm_bench_") as root:
            extra = []
            if spec.get("train"):
                write_train_checkpoint(root, spec)
                extra = ["--train-root", root]
            for fw in ("torch", "ms"):
                entry["runs"][fw] = _child(["--worker", fw, "--size", name, "--batch", "1", "--runs", str(runs),
                                            "--threads", str(threads), *extra])
        if compile_cache and not spec.get("generate") and not spec.get("train"):
            # a new process, after one earlier run of the same shapes filled the cache
            with tempfile.TemporaryDirectory() as root:
                cold, warm = (_child(["--worker", "ms", "--size", name, "--batch", "1", "--runs", "1", "--threads",
                                      str(threads), "--cache-root", root]) for _ in range(2))
            entry["compile_cache"] = {"cold_first_call": cold["first_call"], "warm_first_call": warm["first_call"],
                                      "warm_median": warm["median"], "reused": warm["compile_cache"]["reused"]}
        if batches and not spec.get("generate") and not spec.get("train"):
            entry["batch_scaling"] = {fw: {b: _child(["--worker", fw, "--size", name, "--batch", str(b), "--runs",
                                                      str(max(2, runs // 2)), "--threads", str(threads)])["median"]
                                           for b in batches} for fw in ("torch", "ms")}
        report["sizes"][name] = entry
    return report


def format_report(report: dict) -> str:
    gib = 1024 ** 3
    lines = [f"CPU: {cpu_label(report['cpu'])}; threads: {report['threads']}",
             "| size | framework | median s | spread s | first call s | ms/torch | peak RSS GiB | GFLOP/s | % matmul peak |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, entry in report["sizes"].items():
        peak = max(entry["gemm_gflops"].values())
        torch_median = entry["runs"]["torch"]["median"]
        for fw, label in (("torch", "torch"), ("ms", "ms_rm (graph)")):
            r = entry["runs"][fw]
            gflops = entry["flops"] / r["median"] / 1e9
            ratio = f"{r['median'] / torch_median:.2f}" if fw == "ms" else ""
            lines.append(f"| {name} | {label} | {r['median']:.3f} | {min(r['times']):.3f}-{max(r['times']):.3f} | "
                         f"{r['first_call']:.2f} | {ratio} | {r['peak_rss'] / gib:.2f} | {gflops:.0f} | "
                         f"{100 * gflops / peak:.0f}% |")
    for name, entry in report["sizes"].items():
        ms_r, t_r = np.array(entry["runs"]["ms"]["reward"]), np.array(entry["runs"]["torch"]["reward"])
        rel = float(np.abs(ms_r - t_r).max() / max(np.abs(t_r).max(), 1e-30))
        what = "latents" if name.startswith("generate") else "first step's loss" if name.startswith("train") \
            else "reward"
        lines.append(f"{name}: {entry['flops'] / 1e9:.1f} GFLOP per sample; matmul peak torch "
                     f"{entry['gemm_gflops']['torch']:.0f}, MindSpore {entry['gemm_gflops']['ms']:.0f} GFLOP/s; "
                     f"ms_rm {what} vs torch: max rel diff {rel:.1e}")
        if "compile_cache" in entry:
            c = entry["compile_cache"]
            lines.append(f"{name} first call in a new process: {c['cold_first_call']:.2f} s without a compilation "
                         f"cache, {c['warm_first_call']:.2f} s after one earlier run filled it ({c['reused']} graph "
                         f"reused; steady call {c['warm_median']:.2f} s)")
        if "batch_scaling" in entry:
            lines.append(f"{name} batch scaling (samples/s): " + "; ".join(
                f"{fw} " + ", ".join(f"b{b}={int(b) / s:.2f}" for b, s in entry["batch_scaling"][fw].items())
                for fw in ("torch", "ms")))
            for fw in ("torch", "ms"):
                per_sample = {int(b): s / int(b) for b, s in entry["batch_scaling"][fw].items()}
                if 1 in per_sample and len(per_sample) > 1:
                    top = max(per_sample)
                    lines.append(f"{name} {fw}: time per sample at batch {top} = "
                                 f"{per_sample[top] / per_sample[1]:.2f} x batch 1")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ms_rm_parity.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    parser.add_argument("--worker", choices=["ms", "torch"], help=argparse.SUPPRESS)
    parser.add_argument("--gemm", choices=["ms", "torch"], help=argparse.SUPPRESS)
    parser.add_argument("--shape", type=int, nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--size", default="small", help=argparse.SUPPRESS)
    parser.add_argument("--cache-root", help=argparse.SUPPRESS)
    parser.add_argument("--train-root", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker or args.gemm:
        if args.worker:
            spec = sizes()[args.size]
            if spec.get("generate"):
                work = _ms_generate_worker if args.worker == "ms" else _torch_generate_worker
            elif spec.get("train"):
                work = functools.partial(_ms_train_worker if args.worker == "ms" else _torch_train_worker,
                                         root=args.train_root)
            elif args.worker == "ms":
                work = functools.partial(_ms_worker, cache_root=args.cache_root)
            else:
                work = _torch_worker
            result = work(spec, args.batch, args.runs, args.threads)
        else:
            result = _gemm_worker(args.gemm, *args.shape, args.threads)
        result["peak_rss"] = peak_rss_bytes()      # this process's own peak (see ms_rm_parity.peak_rss)
        with open(args.child_out, "w") as f:
            json.dump(result, f)
        return 0
    return run_command(args)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", nargs="+", choices=list(SIZE_NAMES),
                        default=["small"], help="configurations: small (seconds) and/or real (SD3.5-M 12 layers, "
                                                "minutes) reward forwards; generate-small / generate-real: "
                                                f"{GENERATE_STEPS}-step guided generation (generate-real: all 24 "
                                                "SD3.5-M blocks, ~10 GB per framework); train-small / "
                                                f"train-real: one Diffusion-RM training step of {TRAIN_PAIRS} "
                                                "pair(s), against the reference's TrainingEngine (needs its "
                                                "checkout: .deps/diffusion-rm or MS_RM_DIFFUSION_RM_SRC)")
    parser.add_argument("--runs", type=int, default=5, help="timed runs after the warm-up call")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads for both frameworks")
    parser.add_argument("--batch-scaling", action="store_true",
                        help="throughput at each of --batches, for every reward size asked")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8], help="batch sizes of --batch-scaling")
    parser.add_argument("--compile-cache", action="store_true",
                        help="ms_rm's first call in a new process with a compilation cache filled by one earlier run")
    parser.add_argument("--json", metavar="FILE", help="write the report as JSON")


def run_command(args: argparse.Namespace) -> int:
    report = run(args.sizes, args.runs, args.threads, args.batches if args.batch_scaling else None,
                 args.compile_cache)
    print(format_report(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
