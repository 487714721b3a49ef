"""`ms-rm convert`: a reference (torch) checkpoint -> a converted folder.

The command itself is the registry's (`ms-rm convert --reward NAME`, ms_rm.cli.rewards); these
are its per-model forms: Diffusion-RM's (the default), ImageReward's (also `ms-rm
convert-imagereward`), the BLIP score's, and `signature_command(cls)`, which derives the arguments of any other
registered model from its `convert` classmethod's signature.
"""

from __future__ import annotations

import argparse
import inspect
from typing import List

from ..rewards import REWARD_MODELS
from ..rewards.blip_score import BLIPScore
from ..rewards.diffusion_rm import DiffusionRM
from ..rewards.imagereward import ImageReward
from .command import Command


def run(args: argparse.Namespace) -> int:
    out = DiffusionRM.convert(args.src, args.transformer, args.scheduler, args.out, config=args.config,
                              dtype=args.dtype, u_convention=args.u_convention, force=args.force,
                              progress=not args.no_progress, time_convention=args.time_convention)
    print(out)
    return 0


def _add_diffusion_rm_arguments(conv: argparse.ArgumentParser) -> None:
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


def run_imagereward(args: argparse.Namespace) -> int:
    out = ImageReward.convert(args.src, args.out, dtype=args.dtype, force=args.force, progress=not args.no_progress,
                              config=args.config)
    print(out)
    return 0


def _add_imagereward_arguments(ir: argparse.ArgumentParser) -> None:
    ir.add_argument("src", help="ImageReward.pt")
    ir.add_argument("--out", required=True, help="output folder (must not exist, unless --force)")
    ir.add_argument("--config", help="BLIP's med_config.json (the text encoder's BertConfig; the other sizes are read "
                                     "off the checkpoint) or an ms_rm ImageReward config JSON (default: every size "
                                     "read off the checkpoint, the rest BLIP's)")
    ir.add_argument("--dtype", choices=["keep", "fp32", "bf16", "fp16"], default="keep",
                    help="stored dtype: keep each tensor's source dtype (default), or cast all")
    ir.add_argument("--force", action="store_true", help="replace an existing output folder")
    ir.add_argument("--no-progress", action="store_true", help="no progress bars")


def run_blip_score(args: argparse.Namespace) -> int:
    out = BLIPScore.convert(args.src, args.out, dtype=args.dtype, force=args.force, progress=not args.no_progress,
                            config=args.config)
    print(out)
    return 0


def _add_blip_score_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="BLIP's model_large.pth (BLIP_Pretrain's state dict under 'model')")
    parser.add_argument("--out", required=True, help="output folder (must not exist, unless --force)")
    parser.add_argument("--config", help="BLIP's med_config.json (the text encoder's BertConfig; the other sizes are "
                                         "read off the checkpoint) or an ms_rm BLIP score config JSON (default: "
                                         "every size read off the checkpoint, the rest BLIP's)")
    parser.add_argument("--dtype", choices=["keep", "fp32", "bf16", "fp16"], default="keep",
                        help="stored dtype: keep each tensor's source dtype (default), or cast all")
    parser.add_argument("--force", action="store_true", help="replace an existing output folder")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


DIFFUSION_RM = Command(
    help="convert a reference (torch) Diffusion-RM checkpoint to MindSpore",
    description="Convert a reference-format Diffusion-RM checkpoint (config.json + checkpoint/ with backbone_lora/ + "
                "rm_head.pt, full_model.pt, or rm_head.pt) and its base transformer into a MindSpore checkpoint folder "
                "(ms_rm_config.json, model.safetensors, manifest.json).",
    add_arguments=_add_diffusion_rm_arguments, run=run)
IMAGEREWARD = Command(
    help="convert the released ImageReward.pt (THUDM ImageReward) to MindSpore",
    description="Convert ImageReward.pt (the image-reward package's state dict) into a MindSpore checkpoint folder "
                "(ms_rm_config.json, model.safetensors, manifest.json).",
    add_arguments=_add_imagereward_arguments, run=run_imagereward)

BLIP_SCORE = Command(
    help="convert BLIP's released model_large.pth to the BLIP score in MindSpore",
    description="Convert BLIP's model_large.pth (what the image-reward package's BLIPScore loads) into a MindSpore "
                "checkpoint folder (ms_rm_config.json, model.safetensors, manifest.json); every key not used is "
                "listed in the manifest.",
    add_arguments=_add_blip_score_arguments, run=run_blip_score)


# --- any other registered model: the arguments of its convert(...) ---------------------------------

def _signature(cls) -> List[inspect.Parameter]:
    return list(inspect.signature(cls.convert).parameters.values())         # classmethod: cls is bound


def _add_signature_arguments(cls, parser: argparse.ArgumentParser) -> None:
    """Parameters before `out` (or *sources): positional sources; `out`: --out; every other
    keyword: --name (a bool default True: --no-name; False: --name; otherwise typed by its default)."""
    params = _signature(cls)
    forced = any(p.name == "force" for p in params)
    for p in params:
        flag = "--" + p.name.replace("_", "-")
        if p.kind is p.VAR_POSITIONAL:
            parser.add_argument(p.name, nargs="*", help="source files or folders")
        elif p.kind is p.VAR_KEYWORD:
            continue
        elif p.name == "out":
            required = p.default is p.empty
            parser.add_argument("--out", required=required, default=None if required else p.default,
                                help="output folder" + (" (must not exist, unless --force)" if forced else ""))
        elif p.default is p.empty and p.kind is p.POSITIONAL_OR_KEYWORD:
            parser.add_argument(p.name, help=f"{cls.__name__}.convert's {p.name}")
        elif p.default is p.empty:
            parser.add_argument(flag, dest=p.name, required=True, help=f"{cls.__name__}.convert's {p.name}")
        elif p.default is True:
            parser.add_argument("--no-" + p.name.replace("_", "-"), dest=p.name, action="store_false",
                                help=f"{p.name}=False")
        elif p.default is False:
            parser.add_argument(flag, dest=p.name, action="store_true", help=f"{p.name}=True")
        else:
            kind = type(p.default) if isinstance(p.default, (int, float, str)) else str
            parser.add_argument(flag, dest=p.name, type=kind, default=p.default,
                                help=f"default: {p.default!r}")


def run_signature(args: argparse.Namespace) -> int:
    cls = REWARD_MODELS[args.reward]
    params = _signature(cls)
    star = next((i for i, p in enumerate(params) if p.kind is p.VAR_POSITIONAL), None)
    positional = [getattr(args, p.name) for p in params[:star]] + list(getattr(args, params[star].name)) \
        if star is not None else []
    keywords = {p.name: getattr(args, p.name) for p in params[0 if star is None else star + 1:]
                if p.kind is not p.VAR_KEYWORD}
    print(cls.convert(*positional, **keywords))
    return 0


def signature_command(cls) -> Command:
    """The converting command of a registered model, from its `convert` classmethod's signature."""
    doc = inspect.getdoc(cls.convert) or f"Convert with {cls.__name__}.convert."
    return Command(help=f"convert a {cls.__name__} checkpoint to MindSpore", description=doc.split("\n\n")[0],
                   add_arguments=lambda parser: _add_signature_arguments(cls, parser), run=run_signature)


def add_parsers(sub) -> None:
    """The per-model name of `ms-rm convert --reward imagereward` (ms_rm.cli.rewards)."""
    IMAGEREWARD.add_to(sub, "convert-imagereward")
