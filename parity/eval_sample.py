"""The docs' evaluation sample: a preference set whose true order is known, and `ms-rm eval` on it.

No preference images ship in any installable package, so the sample is made here: a tiny random
Diffusion-RM (the parity cases' builder, converted by `ms-rm convert`), 48 pairs of random latents
over 4 prompts, and the "human" choice in each pair taken to be the one the same model scores
higher at u = 0 (the scheduler table's smallest noise level, sigma = 1/1000). Evaluating that
model over a grid of u then shows what the u curve measures: at u = 0 it agrees with the labels
it made (100% here; the noise at sigma 1/1000 hardly moves a score), and as the
noise level rises the noise drowns the latents and the accuracy falls toward chance. It says
nothing about the released models: the paper's figures need the released data and checkpoints.

    python -m ms_rm_parity.eval_sample OUT      # writes OUT/data, OUT/model, OUT/report (~1 min)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys

import numpy as np

PROMPTS = ["a red cube", "a cat on a sofa", "a lighthouse at dusk", "two apples"]
PAIRS = 48
U_GRID = "0,0.1,0.2,0.4,0.6,0.8,0.95"


def make(out: str, seed: int = 0) -> list:
    """The model, latents, embeddings and pairs under `out`; the `ms-rm eval` arguments to run."""
    from ms_rm import DiffusionRM
    from ms_rm.scoring import DiffusionRMScorer

    from .cases import Case
    from .harness import save_case_reference

    data = os.path.join(out, "data")
    os.makedirs(data, exist_ok=True)
    paths = save_case_reference(Case("eval-sample", ""), os.path.join(out, "reference"), seed)
    model_dir = DiffusionRM.convert(paths.src, paths.transformer, paths.scheduler, os.path.join(out, "model"),
                                    progress=False)
    model = DiffusionRM.from_pretrained(model_dir)
    backbone = model.config.backbone
    rng = np.random.default_rng(seed)
    embeds = rng.standard_normal((len(PROMPTS), 6, backbone.joint_attention_dim), dtype=np.float32)
    pooled = rng.standard_normal((len(PROMPTS), backbone.pooled_projection_dim), dtype=np.float32)
    np.savez(os.path.join(data, "embeddings.npz"), prompts=np.array(PROMPTS), encoder_hidden_states=embeds,
             pooled_projections=pooled)
    latents = rng.standard_normal((PAIRS, 2, backbone.in_channels, 8, 8), dtype=np.float32)
    which = np.arange(PAIRS) % len(PROMPTS)
    clean = DiffusionRMScorer(model=model, seed=seed)              # u = 0: the table's smallest sigma (1/1000)
    scores = [clean.score_latents(latents[:, k], embeds[which], pooled[which], u=0.0) for k in range(2)]
    rows = []
    for i in range(PAIRS):
        first_wins = scores[0][i] > scores[1][i]
        names = []
        for k in (0, 1) if first_wins else (1, 0):
            names.append(f"{i:02d}_{k}.npy")
            np.save(os.path.join(data, names[-1]), latents[i, k])
        rows.append({"prompt": PROMPTS[which[i]], "chosen": names[0], "rejected": names[1]})
    with open(os.path.join(data, "pairs.jsonl"), "w") as f:
        f.write("".join(json.dumps(row) + "\n" for row in rows))
    return ["eval", os.path.join(data, "pairs.jsonl"), "--out", os.path.join(out, "report"),
            "--reward", "diffusion-rm", model_dir, f"prompt_embeddings={os.path.join(data, 'embeddings.npz')}",
            "u=0.4", "--u-grid", U_GRID, "--draws", "4", "--seed", str(seed), "--no-progress"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ms_rm_parity.eval_sample", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="an empty or new folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    command = make(args.out)
    logging.getLogger(__name__).info("ms-rm %s", " ".join(command))
    return subprocess.run([sys.executable, "-m", "ms_rm.cli", *command]).returncode   # as a user runs it


if __name__ == "__main__":
    sys.exit(main())
