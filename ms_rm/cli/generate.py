"""`ms-rm generate`: latents (and PNGs) from a diffusers SD3 / SD3.5 folder, in MindSpore."""

from __future__ import annotations

import argparse
import logging
import os

import numpy as np

from ..core.errors import InputError
from ..generators.sd3 import SD3Generator
from ..io.files import atomic_file, atomic_folder
from ..scoring.runs import read_inputs, write_npz

logger = logging.getLogger(__name__)

EMBEDS = ("prompt_embeds", "pooled_prompt_embeds")
OPTIONAL = ("negative_prompt_embeds", "negative_pooled_prompt_embeds", "noise")


def run(args: argparse.Namespace) -> int:
    generator = SD3Generator.from_pretrained(args.model, lora=args.lora, mode=args.mode)
    if args.embeds:
        if args.prompt:
            raise InputError("pass either --embeds FILE or --prompt, not both")
        arrays = read_inputs(args.embeds, EMBEDS, OPTIONAL)
    elif args.prompt:
        from ..encoders.sd3_prompts import SD3PromptEncoder

        encoder = SD3PromptEncoder.from_pretrained(args.model, max_sequence_length=args.max_sequence_length,
                                                   joint_attention_dim=generator.config.joint_attention_dim)
        ehs, pooled = encoder.encode(list(args.prompt))
        neg, neg_pooled = encoder.encode([args.negative_prompt] * len(args.prompt))
        arrays = {"prompt_embeds": ehs.asnumpy(), "pooled_prompt_embeds": pooled.asnumpy(),
                  "negative_prompt_embeds": neg.asnumpy(), "negative_pooled_prompt_embeds": neg_pooled.asnumpy()}
    else:
        raise InputError("pass --embeds FILE (prompt embeddings in an .npz) or --prompt TEXT")
    batch = arrays["prompt_embeds"].shape[0]
    noise = arrays.get("noise")
    if noise is None:
        if args.height % 16 or args.width % 16 or args.height <= 0 or args.width <= 0:
            raise InputError(f"--height and --width must be positive multiples of 16 pixels, got {args.height}x{args.width}")
        shape = (batch, generator.config.in_channels, args.height // 8, args.width // 8)
        noise = np.random.default_rng(args.seed).standard_normal(shape, dtype=np.float32)
    out = generator.generate(arrays["prompt_embeds"], arrays["pooled_prompt_embeds"], noise, args.steps, args.guidance,
                             arrays.get("negative_prompt_embeds"), arrays.get("negative_pooled_prompt_embeds"),
                             sde=args.sde, seed=args.seed, return_trajectory=args.sde, progress=not args.no_progress)
    latents = (out["latents"] if args.sde else out).asnumpy()
    result = {"latents": latents, "noise": np.asarray(noise, np.float32)}
    if args.sde:
        result["log_probs"] = np.stack([p.asnumpy() for p in out["log_probs"]], axis=1)      # (B, steps)
    write_npz(args.out, result)
    logger.info("wrote %s (latents %s)", args.out, latents.shape)
    if args.png:
        from PIL import Image

        from ..generators.sd3_vae_decoder import load_vae_decoder

        images = load_vae_decoder(args.model, mode=args.mode).to_images(latents)
        with atomic_folder(args.png, force=args.force) as folder:
            for i, image in enumerate(images):
                with atomic_file(os.path.join(folder, f"{i:04d}.png"), "wb") as f:
                    Image.fromarray(image).save(f, format="PNG")
        logger.info("wrote %d PNGs to %s", len(images), args.png)
    return 0


def add_parsers(sub) -> None:
    gen = sub.add_parser("generate", help="generate latents (and PNGs) with an SD3 / SD3.5 diffusers folder",
                         description="StableDiffusion3Pipeline's sampling in MindSpore: prompt embeddings (an .npz "
                                     "with prompt_embeds, pooled_prompt_embeds, optionally negative_prompt_embeds, "
                                     "negative_pooled_prompt_embeds and noise) or prompts (encoded with the folder's "
                                     "text encoders) -> latents in an .npz, and PNGs with --png.")
    gen.add_argument("model", help="a diffusers SD3 / SD3.5 pipeline folder (transformer/, scheduler/, vae/)")
    gen.add_argument("--embeds", help="an .npz of prompt embeddings (see above)")
    gen.add_argument("--prompt", action="append", help="a prompt (repeat for a batch); needs the text encoders")
    gen.add_argument("--negative-prompt", default="", help="with --prompt: the negative prompt (default: empty)")
    gen.add_argument("--max-sequence-length", type=int, default=256, help="with --prompt: T5 tokens")
    gen.add_argument("--out", required=True, help="output .npz: latents, noise (and log_probs with --sde)")
    gen.add_argument("--png", help="also decode with the folder's vae/ and write PNGs into this new folder")
    gen.add_argument("--force", action="store_true", help="replace an existing --png folder")
    gen.add_argument("--steps", type=int, default=28, help="inference steps (default 28)")
    gen.add_argument("--guidance", type=float, default=7.0, help="classifier-free guidance scale (default 7.0; "
                                                                 "<= 1 disables it, as the pipeline)")
    gen.add_argument("--height", type=int, default=1024, help="pixels, when the embeddings file holds no noise")
    gen.add_argument("--width", type=int, default=1024, help="pixels, when the embeddings file holds no noise")
    gen.add_argument("--seed", type=int, default=None, help="seed of the initial noise (and the SDE noise)")
    gen.add_argument("--sde", action="store_true", help="sample with Flow-GRPO's SDE step, writing log_probs")
    gen.add_argument("--lora", help="a peft adapter folder to merge into the transformer")
    gen.add_argument("--mode", choices=["graph", "pynative"], default="graph")
    gen.add_argument("--no-progress", action="store_true", help="no progress bar")
    gen.set_defaults(func=run)
