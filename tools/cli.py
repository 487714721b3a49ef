"""`ms-rm`: the command-line interface. Each subcommand is a thin wrapper over library code.

Errors that ms_rm raises on purpose print as one line on stderr with exit status 2; --debug
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional

logger = logging.getLogger("ms_rm.cli")


def _cmd_demo(args: argparse.Namespace) -> int:
    from ms_rm.demo import run_demo

    rows = run_demo(us=args.u, batch=args.batch, seed=args.seed, mode=args.mode)
    print(f"Tiny random SD3.5-style Diffusion-RM ({args.mode} mode), {args.batch} random latents 16x32x32")
    print(f"{'u':>5} {'sigma':>8} {'seconds':>8}  reward per sample")
    for row in rows:
        rewards = "  ".join(f"{r:+.6f}" for r in row["reward"])
        print(f"{row['u']:>5.2f} {row['sigma']:>8.4f} {row['seconds']:>8.3f}  {rewards}")
    print("(the first call compiles the graph; later calls reuse it)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ms-rm", description="MindSpore Diffusion-RM tools.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")
    parser.add_argument("--device", default="CPU", choices=["CPU", "Ascend", "GPU"],
                        help="MindSpore device target (default: CPU)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="reward from a tiny model built on the spot (no downloads)",
                          description="Build a tiny random SD3.5-style Diffusion-RM and print rewards.")
    demo.add_argument("--u", type=float, nargs="+", default=[0.1, 0.4, 0.9], help="noise levels")
    demo.add_argument("--batch", type=int, default=2)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--mode", choices=["graph", "pynative"], default="graph")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    import mindspore as ms

    from ms_rm.errors import MsRmError

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
