"""`ms-rm generate`: latents (and PNGs) from a diffusers SD3 / SD3.5 folder, in MindSpore."""

from __future__ import annotations

import argparse
import logging
import os

import numpy as np

from ..core.errors import InputError
from ..generators.sd3_generator import SD3Generator
from ..io.files import atomic_file, atomic_folder
from ..scoring.runs import read_inputs, write_npz

logger = logging.getLogger(__name__)

EMBEDS = ("prompt_embeds", "pooled_prompt_embeds")
OPTIONAL = ("negative_prompt_embeds", "negative_pooled_prompt_embeds", "noise")


def initial_noise(batch: int, channels: int, height: int, width: int, seed) -> np.ndarray:
    """The initial noise (B, C, H/8, W/8) of `height` x `width` pixels, from `seed`."""
    if height <= 0 or width <= 0 or height % 16 or width % 16:
        raise InputError(f"--height and --width must be positive multiples of 16 pixels, got {height}x{width}")
    return np.random.default_rng(seed).standard_normal((batch, channels, height // 8, width // 8), dtype=np.float32)


def load_decoder(args: argparse.Namespace):
    """The folder's VAE decoder when --png asks for images (loaded before any generation)."""
    if not args.png:
        return None
    from ..vae.decoder import load_vae_decoder

    return load_vae_decoder(args.model, mode=args.mode)


def write_pngs(folder: str, images: np.ndarray) -> None:
    from PIL import Image

    for i, image in enumerate(images):
        with atomic_file(os.path.join(folder, f"{i:04d}.png"), "wb") as f:
            Image.fromarray(image).save(f, format="PNG")


def run(args: argparse.Namespace) -> int:
    if bool(args.embeds) == bool(args.prompt):
        raise InputError("pass either --embeds FILE (prompt embeddings in an .npz) or --prompt TEXT")
    if args.sde_type != "sde" and not args.sde:
        raise InputError(f"--sde-type {args.sde_type} chooses the stochastic step: pass --sde too")
    if args.png and os.path.exists(args.png) and not args.force:
        raise InputError(f"{args.png}: already exists; pass --force to replace it")
    arrays = read_inputs(args.embeds, EMBEDS, OPTIONAL) if args.embeds else None
    generator = SD3Generator.from_pretrained(args.model, lora=args.lora, mode=args.mode)
    decoder = load_decoder(args)
    if arrays is None:
        from ..encoders.sd3_prompts import SD3PromptEncoder

        encoder = SD3PromptEncoder.from_pretrained(args.model, max_sequence_length=args.max_sequence_length,
                                                   joint_attention_dim=generator.config.joint_attention_dim)
        ehs, pooled = encoder.encode(list(args.prompt))
        neg, neg_pooled = encoder.encode([args.negative_prompt] * len(args.prompt))
        arrays = {"prompt_embeds": ehs.asnumpy(), "pooled_prompt_embeds": pooled.asnumpy(),
                  "negative_prompt_embeds": neg.asnumpy(), "negative_pooled_prompt_embeds": neg_pooled.asnumpy()}
    batch = arrays["prompt_embeds"].shape[0]
    noise = arrays.get("noise")
    if noise is None:
        noise = initial_noise(batch, generator.config.in_channels, args.height, args.width, args.seed)
    out = generator.generate(arrays["prompt_embeds"], arrays["pooled_prompt_embeds"], noise, args.steps, args.guidance,
                             arrays.get("negative_prompt_embeds"), arrays.get("negative_pooled_prompt_embeds"),
                             sde=args.sde, seed=args.seed, return_trajectory=args.sde, progress=not args.no_progress,
                             sde_type=args.sde_type)
    latents = (out["latents"] if args.sde else out).asnumpy()
    result = {"latents": latents, "noise": np.asarray(noise, np.float32)}
    if args.sde:
        result["log_probs"] = np.stack([p.asnumpy() for p in out["log_probs"]], axis=1)      # (B, steps)
    write_npz(args.out, result)
    logger.info("wrote %s (latents %s)", args.out, latents.shape)
    if decoder is not None:
        images = decoder.to_images(latents)
        with atomic_folder(args.png, force=args.force) as folder:
            write_pngs(folder, images)
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
    gen.add_argument("--sde", action="store_true", help="sample with Flow-GRPO's stochastic step, writing log_probs")
    gen.add_argument("--sde-type", choices=["sde", "cps"], default="sde",
                     help="with --sde: Flow-GRPO's sde_type, its SDE step (default) or the CPS step")
    gen.add_argument("--lora", help="a LoRA to merge into the transformer: a peft adapter folder, a diffusers LoRA "
                                    "folder (pytorch_lora_weights.safetensors) or that .safetensors file")
    gen.add_argument("--mode", choices=["graph", "pynative"], default="graph")
    gen.add_argument("--no-progress", action="store_true", help="no progress bar")
    gen.set_defaults(func=run)
