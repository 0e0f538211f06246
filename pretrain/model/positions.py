"""Positions and masks: sinusoids, the relative-position realignment ("rel shift") as a strided view, and
additive attention masks (0 / -inf, fp32), built once per shape and cached.

Frames.  A layer attends over ``K = M + N`` keys: ``M`` memory slots then the ``N`` current tokens; query
``i`` of the segment sits at key index ``M + i``.  The memory is a fixed buffer whose last ``valid[b]`` slots
hold real positions (row ``b``); the others are masked, so a row with ``valid = 0`` behaves exactly as if
there were no memory.

Relative scores.  The position term of query ``i`` and key ``j`` depends on ``j - i`` only.  It is computed
as ``Q @ R^T`` against a short sequence of position vectors (one per distinct distance) and then realigned
so that column ``j`` holds the entry for that key.  When the distance grows by one from one query to the
next, the realignment is a strided view of the ``Q @ R^T`` buffer (row stride = width - 1), so no copy and
no padding op is needed: ``skew`` below.  One extra position vector per block keeps the view free of
overlapping elements (entries read from it are always masked).
"""
from __future__ import annotations

from typing import Dict, Hashable, Optional

import torch

NEG_INF = float("-inf")


class ShapeCache:
    """A small dict of tensors keyed by shape parameters (the static masks); bounded so that eval
    with many segment lengths does not grow it without limit."""

    def __init__(self, max_entries: int = 32):
        self.max_entries = max_entries
        self._d: Dict[Hashable, torch.Tensor] = {}

    def get(self, key, build):
        t = self._d.get(key)
        if t is None:
            if len(self._d) >= self.max_entries:
                self._d.pop(next(iter(self._d)))
            t = self._d[key] = build()
        return t


_CACHE = ShapeCache()


