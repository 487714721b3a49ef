"""`ms-rm train-rm`: train a Diffusion-RM on preference pairs (ms_rm.training.rm_trainer).

    ms-rm train-rm CONFIG --transformer DIR --scheduler DIR --prompt-embeddings FILE.npz [--out DIR]

CONFIG: the reference's YAML (config/sd3m/thurstone-12layer.yaml's keys, read as they are: model,
training, data, logging, paths, system), with two keys of ours: training.max_steps, and data.train.pairs /
data.eval.<split>.pairs (JSON lines {prompt, chosen, rejected} of .npy latents) beside the reference's
parquet_files. Paths in it are taken from the config file's folder.

The base model: --transformer and --scheduler (a diffusers folder each, or the pipeline folder;
default: model.backbone_model_id when it is a local folder). Text: --prompt-embeddings, an .npz with
arrays `prompts`, `encoder_hidden_states`, `pooled_projections` covering every prompt of the data, or
--text-encoders DIR (SD3's three text encoders, as `ms-rm eval` reads them): each distinct prompt is
encoded once, before training. --start continues from a reference checkpoint folder (backbone_lora/ +
rm_head.pt; --start-config when its config.json is not beside it). --resume continues the run in --out
from its latest checkpoint, bit for bit. Under msrun: data parallel.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile

from ..core.errors import ConfigError
from ..io.files import read_config_file
from .command import Command

logger = logging.getLogger(__name__)

DISTRIBUTED = True                  # under msrun: each rank its share of every batch, gradients averaged


def _base_folders(args, config, base):
    model_id = (config.get("model") or {}).get("backbone_model_id")
    local = model_id if model_id and os.path.isdir(os.path.join(base, model_id)) else None
    transformer = args.transformer or (os.path.join(base, local) if local else None)
    scheduler = args.scheduler or (os.path.join(base, local) if local else None)
    if transformer is None or scheduler is None:
        raise ConfigError(f"{args.config}: model.backbone_model_id {model_id!r} is not a local folder: pass "
                          "--transformer and --scheduler (diffusers folders, or the pipeline folder)")
    return transformer, scheduler


def _text_conds(args, prompts, folder, joint_attention_dim):
    from .evaluate import _embeddings_table, _encode_prompts

    if args.prompt_embeddings:
        return _embeddings_table(args.prompt_embeddings, prompts)
    if not args.text_encoders:
        raise ConfigError("pass --prompt-embeddings FILE.npz or --text-encoders DIR (the prompts' SD3 embeddings)")
    spec = {"label": "train-rm", "text_encoders": args.text_encoders, "max_sequence_length": "128"}
    table = _encode_prompts(spec, sorted(set(prompts)), folder, joint_attention_dim, args)
    return lambda batch: dict(zip(("encoder_hidden_states", "pooled_projections"), table.rows(batch)))


def run(args: argparse.Namespace) -> int:
    from ..training.rm_model import build_trainee
    from ..training.rm_trainer import (STATE, RMTrainSettings, data_files, latest_checkpoint, read_training_pairs,
                                       train_reward_model)

    config = read_config_file(args.config)
    base = os.path.dirname(os.path.abspath(args.config))
    if args.max_steps is not None:
        config.setdefault("training", {})["max_steps"] = args.max_steps
    settings = RMTrainSettings.from_config(config, args.config)
    paths = config.get("paths") or {}
    out = args.out or os.path.join(base, paths.get("save_dir", "outputs"), paths.get("run_name") or "run")
    data = config.get("data") or {}
    images = args.vae is not None
    train_pairs = read_training_pairs(data_files(data.get("train") or {}, base, f"{args.config} [data.train]"), images)
    val_pairs = []
    for split, section in (data.get("eval") or {}).items():
        val_pairs += read_training_pairs(data_files(section or {}, base, f"{args.config} [data.eval.{split}]"), images)
    if images:
        from ..training.rm_trainer import encode_image_pairs
        from ..vae.encoder import load_vae_encoder

        if args.world.size > 1:
            raise ConfigError("--vae: encode the image pairs in one process first (ms-rm train-rm CONFIG --vae DIR "
                              "--encode-only), then point data.*.pairs at the latent pairs it writes and train under msrun")
        vae = load_vae_encoder(args.vae, mode=args.mode)
        cache = os.path.join(out, "latents")
        train_pairs = encode_image_pairs(train_pairs, vae, os.path.join(cache, "train"), progress=not args.no_progress)
        val_pairs = encode_image_pairs(val_pairs, vae, os.path.join(cache, "eval"), progress=not args.no_progress)
        if args.encode_only:
            logger.info("latent pairs: %s, %s", os.path.join(cache, "train", "pairs.jsonl"),
                        os.path.join(cache, "eval", "pairs.jsonl"))
            return 0
        del vae
    transformer, scheduler = _base_folders(args, config, base)
    start, start_config, head_state = args.start, args.start_config, None
    if args.resume:
        start = latest_checkpoint(out)
        start_config, head_state = os.path.join(start, "config.json"), os.path.join(start, STATE, "head.safetensors")
    elif start is not None and start_config is None and not os.path.isfile(os.path.join(start, "config.json")):
        raise ConfigError(f"{start}: no config.json beside the checkpoint: pass --start-config")
    elif start is not None and start_config is None:
        start_config = os.path.join(start, "config.json")
    trainee = build_trainee(config, transformer, scheduler, start=start, start_config=start_config,
                            head_state=head_state, seed=settings.seed, mode=args.mode, source=args.config)
    with tempfile.TemporaryDirectory(prefix="ms_rm_prompts_") as folder:
        prompts = [p.prompt for p in list(train_pairs) + list(val_pairs)]
        text_conds = _text_conds(args, prompts, folder, trainee.model.config.backbone.joint_attention_dim)
        history = train_reward_model(trainee, settings, train_pairs, text_conds, out, config, val_pairs=val_pairs,
                                     world=args.world, resume=args.resume, force=args.force,
                                     progress=not args.no_progress)
    if args.world.is_main and history:
        last = history[-1]
        logger.info("step %d: loss %.4f, accuracy %.3f; checkpoints in %s", last["step"], last["loss"],
                    last["accuracy"], os.path.join(out, "checkpoints"))
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="the run's YAML / JSON config (the reference's keys)")
    parser.add_argument("--transformer", help="the base diffusers transformer folder (or the pipeline folder)")
    parser.add_argument("--scheduler", help="the scheduler folder, its scheduler_config.json, or the pipeline folder")
    parser.add_argument("--prompt-embeddings", metavar="NPZ", help="every prompt's SD3 embeddings (arrays prompts, "
                                                                  "encoder_hidden_states, pooled_projections)")
    parser.add_argument("--text-encoders", metavar="DIR", help="SD3's text encoders, to embed the prompts once")
    parser.add_argument("--vae", metavar="DIR", help="the SD3 VAE: encode image pairs once into --out/latents "
                                                     "(kept: an interrupted encoding resumes)")
    parser.add_argument("--encode-only", action="store_true", help="with --vae: encode the pairs and stop")
    parser.add_argument("--start", metavar="CHECKPOINT", help="continue from a reference checkpoint folder "
                                                              "(backbone_lora/ + rm_head.pt)")
    parser.add_argument("--start-config", metavar="FILE", help="--start's config.json when it is not beside it")
    parser.add_argument("--out", help="the run folder (default: paths.save_dir / paths.run_name of the config)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    parser.add_argument("--force", action="store_true", help="start anew over an existing run in --out")
    parser.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (training.max_steps)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts encoded at a time (--text-encoders)")
    parser.add_argument("--mode", choices=["graph", "pynative"], default="graph")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


TRAIN_RM = Command(help="train a Diffusion-RM on preference pairs (the reference's recipe and config)",
                   description=__doc__.split("\n\n", 1)[1], add_arguments=add_arguments, run=run)


def add_parsers(sub) -> None:
    TRAIN_RM.add_to(sub, "train-rm").formatter_class = argparse.RawDescriptionHelpFormatter
