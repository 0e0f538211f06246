"""Input checks and dtype handling shared by every implementation of the fast-weight ops.

Conventions (all implementations): q, k ``[B, H, T, Dk]``, v ``[B, H, T, Dv]``, beta ``[B, H, T]``, the fast
weight (state) ``[B, H, Dk, Dv]`` (key dimension x value dimension, the layout of lmtool-fwms' kernel),
reset ``[B, T]`` bool.  The arithmetic runs in fp32 whatever the input dtype (bf16, fp16, fp32), or in fp64
when an input is fp64 (so that tests can compare implementations to ~1e-10).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch


def compute_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    """fp64 if any given tensor is fp64, else fp32 (the op's arithmetic and state dtype)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def check_inputs(op: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: Optional[torch.Tensor],
                 initial_state: Optional[torch.Tensor], reset: Optional[torch.Tensor]) -> None:
    """Raise ``ValueError`` (``TypeError`` for a non-tensor or non-float input) naming the argument of ``op``
    that does not fit the conventions above, and what it should be."""
    named = [("q", q), ("k", k), ("v", v)] + ([("beta", beta)] if beta is not None else [])
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")
    if q.dim() != 4:
        raise ValueError(f"{op}: q has shape {_shape(q)}, expected 4 dims [B, H, T, Dk]")
    B, H, T, Dk = q.shape
    if T < 1 or Dk < 1:
        raise ValueError(f"{op}: q has shape {_shape(q)}; T and Dk must be at least 1")
    if k.shape != q.shape:
        raise ValueError(f"{op}: k has shape {_shape(k)}, expected q's shape {_shape(q)} ([B, H, T, Dk])")
    if v.dim() != 4 or v.shape[:3] != q.shape[:3] or v.shape[3] < 1:
        raise ValueError(f"{op}: v has shape {_shape(v)}, expected [{B}, {H}, {T}, Dv] with Dv >= 1")
    Dv = v.shape[3]
    if beta is not None and beta.shape != (B, H, T):
        raise ValueError(f"{op}: beta has shape {_shape(beta)}, expected [{B}, {H}, {T}] (one gate per head "
                         f"and position)")
    if initial_state is not None:
        if not isinstance(initial_state, torch.Tensor) or not initial_state.is_floating_point():
            raise TypeError(f"{op}: initial_state must be a floating-point tensor or None")
        if initial_state.shape != (B, H, Dk, Dv):
            raise ValueError(f"{op}: initial_state has shape {_shape(initial_state)}, expected "
                             f"[{B}, {H}, {Dk}, {Dv}] ([B, H, Dk, Dv]) or None for a zero state")
    if reset is not None:
        if not isinstance(reset, torch.Tensor) or reset.dtype != torch.bool:
            raise TypeError(f"{op}: reset must be a bool tensor [B, T] or None, got "
                            f"{getattr(reset, 'dtype', type(reset).__name__)}")
        if reset.shape != (B, T):
            raise ValueError(f"{op}: reset has shape {_shape(reset)}, expected [{B}, {T}] ([B, T])")
    devices = {t.device for _, t in named} | {t.device for t in (initial_state, reset) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"{op}: inputs are on different devices {sorted(str(d) for d in devices)}")


def cast(dtype: torch.dtype, *tensors: Optional[torch.Tensor]) -> Sequence[Optional[torch.Tensor]]:
    """The tensors in ``dtype`` (out of place; a tensor already in ``dtype`` is returned as is, never
    modified by the ops)."""
    return [None if t is None else t.to(dtype) for t in tensors]
