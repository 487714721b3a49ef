"""Scoring image files against prompts: what `ms-rm score-images` does.

Pairs come from the command line (--image / --prompt, repeated) or from a file: a CSV with
columns `image,prompt` (a header row) or a JSONL with one {"image": ..., "prompt": ...} per line.
Relative image paths are taken relative to that file's folder. Images are read, fitted to
multiples of 16 pixels (the scorer's size policy), encoded by groups of equal size, and scored;
results are written as JSONL ({"image", "prompt", "score"} per pair), atomically.
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
from typing import Dict, Iterator, List, Sequence, Tuple

from .errors import InputError
from .images import load_image

Pair = Tuple[str, str]
DEFAULT_IMAGE_U = {"sigma": 0.1}       # the spec's recommended level for clean images from disk


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


def score_pairs(scorer, pairs: Sequence[Pair], batch_size: int = 8, progress: bool = True) -> Iterator[Dict]:
    """Score the pairs `batch_size` at a time; yields {"image", "prompt", "score"} in order."""
    from tqdm import tqdm

    if batch_size < 1:
        raise InputError(f"batch size must be positive, got {batch_size}")
    with tqdm(total=len(pairs), unit="image", desc="scoring", disable=not progress) as bar:
        for start in range(0, len(pairs), batch_size):
            batch = pairs[start:start + batch_size]
            scores = scorer([load_image(path) for path, _ in batch], [prompt for _, prompt in batch])
            for (path, prompt), score in zip(batch, scores):
                yield {"image": path, "prompt": prompt, "score": score}
            bar.update(len(batch))


def write_jsonl(path: str, rows: Sequence[Dict]) -> None:
    """One JSON object per line, written to a temporary file beside `path` and renamed."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".partial-", suffix=".jsonl", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
