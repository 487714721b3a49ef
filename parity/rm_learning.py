"""A Diffusion-RM learns a synthetic preference: `python -m ms_rm_parity.rm_learning --out DIR`.

The tiny SD3.5-style model of the parity cases (its transformer is the base; a fresh head and LoRA)
trains with the released recipe's loss and optimizer (Thurstone, AdamW, clip 1.0, uniform u) on pairs
whose chosen latents are drawn from N(+shift, 1) and rejected from N(-shift, 1) elementwise, each with
its own prompt. Held-out pairs of the same task are validated (ms_rm.evaluation, u 0.3 / 0.4 / 0.5)
before training and every `--eval-every` steps: accuracy starts near 50% (an untrained head) and must
rise above 90%. Writes DIR/history.json and DIR/rm-learning.png (accuracy and loss against the step).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Dict, List

import numpy as np

logger = logging.getLogger(__name__)


def synthetic_pairs(folder: str, name: str, count: int, shape, shift: float, seed: int) -> str:
    """`count` pairs as .npy latents + a JSON lines file; returns the file's path."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    lines = []
    for i in range(count):
        np.save(os.path.join(folder, f"{name}-c{i}.npy"), (rng.standard_normal(shape) + shift).astype(np.float32))
        np.save(os.path.join(folder, f"{name}-r{i}.npy"), (rng.standard_normal(shape) - shift).astype(np.float32))
        lines.append(json.dumps({"prompt": f"prompt {i % 4}", "chosen": f"{name}-c{i}.npy",
                                 "rejected": f"{name}-r{i}.npy"}))
    path = os.path.join(folder, f"{name}.jsonl")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def learning_run(work: str, steps: int = 30, eval_every: int = 5, shift: float = 0.15, seed: int = 0,
                 train_pairs: int = 64, val_pairs: int = 32) -> List[Dict]:
    from ms_rm.evaluation.data import read_pairs
    from ms_rm.training.rm_model import build_trainee
    from ms_rm.training.rm_trainer import RMTrainSettings, train_reward_model, validate

    from .cases import Case
    from .harness import save_case_reference

    paths = save_case_reference(Case("learning", ""), os.path.join(work, "base"), seed)
    with open(os.path.join(paths.src, "config.json")) as f:
        model = json.load(f)["model"]
    config = {"model": dict(model, model_type="thurstone", lora_config={"r": 4, "lora_alpha": 8,
                                                                         "init_lora_weights": "gaussian"}),
              "training": {"learning_rate": "1e-3", "weight_decay": 0.01, "max_grad_norm": 1.0, "add_noise": True,
                           "t_weighting_scheme": "uniform", "max_steps": steps},
              "data": {"train": {"base_batch_size": 4, "seed": seed}},
              "logging": {"eval_frac": eval_every, "save_frac": steps}, "system": {"seed": seed}}
    shape = (16, 16, 12)
    train = read_pairs(synthetic_pairs(os.path.join(work, "data"), "train", train_pairs, shape, shift, seed + 1))
    held_out = read_pairs(synthetic_pairs(os.path.join(work, "data"), "val", val_pairs, shape, shift, seed + 2))
    rng = np.random.default_rng(seed + 3)
    embeddings = {f"prompt {k}": rng.standard_normal((7, 48)).astype(np.float32) for k in range(4)}
    pooled = {f"prompt {k}": rng.standard_normal((40,)).astype(np.float32) for k in range(4)}
    text = lambda prompts: {"encoder_hidden_states": np.stack([embeddings[p] for p in prompts]),
                            "pooled_projections": np.stack([pooled[p] for p in prompts])}
    trainee = build_trainee(config, paths.transformer, paths.scheduler, seed=seed)
    settings = RMTrainSettings.from_config(config)
    before = {"step": 0, "validation": validate(trainee, settings, held_out, text, os.path.join(work, "validation0"))}
    history = train_reward_model(trainee, settings, train, text, os.path.join(work, "run"), config, val_pairs=held_out)
    return [before] + history


def plot(history: List[Dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [h for h in history if "validation" in h]
    fig, (acc, loss) = plt.subplots(1, 2, figsize=(9, 3.4))
    for u in points[0]["validation"]:
        acc.plot([h["step"] for h in points], [h["validation"][u]["accuracy"] for h in points], marker="o",
                 label=f"held-out, u={u}")
        loss.plot([h["step"] for h in points], [h["validation"][u]["loss"] for h in points], marker="o", label=f"u={u}")
    train = [h for h in history if "loss" in h]
    loss.plot([h["step"] for h in train], [h["loss"] for h in train], color="grey", alpha=0.5, label="training batch")
    acc.axhline(0.9, color="grey", linestyle=":")
    acc.set(xlabel="optimizer step", ylabel="pairwise accuracy", ylim=(0, 1.05), title="accuracy")
    loss.set(xlabel="optimizer step", ylabel="Thurstone loss", title="loss")
    acc.legend(fontsize=7)
    loss.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ms_rm_parity.rm_learning", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for history.json, rm-learning.png and the run")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--shift", type=float, default=0.15, help="the latents' mean: +shift chosen, -shift rejected")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    history = learning_run(os.path.join(args.out, "work"), args.steps, args.eval_every, args.shift, args.seed)
    with open(os.path.join(args.out, "history.json"), "w") as f:
        json.dump(history, f, indent=2)
    plot(history, os.path.join(args.out, "rm-learning.png"))
    for h in history:
        if "validation" in h:
            print(h["step"], {u: round(v["accuracy"], 3) for u, v in h["validation"].items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
