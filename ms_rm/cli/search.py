"""`ms-rm search`: search the initial noise of one prompt for the highest reward (best-of-N or SES)."""

from __future__ import annotations

import argparse
import json
import logging
import os

import numpy as np

from ..core.errors import InputError
from ..generators.sd3_generator import SD3Generator
from ..io.files import atomic_file, atomic_folder
from ..rewards import load_reward_model
from ..scoring.runs import read_inputs, write_npz
from ..search import METHODS, GenerateAndScore, random_search, ses_search
from .generate import EMBEDS, OPTIONAL, initial_noise, load_decoder

logger = logging.getLogger(__name__)


def plot_png(path: str, curve, title: str) -> None:
    """Best score against evaluations, as a PNG (PIL: axes, a polyline, the end values)."""
    from PIL import Image, ImageDraw

    width, height, margin = 640, 400, 50
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    lo, hi = min(curve), max(curve)
    span = (hi - lo) or 1.0
    x = lambda i: margin + (width - 2 * margin) * (i / max(len(curve) - 1, 1))
    y = lambda v: height - margin - (height - 2 * margin) * ((v - lo) / span)
    draw.line([(margin, margin), (margin, height - margin), (width - margin, height - margin)], fill="black")
    draw.line([(x(i), y(v)) for i, v in enumerate(curve)] if len(curve) > 1 else [(x(0), y(curve[0]))] * 2,
              fill="blue", width=2)
    draw.text((margin, 10), title, fill="black")
    draw.text((margin - 45, margin - 6), f"{hi:.4g}", fill="black")
    draw.text((margin - 45, height - margin - 6), f"{lo:.4g}", fill="black")
    draw.text((width - margin - 20, height - margin + 8), f"{len(curve)}", fill="black")
    draw.text((width // 2 - 60, height - margin + 20), "evaluations", fill="black")
    with atomic_file(path, "wb") as f:
        image.save(f, format="PNG")


def run(args: argparse.Namespace) -> int:
    weights = args.weight or [1.0] * len(args.reward)
    if len(weights) != len(args.reward):
        raise InputError(f"pass one --weight per --reward ({len(args.reward)}), or none")
    arrays = read_inputs(args.embeds, EMBEDS, OPTIONAL)
    if arrays["prompt_embeds"].shape[0] != 1:
        raise InputError(f"{args.embeds}: holds {arrays['prompt_embeds'].shape[0]} prompts; a search is per prompt "
                         "(run one search per prompt)")
    if os.path.exists(args.out) and not args.force:
        raise InputError(f"{args.out}: already exists; pass --force to replace it")
    generator = SD3Generator.from_pretrained(args.model, mode=args.mode)
    rewards = [(load_reward_model(path, mode=args.mode), w) for path, w in zip(args.reward, weights)]
    decoder = load_decoder(args)
    noise = arrays.get("noise")
    if noise is None:
        noise = initial_noise(1, generator.config.in_channels, args.height, args.width, args.seed)
    objective = GenerateAndScore(generator, arrays["prompt_embeds"], arrays["pooled_prompt_embeds"], rewards,
                                 args.steps, args.guidance, arrays.get("negative_prompt_embeds"),
                                 arrays.get("negative_pooled_prompt_embeds"), u=args.u, reward_seed=args.reward_seed)
    if args.method == "ses":
        result = ses_search(objective, noise, args.budget, args.popsize, args.elites, args.levels, seed=args.seed,
                            progress=not args.no_progress)
    else:
        result = random_search(objective, noise, args.budget, seed=args.seed, batch_size=args.popsize,
                               progress=not args.no_progress)
    best_noise = result.best_noise.reshape((1,) + result.best_noise.shape[-3:])      # (1, C, H, W)
    best_latents = generator.generate(arrays["prompt_embeds"], arrays["pooled_prompt_embeds"], best_noise,
                                      args.steps, args.guidance, arrays.get("negative_prompt_embeds"),
                                      arrays.get("negative_pooled_prompt_embeds")).asnumpy()
    curve = result.best_so_far()
    record = {"method": result.method, "budget": args.budget, "seed": args.seed, "best_score": result.best_score,
              "best_evaluation": result.best_index, "best_so_far": curve,
              "candidates": [{k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in c.items()}
                             for c in result.candidates]}
    if result.generations:
        record["generations"] = [{"generation": g["generation"], "elites": g["elites"],
                                  "mean_of_mean": float(g["mean"].mean()), "mean_of_var": float(g["var"].mean())}
                                 for g in result.generations]
    with atomic_folder(args.out, force=args.force) as folder:
        write_npz(os.path.join(folder, "best.npz"), {"noise": best_noise, "latents": best_latents})
        with atomic_file(os.path.join(folder, "record.json"), "w") as f:
            json.dump(record, f)
        plot_png(os.path.join(folder, "best_score.png"), curve, f"{result.method}: best score {result.best_score:.5g}")
        if decoder is not None:
            from PIL import Image

            with atomic_file(os.path.join(folder, "best.png"), "wb") as f:
                Image.fromarray(decoder.to_images(best_latents)[0]).save(f, format="PNG")
    print(f"best score {result.best_score:.6f} at evaluation {result.best_index} of {args.budget}")
    return 0


def add_parsers(sub) -> None:
    search = sub.add_parser("search", help="search the initial noise for the highest reward (best-of-N, SES)",
                            description="Generate with an SD3 / SD3.5 diffusers folder from candidate initial noises "
                                        "and keep the one the reward model(s) score highest. Writes OUT/best.npz "
                                        "(noise, latents), OUT/record.json (every candidate), OUT/best_score.png "
                                        "(best score against evaluations) and with --png OUT/best.png.")
    search.add_argument("model", help="a diffusers SD3 / SD3.5 pipeline folder")
    search.add_argument("--reward", action="append", required=True,
                        help="a converted reward model folder (repeat for a weighted sum)")
    search.add_argument("--weight", action="append", type=float, help="the weight of each --reward (default 1)")
    search.add_argument("--embeds", required=True, help=".npz with one prompt's prompt_embeds, pooled_prompt_embeds "
                                                        "[, negative_prompt_embeds, negative_pooled_prompt_embeds, noise]")
    search.add_argument("--method", choices=METHODS, default="ses")
    search.add_argument("--budget", type=int, default=30, help="evaluations (generations + rewards)")
    search.add_argument("--popsize", type=int, default=10, help="SES population (random search: batch size)")
    search.add_argument("--elites", type=int, default=5, help="SES elites")
    search.add_argument("--levels", type=int, default=4, help="SES wavelet levels")
    search.add_argument("--steps", type=int, default=28)
    search.add_argument("--guidance", type=float, default=7.0)
    search.add_argument("--u", type=float, default=0.4, help="the latent reward's noise level")
    search.add_argument("--reward-seed", type=int, default=0, help="seed of the latent reward's noise (one for all)")
    search.add_argument("--height", type=int, default=1024, help="pixels, when --embeds holds no noise")
    search.add_argument("--width", type=int, default=1024, help="pixels, when --embeds holds no noise")
    search.add_argument("--seed", type=int, default=0, help="seed of the base noise and of the search")
    search.add_argument("--out", required=True, help="a new folder for the results")
    search.add_argument("--force", action="store_true", help="replace an existing --out folder")
    search.add_argument("--png", action="store_true", help="also decode the best latents with the folder's vae/")
    search.add_argument("--mode", choices=["graph", "pynative"], default="graph")
    search.add_argument("--no-progress", action="store_true")
    search.set_defaults(func=run)
