"""`ms-rm score-images`: score image files against prompts (VAE + text encoders + reward model);
`ms-rm score-clip`: the same with a CLIP scorer (PickScore, CLIP score) from a Hugging Face folder;
`ms-rm score-imagereward`: the same with ImageReward (a folder written by ms-rm convert-imagereward);
`ms-rm score --reward blip-score`: the same with the BLIP score.

Each is also `ms-rm score --reward NAME` (diffusion-rm with --input-kind pixels, clip,
imagereward; ms_rm.cli.rewards), built from the same Command."""

from __future__ import annotations

import argparse
import tempfile
from typing import Optional

from ..core.errors import InputError
from ..core.memory import release_freed_memory
from ..encoders import SD3Encoder
from ..encoders.sd3_encoder import text_encoder_folder
from ..rewards import REWARD_MODELS
from ..rewards.diffusion_rm import DiffusionRM
from ..scoring import DiffusionRMScorer
from ..scoring.blip_score import BLIPScoreScorer
from ..scoring.clip import CLIPScorer
from ..scoring.hpsv2 import HPSv2Scorer
from ..scoring.imagereward import ImageRewardScorer
from ..scoring.runs import PromptTable, read_pairs, score_pairs, write_jsonl
from ..vae.encoder import load_vae_encoder
from .command import Command


DISTRIBUTED = True                  # under msrun: each rank scores its shard; the main rank writes


def _pairs(args: argparse.Namespace):
    """(image, prompt) pairs from --pairs, or from --image / --prompt."""
    if args.pairs:
        if args.image or args.prompt:
            raise InputError("pass either --pairs FILE or --image/--prompt, not both")
        pairs = read_pairs(args.pairs)
    else:
        if not args.image or len(args.image) != len(args.prompt or []):
            raise InputError(f"pass one --prompt per --image (got {len(args.image or [])} images and "
                             f"{len(args.prompt or [])} prompts), or --pairs FILE")
        pairs = list(zip(args.image, args.prompt))
    return pairs


def _score(scorer, pairs, args: argparse.Namespace, prompt_table: Optional[PromptTable] = None) -> int:
    """Score the pairs (each rank its shard under msrun); the main rank prints and writes them all."""
    world = args.world
    rows = score_pairs(scorer, pairs, batch_size=args.batch_size, progress=not args.no_progress and world.is_main,
                       world=world, prompt_table=prompt_table)
    if world.is_main:
        for row in rows:
            print(f"{row['score']:.6f}\t{row['image']}")
        if args.out:
            write_jsonl(args.out, rows)
    return 0


def run(args: argparse.Namespace) -> int:
    """Prompts first, then images: the distinct prompts of this rank's pairs are encoded with the
    text encoders, which are then freed; only then are the VAE and the reward model loaded, so that
    the peak memory is that of the larger stage, not of all the models together (docs/measurements.md,
    "Memory at the released size")."""
    pairs = _pairs(args)
    if args.world.size > 1 and args.sample_latents:
        raise InputError("--sample-latents draws the VAE posterior from one stream per process: not reproducible "
                         "across workers; take the posterior's mode (the default) under msrun")
    config = DiffusionRM.read_config(args.model)          # a bad model folder fails now, not after the prompts
    if len(pairs) < args.world.size:
        raise InputError(f"{len(pairs)} pairs for {args.world.size} workers: run fewer workers than pairs")
    prompts = [prompt for _, prompt in pairs[args.world.shard(len(pairs))]]
    with tempfile.TemporaryDirectory(prefix="ms_rm_prompts_") as folder:
        table = _encode_prompts(args, prompts, folder, config.backbone.joint_attention_dim)
        model = DiffusionRM.from_pretrained(args.model, mode=args.mode, verify=args.verify)
        encoder = SD3Encoder(load_vae_encoder(args.vae, mode=args.mode), None, sample=args.sample_latents,
                             seed=args.seed)
        scorer = DiffusionRMScorer(model=model, u=args.u, seed=args.seed, normalize=args.normalize,
                                   size_policy=args.size_policy, encoder=encoder)
        return _score(scorer, pairs, args, prompt_table=table)


