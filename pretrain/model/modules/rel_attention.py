"""The wiring of the fused relative-attention op (``pretrain.ops.rel_attention``) shared by the attention
mechanisms: which path a layer takes (``attention_path``) and the frame of the current queries over
[memory ; segment] in the op's arguments (``xl_frame``).
"""
from __future__ import annotations

import logging

import torch

from pretrain.ops import kernels
from pretrain.ops import rel_attention as rel_ops

logger = logging.getLogger(__name__)
_paths_logged = set()


def attention_path(mixer, q: torch.Tensor, ctx) -> str:
    """``"fused"`` when the relative attention of ``mixer`` (a Mixer with ``attn``, its AttentionProjections;
    queries ``q`` [H, B, R, dh], ``ctx`` the SegmentContext) runs the fused CUDA kernel
    (``pretrain.ops.rel_attention``, ``impl="fused"``), else ``"reference"`` (the mixers' own computation,
    unchanged; always on CPU).  The fused kernel needs CUDA tensors, the kernels built (``pretrain.ops.kernels``;
    ``MEMTRAIN_FUSED_OPS=0`` switches it off), no attention dropout in training, no stack-level mask edits
    (memory tokens), and XL's ``same_length`` only with a memory.  Logged once per mechanism, path and reason."""
    if q.device.type != "cuda":
        why = f"{q.device.type} tensors"
    elif not kernels.enabled():
        why = "disabled (MEMTRAIN_FUSED_OPS=0 or kernels.set_enabled(False))"
    elif ctx.mask_edits:
        why = "stack-level mask edits"
    elif ctx.recorder is not None:
        why = "attention analysis (the probabilities are recorded)"
    elif mixer.training and mixer.attn.dropatt > 0:
        why = "attention dropout in training"
    elif ctx.same_length and ctx.mem_len == 0:
        why = "same_length without a memory"
    else:
        why = rel_ops.fused_unsupported(q)
    path = "fused" if why is None else "reference"
    key = (mixer.mechanism, path, why)
    if key not in _paths_logged:
        _paths_logged.add(key)
        logger.info("%s attention: %s path%s", mixer.mechanism, path, f" ({why})" if why else "")
    return path


def xl_frame(ctx, m: int, n: int) -> dict:
    """The frame and masks of the current queries over [memory (m) ; segment (n)] as arguments of
    ``pretrain.ops.rel_attention`` (positions.causal_mask, the document mask; the position keys listed as
    ``causal_distances``)."""
    kw = dict(r_offset=n - 1, q_start=m, order="past", window=m if ctx.same_length else 0)
    if m and ctx.valid is not None:
        kw["key_start"] = m - ctx.valid
    if ctx.doc is not None:
        kw["q_doc"] = ctx.doc
        kw["k_doc"] = torch.cat([ctx.doc.new_zeros(ctx.doc.shape[0], m), ctx.doc], 1)
    return kw
