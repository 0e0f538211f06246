"""Helpers shared by the op folders: the compute dtype, argument checks whose messages name the argument, the
choice and logging of an implementation behind ``impl``, and the in-chunk document masks of the chunkwise paths.

Every check raises with the op's name first (``"delta_rule: reset has shape [2, 6], expected [2, 5] ([B, T])"``),
so that a caller sees which argument of which op does not fit.
"""
from __future__ import annotations

import logging
from typing import Callable, Iterable, Optional, Sequence, Set, Tuple

import torch
import torch.nn.functional as F


def compute_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    """fp64 if any given tensor is fp64, else fp32 (the op's arithmetic and state dtype)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def cast(dtype: torch.dtype, *tensors: Optional[torch.Tensor]) -> Sequence[Optional[torch.Tensor]]:
    """The tensors in ``dtype`` (out of place; a tensor already in ``dtype`` is returned as is and is never
    modified by the ops); None stays None."""
    return [None if t is None else t.to(dtype) for t in tensors]


def shape_str(t) -> str:
    """``"[2, 3, 4]"`` for a tensor of that shape; the type's name for anything else (for error messages)."""
    return "[" + ", ".join(str(s) for s in t.shape) + "]" if isinstance(t, torch.Tensor) else type(t).__name__


def check_float_tensors(op: str, named: Iterable[Tuple[str, object]]) -> None:
    """``TypeError`` naming the first ``(name, value)`` pair whose value is not a torch.Tensor, or not a
    floating-point one."""
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")


def check_initial_state(op: str, initial_state, shape: Tuple[int, ...], layout: str) -> None:
    """Check a carried state: None (a zero state) or a floating-point tensor of ``shape``.

    Raises:
        TypeError: neither None nor a floating-point tensor.
        ValueError: a tensor of another shape; the message gives ``shape`` and its ``layout`` (``"[B, H, K, V]"``).
    """
    if initial_state is None:
        return
    if not isinstance(initial_state, torch.Tensor) or not initial_state.is_floating_point():
        raise TypeError(f"{op}: initial_state must be a floating-point tensor or None")
    if initial_state.shape != shape:
        raise ValueError(f"{op}: initial_state has shape {shape_str(initial_state)}, expected "
                         f"[{', '.join(str(s) for s in shape)}] ({layout}) or None for a zero state")


def check_reset(op: str, reset, B: int, T: int) -> None:
    """Check in-segment document starts: None or a bool tensor ``[B, T]``.

    Raises:
        TypeError: neither None nor a bool tensor.
        ValueError: a bool tensor of another shape.
    """
    if reset is None:
        return
    if not isinstance(reset, torch.Tensor) or reset.dtype != torch.bool:
        raise TypeError(f"{op}: reset must be a bool tensor [B, T] or None, got "
                        f"{getattr(reset, 'dtype', type(reset).__name__)}")
    if reset.shape != (B, T):
        raise ValueError(f"{op}: reset has shape {shape_str(reset)}, expected [{B}, {T}] ([B, T])")


def check_same_device(op: str, tensors: Iterable[Optional[torch.Tensor]]) -> None:
    """``ValueError`` listing the devices when the given tensors (Nones skipped) are not all on one device."""
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise ValueError(f"{op}: inputs are on different devices {sorted(str(d) for d in devices)}")


def check_impl(op: str, impl: str, implementations: Tuple[str, ...]) -> None:
    """``ValueError`` when ``impl`` is not one of ``implementations``."""
    if impl not in implementations:
        raise ValueError(f"{op}: impl={impl!r} is not one of {implementations}")