def _encode_prompts(args: argparse.Namespace, prompts, folder: str, joint_attention_dim: int) -> PromptTable:
    """The prompts' embeddings in `folder`; the text encoders live only for this call (eager: a
    compiled mindone CLIP would keep its weights after it)."""
    from ..encoders.sd3_prompts import SD3PromptEncoder

    encoder = SD3PromptEncoder.from_pretrained(text_encoder_folder(args.vae, args.text_encoders),
                                               max_sequence_length=args.max_sequence_length, use_t5=not args.no_t5,
                                               joint_attention_dim=joint_attention_dim, mode="pynative")
    table = PromptTable.encode(encoder.encode, prompts, folder, batch_size=args.batch_size,
                               progress=not args.no_progress and args.world.is_main)
    del encoder
    release_freed_memory()                                # the text encoders' memory, before the VAE's
    return table


def run_clip(args: argparse.Namespace) -> int:
    pairs = _pairs(args)
    scorer = CLIPScorer(args.model, processor_path=args.processor, tokenizer_path=args.tokenizer,
                        image_processor_path=args.image_processor, scale=args.scale, mode=args.mode)
    return _score(scorer, pairs, args)


def run_imagereward(args: argparse.Namespace) -> int:
    pairs = _pairs(args)
    scorer = ImageRewardScorer(args.model, tokenizer=args.tokenizer, mode=args.mode, max_batch=args.batch_size)
    return _score(scorer, pairs, args)


def run_blip_score(args: argparse.Namespace) -> int:
    pairs = _pairs(args)
    scorer = BLIPScoreScorer(args.model, tokenizer=args.tokenizer, mode=args.mode, max_batch=args.batch_size)
    return _score(scorer, pairs, args)


def run_hpsv2(args: argparse.Namespace) -> int:
    pairs = _pairs(args)
    scorer = HPSv2Scorer(args.model, tokenizer_path=args.tokenizer, mode=args.mode, max_batch=args.batch_size,
                         verify=args.verify)
    return _score(scorer, pairs, args)


def run_model(args: argparse.Namespace) -> int:
    """A pixels reward model that scores (images, prompts) itself: `score(images, prompts)` of the
    model --reward names, loaded from its folder."""
    pairs = _pairs(args)
    model = REWARD_MODELS[args.reward].from_pretrained(args.model, mode=args.mode, verify=args.verify)
    return _score(model.score, pairs, args)


def _add_pair_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image", action="append", help="an image file (repeat, with one --prompt each)")
    parser.add_argument("--prompt", action="append", help="the prompt of the --image at the same position")
    parser.add_argument("--pairs", help="a .csv (columns image,prompt) or .jsonl of pairs instead")
    parser.add_argument("--out", help="also write {image, prompt, score} per line to this .jsonl")
    parser.add_argument("--batch-size", type=int, default=8, help="images scored at a time")
    parser.add_argument("--mode", choices=["graph", "pynative"], default="graph")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_images_arguments(images: argparse.ArgumentParser) -> None:
    images.add_argument("model", help="a folder written by ms-rm convert")
    images.add_argument("--vae", required=True, help="diffusers vae/ folder (or the SD3 pipeline folder)")
    images.add_argument("--text-encoders", help="SD3 pipeline folder with text_encoder, text_encoder_2, "
                                                "text_encoder_3 and the tokenizers (default: beside --vae)")
    _add_pair_arguments(images)
    images.add_argument("--u", type=float, default=None,
                        help="noise level (default 0.1, the recommended level for clean images, sigma convention)")
    images.add_argument("--seed", type=int, default=None, help="seed of the noise, each pair's from (seed, its index) "
                                                                "(default: fresh, as the reference)")
    images.add_argument("--size-policy", choices=["crop", "resize", "bucket", "error"], default="crop",
                        help="fit sizes to multiples of 16 px by center crop (default) or resize, resize to the "
                             "nearest multiple of 64 px (bucket: one compiled graph per bucket), or refuse")
    images.add_argument("--normalize", choices=["none", "reference", "flow-grpo-ms"], default="none",
                        help="score scale: raw (default), (raw + 10) / 10, or raw / 5")
    images.add_argument("--max-sequence-length", type=int, default=128, help="T5 tokens (128 as the release)")
    images.add_argument("--no-t5", action="store_true", help="leave T5 out (zeros in its place, as diffusers)")
    images.add_argument("--sample-latents", action="store_true",
                        help="sample the VAE posterior (with --seed) instead of taking its mode")
    images.add_argument("--verify", action="store_true", help="check the model files' sha256 first")


