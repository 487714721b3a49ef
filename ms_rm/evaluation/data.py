"""Human preference data: pairs (prompt, chosen, rejected) and rankings (prompt, generations, ranks).

Pairs
* JSON lines (.jsonl), one {"prompt": ..., "chosen": ..., "rejected": ...} per line, or a .json
  list of them. chosen / rejected are image files, or .npy latents (C, H, W) / (1, C, H, W) for
  latent rewards; relative paths are taken relative to the data file's folder.
* Parquet (.parquet), the Diffusion-RM reference's preprocessed layout: columns `prompt`,
  `latent1` (the chosen sample) and `latent2` (the rejected one), each latent an .npy file's
  bytes. Needs pyarrow (`pip install ms-rm[eval]`).

Rankings (.json list, or .jsonl), either layout, per prompt:
* ImageReward's test set: {"id", "prompt", "generations": [paths], "ranking": [ranks]};
* HPDv2's test set: {"prompt", "image_path": [paths], "rank": [ranks]}.
Rank 1 is the best; gaps in the numbers and ties between generations are normal and kept.

Every sample is addressed by its path (or parquet file and row): two files with the same content
are two samples. Errors name the file and the line (or item) at fault.
"""

from __future__ import annotations

import bisect
import io
import json
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..core.config import is_number
from ..core.errors import InputError, MissingDependencyError
from ..io.files import read_text


@dataclass(frozen=True)
class Sample:
    """One thing a reward scores: an image or .npy file, or a parquet file's latent (`row`, `column`)."""

    path: str
    row: Optional[int] = None
    column: Optional[str] = None

    @property
    def is_latent(self) -> bool:
        return self.row is not None or self.path.endswith(".npy")

    def key(self) -> str:
        return self.path if self.row is None else f"{self.path}#{self.row}:{self.column}"


@dataclass(frozen=True)
class Pair:
    prompt: str
    chosen: Sample
    rejected: Sample
    where: str              # "file:line", for messages


@dataclass(frozen=True)
class Ranking:
    prompt: str
    samples: Tuple[Sample, ...]
    ranks: Tuple[float, ...]
    where: str
    id: Optional[str] = None


PAIR_KEYS = ("prompt", "chosen", "rejected")
LATENT_COLUMNS = ("latent1", "latent2")        # the reference's parquet: chosen, rejected
RANKING_LAYOUTS = {                            # name: (generations key, ranks key)
    "imagereward": ("generations", "ranking"),
    "hpdv2": ("image_path", "rank"),
}


# --- reading ---------------------------------------------------------------------------------------

def read_pairs(path: str, check_files: bool = True) -> List[Pair]:
    """The preference pairs of a .jsonl / .json / .parquet file (see the module docstring)."""
    if path.endswith(".parquet"):
        return _parquet_pairs(path)
    pairs = []
    for where, item in _items(path):
        missing = [k for k in PAIR_KEYS if not isinstance(item.get(k), str) or not item.get(k)]
        if missing:
            raise InputError(f"{where}: a pair needs the strings {list(PAIR_KEYS)}; missing or empty: {missing}")
        chosen, rejected = (_sample(path, item[k], where, check_files) for k in ("chosen", "rejected"))
        if chosen == rejected:
            raise InputError(f"{where}: chosen and rejected are the same file ({item['chosen']}); a pair compares two")
        pairs.append(Pair(item["prompt"], chosen, rejected, where))
    _non_empty(pairs, path, "pairs")
    return pairs


def read_rankings(path: str, check_files: bool = True) -> List[Ranking]:
    """The rankings of a .json / .jsonl file in ImageReward's or HPDv2's layout."""
    rankings = []
    for where, item in _items(path):
        layout = next((name for name, keys in RANKING_LAYOUTS.items() if keys[0] in item), None)
        if layout is None:
            raise InputError(f"{where}: a ranking needs 'generations' and 'ranking' (ImageReward's layout) or "
                             f"'image_path' and 'rank' (HPDv2's); found keys {sorted(item)}")
        files_key, ranks_key = RANKING_LAYOUTS[layout]
        prompt, files, ranks = item.get("prompt"), item.get(files_key), item.get(ranks_key)
        if not isinstance(prompt, str) or not prompt:
            raise InputError(f"{where}: the ranking has no prompt")
        if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
            raise InputError(f"{where}: '{files_key}' must be a list of paths")
        if not isinstance(ranks, list) or not all(is_number(r) for r in ranks):
            raise InputError(f"{where}: '{ranks_key}' must be a list of numbers")
        if len(ranks) != len(files):
            raise InputError(f"{where}: {len(ranks)} ranks for {len(files)} generations")
        if len(files) < 2:
            raise InputError(f"{where}: a ranking needs two generations or more, got {len(files)}")
        if len(set(files)) != len(files):
            raise InputError(f"{where}: a generation is listed twice in '{files_key}'")
        samples = tuple(_sample(path, f, where, check_files) for f in files)
        rankings.append(Ranking(prompt, samples, tuple(float(r) for r in ranks), where,
                                None if item.get("id") is None else str(item["id"])))
    _non_empty(rankings, path, "rankings")
    return rankings


