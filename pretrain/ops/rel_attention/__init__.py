"""Attention with Transformer-XL relative positions over [memory ; segment]: public entry point and dispatch.

The score of query i and key j is (Dai et al. 2019, Sec. 3.3; LaMemo, Ji et al. 2022, Sec. 3 for the
look-ahead)::

    s_ij = (q_i + u)^T k_j + (q_i + w)^T r[r_offset + j - i]

with q the (already 1/sqrt(dh)-scaled) queries, u and w the content and position biases (XL's u and v,
LaMemo's u_fut / v_fut; also scaled), r the position keys W_R R of the listed distances; the visible keys
follow ``order``, ``window``, ``key_start`` and the document ids (``common.py`` defines the frame and the
rule).  The result is the softmax-weighted sum of the values and the log-sum-exp of each query's scores,
which LaMemo's interpolation of old and new memory attention needs.

Implementations behind one signature (``impl``):

* ``"reference"``: plain PyTorch (``naive.py``), the full score matrix; the CPU path, and the definition;
* ``"fused"``: the flash-style CUDA kernel of ``csrc/rel_attention`` (``fused.py``): no score matrix in
  global memory; CUDA, fp32 or bf16, head size up to 128; an error says which condition fails;
* ``"auto"``: ``"fused"`` for CUDA tensors when the kernels load (built on first use,
  ``pretrain.ops.kernels``) and the inputs fit them, else ``"reference"``; ``MEMTRAIN_FUSED_OPS=0`` keeps it
  on the reference.  The implementation used is logged once per implementation and device type.

Attention-probability dropout is not part of the op (the mixers keep their reference path when it is on).
"""
from __future__ import annotations

import logging
from typing import Optional, Tuple

import torch

from pretrain.ops import kernels
from pretrain.ops.common import check_impl, choose_implementation, log_implementation
from pretrain.ops.rel_attention import fused, naive
from pretrain.ops.rel_attention.common import ORDERS, check_inputs, position_rows, visible

__all__ = ["rel_attention", "IMPLEMENTATIONS", "ORDERS", "visible", "position_rows", "fused_unsupported"]

IMPLEMENTATIONS = ("auto", "reference", "fused")
logger = logging.getLogger(__name__)
_logged = set()


def fused_unsupported(q: torch.Tensor, *others: torch.Tensor) -> Optional[str]:
    """None if ``impl="fused"`` can run on inputs like ``q`` and ``others`` here (building the kernels on
    first use), else the reason it cannot."""
    return fused.unsupported(q, *others)


def rel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, r: torch.Tensor, u: torch.Tensor,
                  w: torch.Tensor, *, r_offset: int, q_start: int, order: str = "past", window: int = 0,
                  key_start: Optional[torch.Tensor] = None, q_doc: Optional[torch.Tensor] = None,
                  k_doc: Optional[torch.Tensor] = None, impl: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """Relative-position attention of R queries over C keys, per head and batch row.

    Args:
        q: ``[H, B, R, dh]`` queries, already scaled by 1/sqrt(dh).
        k, v: ``[H, B, C, dh]`` keys and values.
        r: ``[H, P, dh]`` position keys; pair (i, j) uses row ``r_offset + j - i`` (every visible pair must
            find its row in 0 .. P-1, else ValueError).
        u, w: ``[H, dh]`` content and position biases, in query units (the mixers pass ``u / sqrt(dh)``).
        r_offset: the row of the pair (0, 0) (``positions.skew``'s offset: XL ``N - 1``; LaMemo's look-ahead
            ``positions.lookahead_skew_offset``).
        q_start: key index of query 0 (XL: M; LaMemo's look-ahead over its window: W - 1 - M).
        order: ``"past"`` (causal), ``"future"`` (keys strictly after the query) or ``"none"``.
        window: > 0 keeps keys with ``q_start + i - j < window`` (XL's same_length: M); 0 for none.
        key_start: int ``[B]``: keys before ``key_start[b]`` are invisible (empty memory slots: M - valid).
        q_doc, k_doc: int ``[B, R]`` and ``[B, C]`` document ids: a query sees only keys of its document.
        impl: ``"auto"``, ``"reference"`` or ``"fused"`` (module docstring).

    Returns:
        ``(o, lse)``: o ``[H, B, R, dh]`` in v's dtype (the fused kernel: q's, the same), lse ``[H, B, R]``
        fp32 (fp64 for fp64 inputs on the reference): the log-sum-exp of each query's visible scores.  A
        query with no visible key gets o = 0 and lse = -inf.

    Raises:
        TypeError, ValueError: a wrong type, shape, device, frame or ``impl`` (the message names the argument).
        RuntimeError: ``impl="fused"`` on inputs or a machine the kernel cannot take (the message says why).
    """
    check_impl("rel_attention", impl, IMPLEMENTATIONS)
    check_inputs(q, k, v, r, u, w, r_offset, q_start, order, window, key_start, q_doc, k_doc)
    name, why = choose_implementation(
        "rel_attention", impl, "fused", "reference", q.device.type,
        unsupported=lambda: fused.unsupported(q, k, v, r, u, w),
        disabled=kernels.disabled_reason)
    log_implementation(logger, _logged, "rel_attention", name, q.device.type, "fused", why)
    kw = dict(r_offset=r_offset, q_start=q_start, order=order, window=window, key_start=key_start, q_doc=q_doc,
              k_doc=k_doc)
    if name == "fused":
        return fused.rel_attention(q, k, v, r, u, w, **kw)
    return naive.rel_attention(q, k, v, r, u, w, **kw)
