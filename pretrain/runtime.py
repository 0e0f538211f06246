"""Process-level settings for CPU runs, applied by the commands (train, evaluate, generate, benchmarks).

``tune_cpu_allocator``: training allocates and frees the same multi-megabyte activation tensors every step.
glibc's malloc serves allocations above its mmap threshold with fresh pages from the kernel and gives them back
on free, so every step pays page faults and zeroing for each large tensor (on a 2-core machine the tiny presets
trained about 11% slower because of it).  Raising the mmap threshold to its maximum (32 MB) and the heap trim
threshold (512 MB) makes the allocator reuse that memory, the effect PyTorch's CPU performance guide obtains by
preloading tcmalloc or jemalloc.  Linux with glibc only; ``MEMTRAIN_MALLOC_TUNING=0`` turns it off.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_applied = None


def tune_cpu_allocator(mmap_threshold: int = 32 << 20, trim_threshold: int = 512 << 20) -> bool:
    """Keep freed tensor memory in the process; returns whether the setting was applied (once per process)."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if not sys.platform.startswith("linux") or os.environ.get("MEMTRAIN_MALLOC_TUNING", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    _applied = bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    return _applied