def sinusoid(pos: torch.Tensor, dim: int) -> torch.Tensor:
    """[P] positions -> [P, dim] embeddings: sin(pos * f) ++ cos(pos * f), f_k = 10000^(-2k/dim)."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, device=pos.device, dtype=torch.float32) / dim))
    x = torch.outer(pos.float(), inv_freq)
    return torch.cat([x.sin(), x.cos()], dim=-1)


def _skew_view(x: torch.Tensor, cols: int, offset: int) -> torch.Tensor:
    A, B, R, C = x.shape
    return x.as_strided((A, B, R, cols), (B * R * C, R * C, C - 1, 1), x.storage_offset() + offset)


class _Skew(torch.autograd.Function):
    """The strided view, with a backward that writes the gradient into a fresh buffer: when the view covers
    one contiguous stretch of each [R, C] block (cols = C - 1) only the few uncovered ends are zeroed."""

    @staticmethod
    def forward(ctx, x, cols, offset):
        ctx.shape, ctx.cols, ctx.offset = x.shape, cols, offset
        return _skew_view(x, cols, offset)

    @staticmethod
    def backward(ctx, grad):
        A, B, R, C = ctx.shape
        cols, offset = ctx.cols, ctx.offset
        if cols == C - 1:
            out = grad.new_empty(ctx.shape)
            flat = out.view(A * B, R * C)
            flat[:, :offset].zero_()
            flat[:, offset + R * cols:].zero_()
            flat[:, offset:offset + R * cols].view(A, B, R, cols).copy_(grad)
        else:
            out = grad.new_zeros(ctx.shape)
            _skew_view(out, cols, offset).copy_(grad)
        return out, None, None


def skew(x: torch.Tensor, cols: int, offset: int) -> torch.Tensor:
    """View ``x`` [A, B, R, C] (contiguous) as [A, B, R, cols] with ``out[a, b, i, c] = x[a, b, i, offset + c - i]``
    (reading past a row's ends lands in the neighbouring row: only where the caller masks)."""
    A, B, R, C = x.shape
    assert x.is_contiguous() and cols <= C - 1 and 0 <= offset and offset + (R - 1) * (C - 1) + cols <= R * C
    return _Skew.apply(x, cols, offset)


# ----------------------------------------------------------------------------------------------------------
# distance sequences (the values whose position vectors are computed); see docs/model.md

def causal_distances(n: int, m: int, clamp_len: int, lookahead: int = 0) -> torch.Tensor:
    """Distances for the causal scores of ``n`` queries over ``m + n`` keys: K-1, ..., 1, 0, then
    -1, ..., -lookahead, and a pad.  ``skew(QR, m + n, n - 1)`` then puts distance ``m + i - j`` at (i, j) for
    every key up to ``lookahead`` positions after the query (RMT's memory rows, which see the memory tokens after
    them); entries further right are read from the neighbouring row and must be masked."""
    d = torch.cat([torch.arange(m + n - 1, -lookahead - 1, -1, dtype=torch.float32), torch.zeros(1)])  # last: pad
    return d.clamp_(max=clamp_len) if clamp_len > 0 else d


def lookahead_distances(m: int, w: int, full: bool, negative: bool, clamp_len: int) -> torch.Tensor:
    """Distances for the look-ahead scores of the ``m`` memory queries over the ``w`` window keys (key
    indices m-w+1 .. m).  Causal look-ahead: j - i = 1 .. m (+ pad); full look-ahead (33): |j - i| for
    j - i = 2-w .. m (+ pad).  ``negative`` gives -(j - i) (attn_type 31: XL's sinusoid of negative
    distances).  The clamp bounds from above only, as in the LaMemo code."""
    lo = 2 - w if full else 1
    d = torch.arange(lo, m + 2, dtype=torch.float32)    # last value = pad
    d = d.abs() if full else d
    if negative:
        d = -d
    return d.clamp_(max=clamp_len) if clamp_len > 0 else d


def lookahead_skew_offset(m: int, w: int, full: bool) -> int:
    """``skew`` offset that puts, at (memory query i, window column c), the entry of distance
    j - i with j = m - w + 1 + c (see lookahead_distances)."""
    return m - 1 if full else m - w


# ----------------------------------------------------------------------------------------------------------
# masks (additive, fp32)

def causal_mask(n: int, m: int, valid: Optional[torch.Tensor], same_length: bool,
                device: torch.device) -> torch.Tensor:
    """[B or 1, n, m + n]: query i sees key j iff j <= m + i, the key is a valid slot (j >= m - valid[b]),
    and with ``same_length`` also j > i (every query sees the same number m of keys)."""
    k = m + n

    def build():
        i = torch.arange(n, device=device)[:, None]
        j = torch.arange(k, device=device)[None, :]
        blocked = j > m + i
        if same_length:
            blocked |= j <= i
        return torch.zeros(n, k, device=device, dtype=torch.float32).masked_fill_(blocked, NEG_INF)

    static = _CACHE.get(("causal", n, m, same_length, device), build)
    if m == 0 or valid is None:
        return static[None]
    row = _invalid_slots(valid, m, k)                        # [B, k]
    return static[None] + row[:, None, :]


def _invalid_slots(valid: torch.Tensor, m: int, k: int) -> torch.Tensor:
    """[B, k]: -inf at memory slots j < m - valid[b] (empty), 0 elsewhere."""
    j = torch.arange(k, device=valid.device)
    empty = j[None, :] < (m - valid)[:, None]
    return torch.zeros(empty.shape, device=valid.device, dtype=torch.float32).masked_fill_(empty, NEG_INF)


def lookahead_mask(m: int, w: int, n: int, valid: torch.Tensor, full: bool) -> torch.Tensor:
    """Mask of the memory queries over the window keys (indices m-w+1 .. m).

    Causal look-ahead: [1, m, w], query i sees key j iff j > i (strictly to its right; key m, the first
    current token, is always visible).  Full look-ahead (33): [B, 1, w], no order constraint, but a row
    whose memory holds v = valid[b] < n positions sees only the last min(v, n) positions ending at key m
    (the window LaMemo forms over a memory of length v; key m stays visible for an empty memory so that no
    row is fully masked).  For the causal variants that restriction is implied for every valid query, so
    they need no per-row part."""
    device = valid.device
    if not full:
        def build():
            i = torch.arange(m, device=device)[:, None]
            j = (m - w + 1) + torch.arange(w, device=device)[None, :]
            return torch.zeros(m, w, device=device, dtype=torch.float32).masked_fill_(j <= i, NEG_INF)[None]
        return _CACHE.get(("lookahead", m, w, device), build)
    j = (m - w + 1) + torch.arange(w, device=device)
    first = m - torch.clamp(valid, min=1, max=n)             # window of row b: keys j > first (key m always)
    blocked = j[None, :] <= first[:, None]
    return torch.zeros(blocked.shape, device=device, dtype=torch.float32).masked_fill_(blocked, NEG_INF)[:, None, :]


def document_mask(doc: torch.Tensor, m: int) -> torch.Tensor:
    """[B, n, m + n] additive mask keeping query i of row b to the keys of its own document: memory slot j
    (j < m) belongs to document 0, current key m + t to ``doc[b, t]`` (``doc``: [B, n] int64 document index,
    non-decreasing along the segment)."""
    B, n = doc.shape
    keys = torch.cat([doc.new_zeros(B, m), doc], 1)                     # [B, m + n]
    other = keys[:, None, :] != doc[:, :, None]                         # [B, n, m + n]
    return torch.zeros(other.shape, device=doc.device, dtype=torch.float32).masked_fill_(other, NEG_INF)
