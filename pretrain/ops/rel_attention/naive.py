"""Plain PyTorch reference of relative attention: the full score matrix, masked, softmax, log-sum-exp.

Exactly what the Transformer-XL and LaMemo mixers compute with ``pretrain/model/modules/attention.py`` (``biased``,
``position_scores``, ``masked_scores``, ``attend``; their position term realigned with ``positions.skew``),
written from the definition instead: the position term of pair (i, j) is gathered from row
``r_offset + j - i`` of the per-head position products.  The tests hold the two equal in fp64.  Memory is
O(R C) per (head, batch row); this is the CPU path and the definition the fused kernel is held to.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from pretrain.ops.rel_attention.common import visible


def rel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, r: torch.Tensor, u: torch.Tensor,
                  w: torch.Tensor, *, r_offset: int, q_start: int, order: str = "past", window: int = 0,
                  key_start: Optional[torch.Tensor] = None, q_doc: Optional[torch.Tensor] = None,
                  k_doc: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reference of :func:`pretrain.ops.rel_attention.rel_attention` (same arguments, validated there)::

        s_ij = (q_i + u) . k_j + (q_i + w) . r[r_offset + j - i]        (products in q's dtype)
        p_ij = softmax_j(s_ij) over the visible keys (fp32, fp64 for fp64 inputs)
        o_i  = sum_j p_ij v_j,   lse_i = log sum_j exp(s_ij)

    A query with no visible key gets o = 0 and lse = -inf.  Returns ``(o [H, B, R, dh] in v's dtype,
    lse [H, B, R] fp32 or fp64)``.
    """
    H, B, R, D = q.shape
    C, P = k.shape[2], r.shape[1]
    sdt = torch.promote_types(q.dtype, torch.float32)
    content = torch.matmul(q + u[:, None, None], k.transpose(-1, -2))                 # [H, B, R, C]
    raw = torch.matmul((q + w[:, None, None]).reshape(H, B * R, D), r.transpose(-1, -2)).view(H, B, R, P)
    rows = r_offset + torch.arange(C, device=q.device)[None, :] - torch.arange(R, device=q.device)[:, None]
    pos = raw.gather(-1, rows.clamp(0, P - 1).expand(H, B, R, C))                     # masked where out of range
    scores = (content + pos).to(sdt)
    vis = visible(R, C, q_start, order, window, key_start, q_doc, k_doc, q.device)    # [B or 1, R, C]
    scores = scores.masked_fill(~vis[None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    seen = vis.any(-1)[None, ..., None]                                               # [1, B or 1, R, 1]
    probs = torch.where(seen, torch.softmax(scores, dim=-1), torch.zeros((), dtype=sdt, device=q.device))
    o = torch.matmul(probs.to(v.dtype), v)
    return o, lse
