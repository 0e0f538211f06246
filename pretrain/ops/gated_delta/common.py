"""Input checks and dtype handling shared by every implementation of the gated delta rule.

Conventions (all implementations; flash-linear-attention's layout): q, k ``[B, T, H, K]``, v ``[B, T, H, V]``,
g and beta ``[B, T, H]``, the state S ``[B, H, K, V]`` (key dimension x value dimension), reset ``[B, T]``
bool.  The arithmetic runs in fp32 whatever the input dtype (bf16, fp16, fp32), or in fp64 when an input is
fp64 (so that tests can compare implementations to ~1e-12).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch


def compute_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    """fp64 if any given tensor is fp64, else fp32 (the op's arithmetic and state dtype)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def cast(dtype: torch.dtype, *tensors: Optional[torch.Tensor]) -> Sequence[Optional[torch.Tensor]]:
    """The tensors in ``dtype`` (out of place; a tensor already in ``dtype`` is returned as is and is never
    modified by the ops)."""
    return [None if t is None else t.to(dtype) for t in tensors]


def default_scale(scale: Optional[float], K: int) -> float:
    """``scale`` or, when None, K^-1/2 (fla's default)."""
    return K ** -0.5 if scale is None else float(scale)


def _shape(t) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]" if isinstance(t, torch.Tensor) else type(t).__name__


def check_inputs(op: str, q, k, v, g, beta, initial_state, reset, scale) -> None:
    """Raise ``ValueError`` (``TypeError`` for a non-tensor or non-float input) naming the argument of ``op``
    that does not fit the conventions above, and what it should be."""
    named = [("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta)]
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")
    if q.dim() != 4:
        raise ValueError(f"{op}: q has shape {_shape(q)}, expected 4 dims [B, T, H, K]")
    B, T, H, K = q.shape
    if B < 1 or T < 1 or H < 1 or K < 1:
        raise ValueError(f"{op}: q has shape {_shape(q)}; B, T, H and K must be at least 1")
    if k.shape != q.shape:
        raise ValueError(f"{op}: k has shape {_shape(k)}, expected q's shape {_shape(q)} ([B, T, H, K])")
    if v.dim() != 4 or v.shape[:3] != q.shape[:3] or v.shape[3] < 1:
        raise ValueError(f"{op}: v has shape {_shape(v)}, expected [{B}, {T}, {H}, V] ([B, T, H, V]) with "
                         f"V >= 1 (no grouped value heads)")
    V = v.shape[3]
    for name, t in (("g", g), ("beta", beta)):
        if t.shape != (B, T, H):
            raise ValueError(f"{op}: {name} has shape {_shape(t)}, expected [{B}, {T}, {H}] ([B, T, H]: one "
                             f"value per position and head)")
    if initial_state is not None:
        if not isinstance(initial_state, torch.Tensor) or not initial_state.is_floating_point():
            raise TypeError(f"{op}: initial_state must be a floating-point tensor or None")
        if initial_state.shape != (B, H, K, V):
            raise ValueError(f"{op}: initial_state has shape {_shape(initial_state)}, expected "
                             f"[{B}, {H}, {K}, {V}] ([B, H, K, V]) or None for a zero state")
    if reset is not None:
        if not isinstance(reset, torch.Tensor) or reset.dtype != torch.bool:
            raise TypeError(f"{op}: reset must be a bool tensor [B, T] or None, got "
                            f"{getattr(reset, 'dtype', type(reset).__name__)}")
        if reset.shape != (B, T):
            raise ValueError(f"{op}: reset has shape {_shape(reset)}, expected [{B}, {T}] ([B, T])")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"{op}: scale must be a number or None (K^-1/2), got {type(scale).__name__}")
    devices = {t.device for _, t in named} | {t.device for t in (initial_state, reset) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"{op}: inputs are on different devices {sorted(str(d) for d in devices)}")
