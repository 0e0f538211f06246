"""Fast-weight rules (sum rule and delta rule) with a carried state: public entry points and dispatch.

Schlag, Irie, Schmidhuber, "Linear Transformers Are Secretly Fast Weight Programmers" (ICML 2021,
arXiv 2102.11174): a fast weight W in R^{Dk x Dv} per (sequence, head) is programmed by keys and values and
read by queries.  Feature maps and their sum normalisation (``pretrain.ops.feature_maps``) are applied by the
caller: these ops take the mapped q and k.

Implementations behind one signature (``impl``):

* ``"naive"``: the step-by-step reference (``naive.py``), one Python step per token;
* ``"chunk"``: chunkwise-parallel (``chunk.py``), the training path on CPU;
* ``"fused"``: the fused CUDA kernels of ``csrc/fast_weight`` (``fused.py``): CUDA tensors, head sizes up to
  256, ``chunk_size`` 32 or 64, no in-segment ``reset``, no fp64; an error says which condition fails;
* ``"auto"``: ``"fused"`` for CUDA tensors when the kernels load (``pretrain.ops.kernels``: built on first
  use) and the inputs fit them, else ``"chunk"``; in particular a call with ``reset`` (documents starting
  inside the segment) runs the chunk path.  ``MEMTRAIN_FUSED_OPS=0`` keeps ``"auto"`` on the chunk path.

Unlike lmtool-fwms' CUDA kernel, no input is modified in place, and gradients reach the initial state, so
that backpropagation through the carried state across segments works (detach ``final_state`` for truncated
backpropagation).  The implementation used is logged once per op, implementation and device type.
"""
from __future__ import annotations

import logging
from typing import Optional, Tuple

import torch

from pretrain.ops import kernels
from pretrain.ops.common import check_chunk_size, check_impl, choose_implementation, log_implementation
from pretrain.ops.fast_weight import chunk, fused, naive
from pretrain.ops.fast_weight.common import check_inputs

__all__ = ["delta_rule", "sum_rule", "key_sum", "IMPLEMENTATIONS"]

IMPLEMENTATIONS = ("auto", "naive", "chunk", "fused")
logger = logging.getLogger(__name__)
_logged = set()


def _resolve(op: str, impl: str, chunk_size: int, q, k, v, beta, initial_state, reset) -> str:
    check_impl(op, impl, IMPLEMENTATIONS)
    check_chunk_size(op, chunk_size)
    name, why = choose_implementation(
        op, impl, "fused", "chunk", q.device.type,
        unsupported=lambda: fused.unsupported(q, k, v, beta, initial_state, reset, chunk_size),
        disabled=kernels.disabled_reason)
    log_implementation(logger, _logged, op, name, q.device.type, "fused", why,
                       f" (chunk_size {chunk_size})" if name in ("chunk", "fused") else "")
    return name


def delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, *, scale: float = 1.0,
               initial_state: Optional[torch.Tensor] = None, output_final_state: bool = True,
               reset: Optional[torch.Tensor] = None, impl: str = "auto",
               chunk_size: int = 64) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Delta rule ("remove and insert", Schlag et al. 2021, Sec. 4.2), per batch row and head::

        vbar_t = W_{t-1}^T k_t                          (read with the weight BEFORE the update)
        W_t    = W_{t-1} + beta_t k_t (v_t - vbar_t)^T
        o_t    = scale * W_t^T q_t                      (the query reads the UPDATED weight)

    Args:
        q, k: ``[B, H, T, Dk]`` mapped (and, as in the paper, sum-normalised) queries and keys.
        v: ``[B, H, T, Dv]`` values; Dk and Dv are independent.
        beta: ``[B, H, T]`` write strengths in (0, 1) (the caller applies the sigmoid).
        scale: factor on the output.
        initial_state: ``[B, H, Dk, Dv]`` W_0 (fp32; None means zeros).  It receives a gradient.
        output_final_state: return W_T (else None).
        reset: None or bool ``[B, T]``: True at t zeroes the state just before token t (a document starts at
            t: token t and later see nothing from before t; tokens before t are unaffected).
        impl: ``"auto"``, ``"naive"``, ``"chunk"`` or ``"fused"`` (module docstring; with ``reset``,
            ``"auto"`` takes the chunk path).
        chunk_size: chunk length C of the chunked and fused paths (capped at T on the chunk path; T need not
            be a multiple of it; the fused kernel takes 32 or 64).

    The arithmetic runs in fp32 whatever the input dtype (fp64 for fp64 inputs).  Inputs are never modified.

    Returns:
        ``(o, final_state)``: o ``[B, H, T, Dv]`` in v's dtype; final_state ``[B, H, Dk, Dv]`` fp32 (fp64 for
        fp64 inputs) or None.

    Raises:
        TypeError, ValueError: an argument of the wrong type, shape, device, or an unknown ``impl``; the
        message names the argument and the expected shape.
        RuntimeError: ``impl="fused"`` with inputs or a machine the fused kernel cannot take (the message says
        which condition fails).
    """
    check_inputs("delta_rule", q, k, v, beta, initial_state, reset)
    name = _resolve("delta_rule", impl, chunk_size, q, k, v, beta, initial_state, reset)
    if name == "fused":
        return fused.delta_rule(q, k, v, beta, scale=scale, initial_state=initial_state,
                                output_final_state=output_final_state, chunk_size=chunk_size)
    kw = dict(scale=scale, initial_state=initial_state, output_final_state=output_final_state, reset=reset)
    if name == "naive":
        return naive.delta_rule(q, k, v, beta, **kw)
    return chunk.delta_rule(q, k, v, beta, chunk_size=chunk_size, **kw)


def sum_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float = 1.0,
             initial_state: Optional[torch.Tensor] = None, output_final_state: bool = True,
             reset: Optional[torch.Tensor] = None, impl: str = "auto",
             chunk_size: int = 64) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Sum rule (the Linear Transformer / Performer recurrence, Schlag et al. 2021, Sec. 3, without
    the attention normalisation; see :func:`key_sum` for it)::

        W_t = W_{t-1} + k_t v_t^T ;   o_t = scale * W_t^T q_t

    Arguments, returns, dtypes and errors as :func:`delta_rule`, without beta.
    """
    check_inputs("sum_rule", q, k, v, None, initial_state, reset)
    name = _resolve("sum_rule", impl, chunk_size, q, k, v, None, initial_state, reset)
    if name == "fused":
        return fused.sum_rule(q, k, v, scale=scale, initial_state=initial_state,
                              output_final_state=output_final_state, chunk_size=chunk_size)
    kw = dict(scale=scale, initial_state=initial_state, output_final_state=output_final_state, reset=reset)
    if name == "naive":
        return naive.sum_rule(q, k, v, **kw)
    return chunk.sum_rule(q, k, v, chunk_size=chunk_size, **kw)


def key_sum(k: torch.Tensor, *, initial: Optional[torch.Tensor] = None,
            reset: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Running key-sum accumulator of the attention normalisation (Katharopoulos et al. 2020, Sec. 3.2;
    lmtool-fwms attn_types 44-46): ``z_t = z_{t-1} + k_t``, zeroed just before t where ``reset[b, t]``.

    The caller divides an output by ``z_t . q_t``.

    Args:
        k: ``[B, H, T, Dk]`` mapped keys.
        initial: ``[B, H, Dk]`` z_0 (None means zeros); it receives a gradient.
        reset: None or bool ``[B, T]``, as in :func:`delta_rule`.

    Returns:
        ``(z, final)``: z ``[B, H, T, Dk]`` (z_t for every t) and final ``[B, H, Dk]`` (z_T), fp32 (fp64 for
        fp64 inputs).

    Raises:
        TypeError, ValueError: a wrong type, shape or device, naming the argument.
    """
    if not isinstance(k, torch.Tensor) or not k.is_floating_point():
        raise TypeError(f"key_sum: k must be a floating-point tensor, got {getattr(k, 'dtype', type(k).__name__)}")
    if k.dim() != 4 or k.shape[2] < 1:
        raise ValueError(f"key_sum: k has shape {list(k.shape)}, expected [B, H, T, Dk] with T >= 1")
    B, H, T, Dk = k.shape
    if initial is not None and (not isinstance(initial, torch.Tensor) or initial.shape != (B, H, Dk)):
        raise ValueError(f"key_sum: initial has shape {list(getattr(initial, 'shape', []))}, expected "
                         f"[{B}, {H}, {Dk}] ([B, H, Dk]) or None")
    if reset is not None and (not isinstance(reset, torch.Tensor) or reset.dtype != torch.bool
                              or reset.shape != (B, T)):
        raise ValueError(f"key_sum: reset must be a bool tensor [{B}, {T}] ([B, T]) or None")
    if any(t is not None and t.device != k.device for t in (initial, reset)):
        raise ValueError("key_sum: k, initial and reset must be on the same device")
    return chunk.key_sum(k, initial=initial, reset=reset)
