"""`ms-rm score` of a latents model (Diffusion-RM): score latents from an .npz file with a converted
model. The command itself is the registry's (ms_rm.cli.rewards); this is its latents form."""

from __future__ import annotations

import argparse

from ..core.errors import ConfigError
from ..rewards import REWARD_MODELS, load_reward_model
from ..scoring.runs import input_arrays, read_inputs, score_arrays, write_npz
from .command import Command


DISTRIBUTED = True                  # under msrun: each rank scores its shard; the main rank writes


def run(args: argparse.Namespace) -> int:
    kind = getattr(args, "reward", None)            # --reward NAME: that model's loader, else by the manifest
    if kind is None:
        model = load_reward_model(args.model, mode=args.mode, verify=args.verify)
    else:
        model = REWARD_MODELS[kind].from_pretrained(args.model, mode=args.mode, verify=args.verify)
    if getattr(model, "input_kind", "latents") != "latents":
        raise ConfigError(f"{args.model}: a {type(model).__name__} model scores images, not latents: use its scorer "
                          "(ms_rm.scoring.SCORERS) or its ms-rm score-* command")
    arrays = read_inputs(args.inputs, *input_arrays(model))
    result = score_arrays(model, arrays, args.u if len(args.u) > 1 else args.u[0], args.seed, args.features,
                          world=args.world)
    if args.world.is_main:
        write_npz(args.out, result)
        for i, value in enumerate(result["reward"][:, 0]):
            print(f"{i}\t{value:.6f}")
    return 0


def add_arguments(score) -> None:
    score.add_argument("model", help="a folder written by ms-rm convert")
    score.add_argument("--inputs", required=True, help="input .npz")
    score.add_argument("--u", type=float, nargs="+", required=True, help="noise level, or one per sample")
    score.add_argument("--out", required=True, help="output .npz")
    score.add_argument("--seed", type=int, default=None, help="noise seed when the inputs hold no noise")
    score.add_argument("--features", action="store_true", help="also write temb, the taps and raw")
    score.add_argument("--verify", action="store_true", help="check the model files' sha256 first")
    score.add_argument("--mode", choices=["graph", "pynative"], default="graph")


LATENTS = Command(
    help="score latents from an .npz file with a converted model",
    description="Score latents (latents, encoder_hidden_states, pooled_projections [, noise] in an .npz; for "
                "Z-Image: latents, zero-padded encoder_hidden_states, encoder_attention_mask (1 = token) [, noise], "
                "no pooled_projections) and write reward (and features) to an .npz.",
    add_arguments=add_arguments, run=run)
