"""A synthetic reference checkpoint at real size, and a measured conversion of it.

    python -m ms_rm_parity.synthetic --out DIR [--family sd3|flux|zimage] [--convert]

--score-images: the SD3.5-M reward model, converted, and SD3.5-M's text encoders and VAE at full
size (write_sd3_encoders), then `ms-rm score-images` of one 1024 x 1024 image, measured.

sd3 (default): DIR/transformer holds all 24 blocks of SD3.5-Medium (real shapes and key names,
taken from diffusers on the meta device), bf16 in one safetensors file like the release
(~4.9 GB), with the real position table. flux: the kept double-stream blocks (12) and the
embedders of FLUX.1-dev at their real shapes, bf16, in three shards with an index like the
release (~8.2 GB). zimage: Z-Image-Turbo's embedders, refiners, first 16 layers and output layer,
bf16 in three shards (~7.3 GB). All: DIR/scheduler, and DIR/model (the reward config from configs/,
an r=64 LoRA on the kept blocks (Z-Image: every kept attention, refiners included), a full-size
fp32 rm_head.pt). Values are arbitrary but finite.
With --convert it then runs `ms-rm convert` on it in a child process and reports wall time and
peak RSS against the converter's memory bound: 1.5 GB plus the largest single output tensor.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Dict, Tuple

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILIES = {"sd3": ("sd35m", "dina-lrm-12layers.json"), "flux": ("flux1-dev", "diffusion-rm-19layers.json"),
            "zimage": ("zimage-turbo", "diffusion-rm-16layers.json")}
MEMORY_BOUND = 1.5 * 1024 ** 3
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
ZIMAGE_KEPT = ("all_x_embedder.", "all_final_layer.", "noise_refiner.", "context_refiner.", "t_embedder.",
               "cap_embedder.", "x_pad_token", "cap_pad_token")


def _json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def transformer_shapes(config: dict) -> Dict[str, Tuple[int, ...]]:
    """Every tensor name and shape of the diffusers transformer for `config`, allocating nothing."""
    from .reference import transformer_class

    cls, _ = transformer_class(config)
    with torch.device("meta"):
        model = cls(**{k: v for k, v in config.items() if not k.startswith("_")})
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _filler(pool: np.ndarray, shape, offset: int) -> np.ndarray:
    n = int(np.prod(shape))
    start = offset % (pool.size - 1)
    reps = -(-(start + n) // pool.size)
    return np.tile(pool, reps)[start:start + n].reshape(shape) if reps > 1 else pool[start:start + n].reshape(shape)


def _tensor(name: str, shape, config: dict, pool: np.ndarray, i: int) -> np.ndarray:
    from ms_rm.backbones.sd3_transformer import POSITION_TABLE_KEY, sd3_position_rows

    if name != POSITION_TABLE_KEY:
        return _filler(pool, shape, 7919 * i)
    size, dim = config["pos_embed_max_size"], config["num_attention_heads"] * config["attention_head_dim"]
    base = config["sample_size"] // config["patch_size"]
    table = np.empty((size * size, dim), dtype=pool.dtype)
    for start in range(0, size * size, 8192):
        rows = np.arange(start, min(start + 8192, size * size))
        table[rows] = sd3_position_rows(rows, dim, size, base).astype(np.float32).astype(pool.dtype)
    return table.reshape(shape)


def write_transformer(folder: str, config: dict, keep_blocks: int = None, shards: int = 1) -> None:
    """The diffusers transformer folder: every tensor, or (keep_blocks) the embedders and the first
    double-stream blocks only; in one file or `shards` files with an index, bf16."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    shapes = transformer_shapes(config)
    if keep_blocks is not None and config["_class_name"] == "ZImageTransformer2DModel":
        kept = ZIMAGE_KEPT + tuple(f"layers.{i}." for i in range(keep_blocks))
        shapes = {k: s for k, s in shapes.items() if k.startswith(kept)}
    elif keep_blocks is not None:
        kept = ("x_embedder.", "time_text_embed.", "context_embedder.") + \
            tuple(f"transformer_blocks.{i}." for i in range(keep_blocks))
        shapes = {k: s for k, s in shapes.items() if k.startswith(kept)}
    import mindspore  # noqa: F401  (numpy knows the bfloat16 dtype once mindspore is imported)

    bf16 = np.dtype("bfloat16")
    pool = _pool(bf16)
    names = list(shapes)
    write_tensors(folder, "diffusion_pytorch_model", shapes, bf16, shards,
                  lambda name: _tensor(name, shapes[name], config, pool, names.index(name)))


