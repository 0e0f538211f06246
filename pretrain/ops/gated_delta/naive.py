"""Step-by-step reference of the gated delta rule: a plain loop over time, differentiated by autograd.

The definition the chunkwise path (and fla's kernels) are tested against; slow (one Python step per token,
every intermediate state kept for the backward pass).  Written from Yang, Kautz, Hatamizadeh, "Gated Delta
Networks: Improving Mamba2 with Delta Rule" (ICLR 2025, arXiv 2412.06464), Eq. (10), in the state
orientation of flash-linear-attention (S in R^{K x V}, the transpose of the paper's S in R^{d_v x d_k}).

Shapes and dtypes are those of :mod:`pretrain.ops.gated_delta` (see ``common.py``); the public entry point
there validates the inputs, this function assumes valid ones.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from pretrain.ops.common import cast, compute_dtype
from pretrain.ops.gated_delta.common import default_scale


def gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                     initial_state: Optional[torch.Tensor] = None, output_final_state: bool = True,
                     scale: Optional[float] = None,
                     reset: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Gated delta rule, one token at a time, per batch row and head::

        S      = 0                                   if reset[b, t]   (before anything else at step t)
        S      = exp(g_t) S                          (decay alpha_t = exp(g_t))
        u_t    = beta_t (v_t - S^T k_t)              (value to insert, read from the decayed state)
        S_t    = S + k_t u_t^T                       = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
        o_t    = scale * S_t^T q_t                   (the query reads the UPDATED state)

    Returns ``(o [B, T, H, V] in v's dtype, S_T [B, H, K, V] fp32/fp64 or None)``.
    """
    out_dtype = v.dtype
    dt = compute_dtype(q, k, v, g, beta, initial_state)
    q, k, v, g, beta, S = cast(dt, q, k, v, g, beta, initial_state)
    B, T, H, K = q.shape
    scale = default_scale(scale, K)
    if S is None:
        S = q.new_zeros(B, H, K, v.shape[-1])
    keep = None if reset is None else (~reset).to(dt)[:, :, None, None, None]      # [B, T, 1, 1, 1]
    alpha = g.exp()[..., None, None]                                                # [B, T, H, 1, 1]
    outs = []
    for t in range(T):
        if keep is not None:
            S = S * keep[:, t]
        S = S * alpha[:, t]
        kt = k[:, t]                                                                # [B, H, K]
        u = beta[:, t, :, None] * (v[:, t] - torch.einsum("bhkv,bhk->bhv", S, kt))
        S = S + kt[..., :, None] * u[..., None, :]
        outs.append(scale * torch.einsum("bhkv,bhk->bhv", S, q[:, t]))
    return torch.stack(outs, dim=1).to(out_dtype), (S if output_final_state else None)
