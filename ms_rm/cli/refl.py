"""`ms-rm refl`: reward-feedback (ReFL) fine-tuning of an SD3 / SD3.5 LoRA with a Diffusion-RM on latents,
or with ImageReward on decoded pixels (--reward-kind imagereward), resumable."""

from __future__ import annotations

import argparse
import logging
import os

import numpy as np

from ..core.errors import InputError
from ..generators.sd3_generator import SD3Generator
from ..io.files import read_config_file
from ..rewards.diffusion_rm import DiffusionRM
from ..scoring.runs import read_inputs
from ..training.refl import PixelReFLObjective, ReFLSettings, train_refl

logger = logging.getLogger(__name__)

DISTRIBUTED = True                  # under msrun: data parallel (each rank its share of every batch)

EMBEDS = ("prompt_embeds", "pooled_prompt_embeds")
NEGATIVES = ("negative_prompt_embeds", "negative_pooled_prompt_embeds")
PRETRAIN = ("latents", "prompt_embeds", "pooled_prompt_embeds")


def read_prompts(path: str):
    try:
        prompts = [line.strip() for line in open(path, encoding="utf-8") if line.strip()]
    except OSError as e:
        raise InputError(f"{path}: cannot read the prompts file ({e.strerror})") from None
    if not prompts:
        raise InputError(f"{path}: no prompts (one prompt a line)")
    return prompts


def read_pool(args: argparse.Namespace):
    """The --embeds arrays (prompt pool, negatives), checked against each other; None with --prompts
    alone. With ImageReward, --embeds may come with --prompts: the texts of its rows, for its tokens."""
    both_ok = args.reward_kind == "imagereward" and args.embeds and args.prompts
    if not both_ok and bool(args.embeds) == bool(args.prompts):
        raise InputError("pass either --embeds FILE (.npz of prompt embeddings) or --prompts FILE (one prompt a line)")
    if not args.embeds:
        return None
    arrays = read_inputs(args.embeds, EMBEDS, NEGATIVES)
    ehs, pooled = arrays["prompt_embeds"], arrays["pooled_prompt_embeds"]
    if ehs.ndim != 3 or pooled.ndim != 2 or ehs.shape[0] != pooled.shape[0]:
        raise InputError(f"{args.embeds}: prompt_embeds (N, T, D) and pooled_prompt_embeds (N, P) must hold the same "
                         f"N prompts, got {ehs.shape} and {pooled.shape}")
    if (NEGATIVES[0] in arrays) != (NEGATIVES[1] in arrays):
        raise InputError(f"{args.embeds}: holds one of {list(NEGATIVES)}: give both or neither")
    if NEGATIVES[0] not in arrays:
        if args.guidance > 1:
            raise InputError(f"{args.embeds}: guidance {args.guidance} needs the negative prompt's embeddings "
                             f"({' and '.join(NEGATIVES)}, the encoded \"\" by default); add them, or pass --guidance 1")
        arrays[NEGATIVES[0]], arrays[NEGATIVES[1]] = np.zeros_like(ehs[:1]), np.zeros_like(pooled[:1])
    neg, neg_pooled = arrays[NEGATIVES[0]], arrays[NEGATIVES[1]]
    if neg.shape[1:] != ehs.shape[1:] or neg_pooled.shape[1:] != pooled.shape[1:] or neg.shape[0] not in (1, ehs.shape[0]):
        raise InputError(f"{args.embeds}: the negative embeddings {neg.shape} / {neg_pooled.shape} must be one row, or "
                         f"one per prompt, shaped as the prompts' {ehs.shape[1:]} / {pooled.shape[1:]}")
    return ehs, pooled, neg, neg_pooled


def read_pretrain(args: argparse.Namespace):
    """The --pretrain arrays (clean latents and their prompts' embeddings), checked; None without it."""
    if not args.pretrain:
        if args.pretrain_weight:
            raise InputError("--pretrain-weight needs --pretrain FILE (clean latents and their prompt embeddings)")
        return None
    if args.pretrain_weight <= 0:
        raise InputError("--pretrain FILE needs a positive --pretrain-weight")
    arrays = read_inputs(args.pretrain, PRETRAIN, ())
    latents, ehs, pooled = (arrays[k] for k in PRETRAIN)
    if latents.ndim != 4 or not latents.shape[0] == ehs.shape[0] == pooled.shape[0]:
        raise InputError(f"{args.pretrain}: latents (M, C, H, W), prompt_embeds (M, T, D) and pooled_prompt_embeds "
                         f"(M, P) must hold the same M samples, got {latents.shape}, {ehs.shape}, {pooled.shape}")
    return latents, ehs, pooled


