"""The fused CUDA kernels of the fast-weight rules (``csrc/fast_weight/``), with autograd.

The same chunkwise algorithm as ``chunk.py`` (WY representation and UT transform, Yang et al. 2024), one CUDA
launch per stage instead of a Python loop over chunks: the per-chunk quantities in parallel over chunks, the
state recurrence in parallel over (batch, head, 32 value columns), the backward pass recomputing the forward
intermediates (only the inputs are kept between forward and backward).  The arithmetic and the state are
fp32 for bf16 and fp32 inputs; q, k, v of other float dtypes are cast to fp32 (the output comes back in v's
dtype, gradients in each input's dtype).  No input is modified; gradients reach q, k, v, beta and the
initial state, and the final state's gradient flows back (backpropagation across segments).

Limits: CUDA tensors; head sizes Dk, Dv from 1 to 256 (any value: tiles are padded); ``chunk_size`` 32 or
64; no in-segment ``reset`` (the public ops use the chunk path then); no fp64.  :func:`unsupported` says
which limit an input breaks.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from pretrain.ops import kernels

CHUNK_SIZES = (32, 64)
MAX_HEAD = 256
_KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: Optional[torch.Tensor],
                initial_state: Optional[torch.Tensor], reset: Optional[torch.Tensor], chunk_size: int,
                check_build: bool = True) -> Optional[str]:
    """None if the fused kernel takes these (already validated) inputs, else the reason it does not.

    ``check_build``: also require the kernels to load on q's device (this may build them, once)."""
    if q.device.type != "cuda":
        return f"inputs are on {q.device.type}, the fused kernel runs on CUDA"
    if reset is not None:
        return "in-segment resets (reset=...) are not supported by the fused kernel"
    if any(t is not None and t.dtype == torch.float64 for t in (q, k, v, beta, initial_state)):
        return "fp64 inputs are not supported by the fused kernel"
    Dk, Dv = q.shape[-1], v.shape[-1]
    if Dk > MAX_HEAD or Dv > MAX_HEAD:
        return f"head sizes Dk={Dk}, Dv={Dv}: the fused kernel takes up to {MAX_HEAD}"
    if chunk_size not in CHUNK_SIZES:
        return f"chunk_size={chunk_size}: the fused kernel takes {CHUNK_SIZES}"
    if check_build:
        return kernels.unavailable_reason(q.device)
    return None


class _FastWeightFunction(torch.autograd.Function):
    """(q, k, v, beta or None, initial_state or None) -> (o, final_state); the kernel module ``ext`` does the
    work.  Inputs arrive contiguous in one kernel dtype (q, k, v) and fp32 (beta, state)."""

    @staticmethod
    def forward(ctx, q, k, v, beta, s0, scale, chunk_size, ext):
        ctx.set_materialize_grads(False)
        o, final = ext.fast_weight_forward(q, k, v, beta, s0, scale, chunk_size, True)
        ctx.save_for_backward(q, k, v, beta, s0)
        ctx.scale, ctx.chunk_size, ctx.ext = scale, chunk_size, ext
        return o, final

    @staticmethod
    def backward(ctx, grad_o, grad_final):
        q, k, v, beta, s0 = ctx.saved_tensors
        if grad_o is None:
            grad_o = torch.zeros_like(v)
        grad_o = grad_o.to(v.dtype).contiguous()
        if grad_final is not None:
            grad_final = grad_final.float().contiguous()
        want_s0 = s0 is not None and ctx.needs_input_grad[4]
        dq, dk, dv, dbeta, ds0 = ctx.ext.fast_weight_backward(q, k, v, beta, s0, grad_o, grad_final, ctx.scale,
                                                             ctx.chunk_size, want_s0)
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None if beta is None else dbeta,
                ds0 if want_s0 else None, None, None, None)


def _run(q, k, v, beta, scale, initial_state, output_final_state, chunk_size, ext):
    if ext is None:
        ext = kernels.load()
    out_dtype = v.dtype
    dt = q.dtype if (q.dtype == k.dtype == v.dtype and q.dtype in _KERNEL_DTYPES) else torch.float32
    q, k, v = (t.to(dt).contiguous() for t in (q, k, v))
    beta = None if beta is None else beta.to(torch.float32).contiguous()
    s0 = None if initial_state is None else initial_state.to(torch.float32).contiguous()
    o, final = _FastWeightFunction.apply(q, k, v, beta, s0, float(scale), int(chunk_size), ext)
    return o.to(out_dtype), (final if output_final_state else None)


def delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, *, scale: float = 1.0,
               initial_state: Optional[torch.Tensor] = None, output_final_state: bool = True,
               chunk_size: int = 64, ext=None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Delta rule on the fused kernel; the contract of :func:`pretrain.ops.fast_weight.delta_rule` without
    ``reset`` (inputs already validated).  ``ext``: the kernel module (default :func:`kernels.load`; the tests
    pass the CPU emulator's).  Returns ``(o [B, H, T, Dv] in v's dtype, final state [B, H, Dk, Dv] fp32 or
    None)``."""
    return _run(q, k, v, beta, scale, initial_state, output_final_state, chunk_size, ext)


def sum_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float = 1.0,
             initial_state: Optional[torch.Tensor] = None, output_final_state: bool = True,
             chunk_size: int = 64, ext=None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Sum rule on the fused kernel; as :func:`delta_rule` without beta."""
    return _run(q, k, v, None, scale, initial_state, output_final_state, chunk_size, ext)
