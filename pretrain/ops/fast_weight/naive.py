"""Step-by-step reference of the fast-weight rules: a plain loop over time, differentiated by autograd.

This is the definition the fast paths are tested against; it is slow (one Python step per token) and keeps
every intermediate fast weight for the backward pass.  Written from Schlag, Irie, Schmidhuber, "Linear
Transformers Are Secretly Fast Weight Programmers" (ICML 2021, arXiv 2102.11174), Sec. 4.2 (delta rule) and
Sec. 3 (sum rule), in the layout of lmtool-fwms' CUDA kernel (W in R^{Dk x Dv}).

Shapes and dtypes are those of :mod:`pretrain.ops.fast_weight` (see ``common.py``); the public entry points
there validate the inputs, these functions assume valid ones.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from pretrain.ops.common import cast, compute_dtype


def _start(q, k, v, beta, initial_state, reset):
    dt = compute_dtype(q, k, v, beta, initial_state)
    q, k, v, beta, s0 = cast(dt, q, k, v, beta, initial_state)
    B, H, _, Dk = q.shape
    W = s0 if s0 is not None else q.new_zeros(B, H, Dk, v.shape[-1])
    keep = None if reset is None else (~reset).to(dt)[:, None, :, None, None]       # [B, 1, T, 1, 1]
    return q, k, v, beta, W, keep


def _scan(step, q, k, v, beta, scale, initial_state, output_final_state, reset):
    """The time loop shared by the rules: per step t, ``W = 0`` where ``reset`` starts a document, ``W =
    step(W, t, k, v, beta)`` (the rule's update), ``o_t = scale * W^T q_t``.  Returns ``(o [B, H, T, Dv] in v's
    dtype, W_T or None)``."""
    out_dtype = v.dtype
    q, k, v, beta, W, keep = _start(q, k, v, beta, initial_state, reset)
    outs = []
    for t in range(q.shape[2]):
        if keep is not None:
            W = W * keep[:, :, t]
        W = step(W, t, k, v, beta)
        outs.append(scale * torch.einsum("bhkv,bhk->bhv", W, q[:, :, t]))
    return torch.stack(outs, dim=2).to(out_dtype), (W if output_final_state else None)


def delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, *, scale: float = 1.0,
               initial_state: Optional[torch.Tensor] = None, output_final_state: bool = True,
               reset: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Delta rule, one token at a time::

        W_t  = 0                                      if reset[b, t]   (before anything else at step t)
        vbar_t = W_{t-1}^T k_t                        (value stored under k_t, read from the OLD weight)
        W_t  = W_{t-1} + beta_t k_t (v_t - vbar_t)^T
        o_t  = scale * W_t^T q_t                      (the query reads the UPDATED weight)

    Returns ``(o [B, H, T, Dv] in v's dtype, W_T [B, H, Dk, Dv] fp32/fp64 or None)``.
    """
    def step(W, t, k, v, beta):
        kt = k[:, :, t]
        vbar = torch.einsum("bhkv,bhk->bhv", W, kt)
        u = beta[:, :, t, None] * (v[:, :, t] - vbar)
        return W + kt[..., :, None] * u[..., None, :]
    return _scan(step, q, k, v, beta, scale, initial_state, output_final_state, reset)


def sum_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float = 1.0,
             initial_state: Optional[torch.Tensor] = None, output_final_state: bool = True,
             reset: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Sum rule (linear attention without normalisation), one token at a time::

        W_t = 0 if reset[b, t];   W_t = W_{t-1} + k_t v_t^T;   o_t = scale * W_t^T q_t

    Returns ``(o [B, H, T, Dv] in v's dtype, W_T [B, H, Dk, Dv] fp32/fp64 or None)``.
    """
    def step(W, t, k, v, beta):
        return W + k[:, :, t, :, None] * v[:, :, t, None, :]
    return _scan(step, q, k, v, None, scale, initial_state, output_final_state, reset)


def key_sum(k: torch.Tensor, *, initial: Optional[torch.Tensor] = None,
            reset: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Running key sum, one token at a time: ``z_t = 0 if reset[b, t]; z_t = z_{t-1} + k_t``.

    Returns ``(z [B, H, T, Dk], z_T [B, H, Dk])`` in fp32 (fp64 for fp64 inputs)."""
    dt = compute_dtype(k, initial)
    k, z = cast(dt, k, initial)
    if z is None:
        z = k.new_zeros(k.shape[0], k.shape[1], k.shape[3])
    keep = None if reset is None else (~reset).to(dt)[:, None, :, None]              # [B, 1, T, 1]
    outs = []
    for t in range(k.shape[2]):
        if keep is not None:
            z = z * keep[:, :, t]
        z = z + k[:, :, t]
        outs.append(z)
    return torch.stack(outs, dim=2), z
