"""Gated delta rule with a carried, resettable state: public entry point and dispatch.

Yang, Kautz, Hatamizadeh, "Gated Delta Networks: Improving Mamba2 with Delta Rule" (ICLR 2025, arXiv
2412.06464).  Per batch row and head, a state S in R^{K x V} is decayed by alpha_t = exp(g_t) (Mamba2's
scalar gate, the paper's Sec. 2.1), corrected by the delta rule with write strength beta_t (Sec. 2.2) and read
by queries; the gated delta rule (Eq. 10, Sec. 3.1), written in flash-linear-attention's orientation (S here
is the transpose of the paper's S in R^{d_v x d_k})::

    S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
    o_t = scale * S_t^T q_t

The caller applies the feature steps of the GatedDeltaNet layer (short convolutions, SiLU, L2-normalised q
and k, beta = sigmoid(.), g = -exp(A_log) softplus(. + dt_bias)): this op takes their results.

Implementations behind one signature (``impl``):

* ``"naive"``: the step-by-step reference (``naive.py``), one Python step per token;
* ``"chunk"``: chunkwise-parallel WY/UT form (``chunk.py``: the paper's Eq. 6-9 extended by decays as in
  Sec. 3.3 and App. A), the training path on CPU;
* ``"fla"``: flash-linear-attention's Triton kernel ``fla.ops.gated_delta_rule.chunk_gated_delta_rule``
  (fla-core; ``fla_backend.py``): CUDA tensors, no fp64; resets go through its variable-length mode;
* ``"auto"``: ``"fla"`` for CUDA tensors when fla-core imports and takes the inputs, else ``"chunk"``.

Every implementation takes ``reset`` and passes gradients to the initial state, so that backpropagation
through the carried state across segments works (detach ``final_state`` for truncated backpropagation).
The implementation used is logged once per implementation and device type.
"""
from __future__ import annotations

import logging
from typing import Optional, Tuple

import torch

from pretrain.ops.common import check_chunk_size, check_impl, choose_implementation, log_implementation
from pretrain.ops.gated_delta import chunk, fla_backend, naive
from pretrain.ops.gated_delta.common import check_inputs, default_scale

__all__ = ["gated_delta_rule", "IMPLEMENTATIONS"]

IMPLEMENTATIONS = ("auto", "naive", "chunk", "fla")
logger = logging.getLogger(__name__)
_logged = set()


def _resolve(impl: str, chunk_size: int, q, k, v, g, beta, initial_state) -> str:
    op = "gated_delta_rule"
    check_impl(op, impl, IMPLEMENTATIONS)
    check_chunk_size(op, chunk_size)
    name, why = choose_implementation(op, impl, "fla", "chunk", q.device.type,
                                      unsupported=lambda: fla_backend.unsupported(q, k, v, g, beta, initial_state))
    log_implementation(logger, _logged, op, name, q.device.type, "fla", why,
                       f" (chunk_size {chunk_size})" if name == "chunk" else "")
    return name


def gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                     initial_state: Optional[torch.Tensor] = None, output_final_state: bool = True,
                     scale: Optional[float] = None, impl: str = "auto", *,
                     reset: Optional[torch.Tensor] = None,
                     chunk_size: int = 64) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Gated delta rule (Yang, Kautz, Hatamizadeh 2025, Eq. 10), per batch row b and head h::

        S_t = 0                                           if reset[b, t]  (before anything else at step t)
        S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
        o_t = scale * S_t^T q_t                           (the query reads the UPDATED state)

    Same argument order, layout and conventions as fla's ``chunk_gated_delta_rule`` (and
    ``naive_recurrent_gated_delta_rule``, whose arithmetic ``naive.py`` follows step by step).

    Args:
        q, k: ``[B, T, H, K]`` queries and keys (the layer L2-normalises them; the op does not).
        v: ``[B, T, H, V]`` values; K and V are independent (no grouped value heads).
        g: ``[B, T, H]`` log decays, finite, normally <= 0 (alpha_t = exp(g_t) in (0, 1]).
        beta: ``[B, T, H]`` write strengths, normally in (0, 1) (the caller applies the sigmoid).
        initial_state: ``[B, H, K, V]`` S_0 (fp32; None means zeros).  It receives a gradient.
        output_final_state: return S_T (else None).
        scale: factor on the output; None means K^-1/2 (fla's default).
        impl: ``"auto"``, ``"naive"``, ``"chunk"`` or ``"fla"`` (module docstring).
        reset: None or bool ``[B, T]``: True at t zeroes the state just before token t (a document starts at
            t: token t and later see nothing from before t; tokens before t are unaffected).  Equivalent to
            alpha_t = 0.
        chunk_size: chunk length C of the chunk path (capped at T; T need not be a multiple of it).

    The arithmetic runs in fp32 whatever the input dtype (fp64 for fp64 inputs; the fla path follows fla's
    kernels: fp32 accumulation and state).  Inputs are never modified.

    Returns:
        ``(o, final_state)``: o ``[B, T, H, V]`` in v's dtype; final_state ``[B, H, K, V]`` fp32 (fp64 for
        fp64 inputs) or None.

    Raises:
        TypeError, ValueError: an argument of the wrong type, shape or device, or an unknown ``impl`` or bad
        ``chunk_size``; the message names the argument and the expected shape.
        RuntimeError: ``impl="fla"`` where fla-core cannot run (not importable, not CUDA, fp64); the message
        says which.
    """
    check_inputs("gated_delta_rule", q, k, v, g, beta, initial_state, reset, scale)
    name = _resolve(impl, chunk_size, q, k, v, g, beta, initial_state)
    scale = default_scale(scale, q.shape[-1])
    if name == "fla":
        return fla_backend.gated_delta_rule(fla_backend.function(), q, k, v, g, beta, initial_state,
                                            output_final_state, scale, reset)
    kw = dict(initial_state=initial_state, output_final_state=output_final_state, scale=scale, reset=reset)
    if name == "naive":
        return naive.gated_delta_rule(q, k, v, g, beta, **kw)
    return chunk.gated_delta_rule(q, k, v, g, beta, chunk_size=chunk_size, **kw)
