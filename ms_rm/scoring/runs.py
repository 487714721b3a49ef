"""Score runs: what `ms-rm score` and `ms-rm score-images` do, over files.

* Latents from an .npz (`ms-rm score`): `latents` (B, C, H, W), `encoder_hidden_states` (B, T, J),
  `pooled_projections` (B, P), optionally `noise` (B, C, H, W), used instead of random noise.
  Z-Image models take no `pooled_projections`; their text is variable-length: zero-padded
  `encoder_hidden_states` with `encoder_attention_mask` (B, T) (1 = token), or without a mask
  when every row is a token.
  Output .npz: `reward` (B, out_dim), `sigma` and `timestep` (B,), and with features=True `temb`,
  `visual_tap_{k}`, `text_tap_{k}` and `raw`.
* Image files against prompts (`ms-rm score-images`): pairs from the command line or from a
  file, a CSV with columns `image,prompt` (a header row) or a JSONL with one {"image": ...,
  "prompt": ...} per line; relative image paths are taken relative to that file's folder.
  Images are read, fitted to multiples of 16 pixels (the scorer's size policy), encoded and scored
  in batches of one size, each filled up to the batch size (one compiled graph per image size);
  results as JSONL ({"image", "prompt", "score"} per pair), in the order of the pairs.

Under msrun (a World of several ranks, ms_rm.core.distributed) each rank scores a contiguous
shard of the samples and the results are gathered in order, equal to one process's: the noise of
a sample does not depend on the shard (`ms-rm score` draws the whole batch's noise from the seed on
every rank; `ms-rm score-images` draws each pair's from (seed, its index)). Only the main rank
writes, after every rank has delivered, so a failing rank leaves no output.

Every output is written atomically (ms_rm.io.files).
"""

from __future__ import annotations

import csv
import json
import os
import zipfile
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from tqdm import tqdm

from ..core.distributed import World
from ..core.errors import InputError
from ..io.files import atomic_file
from .images import image_size, load_image

REQUIRED = ("latents", "encoder_hidden_states", "pooled_projections")        # SD3 and FLUX models
OPTIONAL = ("noise",)


def input_arrays(model) -> Tuple[Tuple[str, ...], Tuple[str, ...]]:
    """(required, optional) array names of an inputs file for `model`: the latents and the text its
    backbone takes (the Backbone protocol), and optionally the noise."""
    backbone = model.backbone
    return ("latents",) + tuple(backbone.text_inputs), ("noise",) + tuple(backbone.optional_text_inputs)
Pair = Tuple[str, str]


# --- latents from an .npz ------------------------------------------------------------------------

def read_inputs(path: str, required: Sequence[str] = REQUIRED, optional: Sequence[str] = OPTIONAL
                ) -> Dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise InputError(f"{path}: inputs file not found") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise InputError(f"{path}: not a readable .npz file ({e})") from None
    missing = [k for k in required if k not in arrays]
    if missing:
        raise InputError(f"{path}: missing arrays {missing}; it must hold {list(required)} (and may hold "
                         f"{' and '.join(optional)})")
    unknown = sorted(set(arrays) - set(required) - set(optional))
    if unknown:
        raise InputError(f"{path}: unknown arrays {unknown}; expected {list(required)} and optionally "
                         f"{' and '.join(optional)}")
    return arrays


def score_arrays(model, arrays: Dict[str, np.ndarray], u: Union[float, Sequence[float]],
                 seed: Optional[int] = None, features: bool = False, world: World = World()) -> Dict[str, np.ndarray]:
    """Run the model on the arrays of an inputs file; the arrays of an output file. With a world of
    several ranks, each scores its shard of the samples and every rank returns the whole result."""
    count = arrays["latents"].shape[0]
    if world.size > 1:
        if count < world.size:
            raise InputError(f"{count} samples for {world.size} workers: run fewer workers than samples")
        if "noise" not in arrays and seed is not None:       # the whole batch's noise, as one process draws it
            from ..rewards.diffusion_rm.noise import draw_noise

            arrays, seed = {**arrays, "noise": draw_noise(tuple(arrays["latents"].shape), seed=seed)}, None
        if np.ndim(u) and len(u) != count:
            raise InputError(f"--u: one noise level, or one per sample ({count}); got {len(u)}")
        rows = world.shard(count)
        arrays = {k: v[rows] for k, v in arrays.items()}
        u = u if np.ndim(u) == 0 else np.asarray(u)[rows]
    noise = arrays.get("noise")
    stages = model.reward_stages(arrays["latents"], arrays["encoder_hidden_states"], arrays.get("pooled_projections"),
                                 u=u, noise=noise, seed=None if noise is not None else seed,
                                 encoder_attention_mask=arrays.get("encoder_attention_mask"))
    keep = stages if features else {k: stages[k] for k in ("reward", "sigma", "timestep")}
    return {k: world.gather_rows(v.astype("float32").asnumpy(), count) for k, v in keep.items()}


