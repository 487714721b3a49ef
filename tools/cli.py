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
    from ms_rm.demo import noise_spread, run_demo

    if args.spread:
        print("Score spread across noise draws (tiny random model, one sample, 32 repetitions):")
        print(f"{'u':>5} {'k':>3} {'mean':>9} {'std':>9}")
        for row in noise_spread():
            print(f"{row['u']:>5.2f} {row['k']:>3} {row['mean']:>+9.5f} {row['std']:>9.5f}")
        return 0

    rows = run_demo(us=args.u, batch=args.batch, seed=args.seed, mode=args.mode)
    print(f"Tiny random SD3.5-style Diffusion-RM ({args.mode} mode), {args.batch} random latents 16x32x32")
    print(f"{'u':>5} {'sigma':>8} {'seconds':>8}  reward per sample")
    for row in rows:
        rewards = "  ".join(f"{r:+.6f}" for r in row["reward"])
        print(f"{row['u']:>5.2f} {row['sigma']:>8.4f} {row['seconds']:>8.3f}  {rewards}")
    print("(the first call compiles the graph; later calls reuse it)")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from ms_rm.checkpoint import convert

    out = convert(args.src, args.transformer, args.scheduler, args.out, config=args.config, dtype=args.dtype,
                  u_convention=args.u_convention, force=args.force, progress=not args.no_progress)
    print(out)
    return 0


def _cmd_score(args: argparse.Namespace) -> int:
    from ms_rm import DiffusionRM
    from ms_rm.score import read_inputs, score_arrays, write_npz

    arrays = read_inputs(args.inputs)
    model = DiffusionRM.from_pretrained(args.model, mode=args.mode, verify=args.verify)
    result = score_arrays(model, arrays, args.u if len(args.u) > 1 else args.u[0], args.seed, args.features)
    write_npz(args.out, result)
    for i, value in enumerate(result["reward"][:, 0]):
        print(f"{i}\t{value:.6f}")
    return 0


def _cmd_score_images(args: argparse.Namespace) -> int:
    from ms_rm import DiffusionRM
    from ms_rm.encoders import SD3Encoder
    from ms_rm.errors import InputError
    from ms_rm.score_images import DEFAULT_IMAGE_U, read_pairs, score_pairs, write_jsonl
    from ms_rm.scorers import DiffusionRMScorer

    if args.pairs:
        if args.image or args.prompt:
            raise InputError("pass either --pairs FILE or --image/--prompt, not both")
        pairs = read_pairs(args.pairs)
    else:
        if not args.image or len(args.image) != len(args.prompt or []):
            raise InputError(f"pass one --prompt per --image (got {len(args.image or [])} images and "
                             f"{len(args.prompt or [])} prompts), or --pairs FILE")
        pairs = list(zip(args.image, args.prompt))
    model = DiffusionRM.from_pretrained(args.model, mode=args.mode, verify=args.verify)
    u = args.u
    if u is None:
        convention = model.config.u_convention
        if convention not in DEFAULT_IMAGE_U:
            raise InputError(f"this model uses the '{convention}' u convention: pass --u explicitly")
        u = DEFAULT_IMAGE_U[convention]
    encoder = SD3Encoder.from_pretrained(args.vae, args.text_encoders, max_sequence_length=args.max_sequence_length,
                                         use_t5=not args.no_t5, joint_attention_dim=model.config.backbone.joint_attention_dim,
                                         mode=args.mode, sample=args.sample_latents, seed=args.seed)
    scorer = DiffusionRMScorer(model=model, u=u, seed=args.seed, normalize=args.normalize,
                               size_policy=args.size_policy, encoder=encoder)
    rows = []
    for row in score_pairs(scorer, pairs, batch_size=args.batch_size, progress=not args.no_progress):
        rows.append(row)
        print(f"{row['score']:.6f}\t{row['image']}")
    if args.out:
        write_jsonl(args.out, rows)
    return 0


def _cmd_parity(args: argparse.Namespace) -> int:
    try:
        from parity.cli import run
    except ImportError as e:
        from ms_rm.errors import MissingDependencyError

        raise MissingDependencyError(f"ms-rm parity needs the reference side ({e}); install it with "
                                     "pip install 'ms-rm[reference]'") from None
    return run(args)


