"""Conventions, input checks and the visibility rule shared by the implementations of relative attention.

Frame: queries ``i = 0 .. R-1`` and keys ``j = 0 .. C-1``; query ``i`` sits at key index ``q_start + i``
(Transformer-XL over [memory (M) ; segment (N)]: ``q_start = M``; LaMemo's memory queries over the window
keys ``M-W+1 .. M``: ``q_start = W - 1 - M``).  The position row used by the pair (i, j) is
``r_offset + j - i`` of ``r`` [H, P, dh] (the ``skew`` of ``pretrain/model/positions.py``: the rows list the
distances in the order that makes the realignment a shift); what a row holds (clamped distances, negated
distances, absolute ones) is the caller's business, so ``clamp_len`` is applied where ``r`` is made.

Key j is visible from query i iff all of these hold:

* ``order``: ``"past"``: ``j <= q_start + i`` (causal); ``"future"``: ``j > q_start + i`` (LaMemo's causal
  look-ahead); ``"none"``: no order constraint (LaMemo's full look-ahead, attn_type 33);
* ``window > 0``: ``q_start + i - j < window`` (Transformer-XL's ``same_length``: window = M);
* ``key_start`` [B] int: ``j >= key_start[b]`` (the memory slots before ``M - valid[b]`` are empty);
* ``q_doc`` [B, R] / ``k_doc`` [B, C] int: ``q_doc[b, i] == k_doc[b, j]`` (documents inside a segment).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from pretrain.ops.common import check_same_device, shape_str

ORDERS = {"none": 0, "past": 1, "future": 2}


def check_inputs(q, k, v, r, u, w, r_offset, q_start, order, window, key_start, q_doc, k_doc) -> None:
    """Raise TypeError / ValueError naming the argument that breaks the conventions (module docstring)."""
    op = "rel_attention"
    for name, t in (("q", q), ("k", k), ("v", v), ("r", r), ("u", u), ("w", w)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be a floating-point tensor, got "
                            f"{getattr(t, 'dtype', type(t).__name__)}")
    if q.dim() != 4:
        raise ValueError(f"{op}: q has shape {shape_str(q)}, expected [H, B, R, dh]")
    H, B, R, D = q.shape
    if k.dim() != 4 or k.shape[:2] != q.shape[:2] or k.shape[3] != D:
        raise ValueError(f"{op}: k has shape {shape_str(k)}, expected [{H}, {B}, C, {D}]")
    if v.shape != k.shape:
        raise ValueError(f"{op}: v has shape {shape_str(v)}, expected k's shape {shape_str(k)}")
    if r.dim() != 3 or r.shape[0] != H or r.shape[2] != D:
        raise ValueError(f"{op}: r has shape {shape_str(r)}, expected [{H}, P, {D}] (position keys per head)")
    for name, t in (("u", u), ("w", w)):
        if t.shape != (H, D):
            raise ValueError(f"{op}: {name} has shape {shape_str(t)}, expected [{H}, {D}] (a bias per head)")
    if order not in ORDERS:
        raise ValueError(f"{op}: order={order!r} is not one of {tuple(ORDERS)}")
    for name, val in (("r_offset", r_offset), ("q_start", q_start), ("window", window)):
        if isinstance(val, bool) or not isinstance(val, int):
            raise TypeError(f"{op}: {name} must be an int, got {val!r}")
    if window < 0:
        raise ValueError(f"{op}: window={window} must be >= 0 (0: no window)")
    C = k.shape[2]
    if key_start is not None and (not isinstance(key_start, torch.Tensor) or key_start.shape != (B,)
                                  or key_start.is_floating_point()):
        raise ValueError(f"{op}: key_start must be an integer tensor [{B}] ([B]) or None")
    if (q_doc is None) != (k_doc is None):
        raise ValueError(f"{op}: q_doc and k_doc go together (both or neither)")
    if q_doc is not None:
        for name, t, n in (("q_doc", q_doc, R), ("k_doc", k_doc, C)):
            if not isinstance(t, torch.Tensor) or t.shape != (B, n) or t.is_floating_point():
                raise ValueError(f"{op}: {name} must be an integer tensor [{B}, {n}], got {shape_str(t)}")
    check_same_device(op, (q, k, v, r, u, w, key_start, q_doc, k_doc))
    lo, hi = position_rows(R, C, r_offset, q_start, order, window)
    if lo <= hi and (lo < 0 or hi >= r.shape[1]):
        raise ValueError(f"{op}: visible pairs use position rows {lo}..{hi} (r_offset + j - i) but r has "
                         f"{r.shape[1]} rows")


@functools.lru_cache(maxsize=256)
def position_rows(R: int, C: int, r_offset: int, q_start: int, order: str, window: int):
    """(lowest, highest) position row ``r_offset + j - i`` over the pairs that the order and the window let
    through (key_start and documents only remove pairs); lowest > highest when there are none."""
    i = torch.arange(R, dtype=torch.int64)
    jlo = torch.zeros(R, dtype=torch.int64)
    jhi = torch.full((R,), C - 1, dtype=torch.int64)
    qp = q_start + i
    if order == "past":
        jhi = torch.minimum(jhi, qp)
    elif order == "future":
        jlo = torch.maximum(jlo, qp + 1)
    if window > 0:
        jlo = torch.maximum(jlo, qp - window + 1)
    ok = jlo <= jhi
    if not bool(ok.any()):
        return 0, -1
    return int((r_offset + jlo - i)[ok].min()), int((r_offset + jhi - i)[ok].max())


def visible(R: int, C: int, q_start: int, order: str, window: int, key_start: Optional[torch.Tensor],
            q_doc: Optional[torch.Tensor], k_doc: Optional[torch.Tensor], device) -> torch.Tensor:
    """bool [B or 1, R, C]: key j visible from query i (module docstring)."""
    i = torch.arange(R, device=device)[:, None]
    j = torch.arange(C, device=device)[None, :]
    qp = q_start + i
    vis = torch.ones(R, C, dtype=torch.bool, device=device)
    if order == "past":
        vis &= j <= qp
    elif order == "future":
        vis &= j > qp
    if window > 0:
        vis &= qp - j < window
    vis = vis[None]
    if key_start is not None:
        vis = vis & (j[None] >= key_start.to(device)[:, None, None])
    if q_doc is not None:
        vis = vis & (q_doc[:, :, None] == k_doc[:, None, :])
    return vis
