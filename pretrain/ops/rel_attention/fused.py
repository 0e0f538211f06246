"""The fused CUDA kernel of relative attention (``csrc/rel_attention/``), with autograd.

Flash-style: 32 x 32 tiles of scores are computed in shared memory with the relative realignment inside the
kernel (each tile reads the band of position rows it needs), softmax online; no score matrix reaches global
memory.  The backward pass recomputes the scores (FlashAttention-2's scheme, one kernel for dK/dV over key
tiles, one for dQ and the position keys' gradient dR over query tiles; dR accumulates with fp32 atomics).
The biases are added outside the kernel (``qu = q + u``, ``qv = q + w``; autograd takes their gradients).

Limits: CUDA tensors; q, k, v, r, u, w of one dtype, fp32 or bf16 (arithmetic fp32); head size up to 128;
no attention-probability dropout.  :func:`unsupported` says which limit an input breaks.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from pretrain.ops import kernels
from pretrain.ops.rel_attention.common import ORDERS

MAX_HEAD = 128
_KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def unsupported(q: torch.Tensor, *others: torch.Tensor, check_build: bool = True) -> Optional[str]:
    """None if the fused kernel takes inputs like these (q and the other float inputs), else why not."""
    if q.device.type != "cuda":
        return f"inputs are on {q.device.type}, the fused kernel runs on CUDA"
    if q.dtype not in _KERNEL_DTYPES or any(t.dtype != q.dtype for t in others):
        return f"dtype {q.dtype} (with {sorted({str(t.dtype) for t in others})}): the fused kernel takes one of " \
               f"float32, bfloat16 for all inputs"
    if q.shape[-1] > MAX_HEAD:
        return f"head size {q.shape[-1]}: the fused kernel takes up to {MAX_HEAD}"
    if check_build:
        return kernels.unavailable_reason(q.device)
    return None


class _RelAttentionFunction(torch.autograd.Function):
    """(qu, qv, k, v, r) -> (o, lse) on the kernel module ``ext``; masks and frame as plain arguments."""

    @staticmethod
    def forward(ctx, qu, qv, k, v, r, key_start, q_doc, k_doc, r_offset, q_start, order, window, ext):
        ctx.set_materialize_grads(False)
        frame = (r_offset, q_start, order, window)
        o, lse = ext.rel_attention_forward(qu, qv, k, v, r, key_start, q_doc, k_doc, *frame)
        ctx.save_for_backward(qu, qv, k, v, r, o, lse, key_start, q_doc, k_doc)
        ctx.frame, ctx.ext = frame, ext
        return o, lse

    @staticmethod
    def backward(ctx, grad_o, grad_lse):
        qu, qv, k, v, r, o, lse, key_start, q_doc, k_doc = ctx.saved_tensors
        if grad_o is None:
            grad_o = torch.zeros_like(o)
        grad_o = grad_o.to(o.dtype).contiguous()
        dl = (grad_o.float() * o.float()).sum(-1)
        if grad_lse is not None:
            dl = dl - grad_lse.float()
        dqu, dqv, dk, dv, dr = ctx.ext.rel_attention_backward(qu, qv, k, v, r, grad_o, lse, dl.contiguous(),
                                                             key_start, q_doc, k_doc, *ctx.frame)
        dt = qu.dtype
        return (dqu.to(dt), dqv.to(dt), dk.to(dt), dv.to(dt), dr.to(dt)) + (None,) * 8


def _int32(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.to(torch.int32).contiguous()


def rel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, r: torch.Tensor, u: torch.Tensor,
                  w: torch.Tensor, *, r_offset: int, q_start: int, order: str = "past", window: int = 0,
                  key_start: Optional[torch.Tensor] = None, q_doc: Optional[torch.Tensor] = None,
                  k_doc: Optional[torch.Tensor] = None, ext=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Relative attention on the fused kernel; the contract of
    :func:`pretrain.ops.rel_attention.rel_attention` (inputs validated there).  ``ext``: the kernel module
    (default :func:`kernels.load`; the tests pass the CPU emulator's).  Returns ``(o [H, B, R, dh] in q's
    dtype, lse [H, B, R] fp32)``."""
    if ext is None:
        ext = kernels.load()
    qu = (q + u[:, None, None]).contiguous()
    qv = (q + w[:, None, None]).contiguous()
    return _RelAttentionFunction.apply(qu, qv, k.contiguous(), v.contiguous(), r.contiguous(), _int32(key_start),
                                       _int32(q_doc), _int32(k_doc), int(r_offset), int(q_start), ORDERS[order],
                                       int(window), ext)
