"""`ms-rm score --reward NAME` and `ms-rm convert --reward NAME`: one scoring and one converting
command over the reward-model registry (ms_rm.rewards.REWARD_MODELS).

`--reward NAME` picks the registered model, `--input-kind latents|pixels` (score only) what it
scores; the rest of the command line is that model's. Each model's commands come from:

* SCORE_COMMANDS / CONVERT_COMMANDS, for the models whose commands need more than the protocol
  says (Diffusion-RM's latents .npz and its VAE + text-encoder image path, CLIP's processor,
  ImageReward's tokenizer, their converters' documented options);
* otherwise, the protocol alone, so a newly registered model has both commands without a
  change here: a "pixels" model scores image files against prompts through its
  `score(images, prompts)` (ms_rm.cli.score_images.pixels_command), a "latents" model an .npz of
  Diffusion-RM's inputs through its `reward_stages` (ms_rm.cli.score: a latents model with
  other inputs needs its own entry), and its converter takes the arguments of its `convert`
  classmethod (ms_rm.cli.convert.signature_command).

Without --reward both commands are what they were before the registry: `ms-rm score` scores
latents with the model its folder's manifest names, `ms-rm convert` converts a Diffusion-RM.
The older names (`score-images`, `score-clip`, `score-imagereward`, `convert-imagereward`) stay,
built from the same Commands. --reward and --input-kind are read before the model's own parser
runs and taken out of the command line, so they change nothing in how its arguments parse.
"""

from __future__ import annotations

import argparse
import sys
from typing import Dict, List, Optional, Tuple

from ..rewards import INPUT_KINDS, REWARD_MODELS
from . import convert, score, score_images
from .command import Command

DEFAULT = "diffusion-rm"          # --reward left out: what `ms-rm score` / `ms-rm convert` did before

SCORE_COMMANDS: Dict[str, Dict[str, Command]] = {          # registry name -> {input kind: command}
    "diffusion-rm": {"latents": score.LATENTS, "pixels": score_images.IMAGES},
    "clip": {"pixels": score_images.CLIP},
    "imagereward": {"pixels": score_images.IMAGEREWARD},
    "blip-score": {"pixels": score_images.BLIP_SCORE},
    "hpsv2": {"pixels": score_images.HPSV2},
}
CONVERT_COMMANDS: Dict[str, Command] = {
    "diffusion-rm": convert.DIFFUSION_RM,
    "imagereward": convert.IMAGEREWARD,
    "blip-score": convert.BLIP_SCORE,
}


def score_commands(cls) -> Dict[str, Command]:
    """{input kind: scoring command} of a registered model class, its own input kind first."""
    if cls.name in SCORE_COMMANDS:
        commands = SCORE_COMMANDS[cls.name]
    elif cls.input_kind == "latents":
        commands = {"latents": score.LATENTS}
    else:
        commands = {"pixels": score_images.pixels_command(cls)}
    return dict(sorted(commands.items(), key=lambda item: item[0] != cls.input_kind))


def convert_command(cls) -> Command:
    return CONVERT_COMMANDS.get(cls.name) or convert.signature_command(cls)


def describe_kinds(verb: str) -> str:
    """The registered models, one phrase each, for the commands' help."""
    parts = []
    for name in sorted(REWARD_MODELS):
        cls = REWARD_MODELS[name]
        what = " or ".join(score_commands(cls)) if verb == "score" else cls.__name__
        parts.append(f"{name} ({what})")
    return "; ".join(parts)


def _take_option(args: List[str], flag: str) -> Tuple[Optional[str], List[str], bool]:
    """(value, args without `flag VALUE` / `flag=VALUE`, whether the flag came without a value);
    scanning stops at `--`. The last occurrence wins, as argparse's."""
    value, rest, missing, i = None, [], False, 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            rest += args[i:]
            break
        if arg == flag:
            if i + 1 >= len(args) or args[i + 1].startswith("-"):
                missing, i = True, i + 1
                continue
            value, i = args[i + 1], i + 2
            continue
        if arg.startswith(flag + "="):
            value = arg[len(flag) + 1:]
        else:
            rest.append(arg)
        i += 1
    return value, rest, missing


