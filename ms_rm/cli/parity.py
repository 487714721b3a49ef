"""`ms-rm parity` and `ms-rm bench`: the torch reference side.

Both live in the ms_rm_parity package (the repository's parity/ folder, installed with ms_rm);
torch, diffusers and peft come with the `reference` extra and are imported only when one of these
commands runs, so building the parser needs none of them.
"""

from __future__ import annotations

import argparse

from ..core.errors import MissingDependencyError


def _missing(command: str, error: ImportError) -> MissingDependencyError:
    return MissingDependencyError(f"ms-rm {command} needs the reference side ({error}); install it with "
                                  "pip install 'ms-rm[reference]'")


def _parity_cli():
    """ms_rm_parity.cli, imported here (lazily: ms_rm_parity imports torch when its commands run)."""
    try:
        import ms_rm_parity.cli
    except ImportError as e:
        raise _missing("parity", e) from None
    return ms_rm_parity.cli


def _bench():
    """ms_rm_parity.bench, imported here for the same reason."""
    try:
        import ms_rm_parity.bench
    except ImportError as e:
        raise _missing("bench", e) from None
    return ms_rm_parity.bench


def run_parity(args: argparse.Namespace) -> int:
    return _parity_cli().run(args)


def run_bench(args: argparse.Namespace) -> int:
    return _bench().run_command(args)


def add_parsers(sub) -> None:
    parity = sub.add_parser("parity", help="stage-by-stage parity against the torch reference",
                            description="Compare ms_rm with the torch reference stage by stage, on built-in "
                                        "tiny cases or on a user checkpoint and its conversion.")
    _parity_cli().add_arguments(parity)     # argparse only: torch comes when it runs
    parity.set_defaults(func=run_parity)

    bench = sub.add_parser("bench", help="time and memory of the reward forward against the torch reference",
                           description="Time ms_rm's reward forward (graph mode, fp32) and the torch reference "
                                       "on this machine, each in its own process: median, spread, first call, "
                                       "peak RSS, GFLOP/s against a measured matmul peak.")
    _bench().add_arguments(bench)
    bench.set_defaults(func=run_bench)
