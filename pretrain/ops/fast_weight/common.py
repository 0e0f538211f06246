"""Input checks shared by every implementation of the fast-weight ops.

Conventions (all implementations): q, k ``[B, H, T, Dk]``, v ``[B, H, T, Dv]``, beta ``[B, H, T]``, the fast
weight (state) ``[B, H, Dk, Dv]`` (key dimension x value dimension, the layout of lmtool-fwms' kernel),
reset ``[B, T]`` bool.  The arithmetic runs in fp32 whatever the input dtype (bf16, fp16, fp32), or in fp64
when an input is fp64 (so that tests can compare implementations to ~1e-10): ``pretrain.ops.common``'s
``compute_dtype`` and ``cast``.
"""
from __future__ import annotations

from typing import Optional

import torch

from pretrain.ops.common import check_float_tensors, check_initial_state, check_reset, check_same_device, shape_str


def check_inputs(op: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: Optional[torch.Tensor],
                 initial_state: Optional[torch.Tensor], reset: Optional[torch.Tensor]) -> None:
    """Raise ``ValueError`` (``TypeError`` for a non-tensor or non-float input) naming the argument of ``op``
    that does not fit the conventions above, and what it should be."""
    named = [("q", q), ("k", k), ("v", v)] + ([("beta", beta)] if beta is not None else [])
    check_float_tensors(op, named)
    if q.dim() != 4:
        raise ValueError(f"{op}: q has shape {shape_str(q)}, expected 4 dims [B, H, T, Dk]")
    B, H, T, Dk = q.shape
    if T < 1 or Dk < 1:
        raise ValueError(f"{op}: q has shape {shape_str(q)}; T and Dk must be at least 1")
    if k.shape != q.shape:
        raise ValueError(f"{op}: k has shape {shape_str(k)}, expected q's shape {shape_str(q)} ([B, H, T, Dk])")
    if v.dim() != 4 or v.shape[:3] != q.shape[:3] or v.shape[3] < 1:
        raise ValueError(f"{op}: v has shape {shape_str(v)}, expected [{B}, {H}, {T}, Dv] with Dv >= 1")
    if beta is not None and beta.shape != (B, H, T):
        raise ValueError(f"{op}: beta has shape {shape_str(beta)}, expected [{B}, {H}, {T}] (one gate per head "
                         f"and position)")
    check_initial_state(op, initial_state, (B, H, Dk, v.shape[3]), "[B, H, Dk, Dv]")
    check_reset(op, reset, B, T)
    check_same_device(op, [t for _, t in named] + [initial_state, reset])
