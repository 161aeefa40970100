"""Give freed memory back to the OS between layers and shards.

glibc keeps freed blocks below its (adaptive, up to 32 MiB) mmap threshold in the heap, so a loop that allocates
and frees layer-sized tensors keeps its high-water mark as resident memory. `malloc_trim` returns those pages.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    try:
        lib = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return lib if lib is not None and hasattr(lib, "malloc_trim") else None


def release_memory() -> None:
    """Return free heap pages to the OS (glibc only; a no-op elsewhere)."""
    lib = _libc()
    if lib is not None:
        lib.malloc_trim(0)
