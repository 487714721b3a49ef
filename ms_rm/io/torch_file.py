"""The reference's torch `.pt` state dicts (rm_head.pt, full_model.pt): read safely, and written
without torch.

This is the one place ms_rm imports torch, inside `TorchStateFile`, and only ever with
`torch.load(..., weights_only=True)`: a pickle that asks for anything but tensors and plain
containers is refused before any of it runs.

Files in torch's zip format are memory-mapped, and each tensor is copied out when read; its
pages of the mapping are then dropped from the process (madvise MADV_DONTNEED on the clean,
read-only file mapping), so reading a large head does not leave the whole file resident.

`write_state_dict` writes a state dict in torch's zip format with no torch installed (a trained
head must be saved where only MindSpore runs): the pickle holds an OrderedDict of
`torch._utils._rebuild_tensor_v2` calls over one storage per tensor, the globals that
`torch.load(weights_only=True)` accepts, and each storage is stored uncompressed at a 64-byte
aligned offset, as torch.save writes it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import pickle
import re
import struct
import zipfile
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np

from ..core.errors import CheckpointError, MissingDependencyError
from .files import atomic_file
from .tensor_source import TensorSource


_MADV_DONTNEED = 4
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _madvise():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return libc.madvise
    except (OSError, AttributeError, TypeError):      # not Linux, or no libc: pages just stay resident
        return None


_MADVISE = _madvise()


def _first_reason(error: Exception) -> str:
    """The first line of a reader error (torch's corrupt-file messages)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def _refusal(error: Exception) -> str:
    """Why torch.load(weights_only=True) refused a pickle, in one short clause: the global it
    asked for, when the message names one. torch's own advice (allowlisting the global, or
    turning weights_only off) is deliberately not passed on."""
    match = re.search(r"GLOBAL ([\w.]+)", str(error))
    if match:
        return f"it asks for the global '{match.group(1)}', which is not a tensor or plain container"
    return "it holds objects other than tensors and plain containers"


class TorchStateFile(TensorSource):
    """A torch state dict file: {name: tensor}, read tensor by tensor as numpy arrays."""

    def __init__(self, path: str, non_float_ok: Callable[[str], bool] = lambda key: False,
                 entry: Optional[str] = None, entry_required: bool = True):
        """non_float_ok(key): whether a non-float tensor under `key` is accepted (one the caller
        declares unused, such as an integer index buffer); any other non-float tensor is refused.
        entry: the file's top-level entry that holds the state dict (BLIP's {"model": ...}, open_clip's
        and HPSv2's {"state_dict": ..., "epoch": ...}); the file's other entries are listed in `outer`
        (name -> type), never read as weights. entry_required=False: a file without that entry is
        the state dict itself."""
        self.path = os.fspath(path)
        try:
            import torch
        except ImportError:
            raise MissingDependencyError(
                f"{self.path}: reading .pt checkpoints needs torch; install it with "
                "pip install 'ms-rm[reference]' (or torch==2.13.0)") from None
        self._torch = torch
        if not os.path.isfile(self.path):
            raise CheckpointError(f"{self.path}: file not found")
        self._mmapped = True
        try:
            try:
                state = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap can only be used" not in str(e):
                    raise
                self._mmapped = False
                state = torch.load(self.path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"{self.path}: refused: not a plain weights file ({_refusal(e)}); "
                                  "ms_rm never runs code from a checkpoint") from None
        except Exception as e:   # on corrupt bytes torch's reader can raise almost anything
            raise CheckpointError(f"{self.path}: cannot read: corrupt or truncated torch file "
                                  f"({type(e).__name__}: {_first_reason(e)})") from None
        self.outer: Dict[str, str] = {}
        if entry is not None:
            has_entry = isinstance(state, dict) and isinstance(state.get(entry), dict)
            if not has_entry and entry_required:
                found = sorted(map(str, state))[:5] if isinstance(state, dict) else type(state).__name__
                raise CheckpointError(f"{self.path}: expected a dict holding the state dict under '{entry}', "
                                      f"got {found}")
            if has_entry:
                self.outer = {str(k): type(v).__name__ for k, v in state.items() if k != entry}
                state = state[entry]
        if not isinstance(state, dict):
            raise CheckpointError(f"{self.path}: expected a state dict (name -> tensor), "
                                  f"got {type(state).__name__}")
        bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
        if bad:
            hint = " (a nested dict: save model.state_dict() itself)" if any(
                isinstance(state.get(k), dict) for k in bad) else ""
            raise CheckpointError(f"{self.path}: entries that are not named tensors: {bad[:5]}{hint}")
        not_float = [k for k, v in state.items() if not v.is_floating_point() and not non_float_ok(k)]
        if not_float:
            raise CheckpointError(f"{self.path}: tensors with a non-float dtype: {not_float[:5]}")
        self._state: Dict[str, "torch.Tensor"] = state

    def keys(self) -> List[str]:
        return list(self._state)

    def __contains__(self, name: str) -> bool:
        return name in self._state

    def shape(self, name: str) -> Tuple[int, ...]:
        return tuple(self._state[name].shape)

    def dtype(self, name: str) -> np.dtype:
        return np.dtype(str(self._state[name].dtype).replace("torch.", ""))

    def read(self, name: str) -> np.ndarray:
        """The tensor as a new numpy array in its stored dtype (bf16 included, bit for bit)."""
        stored = self._state[name].detach()
        tensor = stored.contiguous()
        if tensor.dtype == self._torch.bfloat16:
            array = tensor.view(self._torch.int16).numpy().view(np.dtype("bfloat16")).copy()
        else:
            array = tensor.numpy().copy()
        self._release(stored)
        return array

    def _release(self, tensor) -> None:
        """Drop a mapped tensor's pages from the resident set; they would be read again from the
        file if touched. Only for torch's file mapping: anonymous memory would be zeroed."""
        if not self._mmapped or _MADVISE is None or tensor.numel() == 0:
            return
        start = tensor.data_ptr()
        end = start + tensor.numel() * tensor.element_size()
        start -= start % _PAGE
        _MADVISE(start, end - start, _MADV_DONTNEED)

    def read_rows(self, name: str, rows) -> np.ndarray:
        """Rows of the tensor seen as (prod(shape[:-1]), shape[-1])."""
        tensor = self._state[name]
        picked = tensor.reshape(-1, tensor.shape[-1])[self._torch.as_tensor(list(rows), dtype=self._torch.long)]
        if picked.dtype == self._torch.bfloat16:
            return picked.contiguous().view(self._torch.int16).numpy().view(np.dtype("bfloat16"))
        return picked.numpy()

    def close(self) -> None:
        self._state = {}


# --- writing ----------------------------------------------------------------------------------------
_STORAGE_TYPES = {"float32": "FloatStorage", "float64": "DoubleStorage", "float16": "HalfStorage",
                  "bfloat16": "BFloat16Storage", "int64": "LongStorage", "int32": "IntStorage"}
_ALIGNMENT = 64                               # torch.save's storage alignment (mmap-friendly)


def _pickle_int(value: int) -> bytes:
    if -2 ** 31 <= value < 2 ** 31:
        return b"J" + struct.pack("<i", value)                     # BININT
    data = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(data)]) + data                    # LONG1


