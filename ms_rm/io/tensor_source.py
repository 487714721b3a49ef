"""The one surface every tensor file reader of ms_rm offers: a TensorSource.

Readers: a safetensors file or a sharded set (ms_rm.io.safetensors_file), a torch state-dict
file (ms_rm.io.torch_file). Converters and loaders read through this surface only, so they do
not care which format a tensor comes from. Tensors are read one at a time, in their stored
dtype (bf16 included), so a conversion holds one tensor in memory, not the file.
"""

from __future__ import annotations

import abc
from typing import List, Sequence, Tuple

import numpy as np


class TensorSource(abc.ABC):
    """A mapping-like, read-only view of the named tensors in one or more files."""

    path: str                        # the file (or the index of a sharded set) it was opened from

    @abc.abstractmethod
    def keys(self) -> List[str]:
        """The tensor names, in file order."""

    @abc.abstractmethod
    def __contains__(self, name: str) -> bool: ...

    @abc.abstractmethod
    def shape(self, name: str) -> Tuple[int, ...]: ...

    @abc.abstractmethod
    def dtype(self, name: str) -> np.dtype: ...

    @abc.abstractmethod
    def read(self, name: str) -> np.ndarray:
        """The tensor as a new numpy array in its stored dtype."""

    @abc.abstractmethod
    def read_rows(self, name: str, rows: Sequence[int]) -> np.ndarray:
        """Rows of the tensor seen as (prod(shape[:-1]), shape[-1]), without reading the rest."""

    def source(self, name: str) -> str:
        """The file that holds tensor `name` (for error messages and manifests)."""
        return self.path

    def close(self) -> None:
        """Release the file(s)."""

    def __enter__(self) -> "TensorSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
