"""Host memory: giving freed memory back to the operating system.

glibc's malloc keeps the memory a process frees in its heaps, where the resident set still counts
it, unless the pages happen to lie at a heap's top. Loading a large model leaves such holes (mindone's
CLIP-G leaves the process resident far above the size of its weights until `malloc_trim`: the
figures are in docs/measurements.md), and so does freeing a model. `release_freed_memory()` asks
glibc to return them; elsewhere (another C library, another OS) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
from typing import Optional

logger = logging.getLogger(__name__)

_libc: Optional[ctypes.CDLL] = None
_looked_up = False


def release_freed_memory() -> None:
    """Collect Python's garbage, then return the C heap's free pages to the OS (glibc malloc_trim)."""
    global _libc, _looked_up
    gc.collect()
    if not _looked_up:
        _looked_up = True
        name = ctypes.util.find_library("c")
        try:
            libc = ctypes.CDLL(name) if name else None
            _libc = libc if libc is not None and hasattr(libc, "malloc_trim") else None
        except OSError:
            _libc = None
        if _libc is None:
            logger.debug("no glibc malloc_trim here: freed memory stays with the C heap")
    if _libc is not None:
        _libc.malloc_trim(0)