def write_npz(path: str, arrays: Dict[str, np.ndarray]) -> None:
    """np.savez, atomically: no half-written outputs."""
    with atomic_file(path, "wb") as f:
        np.savez(f, **arrays)


# --- image files against prompts --------------------------------------------------------------------

def read_pairs(path: str) -> List[Pair]:
    """(image path, prompt) pairs from a .csv (header image,prompt) or .jsonl file."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        with open(path, newline="", encoding="utf-8") as f:
            if path.endswith(".jsonl"):
                rows = []
                for number, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise InputError(f"{path}, line {number}: not valid JSON ({e.msg})") from None
            elif path.endswith(".csv"):
                rows = list(csv.DictReader(f))
            else:
                raise InputError(f"{path}: pairs must be a .csv (columns image,prompt) or a .jsonl file")
    except FileNotFoundError:
        raise InputError(f"{path}: pairs file not found") from None
    pairs = []
    for number, row in enumerate(rows, 1):
        if not isinstance(row, dict) or not isinstance(row.get("image"), str) or not isinstance(row.get("prompt"), str):
            raise InputError(f"{path}, entry {number}: needs an 'image' path and a 'prompt' string, got {row!r}")
        pairs.append((os.path.join(folder, row["image"]), row["prompt"]))
    if not pairs:
        raise InputError(f"{path}: holds no pairs")
    return pairs


def score_pairs(scorer, pairs: Sequence[Pair], batch_size: int = 8, progress: bool = True,
                world: World = World(), prompt_table: Optional["PromptTable"] = None,
                noise_ids: Optional[Sequence[int]] = None) -> List[Dict]:
    """Score the pairs `batch_size` at a time; {"image", "prompt", "score"} per pair, in order.

    Batches hold images of one size (the scorer's `fitted_size` of the file's, when it has one),
    and a batch short of `batch_size` (the last of a size) is filled up with copies of its first
    pair whose scores are dropped: every call for a size has the same batch size, so each model
    compiles one graph per image size in a run, not one per batch size (the cost: at most
    batch_size - 1 extra samples per image size; a size with fewer pairs than batch_size is scored
    at its own count, unfilled). With a seed, each pair's
    noise comes from (seed, its index): scores do not depend on the batch size, the order or the
    number of workers. With a world of several ranks, each scores its shard and every rank
    returns all rows. prompt_table: the prompts' embeddings, encoded beforehand (PromptTable),
    passed to the scorer with the prompts. noise_ids: the id each pair's noise is drawn with
    (default: its index); pairs with one id share their noise (ms-rm eval: a preference pair's two
    images)."""
    if batch_size < 1:
        raise InputError(f"batch size must be positive, got {batch_size}")
    if noise_ids is not None and len(noise_ids) != len(pairs):
        raise InputError(f"{len(noise_ids)} noise ids for {len(pairs)} pairs")
    ids = range(len(pairs)) if noise_ids is None else [int(i) for i in noise_ids]
    rows = world.shard(len(pairs))
    keyed = getattr(scorer, "seed", None) is not None
    scores = np.zeros(len(pairs), np.float32)
    with tqdm(total=rows.stop - rows.start, unit="image", desc="scoring", disable=not progress) as bar:
        for batch, target in size_batches(pairs, range(rows.start, rows.stop), batch_size,
                                          getattr(scorer, "fitted_size", None)):
            filled = batch + [batch[0]] * (target - len(batch))               # the fillers: the first pair
            images = [load_image(pairs[i][0]) for i in batch]
            prompts = [pairs[i][1] for i in filled]
            extra = {"sample_ids": [ids[i] for i in filled]} if keyed else {}
            if prompt_table is not None:
                extra["prompt_embeds"], extra["pooled_prompt_embeds"] = prompt_table.rows(prompts)
            values = scorer(images + images[:1] * (target - len(batch)), prompts, **extra)
            scores[batch] = values[:len(batch)]
            bar.update(len(batch))
    everyone = world.gather_rows(scores[rows][:, None], len(pairs))[:, 0]          # float32: lossless
    return [{"image": path, "prompt": prompt, "score": float(score)} for (path, prompt), score in zip(pairs, everyone)]


def size_batches(pairs: Sequence[Pair], indices: Sequence[int], batch_size: int,
                 fitted: Optional[Callable[[int, int], Tuple[int, int]]] = None) -> List[Tuple[List[int], int]]:
    """The indices cut into batches of pairs whose images have one size (from the file headers;
    with `fitted(height, width)`, the size the scorer will fit them to, e.g. a bucket), sizes in
    order of first appearance, each with the batch size it is to be filled up to: the size's own
    count of pairs when that is below batch_size, else batch_size."""
    by_size: Dict[Tuple[int, int], List[int]] = {}
    for i in indices:
        width, height = image_size(pairs[i][0])
        by_size.setdefault(fitted(height, width) if fitted else (height, width), []).append(i)
    return [(group[start:start + batch_size], min(batch_size, len(group)))
            for group in by_size.values() for start in range(0, len(group), batch_size)]


def write_jsonl(path: str, rows: Sequence[Dict]) -> None:
    """One JSON object per line, atomically."""
    with atomic_file(path) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


# --- prompts encoded before the images ---------------------------------------------------------------

class PromptTable:
    """Each distinct prompt's embeddings (prompt_embeds (T, D), pooled (P,), float32), encoded once,
    before any image, and kept in two .npy files in `folder`, written and read a row at a time
    (never mapped): the memory they take does not grow with the number of prompts.

    `ms-rm score-images` encodes its prompts this way and frees the text encoders before it loads
    the VAE and the reward model, so that they are never in memory together (README, "Memory at
    the released size"). Build it with `PromptTable.encode`."""

    FILES = ("prompt_embeds.npy", "pooled_prompt_embeds.npy")

    def __init__(self, folder: str, prompts: Sequence[str]):
        self.index = {prompt: i for i, prompt in enumerate(prompts)}
        self.paths = [os.path.join(folder, name) for name in self.FILES]
        self.layouts = [_npy_layout(path) for path in self.paths]              # (data offset, row shape)

    @classmethod
    def encode(cls, encode_prompts: Callable, prompts: Sequence[str], folder: str, batch_size: int = 8,
               progress: bool = True) -> "PromptTable":
        """Encode the distinct `prompts` batch_size at a time (a short last batch filled with copies
        of its first prompt: one compiled graph) with encode_prompts(list) -> (embeds, pooled)."""
        distinct = list(dict.fromkeys(prompts))
        files = [open(path, "wb") for path in (os.path.join(folder, name) for name in cls.FILES)]
        try:
            with tqdm(total=len(distinct), unit="prompt", desc="encoding prompts", disable=not progress) as bar:
                for start in range(0, len(distinct), batch_size):
                    batch = distinct[start:start + batch_size]
                    outputs = encode_prompts(batch + batch[:1] * (batch_size - len(batch)))
                    for f, output in zip(files, outputs):
                        rows = np.ascontiguousarray(output.astype("float32").asnumpy()[:len(batch)])
                        if start == 0:                                      # the header, once the shape is known
                            np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False,
                                                                      "shape": (len(distinct),) + rows.shape[1:]})
                        f.write(rows.tobytes())
                    bar.update(len(batch))
        finally:
            for f in files:
                f.close()
        return cls(folder, distinct)

    def rows(self, prompts: Sequence[str]) -> Tuple[np.ndarray, np.ndarray]:
        """(prompt_embeds (B, T, D), pooled (B, P)) of the prompts, in their order."""
        missing = [p for p in prompts if p not in self.index]
        if missing:
            raise InputError(f"prompts not encoded beforehand: {missing[:3]}")
        result = []
        for path, (offset, shape) in zip(self.paths, self.layouts):
            size = int(np.prod(shape)) * 4
            with open(path, "rb") as f:
                parts = []
                for prompt in prompts:
                    f.seek(offset + self.index[prompt] * size)
                    parts.append(np.frombuffer(f.read(size), dtype="<f4").reshape(shape))
            result.append(np.stack(parts))
        return result[0], result[1]


def _npy_layout(path: str) -> Tuple[int, Tuple[int, ...]]:
    """(offset of the data, shape of one row) of a float32 .npy file written by PromptTable.encode."""
    with open(path, "rb") as f:
        np.lib.format.read_magic(f)
        shape, _, _ = np.lib.format.read_array_header_1_0(f)
        return f.tell(), tuple(shape[1:])
