"""`ms-rm parity` / `python -m ms_rm_parity`: the parity harness from the command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import List, Optional

from .compare import format_table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--case", nargs="+", default=None, metavar="NAME",
                        help="built-in cases to run ('all' for every one; see --list)")
    parser.add_argument("--list", action="store_true", help="list the built-in cases and exit")
    parser.add_argument("--checkpoint", metavar="SRC",
                        help="a reference model directory (config.json + checkpoint/) to check against --converted")
    parser.add_argument("--config", help="with --checkpoint: the run's config.json when SRC is a checkpoint folder")
    parser.add_argument("--transformer", help="with --checkpoint: the diffusers transformer folder")
    parser.add_argument("--scheduler", help="with --checkpoint: the scheduler folder or scheduler_config.json")
    parser.add_argument("--converted", help="with --checkpoint: the folder ms-rm convert wrote")
    parser.add_argument("--inputs", help="with --checkpoint: an .npz with latents, encoder_hidden_states, "
                                         "pooled_projections [, noise]; default: random inputs")
    parser.add_argument("--u", type=float, nargs="+", default=[0.4], help="with --checkpoint: noise level(s)")
    parser.add_argument("--latent-size", type=int, nargs=2, default=[64, 64], metavar=("H", "W"),
                        help="with --checkpoint and random inputs: latent height and width")
    parser.add_argument("--text-tokens", type=int, default=333, help="with --checkpoint and random inputs")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32",
                        help="precision of the MindSpore side (default fp32)")
    parser.add_argument("--mode", choices=["graph", "pynative", "both"], default="both",
                        help="MindSpore execution mode (default: both)")
    parser.add_argument("--ms-device", default="CPU", choices=["CPU", "Ascend", "GPU"],
                        help="MindSpore device target")
    parser.add_argument("--torch-device", default="cpu", help="torch device: cpu, cuda, npu")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights, inputs and noise")
    parser.add_argument("--json", metavar="FILE", help="write every figure to FILE as JSON")


def run(args: argparse.Namespace) -> int:
    import mindspore as ms
    import torch

    from .aesthetic_parity import AESTHETIC_CASES, run_aesthetic_case
    from .cases import CASES
    from .clip_parity import CLIP_CASES, run_clip_case
    from .encoders import ENCODER_CASES, run_encoder_case
    from .flow_parity import FLOW_CASES, run_flow_case
    from .generator import GENERATOR_CASES, run_generator_case
    from .refl_parity import REFL_CASES, run_refl_case
    from .rm_train_parity import RM_TRAIN_CASES, run_rm_train_case
    from .harness import run_case, run_checkpoint
    from .hpsv2_parity import HPSV2_CASES, run_hpsv2_case
    from .imagereward import IMAGEREWARD_CASES, run_imagereward_case
    from .blip_score import BLIP_SCORE_CASES, run_blip_score_case

    # Cases outside the reward-model case table, fp32 only: name -> (description, runner).
    fp32_cases = {**{n: (d, run_encoder_case) for n, d in ENCODER_CASES.items()},
                  **{n: (d, run_generator_case) for n, d in GENERATOR_CASES.items()},
                  **{n: (d, run_flow_case) for n, d in FLOW_CASES.items()},
                  **{n: (d, run_refl_case) for n, d in REFL_CASES.items()},
                  **{n: (v[0], run_rm_train_case) for n, v in RM_TRAIN_CASES.items()},
                  **{n: (d, run_clip_case) for n, d in CLIP_CASES.items()},
                  **{n: (d, run_hpsv2_case) for n, d in HPSV2_CASES.items()},
                  **{n: (d, run_imagereward_case) for n, d in IMAGEREWARD_CASES.items()},
                  **{n: (d, run_aesthetic_case) for n, d in AESTHETIC_CASES.items()},
                  **{n: (d, run_blip_score_case) for n, d in BLIP_SCORE_CASES.items()}}
    if args.list:
        width = max(map(len, list(CASES) + list(fp32_cases)))
        for case in CASES.values():
            print(f"{case.name:<{width}}  {case.description}{'  [slow]' if case.slow else ''}")
        for name, (description, _) in fp32_cases.items():
            print(f"{name:<{width}}  {description}  [fp32]")
        return 0
    if args.torch_device == "npu":
        import torch_npu  # noqa: F401  (registers the npu device)
    ms.set_device(args.ms_device)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    modes = ["graph", "pynative"] if args.mode == "both" else [args.mode]
    if args.checkpoint:
        missing = [f"--{n}" for n in ("transformer", "scheduler", "converted") if getattr(args, n) is None]
        if missing:
            print(f"ms-rm parity: error: --checkpoint needs {', '.join(missing)}", file=sys.stderr)
            return 2
        reports = run_checkpoint(args.checkpoint, args.transformer, args.scheduler, args.converted, args.config,
                                 args.inputs, args.u, 1, tuple(args.latent_size), args.text_tokens, modes,
                                 args.dtype, args.seed, args.ms_device, args.torch_device)
    else:
        names = args.case or ["all"]
        if names == ["all"]:    # the encoder, generator and flow cases compare fp32 only
            names = list(CASES) + (list(fp32_cases) if args.dtype == "fp32" else [])
        unknown = [n for n in names if n not in CASES and n not in fp32_cases]
        if unknown:
            print(f"ms-rm parity: error: unknown cases {unknown}; see --list", file=sys.stderr)
            return 2
        if args.dtype != "fp32" and any(n in fp32_cases for n in names):
            print(f"ms-rm parity: error: the encoder, generator and flow cases {list(fp32_cases)} compare fp32 only",
                  file=sys.stderr)
            return 2
        reports = []
        for name in names:
            if name in fp32_cases:
                new = fp32_cases[name][1](name, modes, args.dtype, args.seed, args.ms_device, args.torch_device)
            else:
                new = run_case(CASES[name], modes, args.dtype, args.seed, args.ms_device, args.torch_device)
            reports += new
            for report in new:
                _print(report)
    if args.checkpoint:
        for report in reports:
            _print(report)
    failed = [f"{r.case} ({r.mode}): first divergence at '{r.first_failure}'" for r in reports if not r.passed]
    print(f"\n{len(reports) - len(failed)} passed, {len(failed)} failed")
    for line in failed:
        print(f"FAILED {line}")
    if args.json:
        from ms_rm.io.files import write_json

        write_json(args.json, {"reports": [r.to_dict() for r in reports]})
        logging.getLogger(__name__).info("wrote %s", args.json)
    return 1 if failed else 0


def _print(report) -> None:
    status = "PASS" if report.passed else f"FAIL (first divergence: {report.first_failure})"
    print(f"\n== {report.case} [{report.mode}, {report.dtype}] {status}\n   {report.description}")
    for note in report.notes:
        print(f"   {note}")
    print(format_table(report.stages))


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ms_rm_parity", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return run(args)
