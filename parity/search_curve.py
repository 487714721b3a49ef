"""Best score against budget for random search and SES, over seeds, on a tiny random model.

    python -m ms_rm_parity.search_curve [--seeds 10] [--budget 30] [--popsize 10]

The objective is ms_rm's own: the tiny SD3.5-style generator of the generator parity cases (4
steps, no guidance, 32 x 32 latents) and a tiny random Diffusion-RM scoring the latents (u 0.4,
one reward noise for all candidates). Each seed draws its own base noise and prompt embeddings and
runs both methods with that seed; the table gives the mean over seeds of the best score after 1, 5,
10, 20 ... evaluations, and in brackets the mean and standard deviation of its gain over the
seed's first evaluation (the base noise for random search, the first candidate for SES). Random weights: the numbers say how the two
methods spend a budget on this objective, not how much a trained reward improves.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

CHECKPOINTS = (1, 5, 10, 20, 30, 50, 100)


def run(seeds: int, budget: int, popsize: int, levels: int = 3, steps: int = 4) -> dict:
    from ms_rm import DiffusionRM, SD3Generator
    from ms_rm.search import GenerateAndScore, random_search, ses_search

    from .generator import _reference
    from .harness import prepare_case
    from .cases import CASES

    curves = {"random": [], "ses": []}
    with tempfile.TemporaryDirectory() as folder:
        _reference(0, os.path.join(folder, "pipeline"))
        generator = SD3Generator.from_pretrained(os.path.join(folder, "pipeline"))
        rm = DiffusionRM.from_pretrained(prepare_case(CASES["tiny-sd35"], os.path.join(folder, "rm")).converted["fp32"])
        for seed in range(seeds):
            rng = np.random.default_rng(1000 + seed)
            ehs, pooled = rng.standard_normal((1, 7, 48), np.float32), rng.standard_normal((1, 40), np.float32)
            base = rng.standard_normal((1, 16, 32, 32), np.float32)
            objective = GenerateAndScore(generator, ehs, pooled, [(rm, 1.0)], steps, 1.0)
            curves["random"].append(random_search(objective, base, budget, seed=seed, batch_size=popsize).best_so_far())
            curves["ses"].append(ses_search(objective, base, budget, popsize, max(2, popsize // 2), levels,
                                            seed=seed).best_so_far())
    return {k: np.array(v) for k, v in curves.items()}


def format_table(curves: dict) -> str:
    budget = curves["random"].shape[1]
    points = [c for c in CHECKPOINTS if c <= budget]
    lines = ["| method | " + " | ".join(f"best after {c}" for c in points) + " |",
             "|---|" + "---|" * len(points)]
    for method, label in (("random", "random search"), ("ses", "SES")):
        values = curves[method]
        gain = values - values[:, :1]                 # the gain over each seed's first evaluation
        cells = [f"{values[:, c - 1].mean():.4f} (+{gain[:, c - 1].mean():.4f} ± {gain[:, c - 1].std():.4f})"
                 for c in points]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    wins = int((curves["ses"][:, -1] > curves["random"][:, -1]).sum())
    lines.append(f"SES ends higher than random search for {wins} of {curves['ses'].shape[0]} seeds")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ms_rm_parity.search_curve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--budget", type=int, default=30)
    parser.add_argument("--popsize", type=int, default=10)
    args = parser.parse_args(argv)
    print(format_table(run(args.seeds, args.budget, args.popsize)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
