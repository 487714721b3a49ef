"""The launcher, `python -m ms_rm.integrations.flow_grpo --scorer-config F -- SCRIPT ARGS`: registers
ms_rm's scorers with Flow-GRPO-MS, then runs SCRIPT as `python SCRIPT ARGS` would.

It lives outside the package's `__init__`, which `python -m` never runs as `__main__`: a trainer's
`from ms_rm.integrations.flow_grpo import with_latents` and the classes `register()` creates come
from the one imported module, so a `with_latents(...)` batch is the `LatentBatch` the scorers test for.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
from typing import Optional, Sequence

from ...core.errors import MsRmError
from ...io.files import read_config_file
from . import register

PROG = "python -m ms_rm.integrations.flow_grpo"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Register ms_rm's scorers with Flow-GRPO-MS (names ms-rm-sd3, ms-rm-flux, ...), then run a "
                    "Flow-GRPO-MS script unchanged with its own arguments.",
        epilog=f"example: {PROG} --scorer-config ms_rm_scorers.yaml -- scripts/train_sd3.py --reward ms-rm-sd3 ...")
    parser.add_argument("--scorer-config", help="YAML/JSON file: {ms-rm-sd3: {checkpoint_path: ..., u: ..., "
                                                "u_convention: ...}, ...}, the defaults of each registered scorer")
    parser.add_argument("script", help="the Flow-GRPO-MS script to run (e.g. scripts/train_sd3.py)")
    parser.add_argument("script_args", nargs=argparse.REMAINDER, help="its arguments")
    args = parser.parse_args(argv)
    configs = read_config_file(args.scorer_config) if args.scorer_config else {}
    if not os.path.isfile(args.script):
        parser.error(f"{args.script}: no such script")
    script_dir = os.path.dirname(os.path.abspath(args.script))
    sys.path.insert(0, script_dir)                       # as `python script.py` would
    try:
        register(configs)
    except MsRmError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    script_args = args.script_args[1:] if args.script_args[:1] == ["--"] else args.script_args
    sys.argv = [args.script] + list(script_args)
    runpy.run_path(args.script, run_name="__main__")
    return 0
