"""`ms-rm eval`: measure reward models on human preference data (ms_rm.evaluation).

    ms-rm eval DATA --out DIR --reward KIND FOLDER [KEY=VALUE ...] [--reward ...]

DATA: preference pairs (.jsonl / .json / .parquet) or rankings (ImageReward's or HPDv2's test-set
layout); --data-kind tells which when the file does not (default: rankings when the first item
has 'generations' or 'image_path'). Each --reward names a kind and its folder, then its options:

* diffusion-rm FOLDER: on images, vae=DIR (the SD3 VAE; text_encoders=DIR when they are not beside
  it); on latents (.npy files, parquet), prompt_embeddings=FILE.npz (arrays `prompts`,
  `encoder_hidden_states`, `pooled_projections` [, `encoder_attention_mask`]) or text_encoders=DIR
  (SD3). The noise levels: --u-grid; the headline u: u=.
* clip FOLDER (PickScore, CLIP score): processor=, tokenizer=, image_processor=, scale=cosine|logit;
* imagereward FOLDER: tokenizer=DIR (bert-base-uncased's vocab.txt);
* hpsv2 FOLDER: tokenizer=FILE (CLIP's bpe_simple_vocab_16e6.txt.gz, a merges.txt, or their folder);
* any other registered pixels model: its folder.
Every reward takes label=NAME (default: its kind) and weight=W (its weight in the combination,
reported when any reward has one).
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
from typing import Dict, List, Sequence

import numpy as np

from ..core.errors import ConfigError, InputError
from .command import Command

logger = logging.getLogger(__name__)

DISTRIBUTED = True                  # under msrun: each rank scores its shard of what the cache lacks

PATH_OPTIONS = {"vae", "text_encoders", "prompt_embeddings", "processor", "tokenizer", "image_processor"}
# what a score does not depend on, so the cache's record of the reward leaves it out (the keys carry u)
NOT_IN_CACHE_RECORD = ("label", "weight", "u")
OPTIONS = {                         # kind: the KEY=VALUE options it takes (besides label and weight)
    "diffusion-rm": ("vae", "text_encoders", "prompt_embeddings", "u", "normalize", "max_sequence_length"),
    "clip": ("processor", "tokenizer", "image_processor", "scale"),
    "imagereward": ("tokenizer",),
    "hpsv2": ("tokenizer",),
}


def parse_reward(values: Sequence[str]) -> Dict:
    """['KIND', 'FOLDER', 'KEY=VALUE', ...] -> {"kind", "folder", options...}."""
    from ..rewards import REWARD_MODELS

    if len(values) < 2:
        raise ConfigError(f"--reward {' '.join(values)}: give a kind and a folder (--reward KIND FOLDER [KEY=VALUE ...])")
    kind, folder, rest = values[0], values[1], values[2:]
    if kind not in REWARD_MODELS:
        raise ConfigError(f"--reward {kind}: unknown reward model; registered: {', '.join(sorted(REWARD_MODELS))}")
    allowed = OPTIONS.get(kind, ()) + ("label", "weight")
    spec = {"kind": kind, "folder": os.path.abspath(folder)}
    for item in rest:
        key, sep, value = item.partition("=")
        if not sep or key not in allowed:
            raise ConfigError(f"--reward {kind}: '{item}' is not one of its KEY=VALUE options ({', '.join(allowed)})")
        spec[key] = os.path.abspath(value) if key in PATH_OPTIONS else value
    spec.setdefault("label", kind)
    return spec


def run(args: argparse.Namespace) -> int:
    from ..evaluation import data_kind, evaluate_pairs, evaluate_rankings, read_pairs, read_rankings
    from ..evaluation.report import markdown, write_report

    specs = [parse_reward(r) for r in args.reward]
    kind = args.data_kind or data_kind(args.data)
    data = read_rankings(args.data) if kind == "rankings" else read_pairs(args.data)
    prompts = [item.prompt for item in data]
    latent = kind == "pairs" and data[0].chosen.is_latent
    with tempfile.TemporaryDirectory(prefix="ms_rm_eval_prompts_") as folder:
        rewards = [_reward(spec, prompts, latent, folder, args) for spec in specs]
        weights = {s["label"]: _number(s["weight"], f"{s['label']} weight") for s in specs if "weight" in s}
        evaluate = evaluate_rankings if kind == "rankings" else evaluate_pairs
        extra = {} if kind == "rankings" else {"bootstrap": args.bootstrap, "seed": args.seed}
        report = evaluate(data, rewards, args.out, weights=weights or None, world=args.world, **extra)
    if args.world.is_main:
        report["data"] = os.path.abspath(args.data)
        report["seed"], report["draws"] = args.seed, args.draws
        written = write_report(report, args.out, plot=not args.no_plot)
        print(markdown(report), end="")
        logger.info("wrote %s", ", ".join(written))
    return 0


def _reward(spec: Dict, prompts: List[str], latent: bool, folder: str, args: argparse.Namespace):
    from ..evaluation import image_reward

    kind, label = spec["kind"], spec["label"]
    description = {k: v for k, v in spec.items() if k not in NOT_IN_CACHE_RECORD}
    common = dict(batch_size=args.batch_size, world=args.world, progress=not args.no_progress and args.world.is_main)
    if kind == "diffusion-rm":
        return _diffusion_rm(spec, description, prompts, latent, folder, args, common)
    if latent:
        raise ConfigError(f"--reward {kind} scores images; the data holds latents")
    if kind == "clip":
        from ..scoring.clip import CLIPScorer

        scorer = CLIPScorer(spec["folder"], processor_path=spec.get("processor"), tokenizer_path=spec.get("tokenizer"),
                            image_processor_path=spec.get("image_processor"), scale=spec.get("scale", "cosine"),
                            mode=args.mode)
    elif kind == "imagereward":
        from ..scoring.imagereward import ImageRewardScorer

        scorer = ImageRewardScorer(spec["folder"], tokenizer=spec.get("tokenizer"), mode=args.mode,
                                   max_batch=args.batch_size)
    elif kind == "hpsv2":
        from ..scoring.hpsv2 import HPSv2Scorer

        scorer = HPSv2Scorer(spec["folder"], tokenizer_path=spec.get("tokenizer"), mode=args.mode,
                             max_batch=args.batch_size)
    else:
        from ..rewards import REWARD_MODELS

        scorer = REWARD_MODELS[kind].from_pretrained(spec["folder"], mode=args.mode).score
    return image_reward(label, scorer, description, **common)


def _diffusion_rm(spec, description, prompts, latent, folder, args, common):
    from ..evaluation import image_reward, latent_reward
    from ..rewards.diffusion_rm import DiffusionRM
    from ..scoring import DiffusionRMScorer

    us = args.u_grid or []
    u = _number(spec["u"], f"{spec['label']} u") if "u" in spec else None
    description.update(seed=args.seed, draws=args.draws)
    config = DiffusionRM.read_config(spec["folder"])
    scorer_options = dict(seed=args.seed, num_noise_draws=args.draws, normalize=spec.get("normalize", "none"))
    if latent:
        if "prompt_embeddings" in spec:
            text_conds = _embeddings_table(spec["prompt_embeddings"], prompts)
        elif "text_encoders" in spec:
            table = _encode_prompts(spec, prompts, folder, config.backbone.joint_attention_dim, args)
            text_conds = lambda batch: dict(zip(("encoder_hidden_states", "pooled_projections"), table.rows(batch)))
        else:
            raise ConfigError(f"--reward diffusion-rm {spec['folder']}: latents need the prompts' embeddings: "
                              "prompt_embeddings=FILE.npz or text_encoders=DIR (SD3)")
        model = DiffusionRM.from_pretrained(spec["folder"], mode=args.mode)
        scorer = DiffusionRMScorer(model=model, **scorer_options)
        return latent_reward(spec["label"], scorer, text_conds, description, us=us, u=u, **common)
    if "vae" not in spec:
        raise ConfigError(f"--reward diffusion-rm {spec['folder']}: images need the SD3 VAE: vae=DIR "
                          "(and text_encoders=DIR unless they are beside it)")
    from ..encoders import SD3Encoder
    from ..vae.encoder import load_vae_encoder

    table = _encode_prompts(spec, prompts, folder, config.backbone.joint_attention_dim, args)
    model = DiffusionRM.from_pretrained(spec["folder"], mode=args.mode)
    encoder = SD3Encoder(load_vae_encoder(spec["vae"], mode=args.mode), None)
    scorer = DiffusionRMScorer(model=model, encoder=encoder, **scorer_options)
    return image_reward(spec["label"], scorer, description, us=us, u=u, prompt_table=table, **common)


def _encode_prompts(spec, prompts, folder, joint_attention_dim, args):
    """The distinct prompts' SD3 embeddings (the text encoders freed before the models load)."""
    from ..core.memory import release_freed_memory
    from ..encoders.sd3_encoder import text_encoder_folder
    from ..encoders.sd3_prompts import SD3PromptEncoder
    from ..scoring.runs import PromptTable

    encoder = SD3PromptEncoder.from_pretrained(text_encoder_folder(spec.get("vae"), spec.get("text_encoders")),
                                               max_sequence_length=_count(spec.get("max_sequence_length", "128"),
                                                                          "max_sequence_length"),
                                               joint_attention_dim=joint_attention_dim, mode="pynative")
    folder = os.path.join(folder, spec["label"])             # one table per reward
    os.makedirs(folder)
    table = PromptTable.encode(encoder.encode, prompts, folder, batch_size=args.batch_size, progress=not args.no_progress and args.world.is_main)
    del encoder
    release_freed_memory()
    return table