def _cmd_bench(args: argparse.Namespace) -> int:
    try:
        from parity.bench import run_command
    except ImportError as e:
        from ms_rm.errors import MissingDependencyError

        raise MissingDependencyError(f"ms-rm bench needs the reference side ({e}); install it with "
                                     "pip install 'ms-rm[reference]'") from None
    return run_command(args)


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
    demo.add_argument("--spread", action="store_true",
                      help="instead: how much the score moves with the noise, averaging k = 1, 4, 16 draws")
    demo.set_defaults(func=_cmd_demo)

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
    conv.add_argument("--force", action="store_true", help="replace an existing output folder")
    conv.add_argument("--no-progress", action="store_true", help="no progress bars")
    conv.set_defaults(func=_cmd_convert)

    score = sub.add_parser("score", help="score latents from an .npz file with a converted model",
                           description="Score latents (latents, encoder_hidden_states, pooled_projections "
                                       "[, noise] in an .npz) and write reward (and features) to an .npz.")
    score.add_argument("model", help="a folder written by ms-rm convert")
    score.add_argument("--inputs", required=True, help="input .npz")
    score.add_argument("--u", type=float, nargs="+", required=True, help="noise level, or one per sample")
    score.add_argument("--out", required=True, help="output .npz")
    score.add_argument("--seed", type=int, default=None, help="noise seed when the inputs hold no noise")
    score.add_argument("--features", action="store_true", help="also write temb, the taps and raw")
    score.add_argument("--verify", action="store_true", help="check the model files' sha256 first")
    score.add_argument("--mode", choices=["graph", "pynative"], default="graph")
    score.set_defaults(func=_cmd_score)

    images = sub.add_parser(
        "score-images", help="score image files against prompts (VAE + text encoders + reward model)",
        description="Encode images with the SD3 VAE and prompts with SD3's text encoders, in MindSpore, and "
                    "score them with a converted Diffusion-RM. One score per pair on stdout (score, image).")
    images.add_argument("model", help="a folder written by ms-rm convert")
    images.add_argument("--vae", required=True, help="diffusers vae/ folder (or the SD3 pipeline folder)")
    images.add_argument("--text-encoders", help="SD3 pipeline folder with text_encoder, text_encoder_2, "
                                                "text_encoder_3 and the tokenizers (default: beside --vae)")
    images.add_argument("--image", action="append", help="an image file (repeat, with one --prompt each)")
    images.add_argument("--prompt", action="append", help="the prompt of the --image at the same position")
    images.add_argument("--pairs", help="a .csv (columns image,prompt) or .jsonl of pairs instead")
    images.add_argument("--out", help="also write {image, prompt, score} per line to this .jsonl")
    images.add_argument("--u", type=float, default=None,
                        help="noise level (default 0.1, the recommended level for clean images, sigma convention)")
    images.add_argument("--seed", type=int, default=None, help="seed of the noise (default: fresh, as the reference)")
    images.add_argument("--size-policy", choices=["crop", "resize", "error"], default="crop",
                        help="fit sizes to multiples of 16 px by center crop (default), resize, or refuse")
    images.add_argument("--normalize", choices=["none", "reference", "flow-grpo-ms"], default="none",
                        help="score scale: raw (default), (raw + 10) / 10, or raw / 5")
    images.add_argument("--max-sequence-length", type=int, default=128, help="T5 tokens (128 as the release)")
    images.add_argument("--no-t5", action="store_true", help="leave T5 out (zeros in its place, as diffusers)")
    images.add_argument("--sample-latents", action="store_true",
                        help="sample the VAE posterior (with --seed) instead of taking its mode")
    images.add_argument("--batch-size", type=int, default=8, help="images encoded and scored at a time")
    images.add_argument("--verify", action="store_true", help="check the model files' sha256 first")
    images.add_argument("--mode", choices=["graph", "pynative"], default="graph")
    images.add_argument("--no-progress", action="store_true", help="no progress bar")
    images.set_defaults(func=_cmd_score_images)

    parity = sub.add_parser("parity", help="stage-by-stage parity against the torch reference",
                            description="Compare ms_rm with the torch reference stage by stage, on built-in "
                                        "tiny cases or on a user checkpoint and its conversion.")
    from parity.cli import add_arguments   # argparse only: torch is imported when the command runs

    add_arguments(parity)
    parity.set_defaults(func=_cmd_parity)

    from parity.bench import add_arguments as add_bench_arguments

    bench = sub.add_parser("bench", help="time and memory of the reward forward against the torch reference",
                           description="Time ms_rm's reward forward (graph mode, fp32) and the torch reference "
                                       "on this machine, each in its own process: median, spread, first call, "
                                       "peak RSS, GFLOP/s against a measured matmul peak.")
    add_bench_arguments(bench)
    bench.set_defaults(func=_cmd_bench)
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
