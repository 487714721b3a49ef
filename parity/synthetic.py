"""A synthetic reference checkpoint at the real SD3.5-Medium size, and a measured conversion of it.

    python -m parity.synthetic --out DIR [--convert]

writes DIR/transformer (all 24 blocks, real shapes and key names taken from diffusers on the
meta device, bf16 in one safetensors file like the release, ~4.9 GB, with the real position
table), DIR/scheduler, and DIR/model (the release config.json, an r=64 LoRA on the first 12
blocks, and a full-size fp32 rm_head.pt). Values are arbitrary but finite. With --convert it
then runs `ms-rm convert` on it in a child process and reports wall time and peak RSS against
the converter's memory bound: 1.5 GB plus the largest single output tensor.
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

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "sd35m")
MEMORY_BOUND = 1.5 * 1024 ** 3
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


def _json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def transformer_shapes(config: dict) -> Dict[str, Tuple[int, ...]]:
    """Every tensor name and shape of diffusers' SD3Transformer2DModel for `config`, allocating nothing."""
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        model = SD3Transformer2DModel(**{k: v for k, v in config.items() if not k.startswith("_")})
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _filler(pool: np.ndarray, shape, offset: int) -> np.ndarray:
    n = int(np.prod(shape))
    start = offset % (pool.size - 1)
    reps = -(-(start + n) // pool.size)
    return np.tile(pool, reps)[start:start + n].reshape(shape) if reps > 1 else pool[start:start + n].reshape(shape)


def write_transformer(folder: str, config: dict) -> None:
    from ms_rm.safetensors_io import SafetensorsWriter
    from ms_rm.sd3 import POSITION_TABLE_KEY, sd3_position_rows

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    shapes = transformer_shapes(config)
    bf16 = np.dtype("bfloat16")
    writer = SafetensorsWriter(os.path.join(folder, "diffusion_pytorch_model.safetensors"),
                               [(k, bf16, s) for k, s in shapes.items()])
    pool = (np.random.default_rng(0).standard_normal(1 << 22, dtype=np.float32) * 0.02).astype(bf16)
    size, dim = config["pos_embed_max_size"], config["num_attention_heads"] * config["attention_head_dim"]
    base = config["sample_size"] // config["patch_size"]
    for i, (name, shape) in enumerate(shapes.items()):
        if name == POSITION_TABLE_KEY:
            table = np.empty((size * size, dim), dtype=bf16)
            for start in range(0, size * size, 8192):
                rows = np.arange(start, min(start + 8192, size * size))
                table[rows] = sd3_position_rows(rows, dim, size, base).astype(np.float32).astype(bf16)
            writer.write(name, table.reshape(shape))
        else:
            writer.write(name, _filler(pool, shape, 7919 * i))
    writer.close()


def write_reference(root: str, lora_rank: int = 64) -> Dict[str, str]:
    from safetensors.numpy import save_file

    from .reference import RewardHead

    transformer_cfg = _json(os.path.join(CONFIGS, "transformer_config.json"))
    rm_cfg = _json(os.path.join(CONFIGS, "dina-lrm-12layers.json"))
    paths = {"src": os.path.join(root, "model"), "transformer": os.path.join(root, "transformer"),
             "scheduler": os.path.join(root, "scheduler")}
    write_transformer(paths["transformer"], transformer_cfg)
    os.makedirs(paths["scheduler"], exist_ok=True)
    with open(os.path.join(paths["scheduler"], "scheduler_config.json"), "w") as f:
        json.dump(_json(os.path.join(CONFIGS, "scheduler_config.json")), f)

    ckpt = os.path.join(paths["src"], "checkpoint")
    lora_dir = os.path.join(ckpt, "backbone_lora")
    os.makedirs(lora_dir, exist_ok=True)
    rm_cfg["model"]["lora_config"]["r"] = lora_rank
    with open(os.path.join(paths["src"], "config.json"), "w") as f:
        json.dump(rm_cfg, f, indent=2)
    n, dim = rm_cfg["model"]["num_transformer_layers"], 1536
    rng = np.random.default_rng(1)
    factors = {}
    for block in range(n):
        for attn, modules in (("attn", LORA_TARGETS), ("attn2", LORA_TARGETS[:4])):
            for module in modules:
                key = f"base_model.model.transformer_blocks.{block}.{attn}.{module}"
                factors[f"{key}.lora_A.weight"] = rng.standard_normal((lora_rank, dim), dtype=np.float32) * 0.01
                factors[f"{key}.lora_B.weight"] = rng.standard_normal((dim, lora_rank), dtype=np.float32) * 0.01
    save_file(factors, os.path.join(lora_dir, "adapter_model.safetensors"))
    with open(os.path.join(lora_dir, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": lora_rank, "lora_alpha": rm_cfg["model"]["lora_config"]["lora_alpha"],
                   "target_modules": LORA_TARGETS, "exclude_modules": None, "bias": "none", "use_rslora": False,
                   "use_dora": False, "rank_pattern": {}, "alpha_pattern": {}}, f, indent=2)
    head_cfg = rm_cfg["model"]["reward_head"]
    head = RewardHead(dim, 3, 3, **head_cfg)
    torch.save(head.state_dict(), os.path.join(ckpt, "rm_head.pt"))
    return paths


def measured_convert(paths: Dict[str, str], out: str, dtype: str = "keep") -> Dict[str, float]:
    """Run `ms-rm convert` in a child process; wall seconds and peak RSS bytes of that child."""
    command = [sys.executable, "-m", "tools.cli", "convert", paths["src"], "--transformer", paths["transformer"],
               "--scheduler", paths["scheduler"], "--out", out, "--dtype", dtype, "--force", "--no-progress"]
    start = time.perf_counter()
    child = subprocess.Popen(command, cwd=os.path.dirname(CONFIGS.rstrip(os.sep)).rsplit(os.sep, 1)[0] or ".")
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"ms-rm convert failed with status {os.waitstatus_to_exitcode(status)}")
    from ms_rm.safetensors_io import SafetensorsFile

    with SafetensorsFile(os.path.join(out, "model.safetensors")) as f:
        largest = max(f.nbytes(k) for k in f.keys())
        total = sum(f.nbytes(k) for k in f.keys())
    return {"seconds": seconds, "peak_rss": usage.ru_maxrss * 1024, "largest_tensor": largest,
            "output_bytes": total, "bound": MEMORY_BOUND + largest}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m parity.synthetic", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder to write the synthetic reference into")
    parser.add_argument("--convert", action="store_true", help="then convert it and measure time and peak RSS")
    parser.add_argument("--dtype", default="keep", choices=["keep", "fp32", "bf16", "fp16"])
    args = parser.parse_args(argv)
    start = time.perf_counter()
    paths = write_reference(args.out)
    print(f"wrote the synthetic SD3.5-M reference under {args.out} in {time.perf_counter() - start:.0f} s")
    if args.convert:
        gib = 1024 ** 3
        m = measured_convert(paths, os.path.join(args.out, "converted"), args.dtype)
        print(f"ms-rm convert --dtype {args.dtype}: {m['seconds']:.1f} s, peak RSS {m['peak_rss'] / gib:.2f} GiB "
              f"(bound {m['bound'] / gib:.2f} GiB = 1.5 GiB + largest output tensor "
              f"{m['largest_tensor'] / 2 ** 20:.0f} MiB), output {m['output_bytes'] / gib:.2f} GiB")
        return 0 if m["peak_rss"] <= m["bound"] else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
