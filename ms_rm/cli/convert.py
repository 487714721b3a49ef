"""`ms-rm convert`: a reference (torch) checkpoint -> a converted folder."""

from __future__ import annotations

import argparse

from ..rewards.diffusion_rm import DiffusionRM
from ..rewards.imagereward import ImageReward


def run(args: argparse.Namespace) -> int:
    out = DiffusionRM.convert(args.src, args.transformer, args.scheduler, args.out, config=args.config,
                              dtype=args.dtype, u_convention=args.u_convention, force=args.force,
                              progress=not args.no_progress, time_convention=args.time_convention)
    print(out)
    return 0


def add_parsers(sub) -> None:
    conv = sub.add_parser(
        "convert", help="convert a reference (torch) Diffusion-RM checkpoint to MindSpore",
        description="Convert a reference-format Diffusion-RM checkpoint (config.json + checkpoint/ with "
                    "backbone_lora/ + rm_head.pt, full_model.pt, or rm_head.pt) and its base transformer "
                    "into a MindSpore checkpoint folder (ms_rm_config.json, model.safetensors, manifest.json).")
    conv.add_argument("src", help="model directory (config.json + checkpoint/), or a checkpoints/step_N "
                                  "folder together with --config")
    conv.add_argument("--transformer", required=True,
                      help="diffusers transformer folder of the base model (or the pipeline folder)")
    conv.add_argument("--scheduler", required=True,
                      help="scheduler folder, its scheduler_config.json, or the pipeline folder")
    conv.add_argument("--out", required=True, help="output folder (must not exist, unless --force)")
    conv.add_argument("--config", help="the run's config.json, when SRC is a checkpoint folder")
    conv.add_argument("--dtype", choices=["keep", "fp32", "bf16", "fp16"], default="keep",
                      help="stored dtype: keep each tensor's source dtype (default), or cast all; "
                           "LoRA merges run in fp32 either way")
    conv.add_argument("--u-convention", choices=["sigma", "index"], default="sigma",
                      help="how u maps to a noise level for this checkpoint (default: sigma, as the "
                           "released DiNa-LRM); recorded in the output")
    conv.add_argument("--time-convention", choices=["reference", "diffusers"], default="reference",
                      help="FLUX only: how the time and guidance reach the embeddings: as the upstream FLUX reward "
                           "model (default: sigma and guidance as they are) or as diffusers' forward (x 1000)")
    conv.add_argument("--force", action="store_true", help="replace an existing output folder")
    conv.add_argument("--no-progress", action="store_true", help="no progress bars")
    conv.set_defaults(func=run)
    ir = sub.add_parser(
        "convert-imagereward", help="convert the released ImageReward.pt (THUDM ImageReward) to MindSpore",
        description="Convert ImageReward.pt (the image-reward package's state dict) into a MindSpore checkpoint "
                    "folder (ms_rm_config.json, model.safetensors, manifest.json).")
    ir.add_argument("src", help="ImageReward.pt")
    ir.add_argument("--out", required=True, help="output folder (must not exist, unless --force)")
    ir.add_argument("--config", help="an ms_rm ImageReward config JSON (default: the released model's)")
    ir.add_argument("--dtype", choices=["keep", "fp32", "bf16", "fp16"], default="keep",
                    help="stored dtype: keep each tensor's source dtype (default), or cast all")
    ir.add_argument("--force", action="store_true", help="replace an existing output folder")
    ir.add_argument("--no-progress", action="store_true", help="no progress bars")
    ir.set_defaults(func=run_imagereward)


def run_imagereward(args: argparse.Namespace) -> int:
    out = ImageReward.convert(args.src, args.out, dtype=args.dtype, force=args.force, progress=not args.no_progress,
                              config=args.config)
    print(out)
    return 0
