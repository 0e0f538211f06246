"""Helpers shared by the op folders: the compute dtype, argument checks whose messages name the argument, and
the in-chunk document masks of the chunkwise paths.

Every check raises with the op's name first (``"delta_rule: reset has shape [2, 6], expected [2, 5] ([B, T])"``),
so that a caller sees which argument of which op does not fit.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence, Tuple

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
