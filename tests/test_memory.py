"""Freed host memory goes back to the OS (ms_rm.core.memory)."""

from ms_rm.core.memory import release_freed_memory


def _resident_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def test_release_returns_the_holes_a_freed_model_leaves_in_the_heap():
    """400 MiB of 4 KiB blocks, one in 64 kept (so the heap cannot simply shrink from its top):
    freeing the rest leaves the pages resident until release_freed_memory hands them back."""
    blocks = [bytearray(4096) for _ in range(100_000)]
    for block in blocks:
        block[::512] = b"\x01" * 8                       # touch every page
    kept = blocks[::64]
    before_free = _resident_mib()
    del blocks
    freed = _resident_mib()
    release_freed_memory()
    released = _resident_mib()
    assert kept and before_free - released > 250, (before_free, freed, released)
    assert freed - released > 150, (before_free, freed, released)     # free() alone had not returned them
