"""`ms-rm demo`, the README's first command: a real reward out of a tiny Diffusion-RM built on the spot.

The model is SD3.5-shaped (dual attention, RMS qk-norm, taps at three depths) but tiny, with
random weights: the numbers mean nothing, the pipeline is the real one (u -> sigma, noising,
backbone, head, compiled in graph mode).
"""

from __future__ import annotations

import argparse
import time
from typing import List, Sequence

import numpy as np

from ..rewards.diffusion_rm import DiffusionRM, RewardModelConfig
from ..scoring import DiffusionRMSD3Scorer

TINY_SD35 = {
    "format": "ms_rm.diffusion_rm", "format_version": 1,
    "backbone": {"family": "sd3", "num_layers": 4, "num_attention_heads": 4, "attention_head_dim": 16,
                 "in_channels": 16, "patch_size": 2, "joint_attention_dim": 64,
                 "caption_projection_dim": 64, "pooled_projection_dim": 32, "pos_embed_max_size": 32,
                 "sample_size": 32, "dual_attention_layers": [0, 1], "qk_norm": "rms_norm"},
    "num_transformer_layers": 3, "visual_head_idx": [1, 2, 3], "text_head_idx": [1, 2, 3],
    "reward_head": {"width": -1, "out_dim": 1, "num_queries": 4, "num_attn_heads": 4,
                    "dropout": 0.0, "use_proj_in": False},
    "use_logistic": False, "add_noise": True,
    "scheduler": {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": False},
    "u_convention": "sigma",
}


def run_demo(us: Sequence[float] = (0.1, 0.4, 0.9), batch: int = 2, seed: int = 0,
             mode: str = "graph") -> List[dict]:
    """Rewards of `batch` random latents (16 x 32 x 32) at each u; one row per u."""
    model = DiffusionRM(RewardModelConfig.from_dict(TINY_SD35), mode=mode).randomize(seed)
    bb = model.config.backbone
    rng = np.random.default_rng(seed)
    latents = rng.standard_normal((batch, bb.in_channels, 32, 32), dtype=np.float32)
    prompt = rng.standard_normal((batch, 20, bb.joint_attention_dim), dtype=np.float32)
    pooled = rng.standard_normal((batch, bb.pooled_projection_dim), dtype=np.float32)
    rows = []
    for u in us:
        start = time.perf_counter()
        reward = model.reward(latents, prompt, pooled, u=u, seed=seed)
        seconds = time.perf_counter() - start
        sigma, _ = model.noise_level(u, batch)
        rows.append({"u": float(u), "sigma": float(sigma[0]), "seconds": seconds,
                     "reward": reward.asnumpy()[:, 0].tolist()})
    return rows


def noise_spread(us: Sequence[float] = (0.1, 0.4, 0.9), draws: int = 32, ks: Sequence[int] = (1, 4, 16),
                 seed: int = 0) -> List[dict]:
    """How much the reward moves with the noise: the std over `draws` repetitions of the score of
    the same latents and prompt, scoring with the mean of k noise draws (k in `ks`), per u."""
    model = DiffusionRM(RewardModelConfig.from_dict(TINY_SD35)).randomize(seed)
    bb = model.config.backbone
    rng = np.random.default_rng(seed)
    latents = rng.standard_normal((1, bb.in_channels, 32, 32), dtype=np.float32)
    prompt = rng.standard_normal((1, 20, bb.joint_attention_dim), dtype=np.float32)
    pooled = rng.standard_normal((1, bb.pooled_projection_dim), dtype=np.float32)
    rows = []
    for u in us:
        for k in ks:
            scorer = DiffusionRMSD3Scorer(model=model, u=u, seed=seed, num_noise_draws=k)
            scores = [scorer.score_latents(latents, prompt, pooled)[0] for _ in range(draws)]
            rows.append({"u": float(u), "k": int(k), "mean": float(np.mean(scores)), "std": float(np.std(scores))})
    return rows


def run(args: argparse.Namespace) -> int:
    if args.spread:
        print("Score spread across noise draws (tiny random model, one sample, 32 repetitions):")
        print(f"{'u':>5} {'k':>3} {'mean':>9} {'std':>9}")
        for row in noise_spread():
            print(f"{row['u']:>5.2f} {row['k']:>3} {row['mean']:>+9.5f} {row['std']:>9.5f}")
        return 0

    rows = run_demo(us=args.u, batch=args.batch, seed=args.seed, mode=args.mode)
    print(f"Tiny random SD3.5-style Diffusion-RM ({args.mode} mode), {args.batch} random latents 16x32x32")
    print(f"{'u':>5} {'sigma':>8} {'seconds':>8}  reward per sample")
    for row in rows:
        rewards = "  ".join(f"{r:+.6f}" for r in row["reward"])
        print(f"{row['u']:>5.2f} {row['sigma']:>8.4f} {row['seconds']:>8.3f}  {rewards}")
    print("(the first call compiles the graph; later calls reuse it)")
    return 0


def add_parsers(sub) -> None:
    demo = sub.add_parser("demo", help="reward from a tiny model built on the spot (no downloads)",
                          description="Build a tiny random SD3.5-style Diffusion-RM and print rewards.")
    demo.add_argument("--u", type=float, nargs="+", default=[0.1, 0.4, 0.9], help="noise levels")
    demo.add_argument("--batch", type=int, default=2)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--mode", choices=["graph", "pynative"], default="graph")
    demo.add_argument("--spread", action="store_true",
                      help="instead: how much the score moves with the noise, averaging k = 1, 4, 16 draws")
    demo.set_defaults(func=run)