class CommandParser(argparse.ArgumentParser):
    """The parser of each `ms-rm` subcommand; with registry="score" or "convert", it reads
    --reward (and --input-kind) first and parses the rest with that model's command."""

    def __init__(self, *args, registry: Optional[str] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.registry = registry

    def fail(self, message: str):
        """One line on stderr, exit status 2 (as argparse's errors, without the usage)."""
        self.exit(2, f"{self.prog}: error: {message}\n")

    def parse_known_args(self, args=None, namespace=None):
        if self.registry is None:
            return super().parse_known_args(args, namespace)
        args = list(sys.argv[1:] if args is None else args)
        known = ", ".join(sorted(REWARD_MODELS))
        kind, args, missing = _take_option(args, "--reward")
        if missing and kind is None:
            self.fail(f"--reward: name a reward model: {known}")
        if kind is not None and kind not in REWARD_MODELS:
            self.fail(f"unknown reward model '{kind}'; registered: {known}")
        input_kind = None
        if self.registry == "score":
            input_kind, args, missing = _take_option(args, "--input-kind")
            if missing and input_kind is None:
                self.fail(f"--input-kind: name one of {', '.join(INPUT_KINDS)}")
        parser = self.model_parser(kind, input_kind)
        return parser.parse_known_args(args, namespace)

    def model_parser(self, kind: Optional[str], input_kind: Optional[str]) -> argparse.ArgumentParser:
        """The parser of model `kind`'s command (None: the default model)."""
        cls = REWARD_MODELS[kind or DEFAULT]
        commands = score_commands(cls) if self.registry == "score" else {None: convert_command(cls)}
        if self.registry == "score":
            if input_kind is None:
                input_kind = next(iter(commands))
            if input_kind not in commands:
                self.fail(f"{cls.name} scores {' or '.join(commands)}, not {input_kind} (--input-kind)")
        command = commands[input_kind]
        parser = _ModelParser(prog=self.prog, description=command.description)
        command.add_arguments_to(parser)
        parser.set_defaults(reward=kind, input_kind=input_kind)
        # what --help and the errors show: the same arguments after --reward (and --input-kind)
        parser.display = display = argparse.ArgumentParser(
            prog=self.prog, description=command.description,
            epilog=f"`{self.prog} --reward NAME --help` shows the arguments of model NAME's "
                   f"{'scoring' if self.registry == 'score' else 'converting'} command.")
        display.add_argument("--reward", choices=sorted(REWARD_MODELS), default=DEFAULT,
                             help=f"the reward model (default: {DEFAULT}); registered: "
                                  f"{describe_kinds(self.registry)}")
        if self.registry == "score":
            first = next(iter(commands))
            display.add_argument("--input-kind", choices=list(commands), default=first,
                                 help=f"what {cls.name} scores: {' or '.join(commands)} (default: {first})")
        command.add_arguments(display)
        return parser


class _ModelParser(argparse.ArgumentParser):
    """A model's command parser; its help and usage are those of `display` (the same arguments
    with --reward and --input-kind, which CommandParser has already taken out)."""

    display: argparse.ArgumentParser

    def format_usage(self) -> str:
        return self.display.format_usage()

    def format_help(self) -> str:
        return self.display.format_help()


def add_parsers(sub) -> None:
    sub.add_parser("convert", registry="convert", add_help=False,
                   help="convert a reward model's published checkpoint to MindSpore (--reward NAME; default: "
                        "Diffusion-RM)")
    sub.add_parser("score", registry="score", add_help=False,
                   help="score with a reward model (--reward NAME): latents from an .npz (default: Diffusion-RM), "
                        "or image files against prompts")