def _pickle_str(value: str) -> bytes:
    data = value.encode("utf-8")
    return b"X" + struct.pack("<I", len(data)) + data              # BINUNICODE


def _pickle_ints(values) -> bytes:
    return b")" if not values else b"(" + b"".join(_pickle_int(int(v)) for v in values) + b"t"


def _state_dict_pickle(arrays: Mapping[str, np.ndarray]) -> bytes:
    """Protocol-2 pickle of OrderedDict{name: tensor}, storage k holding the k-th array."""
    ordered_dict = b"ccollections\nOrderedDict\n)R"                # OrderedDict()
    out = [b"\x80\x02", ordered_dict, b"("]
    for key, (name, array) in enumerate(arrays.items()):
        strides = [s // array.itemsize for s in array.strides] if array.size else [1] * array.ndim
        storage = (b"(" + _pickle_str("storage") + b"ctorch\n" + _STORAGE_TYPES[array.dtype.name].encode() + b"\n"
                   + _pickle_str(str(key)) + _pickle_str("cpu") + _pickle_int(array.size) + b"tQ")   # BINPERSID
        out += [_pickle_str(name), b"ctorch._utils\n_rebuild_tensor_v2\n(", storage, _pickle_int(0),
                _pickle_ints(array.shape), _pickle_ints(strides), b"\x89", ordered_dict, b"tR"]
    out.append(b"u.")                                               # SETITEMS, STOP
    return b"".join(out)


def _aligned(archive: zipfile.ZipFile, fh, name: str, data: bytes) -> None:
    """One stored (uncompressed) entry whose data starts at a multiple of _ALIGNMENT in the file."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    start = fh.tell() + 30 + len(name.encode()) + 4                 # local header + name + extra field header
    info.extra = struct.pack("<HH", 0x4246, (-start) % _ALIGNMENT) + b"\0" * ((-start) % _ALIGNMENT)   # "FB" padding
    archive.writestr(info, data)


def write_state_dict(path: str, arrays: Mapping[str, np.ndarray]) -> str:
    """{name: array} as a torch state dict file `path` (torch.load(path, weights_only=True) reads it
    back as those tensors; bf16 arrays become bf16 tensors), written atomically; no torch needed."""
    arrays = {k: np.require(v, requirements="C") for k, v in arrays.items()}         # (0-d stays 0-d)
    bad = [k for k, v in arrays.items() if v.dtype.name not in _STORAGE_TYPES]
    if bad:
        raise CheckpointError(f"{path}: cannot write {bad[:5]} to a torch file: dtypes {sorted(_STORAGE_TYPES)} only")
    prefix = os.path.splitext(os.path.basename(path))[0] or "archive"
    with atomic_file(path, "wb") as fh:
        with zipfile.ZipFile(fh, "w", zipfile.ZIP_STORED) as archive:
            _aligned(archive, fh, f"{prefix}/data.pkl", _state_dict_pickle(arrays))
            _aligned(archive, fh, f"{prefix}/byteorder", b"little")
            for key, array in enumerate(arrays.values()):
                data = array.view(np.uint16).tobytes() if array.dtype.name == "bfloat16" else array.astype(
                    array.dtype.newbyteorder("<")).tobytes()
                _aligned(archive, fh, f"{prefix}/data/{key}", data)
            _aligned(archive, fh, f"{prefix}/version", b"3\n")
    return path
