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


def extensions_dir() -> str:
    """Where torch builds its JIT extensions (DeepSpeed's CPU ops, the fused kernels): ``TORCH_EXTENSIONS_DIR``,
    else torch's default under ``~/.cache``."""
    explicit = os.environ.get("TORCH_EXTENSIONS_DIR")
    if explicit:
        return explicit
    from torch.utils.cpp_extension import _get_build_directory  # noqa: PLC0415 (torch's own default)
    return os.path.dirname(_get_build_directory("x", verbose=False))


def _process_cwds() -> set:
    cwds = set()
    for pid in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if pid.isdigit():
            try:
                cwds.add(os.path.realpath(os.readlink(f"/proc/{pid}/cwd")))
            except OSError:
                continue
    return cwds


def clear_stale_build_locks(root: str | None = None, min_age_s: float = 60.0) -> list:
    """Remove the ``lock`` files that a killed extension build left in ``root`` (default: ``extensions_dir()``).

    torch guards each JIT build directory with a ``lock`` file and waits, without limit, for it to disappear: a
    build killed half-way (Ctrl-C, a job's time limit) makes every later run that loads the extension hang.  A
    lock counts as stale when it is older than ``min_age_s`` and no process works in its directory (the build's
    ninja runs there).  Returns the removed paths (each is also printed to stderr).  Linux only (``/proc``);
    elsewhere nothing is removed."""
    root = root or extensions_dir()
    if not os.path.isdir(root) or not os.path.isdir("/proc"):
        return []
    import time
    locks = []
    for dirpath, _, files in os.walk(root):
        if "lock" in files:
            path = os.path.join(dirpath, "lock")
            try:
                if time.time() - os.path.getmtime(path) >= min_age_s:
                    locks.append(path)
            except OSError:
                continue
    if not locks:
        return []
    busy = _process_cwds()
    removed = []
    for path in locks:
        if os.path.realpath(os.path.dirname(path)) in busy:
            continue
        try:
            os.remove(path)
        except OSError:
            continue
        removed.append(path)
        print(f"removed a stale build lock left by an interrupted extension build: {path}", file=sys.stderr)
    return removed
