"""`ms-rm`: the command-line interface, one module per subcommand, each a thin layer over the library.

Errors that ms_rm raises on purpose print as one line on stderr with exit status 2; --debug
shows the traceback instead. Under msrun every subcommand joins the job first (ms_rm.core.distributed);
`score`, `score-images`, `score-clip`, `score-imagereward` and `eval` shard their samples, `refl`
and `train-rm` train data-parallel.

`score` and `convert` take `--reward NAME`, any model of the registry (ms_rm.rewards.REWARD_MODELS;
ms_rm.cli.rewards): a newly registered model gets both commands without a change here.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import List, Optional

from . import convert, demo, evaluate, flow, generate, parity, refl, rewards, score_images, search, train_rm
from .rewards import CommandParser

# each: add_parsers(subparsers); rewards: `score` and `convert` over the reward-model registry
SUBCOMMANDS = (demo, rewards, convert, score_images, evaluate, generate, refl, train_rm, search, flow, parity)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ms-rm", description="MindSpore reward models for diffusion generators.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")
    parser.add_argument("--device", default="CPU", choices=["CPU", "Ascend", "GPU"],
                        help="MindSpore device target (default: CPU)")
    parser.add_argument("--compile-cache", metavar="DIR", default=os.environ.get("MS_RM_COMPILE_CACHE") or None,
                        help="keep compiled graphs in DIR for later runs of the same shapes (default: "
                             "$MS_RM_COMPILE_CACHE; none)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=CommandParser)
    for module in SUBCOMMANDS:
        module.add_parsers(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    import mindspore as ms

    from ..core.compile_cache import use_compile_cache
    from ..core.distributed import init_world
    from ..core.errors import ConfigError, MsRmError

    ms.set_device(args.device)
    use_compile_cache(args.compile_cache)
    args.world = init_world()              # under msrun: join the job first (its scheduler process stays there)
    level = logging.DEBUG if args.debug else logging.INFO if args.world.is_main else logging.WARNING
    prefix = f"[rank {args.world.rank}] " if args.world.size > 1 else ""
    logging.basicConfig(level=level, format=f"{prefix}%(levelname)s %(name)s: %(message)s")
    try:
        if args.world.size > 1 and not getattr(sys.modules[args.func.__module__], "DISTRIBUTED", False):
            raise ConfigError(f"ms-rm {args.command} runs in one process; under msrun only score, score-images, "
                              "score-clip, eval, refl and train-rm split their work")
        return args.func(args)
    except MsRmError as e:
        if args.debug:
            raise
        print(f"ms-rm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