def _pool(dtype: np.dtype) -> np.ndarray:
    """The values synthetic tensors are cut from: N(0, 0.02^2), finite in any float dtype."""
    return (np.random.default_rng(0).standard_normal(1 << 22, dtype=np.float32) * 0.02).astype(dtype)


def write_tensors(folder: str, stem: str, shapes: Dict[str, Tuple[int, ...]], dtype: np.dtype, shards: int,
                  value) -> None:
    """FOLDER/STEM.safetensors, or `shards` files STEM-0000i-of-0000n.safetensors with their
    STEM.safetensors.index.json (consecutive tensors, about equal sizes); value(name) -> array."""
    from ms_rm.io.safetensors_file import SafetensorsWriter

    names = list(shapes)
    size_of = {n: int(np.prod(shapes[n])) * dtype.itemsize for n in names}
    total = sum(size_of.values())
    groups, current, size = [], [], 0
    for name in names:
        current.append(name)
        size += size_of[name]
        if size >= total * (len(groups) + 1) / shards and len(groups) < shards - 1:
            groups.append(current)
            current = []
    groups.append(current)
    weight_map = {}
    for g, group in enumerate(groups):
        file = f"{stem}.safetensors" if shards == 1 else f"{stem}-{g + 1:05d}-of-{shards:05d}.safetensors"
        writer = SafetensorsWriter(os.path.join(folder, file), [(k, dtype, shapes[k]) for k in group])
        for name in group:
            writer.write(name, np.asarray(value(name), dtype=dtype))
            weight_map[name] = file
        writer.close()
    if shards > 1:
        with open(os.path.join(folder, f"{stem}.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def write_reference(root: str, family: str = "sd3", lora_rank: int = 64, transformer_config: dict = None,
                    rm_config: dict = None) -> Dict[str, str]:
    """The synthetic reference checkpoint of `family` (module docstring), at its released configs or at
    the `transformer_config` / `rm_config` given (the benchmark's small size)."""
    from safetensors.numpy import save_file

    from .reference import RewardHead

    configs = os.path.join(ROOT, "configs", FAMILIES[family][0])
    transformer_cfg = transformer_config or _json(os.path.join(configs, "transformer_config.json"))
    rm_cfg = json.loads(json.dumps(rm_config or _json(os.path.join(configs, FAMILIES[family][1]))))
    paths = {"src": os.path.join(root, "model"), "transformer": os.path.join(root, "transformer"),
             "scheduler": os.path.join(root, "scheduler")}
    n = rm_cfg["model"]["num_transformer_layers"]
    if family in ("flux", "zimage"):
        write_transformer(paths["transformer"], transformer_cfg, keep_blocks=n, shards=3)
    else:
        write_transformer(paths["transformer"], transformer_cfg)
    os.makedirs(paths["scheduler"], exist_ok=True)
    with open(os.path.join(paths["scheduler"], "scheduler_config.json"), "w") as f:
        json.dump(_json(os.path.join(configs, "scheduler_config.json")), f)

    ckpt = os.path.join(paths["src"], "checkpoint")
    lora_dir = os.path.join(ckpt, "backbone_lora")
    os.makedirs(lora_dir, exist_ok=True)
    rm_cfg["model"]["lora_config"]["r"] = lora_rank
    with open(os.path.join(paths["src"], "config.json"), "w") as f:
        json.dump(rm_cfg, f, indent=2)
    if family == "zimage":
        dim, temb_dim, targets = transformer_cfg["dim"], 256, LORA_TARGETS[:4]
        refiners = [f"{kind}.{i}.attention" for kind in ("noise_refiner", "context_refiner")
                    for i in range(transformer_cfg["n_refiner_layers"])]
        attentions = [(a, targets) for a in refiners + [f"layers.{i}.attention" for i in range(n)]]
    else:
        dim = temb_dim = transformer_cfg["num_attention_heads"] * transformer_cfg["attention_head_dim"]
        targets = LORA_TARGETS
        per_block = (("attn", LORA_TARGETS), ("attn2", LORA_TARGETS[:4])) if family == "sd3" else (("attn", LORA_TARGETS),)
        attentions = [(f"transformer_blocks.{b}.{a}", m) for b in range(n) for a, m in per_block]
    rng = np.random.default_rng(1)
    factors = {}
    for attn, modules in attentions:
        for module in modules:
            key = f"base_model.model.{attn}.{module}"
            factors[f"{key}.lora_A.weight"] = rng.standard_normal((lora_rank, dim), dtype=np.float32) * 0.01
            factors[f"{key}.lora_B.weight"] = rng.standard_normal((dim, lora_rank), dtype=np.float32) * 0.01
    save_file(factors, os.path.join(lora_dir, "adapter_model.safetensors"))
    with open(os.path.join(lora_dir, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": lora_rank, "lora_alpha": rm_cfg["model"]["lora_config"]["lora_alpha"],
                   "target_modules": targets, "exclude_modules": [] if family == "zimage" else None,
                   "bias": "none", "use_rslora": False,
                   "use_dora": False, "rank_pattern": {}, "alpha_pattern": {}}, f, indent=2)
    head_cfg = rm_cfg["model"]["reward_head"]
    head = RewardHead(dim, len(rm_cfg["model"]["visual_head_idx"]), len(rm_cfg["model"]["text_head_idx"]),
                      temb_dim=temb_dim, **head_cfg)
    torch.save(head.state_dict(), os.path.join(ckpt, "rm_head.pt"))
    return paths


def write_sd3_encoders(root: str) -> str:
    """DIR/text_encoder, text_encoder_2 and text_encoder_3 at SD3.5-Medium's real sizes (CLIP-L,
    CLIP-G, T5-XXL; fp16 like the release, T5 in two shards with an index), DIR/vae (SD3's VAE,
    fp16) and small locally built tokenizers (their ids lie inside the real vocabularies): a
    pipeline folder for `ms-rm score-images` at full size. Returns DIR."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from .text_reference import build_clip_tokenizer, build_t5_tokenizer
    from .vae_reference import SD35_VAE_CONFIG, model_kwargs

    fp16 = np.dtype(np.float16)
    pool = _pool(fp16)
    parts = (("text_encoder", CLIPTextConfig, CLIPTextModelWithProjection, 1),
             ("text_encoder_2", CLIPTextConfig, CLIPTextModelWithProjection, 1),
             ("text_encoder_3", T5Config, T5EncoderModel, 2))
    for part, config_class, model_class, shards in parts:
        folder = os.path.join(root, part)
        os.makedirs(folder, exist_ok=True)
        config = config_class.from_dict(_json(os.path.join(ROOT, "configs", "sd35m", f"{part}_config.json")))
        with torch.device("meta"):
            shapes = {k: tuple(v.shape) for k, v in model_class(config).state_dict().items()}
        if part == "text_encoder_3":               # the release stores the tied embedding once
            shapes.pop("encoder.embed_tokens.weight")
        config.save_pretrained(folder)
        write_tensors(folder, "model", shapes, fp16, shards, lambda name: _filler(pool, shapes[name], len(name) * 7919))
    from diffusers import AutoencoderKL

    vae = os.path.join(root, "vae")
    os.makedirs(vae, exist_ok=True)
    with open(os.path.join(vae, "config.json"), "w") as f:
        json.dump(dict(SD35_VAE_CONFIG, _class_name="AutoencoderKL"), f, indent=2)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in AutoencoderKL(**model_kwargs(SD35_VAE_CONFIG)).state_dict().items()}
    write_tensors(vae, "diffusion_pytorch_model", shapes, fp16, 1,
                  lambda name: _filler(pool, shapes[name], len(name) * 7919))
    for part in ("tokenizer", "tokenizer_2"):
        build_clip_tokenizer(os.path.join(root, part))
    build_t5_tokenizer(os.path.join(root, "tokenizer_3"))
    return root


def measured_score_images(model: str, pipeline: str, work: str, size: int = 1024) -> Dict[str, float]:
    """`ms-rm score-images` of one random size x size image with the converted `model` and the
    `pipeline` folder (write_sd3_encoders) in a child process: wall seconds, peak RSS, the score."""
    from PIL import Image

    image = os.path.join(work, "image.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(image)
    out = os.path.join(work, "scores.jsonl")
    m = _measured_child(["score-images", model, "--vae", os.path.join(pipeline, "vae"), "--text-encoders", pipeline,
                         "--image", image, "--prompt", "a red cube on a table", "--seed", "0", "--out", out,
                         "--no-progress"], out)
    with open(out) as f:
        m["score"] = json.loads(f.readline())["score"]
    return m


def measured_convert(paths: Dict[str, str], out: str, dtype: str = "keep") -> Dict[str, float]:
    """Run `ms-rm convert` in a child process; wall seconds and peak RSS bytes of that child
    (its own VmHWM, see ms_rm_parity.peak_rss)."""
    return measured_cli(["convert", paths["src"], "--transformer", paths["transformer"], "--scheduler",
                         paths["scheduler"], "--out", out, "--dtype", dtype, "--force", "--no-progress"], out)


def _measured_child(arguments, out: str) -> Dict[str, float]:
    """Run `ms-rm ARGUMENTS` (writing `out`) in a child process; its wall seconds and peak RSS bytes."""
    report = out.rstrip(os.sep) + ".peak_rss"
    command = [sys.executable, "-m", "ms_rm_parity.peak_rss", report, "ms_rm.cli", *arguments]
    start = time.perf_counter()
    status = subprocess.run(command, cwd=ROOT).returncode
    seconds = time.perf_counter() - start
    if status != 0:
        raise RuntimeError(f"ms-rm {arguments[0]} failed with status {status}")
    with open(report) as f:
        peak = int(f.read())
    os.remove(report)
    return {"seconds": seconds, "peak_rss": peak}


def measured_cli(arguments, out: str) -> Dict[str, float]:
    """Run `ms-rm ARGUMENTS` (a conversion writing the folder `out`) in a child process; its wall
    seconds, peak RSS bytes, the largest and total output tensor bytes and the memory bound."""
    m = _measured_child(arguments, out)
    from ms_rm.io.safetensors_file import SafetensorsFile

    with SafetensorsFile(os.path.join(out, "model.safetensors")) as f:
        largest = max(f.nbytes(k) for k in f.keys())
        total = sum(f.nbytes(k) for k in f.keys())
    return {**m, "largest_tensor": largest, "output_bytes": total, "bound": MEMORY_BOUND + largest}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ms_rm_parity.synthetic", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder to write the synthetic reference into")
    parser.add_argument("--family", choices=sorted(FAMILIES), default="sd3",
                        help="SD3.5-Medium, FLUX.1-dev or Z-Image-Turbo")
    parser.add_argument("--convert", action="store_true", help="then convert it and measure time and peak RSS")
    parser.add_argument("--dtype", default="keep", choices=["keep", "fp32", "bf16", "fp16"])
    parser.add_argument("--score-images", action="store_true",
                        help="write SD3.5-M's reward model, text encoders and VAE at full size (~20 GB), convert, "
                             "and measure `ms-rm score-images` of one 1024x1024 image (peak RSS against 24 GiB)")
    args = parser.parse_args(argv)
    if args.score_images:
        return _score_images_report(args.out)
    start = time.perf_counter()
    paths = write_reference(args.out, args.family)
    print(f"wrote the synthetic {args.family} reference under {args.out} in {time.perf_counter() - start:.0f} s")
    if args.convert:
        gib = 1024 ** 3
        m = measured_convert(paths, os.path.join(args.out, "converted"), args.dtype)
        print(f"ms-rm convert --dtype {args.dtype}: {m['seconds']:.1f} s, peak RSS {m['peak_rss'] / gib:.2f} GiB "
              f"(bound {m['bound'] / gib:.2f} GiB = 1.5 GiB + largest output tensor "
              f"{m['largest_tensor'] / 2 ** 20:.0f} MiB), output {m['output_bytes'] / gib:.2f} GiB")
        return 0 if m["peak_rss"] <= m["bound"] else 1
    return 0


SCORE_IMAGES_LIMIT = 24 * 1024 ** 3


def _score_images_report(root: str) -> int:
    gib = 1024 ** 3
    start = time.perf_counter()
    paths = write_reference(os.path.join(root, "reference"))
    model = os.path.join(root, "converted")
    measured_convert(paths, model)
    pipeline = write_sd3_encoders(os.path.join(root, "pipeline"))
    print(f"wrote and converted the synthetic SD3.5-M reward model and encoders in {time.perf_counter() - start:.0f} s")
    m = measured_score_images(model, pipeline, root)
    print(f"ms-rm score-images, one 1024x1024 image, full-size encoders and reward model: {m['seconds']:.1f} s, "
          f"peak RSS {m['peak_rss'] / gib:.2f} GiB (limit {SCORE_IMAGES_LIMIT / gib:.0f} GiB), score {m['score']:.4f}")
    return 0 if m["peak_rss"] <= SCORE_IMAGES_LIMIT else 1


if __name__ == "__main__":
    sys.exit(main())