class ParquetLatents:
    """Latents out of the reference's parquet files, read a row group at a time (the reference's
    own reading: `read_row_group`); the group read last is kept, so samples in file order read
    each group once. Never the whole file."""

    def __init__(self):
        self.files: Dict[str, Tuple[Any, List[int]]] = {}      # path -> (ParquetFile, first row of each group)
        self.group: Optional[Tuple[Tuple[str, int], Any]] = None

    def cell(self, sample: Sample) -> bytes:
        if sample.path not in self.files:
            parquet = _parquet_file(sample.path)
            sizes = [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)]
            self.files[sample.path] = (parquet, np.cumsum([0] + sizes[:-1]).tolist())
        parquet, starts = self.files[sample.path]
        group = bisect.bisect_right(starts, sample.row) - 1
        if self.group is None or self.group[0] != (sample.path, group):
            self.group = ((sample.path, group), parquet.read_row_group(group, columns=list(LATENT_COLUMNS)))
        return self.group[1].column(sample.column)[sample.row - starts[group]].as_py()


def read_latent(sample: Sample, parquet: Optional[ParquetLatents] = None) -> np.ndarray:
    """A sample's latents (C, H, W) float32, from its .npy file or parquet row (pass one
    ParquetLatents for a run over many rows)."""
    if sample.row is None:
        array = _load_npy(sample.path, lambda: np.load(sample.path, allow_pickle=False))
    else:
        cell = (parquet or ParquetLatents()).cell(sample)
        array = _load_npy(f"{sample.path} row {sample.row} column {sample.column}",
                          lambda: np.load(io.BytesIO(cell), allow_pickle=False))
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3:
        raise InputError(f"{sample.key()}: latents must have shape (C, H, W) or (1, C, H, W), got {array.shape}")
    return np.asarray(array, np.float32)


def data_kind(path: str) -> str:
    """"rankings" when the file's first item has a ranking layout's generations key, else "pairs"."""
    if path.endswith(".parquet"):
        return "pairs"
    _, first = _items(path)[0]
    return "rankings" if any(keys[0] in first for keys in RANKING_LAYOUTS.values()) else "pairs"


# --- helpers ---------------------------------------------------------------------------------------

def _items(path: str):
    """(where, dict) per item of a .json list or per line of a .jsonl file."""
    text = read_text(path, "preference data file", InputError)
    if not text.strip():
        raise InputError(f"{path}: the file is empty")
    if path.endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(data, list):
            raise InputError(f"{path}: a .json data file must hold a list of items, got {type(data).__name__}")
        items = [(f"{path} item {k}", item) for k, item in enumerate(data)]
    else:
        items = []
        for number, line in enumerate(text.split("\n"), start=1):     # JSON lines end in \n only
            if not line.strip():
                continue
            try:
                items.append((f"{path}:{number}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{number}: not a JSON object ({e})") from None
    for where, item in items:
        if not isinstance(item, dict):
            raise InputError(f"{where}: expected a JSON object, got {type(item).__name__}")
    return items


def _sample(data_path: str, name: str, where: str, check_files: bool) -> Sample:
    path = name if os.path.isabs(name) else os.path.join(os.path.dirname(os.path.abspath(data_path)), name)
    path = os.path.normpath(path)
    if check_files and not os.path.isfile(path):
        raise InputError(f"{where}: {name} not found (looked for {path})")
    return Sample(path)


def _non_empty(items: Sequence, path: str, what: str) -> None:
    if not items:
        raise InputError(f"{path}: no {what} in the file")


def _load_npy(where: str, load):
    try:
        return load()
    except FileNotFoundError:
        raise InputError(f"{where}: latents file not found") from None
    except (OSError, ValueError) as e:
        raise InputError(f"{where}: not a readable .npy array ({e})") from None


def _parquet_file(path: str):
    """The pyarrow ParquetFile of a preference parquet, its columns checked."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise MissingDependencyError("reading .parquet preference data needs pyarrow: pip install ms-rm[eval]") from None
    try:
        parquet = pq.ParquetFile(path)
    except FileNotFoundError:
        raise InputError(f"{path}: preference data file not found") from None
    except Exception as e:      # pyarrow's errors (ArrowInvalid, ...) have no common base worth naming
        raise InputError(f"{path}: not a readable parquet file ({e})") from None
    missing = [c for c in ("prompt",) + LATENT_COLUMNS if c not in parquet.schema_arrow.names]
    if missing:
        raise InputError(f"{path}: not the reference's preference parquet (columns prompt, latent1, latent2): "
                         f"no {missing}")
    return parquet


def _parquet_pairs(path: str) -> List[Pair]:
    path = os.path.abspath(path)                         # a sample's key: the same file wherever it is named from
    prompts = _parquet_file(path).read(columns=["prompt"]).column("prompt").to_pylist()   # the latents stay on disk
    pairs = []
    for row, prompt in enumerate(prompts):
        where = f"{path} row {row}"
        if not isinstance(prompt, str) or not prompt:
            raise InputError(f"{where}: the pair has no prompt")
        pairs.append(Pair(prompt, Sample(path, row, "latent1"), Sample(path, row, "latent2"), where))
    _non_empty(pairs, path, "pairs")
    return pairs
