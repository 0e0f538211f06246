"""Input checks shared by every implementation of the gated delta rule.

Conventions (all implementations; flash-linear-attention's layout): q, k ``[B, T, H, K]``, v ``[B, T, H, V]``,
g and beta ``[B, T, H]``, the state S ``[B, H, K, V]`` (key dimension x value dimension), reset ``[B, T]``
bool.  The arithmetic runs in fp32 whatever the input dtype (bf16, fp16, fp32), or in fp64 when an input is
fp64 (so that tests can compare implementations to ~1e-12): ``pretrain.ops.common``'s ``compute_dtype`` and
``cast``.
"""
from __future__ import annotations

from typing import Optional

import torch

from pretrain.ops.common import check_float_tensors, check_initial_state, check_reset, check_same_device, shape_str


def default_scale(scale: Optional[float], K: int) -> float:
    """``scale`` or, when None, K^-1/2 (fla's default)."""
    return K ** -0.5 if scale is None else float(scale)


def check_inputs(op: str, q, k, v, g, beta, initial_state, reset, scale) -> None:
    """Raise ``ValueError`` (``TypeError`` for a non-tensor or non-float input) naming the argument of ``op``
    that does not fit the conventions above, and what it should be."""
    named = [("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta)]
    check_float_tensors(op, named)
    if q.dim() != 4:
        raise ValueError(f"{op}: q has shape {shape_str(q)}, expected 4 dims [B, T, H, K]")
    B, T, H, K = q.shape
    if B < 1 or T < 1 or H < 1 or K < 1:
        raise ValueError(f"{op}: q has shape {shape_str(q)}; B, T, H and K must be at least 1")
    if k.shape != q.shape:
        raise ValueError(f"{op}: k has shape {shape_str(k)}, expected q's shape {shape_str(q)} ([B, T, H, K])")
    if v.dim() != 4 or v.shape[:3] != q.shape[:3] or v.shape[3] < 1:
        raise ValueError(f"{op}: v has shape {shape_str(v)}, expected [{B}, {T}, {H}, V] ([B, T, H, V]) with "
                         f"V >= 1 (no grouped value heads)")
    for name, t in (("g", g), ("beta", beta)):
        if t.shape != (B, T, H):
            raise ValueError(f"{op}: {name} has shape {shape_str(t)}, expected [{B}, {T}, {H}] ([B, T, H]: one "
                             f"value per position and head)")
    check_initial_state(op, initial_state, (B, H, K, v.shape[3]), "[B, H, K, V]")
    check_reset(op, reset, B, T)
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"{op}: scale must be a number or None (K^-1/2), got {type(scale).__name__}")
    check_same_device(op, [t for _, t in named] + [initial_state, reset])