def check_chunk_size(op: str, chunk_size) -> None:
    """``ValueError`` unless ``chunk_size`` is an int >= 1 (a bool is refused)."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{op}: chunk_size={chunk_size!r} must be an integer >= 1")


def choose_implementation(op: str, impl: str, fast: str, fallback: str, device_type: str,
                          unsupported: Callable[[], Optional[str]],
                          disabled: Callable[[], Optional[str]] = lambda: None) -> Tuple[str, Optional[str]]:
    """The implementation that runs for ``impl`` (already checked by :func:`check_impl`): ``fast`` or another
    named implementation runs as asked; ``"auto"`` takes ``fast`` on CUDA where it can run, else ``fallback``.

    ``fast`` is the CUDA-only path (``"fused"``, ``"fla"``), ``fallback`` the path that ``"auto"`` takes where
    ``fast`` does not run.  ``unsupported()`` gives the reason ``fast`` cannot take the inputs, or None;
    ``disabled()`` the reason ``"auto"`` must not choose it even so (a switch that ``impl=fast`` ignores), or
    None; it is asked first, and ``unsupported()`` only when it gives None.  Neither is called off CUDA under
    ``"auto"``.

    Returns:
        ``(name, why)``: the implementation, and the reason ``"auto"`` on CUDA did not take ``fast`` (else None).

    Raises:
        RuntimeError: ``impl == fast`` and ``unsupported()`` gives a reason (the message says it).
    """
    if impl == fast:
        why = unsupported()
        if why is not None:
            raise RuntimeError(f"{op}: impl={fast!r} cannot run: {why}; use impl={fallback!r} (or 'auto')")
        return fast, None
    if impl != "auto":
        return impl, None
    if device_type != "cuda":
        return fallback, None
    why = disabled()
    if why is None:
        why = unsupported()
    return (fast if why is None else fallback), why


def log_implementation(logger: logging.Logger, logged: Set[tuple], op: str, name: str, device_type: str,
                       fast: str, why: Optional[str], detail: str = "") -> None:
    """Log ``"<op>: <name> implementation on <device_type><detail>"`` at INFO, with ``"; not <fast>: <why>"``
    when ``why`` (the reason returned by :func:`choose_implementation`), once per (op, name, device type, why):
    ``logged`` holds the keys already logged."""
    key = (op, name, device_type, why)
    if key not in logged:
        logged.add(key)
        logger.info("%s: %s implementation on %s%s%s", op, name, device_type, detail,
                    f"; not {fast}: {why}" if why else "")


class ChunkDocuments:
    """In-chunk documents for ``reset [B, T]`` (True: a document starts at t) cut into n chunks of c
    positions (the tail padded with no reset), as masks that broadcast over heads:

    * ``same  [n, B, 1, c, c]`` bool: positions i, j of a chunk belong to the same document;
    * ``first [n, B, 1, c, 1]``: position belongs to the chunk's first document (it sees the entering state);
    * ``last  [n, B, 1, c, 1]``: position belongs to the chunk's last document (it writes the leaving state);
    * ``carry [n, B, 1, 1, 1]``: no reset inside the chunk (the entering state passes through);
    * ``keep  [n, B, 1, c, 1]``: the position is not a reset (its decay acts on a nonzero state).

    All but ``same`` are 0 / 1 in ``dtype``.
    """

    def __init__(self, reset: torch.Tensor, n: int, c: int, dtype: torch.dtype):
        B, T = reset.shape
        r = F.pad(reset.long(), (0, n * c - T))
        doc = r.cumsum(1).view(B, n, c).transpose(0, 1)            # [n, B, c] document id of each position
        r = r.view(B, n, c).transpose(0, 1)
        entering = doc[..., 0] - r[..., 0]                        # the document of the state entering the chunk
        self.same = (doc[..., :, None] == doc[..., None, :])[:, :, None]
        self.first = (doc == entering[..., None]).to(dtype)[:, :, None, :, None]
        self.last = (doc == doc[..., -1:]).to(dtype)[:, :, None, :, None]
        self.carry = (doc[..., -1] == entering).to(dtype)[:, :, None, None, None]
        self.keep = (r == 0).to(dtype)[:, :, None, :, None]
