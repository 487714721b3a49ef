"""`ms-rm`: the command-line interface, one module per subcommand, each a thin layer over the library.

Errors that ms_rm raises on purpose print as one line on stderr with exit status 2; --debug
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional

from . import convert, demo, flow, generate, parity, refl, score, score_images, search

SUBCOMMANDS = (demo, convert, score, score_images, generate, refl, search, flow, parity)    # each: add_parsers(subparsers)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ms-rm", description="MindSpore reward models for diffusion generators.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")
    parser.add_argument("--device", default="CPU", choices=["CPU", "Ascend", "GPU"],
                        help="MindSpore device target (default: CPU)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in SUBCOMMANDS:
        module.add_parsers(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    import mindspore as ms

    from ..core.errors import MsRmError

    ms.set_device(args.device)
    try:
        return args.func(args)
    except MsRmError as e:
        if args.debug:
            raise
        print(f"ms-rm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