def _embeddings_table(path: str, prompts: Sequence[str]):
    """text_conds(prompts) from an .npz of every prompt's embeddings (arrays `prompts`,
    `encoder_hidden_states`, `pooled_projections` [, `encoder_attention_mask`])."""
    from ..scoring.runs import read_inputs

    arrays = read_inputs(path, ("prompts", "encoder_hidden_states"), ("pooled_projections", "encoder_attention_mask"))
    index = {str(p): i for i, p in enumerate(arrays["prompts"].tolist())}
    missing = sorted(set(prompts) - set(index))
    if missing:
        raise InputError(f"{path}: no embeddings for {len(missing)} prompts of the data, e.g. {missing[0]!r}")
    for name, array in arrays.items():
        if array.shape[0] != len(index):
            raise InputError(f"{path}: '{name}' has {array.shape[0]} rows for {len(index)} prompts")

    def text_conds(batch: Sequence[str]) -> Dict[str, np.ndarray]:
        rows = [index[p] for p in batch]
        return {name: arrays[name][rows] for name in arrays if name != "prompts"}

    return text_conds


def _number(value: str, what: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ConfigError(f"{what}: not a number: {value!r}") from None


def _count(value: str, what: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(f"{what}: a positive integer, got {value!r}")
    return int(value)


def _seed(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"a non-negative integer, got {text!r}")
    return int(text)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"a positive integer, got {text!r}")
    return int(text)


def _u_grid(text: str) -> List[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("name at least one u")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", help="preference pairs (.jsonl, .json, .parquet) or rankings (.json, .jsonl)")
    parser.add_argument("--reward", nargs="+", action="append", required=True, metavar="ARG",
                        help="KIND FOLDER [KEY=VALUE ...]: a reward to evaluate (repeat for several; see the "
                             "command's description for each kind's options)")
    parser.add_argument("--out", required=True, help="folder for report.json, report.md, the plot and the "
                                                     "score cache (an interrupted run resumes from it)")
    parser.add_argument("--data-kind", choices=["pairs", "rankings"], help="what DATA holds (default: read it off "
                                                                           "the first item)")
    parser.add_argument("--u-grid", type=_u_grid, metavar="U,U,...",
                        help="Diffusion-RM: measure accuracy at each of these noise levels (the curve as a PNG)")
    parser.add_argument("--draws", type=_positive, default=1, help="Diffusion-RM: noise draws averaged per sample "
                                                              "(default 1)")
    parser.add_argument("--seed", type=_seed, default=0, help="seed of the noise (each pair's from (seed, its index)) "
                                                             "and of the bootstrap (default 0)")
    parser.add_argument("--bootstrap", type=_positive, default=1000, help="bootstrap resamples of the 95%% interval")
    parser.add_argument("--batch-size", type=_positive, default=8, help="samples scored at a time")
    parser.add_argument("--mode", choices=["graph", "pynative"], default="graph")
    parser.add_argument("--no-plot", action="store_true", help="no accuracy-vs-u PNG (matplotlib not needed)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


EVAL = Command(
    help="evaluate reward models on human preference data (pairwise accuracy, ranking metrics, u curves)",
    description=__doc__.split("\n\n", 1)[1], add_arguments=add_arguments, run=run)


def add_parsers(sub) -> None:
    EVAL.add_to(sub, "eval").formatter_class = argparse.RawDescriptionHelpFormatter
