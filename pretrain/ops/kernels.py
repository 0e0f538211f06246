"""Building and loading the fused CUDA kernels of ``csrc/`` (the extension module ``memtrain_kernels``).

Two ways to get the module, as DeepSpeed does with its ops:

* **just in time** (the default): the first call of :func:`load` on a machine with a CUDA build of torch and
  the CUDA toolkit (``CUDA_HOME`` or ``nvcc`` on the PATH) compiles ``csrc/`` with ninja through
  ``torch.utils.cpp_extension.load`` into :func:`build_dir` (for example
  ``$TORCH_EXTENSIONS_DIR/py312_cu130/memtrain_kernels``; torch's default cache directory when unset); later
  processes load the cached build.  The compiler's output is kept in
  ``build.log`` in that directory; set ``MEMTRAIN_KERNELS_VERBOSE=1`` to also see it while it builds.
  Architectures: ``TORCH_CUDA_ARCH_LIST`` (torch's default: the visible GPUs').
* **ahead of time**: ``MEMTRAIN_BUILD_OPS=1 pip install --no-build-isolation -e .`` builds the same sources
  into an importable ``memtrain_kernels`` module (setup.py); :func:`load` uses it when it imports.

The ops (``pretrain.ops.fast_weight``, ``pretrain.ops.rel_attention``) choose the fused kernels for CUDA
tensors with ``impl="auto"`` when :func:`load` succeeds and the selection is not switched off
(``MEMTRAIN_FUSED_OPS=0`` in the environment, or :func:`set_enabled` ``(False)``); they log which
implementation runs.  On a CPU-only machine nothing here is built or imported.

:func:`load_emulator` builds the same kernel sources as plain C++ for a CPU emulator of CUDA thread blocks
(``csrc/common/emulate.h``): the tests use it to check the kernels' indexing and algebra without a GPU.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
import time
from pathlib import Path
from typing import List, Optional

import torch

__all__ = ["KernelsUnavailable", "load", "load_emulator", "available", "unavailable_reason", "enabled",
           "set_enabled", "disabled", "csrc_dir", "cuda_sources", "build_dir", "NAME"]

NAME = "memtrain_kernels"
EMULATOR_NAME = "memtrain_kernels_emu"
logger = logging.getLogger(__name__)

_module = None
_error: Optional[str] = None
_emulator = None
_enabled = os.environ.get("MEMTRAIN_FUSED_OPS", "1").strip() not in ("0", "false", "False", "no")


class KernelsUnavailable(RuntimeError):
    """The fused kernels cannot be used here; the message says why and what to do."""


def csrc_dir() -> Path:
    """The kernel sources: ``csrc/`` at the repository root (the package is installed in editable mode)."""
    return Path(__file__).resolve().parents[2] / "csrc"


def cuda_sources() -> List[str]:
    """Source files of the CUDA extension (the torch binding and every ``.cu`` file), as strings."""
    root = csrc_dir()
    return [str(root / "binding.cpp")] + sorted(str(p) for p in root.glob("*/*.cu"))


def build_dir(name: str = NAME) -> Path:
    """Where the JIT build of ``name`` lives (with its ``build.log``): torch's layout,
    ``$TORCH_EXTENSIONS_DIR/py<version>_<cu<version>|cpu>/<name>`` (torch's default root when unset)."""
    from torch.utils.cpp_extension import get_default_build_root
    base = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    cu = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
    return Path(base) / f"{py}_{cu}" / name


def _write_log(bdir: Path, text: str) -> Path:
    """Write ``build.log`` atomically (a temporary name, then a rename)."""
    path = bdir / "build.log"
    tmp = bdir / f".build.log.{os.getpid()}"
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def _jit(name: str, sources: List[str], cuda: bool, verbose: bool):
    from torch.utils import cpp_extension
    bdir = build_dir(name)
    bdir.mkdir(parents=True, exist_ok=True)
    kw = dict(name=name, sources=sources, extra_include_paths=[str(csrc_dir())], build_directory=str(bdir),
              verbose=verbose)
    if cuda:
        kw.update(extra_cflags=["-O3"], extra_cuda_cflags=["-O3", "--expt-relaxed-constexpr", "-lineinfo"])
    else:
        kw.update(extra_cflags=["-O1", "-DMT_EMULATE"])
    t0 = time.perf_counter()
    try:
        from pretrain.runtime import clear_stale_build_locks
        clear_stale_build_locks()                 # a build killed half-way would make this load wait forever
        mod = cpp_extension.load(**kw)
    except Exception as e:  # the compiler's output is in the message
        log = _write_log(bdir, f"build of {name} failed\nsources: {sources}\n\n{e}\n")
        raise KernelsUnavailable(f"building {name} failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                                 f" (full compiler output: {log})") from e
    secs = time.perf_counter() - t0
    log = _write_log(bdir, f"{name} loaded in {secs:.1f} s (a build, or the cached one) from {bdir}\n"
                                f"sources: {sources}\narchitectures: "
                                f"{os.environ.get('TORCH_CUDA_ARCH_LIST', 'torch default') if cuda else 'CPU'}\n")
    logger.info("%s ready in %.1f s (build directory %s, log %s)", name, secs, bdir, log)
    return mod


def load(verbose: Optional[bool] = None):
    """The CUDA extension module, built on first use (module docstring); the result, or the reason it failed,
    is remembered for the process.

    Raises:
        KernelsUnavailable: torch has no CUDA, the CUDA toolkit is missing, or the build failed (the message
        names the log with the compiler's output).
    """
    global _module, _error
    if _module is not None:
        return _module
    if _error is not None:
        raise KernelsUnavailable(_error)
    if verbose is None:
        verbose = os.environ.get("MEMTRAIN_KERNELS_VERBOSE", "0") == "1"
    try:
        try:
            mod = importlib.import_module(NAME)          # built ahead of time (MEMTRAIN_BUILD_OPS=1)
            if mod.info()["emulated"]:
                raise ImportError("emulated build")
            logger.info("%s: using the prebuilt module %s", NAME, getattr(mod, "__file__", "?"))
        except ImportError:
            if torch.version.cuda is None:
                raise KernelsUnavailable(f"torch {torch.__version__} is a CPU build: the fused kernels need a CUDA "
                                         f"build of torch") from None
            from torch.utils.cpp_extension import CUDA_HOME
            if CUDA_HOME is None:
                raise KernelsUnavailable("the CUDA toolkit was not found (set CUDA_HOME or put nvcc on the PATH)") \
                    from None
            mod = _jit(NAME, cuda_sources(), cuda=True, verbose=verbose)
    except KernelsUnavailable as e:
        _error = str(e)
        logger.warning("fused kernels unavailable: %s", _error)
        raise
    _module = mod
    return mod


def load_emulator(verbose: bool = False):
    """The kernel sources built as C++ for the CPU block emulator (tests only): the same functions as
    :func:`load`'s module, on CPU tensors.  Slow (each CUDA thread is a fiber); for small inputs.

    Raises:
        KernelsUnavailable: the C++ build failed (the message names the log).
    """
    global _emulator
    if _emulator is None:
        root = csrc_dir()
        sources = [str(root / "emulate" / f) for f in ("binding.cpp", "fast_weight.cpp", "rel_attention.cpp")]
        _emulator = _jit(EMULATOR_NAME, sources, cuda=False, verbose=verbose)
    return _emulator


def unavailable_reason(device: Optional[torch.device] = None) -> Optional[str]:
    """None if the fused kernels can run on ``device`` (a CUDA device; building them if needed), else why not."""
    if device is not None and torch.device(device).type != "cuda":
        return f"the fused kernels run on CUDA devices, not {torch.device(device).type}"
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    try:
        load()
    except KernelsUnavailable as e:
        return str(e)
    return None


def available(device: Optional[torch.device] = None) -> bool:
    """Whether the fused kernels can run on ``device`` (see :func:`unavailable_reason`)."""
    return unavailable_reason(device) is None


def enabled() -> bool:
    """Whether ``impl="auto"`` may choose the fused kernels (``MEMTRAIN_FUSED_OPS=0`` or
    ``set_enabled(False)`` switch it off; ``impl="fused"`` ignores this switch)."""
    return _enabled


def disabled_reason() -> Optional[str]:
    """Why ``impl="auto"`` may not choose the fused kernels now (see :func:`enabled`), or None when it may."""
    return None if enabled() else "disabled (MEMTRAIN_FUSED_OPS=0 or kernels.set_enabled(False))"


def set_enabled(flag: bool) -> bool:
    """Let ``impl="auto"`` choose the fused kernels or not; returns the previous setting."""
    global _enabled
    prev, _enabled = _enabled, bool(flag)
    return prev


@contextlib.contextmanager
def disabled():
    """``with kernels.disabled():`` runs the reference / chunk paths under ``impl="auto"``."""
    prev = set_enabled(False)
    try:
        yield
    finally:
        set_enabled(prev)