def _add_clip_arguments(clip: argparse.ArgumentParser) -> None:
    clip.add_argument("model", help="a Hugging Face CLIPModel folder (config.json + model.safetensors)")
    clip.add_argument("--processor", help="folder with vocab.json, merges.txt and preprocessor_config.json "
                                          "(default: the model folder)")
    clip.add_argument("--tokenizer", help="folder with vocab.json and merges.txt, when the tokenizer has a folder "
                                          "of its own (CLIPTokenizer.save_pretrained)")
    clip.add_argument("--image-processor", help="folder with preprocessor_config.json, when the image processor has "
                                                "a folder of its own (CLIPImageProcessor.save_pretrained)")
    clip.add_argument("--scale", choices=["cosine", "logit"], default="cosine",
                      help="cosine of the embeddings (default) or exp(logit_scale) x cosine (original PickScore)")
    _add_pair_arguments(clip)


def _add_imagereward_arguments(ir: argparse.ArgumentParser) -> None:
    ir.add_argument("model", help="a folder written by ms-rm convert-imagereward")
    ir.add_argument("--tokenizer", required=True,
                    help="folder with bert-base-uncased's vocab.txt (ImageReward's tokenizer; nothing is downloaded)")
    _add_pair_arguments(ir)


def _add_blip_score_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a folder written by ms-rm convert --reward blip-score")
    parser.add_argument("--tokenizer", required=True,
                        help="folder with bert-base-uncased's vocab.txt (BLIP's tokenizer; nothing is downloaded)")
    _add_pair_arguments(parser)


def _add_hpsv2_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a folder written by ms-rm convert --reward hpsv2")
    parser.add_argument("--tokenizer", help="CLIP's bpe_simple_vocab_16e6.txt.gz (open_clip's), a CLIP tokenizer's "
                                            "merges.txt, or a folder with either (default: the model folder)")
    _add_pair_arguments(parser)
    parser.add_argument("--verify", action="store_true", help="check the model files' sha256 first")


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="the model's folder (as ms-rm convert --reward NAME writes it)")
    _add_pair_arguments(parser)
    parser.add_argument("--verify", action="store_true", help="check the model files' sha256 first")


IMAGES = Command(
    help="score image files against prompts (VAE + text encoders + reward model)",
    description="Encode images with the SD3 VAE and prompts with SD3's text encoders, in MindSpore, and score them "
                "with a converted Diffusion-RM. One score per pair on stdout (score, image).",
    add_arguments=_add_images_arguments, run=run)
CLIP = Command(
    help="score image files against prompts with PickScore / CLIP score",
    description="Score image files against prompts with a Hugging Face CLIPModel folder (PickScore, CLIP) in "
                "MindSpore. One score per pair on stdout (score, image).",
    add_arguments=_add_clip_arguments, run=run_clip)
IMAGEREWARD = Command(
    help="score image files against prompts with ImageReward",
    description="Score image files against prompts with ImageReward in MindSpore (the package's preprocessing and "
                "BLIP tokenizer). One score per pair on stdout (score, image).",
    add_arguments=_add_imagereward_arguments, run=run_imagereward)

BLIP_SCORE = Command(
    help="score image files against prompts with the BLIP score",
    description="Score image files against prompts with the BLIP score (the image-reward package's BLIPScore: the "
                "cosine of BLIP's image and text features) in MindSpore. One score per pair on stdout (score, image).",
    add_arguments=_add_blip_score_arguments, run=run_blip_score)
HPSV2 = Command(
    help="score image files against prompts with HPSv2",
    description="Score image files against prompts with HPSv2 (a folder ms-rm convert --reward hpsv2 wrote) in "
                "MindSpore: hpsv2's preprocess_val and open_clip's tokenizer. One score per pair on stdout "
                "(score, image).",
    add_arguments=_add_hpsv2_arguments, run=run_hpsv2)


def pixels_command(cls) -> Command:
    """The image-scoring command of a registered pixels model that scores (images, prompts) itself."""
    return Command(
        help=f"score image files against prompts with {cls.__name__}",
        description=f"Score image files against prompts with the registered reward model '{cls.name}' "
                    f"({cls.__name__}.score(images, prompts)). One score per pair on stdout (score, image).",
        add_arguments=_add_model_arguments, run=run_model)


def add_parsers(sub) -> None:
    """The per-model names of `ms-rm score --reward NAME --input-kind pixels` (ms_rm.cli.rewards)."""
    IMAGES.add_to(sub, "score-images")
    CLIP.add_to(sub, "score-clip")
    IMAGEREWARD.add_to(sub, "score-imagereward")