def encode_pool(args: argparse.Namespace, generator: SD3Generator):
    """The --prompts file encoded with the folder's text encoders: (embeds, pooled, negative, negative pooled)."""
    from ..encoders.sd3_prompts import SD3PromptEncoder

    prompts = read_prompts(args.prompts)
    encoder = SD3PromptEncoder.from_pretrained(args.model, max_sequence_length=args.max_sequence_length,
                                               joint_attention_dim=generator.config.joint_attention_dim)
    ehs, pooled = (t.asnumpy() for t in encoder.encode(prompts))
    neg, neg_pooled = (t.asnumpy() for t in encoder.encode([args.negative_prompt]))
    return ehs, pooled, neg, neg_pooled


def run(args: argparse.Namespace) -> int:
    if args.height % 16 or args.width % 16 or args.height <= 0 or args.width <= 0:
        raise InputError(f"--height and --width must be positive multiples of 16 pixels, got {args.height}x{args.width}")
    if os.path.exists(args.out) and not (args.resume or args.force):
        raise InputError(f"{args.out}: already exists; pass --resume to continue that run or --force to start anew")
    pool, pretrain = read_pool(args), read_pretrain(args)
    if args.resume:
        adapter = read_config_file(os.path.join(args.out, "adapter_config.json"))
        lora = (adapter["r"], adapter["lora_alpha"], adapter["target_modules"])
        generator = SD3Generator.from_pretrained(args.model, lora=args.out, lora_mode="train", mode=args.mode)
    else:
        lora = (args.rank, args.alpha, args.targets)
        generator = SD3Generator.from_pretrained(args.model, mode=args.mode)
        generator.add_lora(args.rank, args.alpha, args.targets, seed=args.seed)
    pool = pool if pool is not None else encode_pool(args, generator)
    config = generator.config
    widths = {"prompt embeddings": (pool[0].shape[-1], config.joint_attention_dim),
              "pooled embeddings": (pool[1].shape[-1], config.pooled_projection_dim)}
    if pretrain is not None:
        widths["pretrain latent channels"] = (pretrain[0].shape[1], config.in_channels)
    wrong = [f"{what} {have} (the transformer takes {want})" for what, (have, want) in widths.items() if have != want]
    if wrong:
        raise InputError(f"{args.model}: " + "; ".join(wrong))
    ehs, pooled, neg, neg_pooled = pool
    if neg.shape[0] == 1:                                 # one negative for every prompt
        neg, neg_pooled = np.repeat(neg, ehs.shape[0], axis=0), np.repeat(neg_pooled, ehs.shape[0], axis=0)
    reward_model = (pixel_objective(args, generator, ehs.shape[0]) if args.reward_kind == "imagereward"
                    else DiffusionRM.from_pretrained(args.reward, mode=args.mode))
    settings = ReFLSettings(steps=args.steps, batch_size=args.batch_size, grad_accumulation=args.grad_accumulation,
                            num_inference_steps=args.num_inference_steps, step_range=tuple(args.step_range),
                            guidance_scale=args.guidance, lr=args.lr, u=args.u, seed=args.seed,
                            checkpoint_every=args.checkpoint_every, pretrain_weight=args.pretrain_weight)
    history = train_refl(generator, reward_model, ehs, pooled, neg, neg_pooled, settings, args.out, lora,
                         latent_hw=(args.height // 8, args.width // 8), progress=not args.no_progress,
                         resume=args.resume, pretrain_data=pretrain, world=args.world, force=args.force)
    last = history[-min(len(history), 10):]
    logger.info("mean reward of the last %d steps: %.4f; LoRA (peft) and run state in %s", len(last),
                float(np.mean([h["mean_reward"] for h in last])), args.out)
    return 0


def pixel_objective(args: argparse.Namespace, generator: SD3Generator, count: int) -> PixelReFLObjective:
    """ImageReward's pixel ReFL: the pipeline's (or --vae's) decoder, ImageReward from --reward, the
    pool's prompts tokenized with --tokenizer."""
    from ..vae.decoder import load_vae_decoder
    from ..rewards.imagereward import ImageReward, ImageRewardTokenizer

    if not args.prompts:
        raise InputError("--reward-kind imagereward needs --prompts FILE: the pool's prompts, which ImageReward reads "
                         "(with --embeds: the texts of its rows, in order)")
    if not args.tokenizer:
        raise InputError("--reward-kind imagereward needs --tokenizer: the folder of bert-base-uncased's vocab.txt")
    prompts = read_prompts(args.prompts)
    if len(prompts) != count:
        raise InputError(f"{args.prompts}: {len(prompts)} prompts for the {count} rows of {args.embeds}: "
                         "one prompt per row")
    model = ImageReward.from_pretrained(args.reward, mode=args.mode)
    ids, mask = ImageRewardTokenizer(args.tokenizer, model.config.max_length)(prompts)
    vae = load_vae_decoder(args.vae or args.model, mode=args.mode)
    return PixelReFLObjective(generator, vae, model, grad_scale=args.grad_scale, input_ids=ids, attention_mask=mask)


def add_parsers(sub) -> None:
    p = sub.add_parser("refl", help="ReFL fine-tuning of an SD3 / SD3.5 LoRA with a Diffusion-RM or ImageReward "
                                       "(resumable)",
                       description="The reference recipe's reward-feedback fine-tuning on latents: per step, sample "
                                   "without gradient to a step k in --step-range, one gradient-carrying transformer "
                                   "call, x0_hat = x_t - sigma v, loss 2 - mean(Diffusion-RM reward of x0_hat) "
                                   "(+ --pretrain-weight x the flow-matching loss on --pretrain latents), Adam on the "
                                   "LoRA. Writes a run folder: the LoRA as a peft adapter, the optimizer state and "
                                   "state.json; --resume continues it (with the same reward flags). --reward-kind "
                                   "imagereward: ImageReward's own ReFL on pixels instead: x0_hat decoded by the VAE, "
                                   "(image / 2 + 0.5) clamped to [0, 1], loss relu(2 - ImageReward).mean() x "
                                   "--grad-scale.")
    p.add_argument("model", help="a diffusers SD3 / SD3.5 pipeline folder (transformer/, scheduler/; text encoders "
                                 "for --prompts)")
    p.add_argument("--reward", required=True, help="a Diffusion-RM folder written by ms-rm convert (or, with "
                                                   "--reward-kind imagereward, by ms-rm convert-imagereward)")
    p.add_argument("--reward-kind", choices=["diffusion-rm", "imagereward"], default="diffusion-rm",
                   help="diffusion-rm: latent ReFL, loss 2 - mean(reward of x0_hat) (default); imagereward: "
                        "ImageReward's pixel ReFL, loss relu(2 - reward of the decoded x0_hat).mean() x --grad-scale")
    p.add_argument("--tokenizer", help="imagereward: folder of bert-base-uncased's vocab.txt")
    p.add_argument("--vae", help="imagereward: diffusers vae/ folder (default: the pipeline's)")
    p.add_argument("--grad-scale", type=float, default=1e-3, help="imagereward: the loss scale (the package's 1e-3)")
    p.add_argument("--out", required=True, help="the run folder (peft adapter + optimizer.safetensors + state.json)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out (same settings; --steps may grow)")
    p.add_argument("--force", action="store_true", help="replace an existing --out and start anew")
    p.add_argument("--embeds", help=".npz: prompt_embeds, pooled_prompt_embeds (and the negative_ pair, needed with "
                                    "--guidance > 1)")
    p.add_argument("--prompts", help="a text file, one prompt a line, encoded with the folder's text encoders")
    p.add_argument("--negative-prompt", default="", help="with --prompts (default: empty)")
    p.add_argument("--max-sequence-length", type=int, default=256, help="with --prompts: T5 tokens")
    p.add_argument("--rank", type=int, default=32, help="LoRA rank (a new run)")
    p.add_argument("--alpha", type=float, default=64, help="LoRA alpha (a new run)")
    p.add_argument("--targets", nargs="+", default=["to_q", "to_k", "to_v", "to_out.0"],
                   help="LoRA target modules, peft's rule (a new run)")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps in all (default 100)")
    p.add_argument("--batch-size", type=int, default=2, help="prompts per step (default 2)")
    p.add_argument("--grad-accumulation", type=int, default=1)
    p.add_argument("--num-inference-steps", type=int, default=40, help="sampler steps (the reference: 40)")
    p.add_argument("--step-range", type=int, nargs=2, default=[30, 39], metavar=("LOW", "HIGH"),
                   help="the step k carrying the gradient, inclusive (the reference: 30 39)")
    p.add_argument("--guidance", type=float, default=4.5, help="classifier-free guidance of the sampling")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--u", type=float, default=0.4, help="the reward model's noise level (its u convention)")
    p.add_argument("--height", type=int, default=512, help="pixels")
    p.add_argument("--width", type=int, default=512, help="pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=0, help="steps between checkpoints (0: at the end)")
    p.add_argument("--pretrain", help=".npz of clean latents, prompt_embeds, pooled_prompt_embeds for the "
                                      "pretraining term")
    p.add_argument("--pretrain-weight", type=float, default=0.0, help="weight of the pretraining term (0: off)")
    p.add_argument("--mode", choices=["graph", "pynative"], default="graph")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
