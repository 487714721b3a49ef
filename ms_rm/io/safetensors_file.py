"""safetensors files, one tensor at a time.

Reading parses and checks the whole header first (size, JSON, dtypes, shapes, offsets inside
the file, no overlaps), so a truncated or corrupt file fails before any data is read and an
absurd header allocates nothing. Each tensor is then read with a positioned read into a fresh
buffer, without a memory map: a conversion's resident memory is one tensor, not the file.

Writing streams: the header is laid out from the declared names, dtypes and shapes, then the
tensors are written in that order while their sha256 is computed.

Format: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape,
data_offsets: [begin, end]}, "__metadata__": {str: str}}, then the data.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Dict, Iterable, List, Mapping, Optional, Tuple

import numpy as np
import mindspore  # noqa: F401  (registers numpy's bfloat16 dtype)

from ..core.config import is_int
from ..core.errors import CheckpointError
from .files import read_json
from .tensor_source import TensorSource

DTYPES = {"F64": np.dtype("float64"), "F32": np.dtype("float32"), "F16": np.dtype("float16"),
          "BF16": np.dtype("bfloat16"), "I64": np.dtype("int64"), "I32": np.dtype("int32"),
          "I16": np.dtype("int16"), "I8": np.dtype("int8"), "U8": np.dtype("uint8"),
          "BOOL": np.dtype("bool")}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER_BYTES = 100 * 1024 * 1024      # the safetensors library's own limit


class SafetensorsFile(TensorSource):
    """A safetensors file opened for checked, tensor-by-tensor reading."""

    def __init__(self, path: str):
        self.path = os.fspath(path)
        try:
            self._file = open(self.path, "rb")
        except FileNotFoundError:
            raise CheckpointError(f"{self.path}: file not found") from None
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot open ({e.strerror})") from None
        try:
            self._entries, self.metadata, self._data_start = self._parse_header()
        except BaseException:
            self._file.close()
            raise

    def _fail(self, problem: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: not a valid safetensors file: {problem}")

    def _parse_header(self):
        size = os.fstat(self._file.fileno()).st_size
        prefix = self._file.read(8)
        if len(prefix) < 8:
            raise self._fail(f"only {size} bytes, shorter than the 8-byte header length (truncated?)")
        n = int.from_bytes(prefix, "little")
        if n > MAX_HEADER_BYTES or n > size - 8:
            raise self._fail(f"header length {n} exceeds the file ({size} bytes) or the "
                             f"{MAX_HEADER_BYTES}-byte limit (truncated or corrupt)")
        raw = self._file.read(n)
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise self._fail(f"header is not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise self._fail("header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise self._fail("__metadata__ must map strings to strings")
        data_size = size - 8 - n
        entries: Dict[str, Tuple[np.dtype, Tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            entries[name] = self._check_entry(name, info, data_size)
        spans = sorted((begin, end, name) for name, (_, _, begin, end) in entries.items())
        for (b1, e1, n1), (b2, e2, n2) in zip(spans, spans[1:]):
            if b2 < e1:
                raise self._fail(f"tensors '{n1}' and '{n2}' overlap")
        return entries, metadata, 8 + n

    def _check_entry(self, name: str, info, data_size: int):
        if not isinstance(info, dict):
            raise self._fail(f"entry '{name}' is not an object")
        dtype = DTYPES.get(info.get("dtype")) if isinstance(info.get("dtype"), str) else None
        if dtype is None:
            raise self._fail(f"tensor '{name}' has unsupported dtype {info.get('dtype')!r}")
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not isinstance(shape, list) or not all(is_int(d, 0) for d in shape):
            raise self._fail(f"tensor '{name}' has an invalid shape {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(is_int(o) for o in offsets)):
            raise self._fail(f"tensor '{name}' has invalid data_offsets {offsets!r}")
        begin, end = offsets
        nbytes = math.prod(shape) * dtype.itemsize          # Python ints: an absurd shape cannot overflow
        if not 0 <= begin <= end or end - begin != nbytes:
            raise self._fail(f"tensor '{name}': data_offsets {offsets} do not hold {nbytes} bytes "
                             f"of shape {shape} {info['dtype']}")
        if end > data_size:
            raise self._fail(f"tensor '{name}' ends at byte {end} but the data section has only "
                             f"{data_size} bytes (truncated file?)")
        return dtype, tuple(shape), begin, end

    # --- mapping-like access -----------------------------------------------------------------
    def keys(self) -> List[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> Tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self._entries[name][0]

    def nbytes(self, name: str) -> int:
        _, _, begin, end = self._entries[name]
        return end - begin

    def read(self, name: str) -> np.ndarray:
        """The tensor as a new numpy array in its stored dtype."""
        dtype, shape, begin, end = self._entries[name]
        out = np.empty(shape, dtype=dtype)
        view = out.reshape(-1).view(np.uint8)
        self._file.seek(self._data_start + begin)
        if self._file.readinto(view) != end - begin:
            raise self._fail(f"tensor '{name}' is cut short (file changed while reading?)")
        return out

    def read_rows(self, name: str, rows) -> np.ndarray:
        """Rows of the tensor seen as (prod(shape[:-1]), shape[-1]), read without reading the rest."""
        dtype, shape, begin, _ = self._entries[name]
        width = shape[-1]
        out = np.empty((len(rows), width), dtype=dtype)
        for i, row in enumerate(rows):
            self._file.seek(self._data_start + begin + int(row) * width * dtype.itemsize)
            if self._file.readinto(out[i].view(np.uint8)) != width * dtype.itemsize:
                raise self._fail(f"tensor '{name}' is cut short")
        return out

    def close(self) -> None:
        self._file.close()


class ShardedSafetensors(TensorSource):
    """Several safetensors files seen as one key space (a sharded diffusers checkpoint)."""

    def __init__(self, files: Iterable[str], index_path: Optional[str] = None,
                 weight_map: Optional[Mapping[str, str]] = None):
        self.files = [SafetensorsFile(f) for f in files]
        self.path = index_path or self.files[0].path
        self._where: Dict[str, SafetensorsFile] = {}
        for f in self.files:
            for key in f.keys():
                if key in self._where:
                    raise CheckpointError(f"tensor '{key}' appears in both {self._where[key].path} and {f.path}")
                self._where[key] = f
        if weight_map is not None:
            for key, shard in weight_map.items():
                holder = self._where.get(key)
                if holder is None or os.path.basename(holder.path) != shard:
                    raise CheckpointError(f"{index_path}: weight_map puts '{key}' in {shard}, "
                                          "but that shard does not hold it (incomplete or mismatched shards)")
            extra = sorted(set(self._where) - set(weight_map))
            if extra:
                raise CheckpointError(f"{index_path}: weight_map lacks {len(extra)} tensors the shards hold, "
                                      f"e.g. {extra[:3]}")

    def keys(self) -> List[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> Tuple[int, ...]:
        return self._where[name].shape(name)

    def dtype(self, name: str) -> np.dtype:
        return self._where[name].dtype(name)

    def source(self, name: str) -> str:
        return self._where[name].path

    def read(self, name: str) -> np.ndarray:
        return self._where[name].read(name)

    def read_rows(self, name: str, rows) -> np.ndarray:
        return self._where[name].read_rows(name, rows)

    def close(self) -> None:
        for f in self.files:
            f.close()


def open_safetensors(path: str) -> ShardedSafetensors:
    """A single .safetensors file, or a sharded set through its .index.json."""
    path = os.fspath(path)
    if path.endswith(".index.json"):
        index = read_json(path, "shard index", CheckpointError)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{path}: shard index has no valid 'weight_map'")
        folder = os.path.dirname(path)
        shards = sorted(set(weight_map.values()))
        bad = [s for s in shards if os.path.basename(s) != s]
        if bad:
            raise CheckpointError(f"{path}: shard names must be plain file names, got {bad[:3]}")
        return ShardedSafetensors([os.path.join(folder, s) for s in shards], path, weight_map)
    return ShardedSafetensors([path])


class SafetensorsWriter:
    """Streams tensors into a safetensors file in a declared order, hashing as it goes."""

    def __init__(self, path: str, specs: List[Tuple[str, np.dtype, Tuple[int, ...]]],
                 metadata: Optional[Mapping[str, str]] = None):
        self.path = os.fspath(path)
        self._specs = [(name, np.dtype(dtype), tuple(shape)) for name, dtype, shape in specs]
        header: Dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
        offset = 0
        for name, dtype, shape in self._specs:
            nbytes = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-(8 + len(raw)) % 8)                         # data starts 8-byte aligned
        self._file = open(self.path, "wb")
        self._hash = hashlib.sha256()
        self._emit(len(raw).to_bytes(8, "little") + raw)
        self._next = 0

    def _emit(self, data) -> None:
        self._file.write(data)
        self._hash.update(data)

    def write(self, name: str, array: np.ndarray) -> None:
        expected, dtype, shape = self._specs[self._next]
        if name != expected or array.dtype != dtype or tuple(array.shape) != shape:
            raise ValueError(f"{self.path}: expected tensor '{expected}' {dtype} {shape}, "
                             f"got '{name}' {array.dtype} {tuple(array.shape)}")
        self._emit(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
        self._next += 1

    def close(self) -> str:
        """Finish the file; returns its sha256 (hex)."""
        if self._next != len(self._specs):
            self._file.close()
            raise ValueError(f"{self.path}: only {self._next} of {len(self._specs)} tensors written")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        return self._hash.hexdigest()


def sha256_file(path: str, progress=None, chunk: int = 16 * 1024 * 1024) -> str:
    """sha256 of a file, read in chunks (constant memory); progress(n_bytes) after each chunk."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                return digest.hexdigest()
            digest.update(block)
            if progress is not None:
                progress(len(block))
