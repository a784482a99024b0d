"""Keep a streaming write's memory at the size of the tensor in flight.

glibc serves a freed large block's size from its heap afterwards (its mmap threshold rises to it),
and a heap fragmented by tensors of mixed sizes is not returned to the system: converting 32
tensors of 16 MiB one at a time held ~190 MiB. Large blocks mapped and unmapped each time do not
stay behind.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_MMAP_THRESHOLD = -3
_done = False


def release_large_blocks(threshold: int = 1 << 20) -> None:
    """Have glibc map (and unmap on free) every block of ``threshold`` bytes or more; once per process."""
    global _done
    if _done or not sys.platform.startswith("linux"):
        return
    _done = True
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, threshold)
