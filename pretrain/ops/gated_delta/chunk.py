"""Chunkwise-parallel gated delta rule (the fast path on CPU), differentiated by autograd.

Yang, Kautz, Hatamizadeh, "Gated Delta Networks: Improving Mamba2 with Delta Rule" (ICLR 2025, arXiv
2412.06464), Sec. 3.3 (proof in App. A): the WY representation and UT transform of the delta rule (the paper's
Eq. 3-9, from Yang et al., NeurIPS 2024) extended by the within-chunk cumulative decays of Eq. 1-2.  The same
computation as flash-linear-attention's ``naive_chunk_gated_delta_rule`` (``fla/ops/gated_delta_rule/
naive.py``), arranged so that everything not depending on the carried state is batched over all chunks.

The sequence is cut into chunks of C tokens.  Inside a chunk with rows K [C, K], V [C, V], beta [C] and
log decays g [C], let gamma_i = g_1 + ... + g_i (cumulative within the chunk, the log of the paper's
gamma^i), Gamma_i = exp(gamma_i) (the decay from the chunk's start through i) and S the state entering the
chunk.  The inserted values u_i = beta_i (v_i - (alpha_i S_{i-1})^T k_i) satisfy::

    u_i = beta_i v_i - beta_i Gamma_i S^T k_i - sum_{j<i} beta_i exp(gamma_i - gamma_j) (k_i . k_j) u_j,

i.e.  (I + A) U = diag(beta) V - diag(beta Gamma) K S  with the strictly lower triangular
A_ij = beta_i exp(gamma_i - gamma_j) k_i . k_j (Eq. 6 with the paper's decay-aware mask).  With the UT
transform T = (I + A)^{-1} (Eq. 6-9 with decays)::

    U' = T diag(beta) V,   W' = T diag(beta Gamma) K,   U = U' - W' S
    O  = scale * (P U' + (diag(Gamma) Q - P W') S),       P_ij = exp(gamma_i - gamma_j) q_i . k_j  (j <= i)
    S <- Gamma_C S + Ktil^T U  = (Gamma_C I - Ktil^T W') S + Ktil^T U',   Ktil_j = exp(gamma_C - gamma_j) k_j

so per chunk only ``S <- M S + Ktil^T U'`` and ``O = P U' + Qs S`` involve the state; M (or, for K > C, the
two thin factors), Ktil^T U', P U' and Qs = diag(Gamma) Q - P W' are computed for all chunks beforehand.
The decay ratios are formed as exp of differences of the cumulative log decays (masked before the exp), never
as quotients, so strong decays underflow to 0 instead of overflowing.

Resets (``reset[b, t]``: the state is zeroed just before token t, which is alpha_t = 0): with document ids
``doc = cumsum(reset)``, the in-chunk interactions (A and P) are masked to equal documents, the entering
state reaches only positions of the chunk's first document (Gamma masked), the leaving state keeps only the
contributions of the chunk's last document (Ktil masked), and none of the entering state when the chunk holds
a reset (Gamma_C masked).  The cumulative log decays are then taken within each document (a masked [C, C]
product instead of the cumulative sum) and skip the g of reset positions, which acts on a zeroed state: no
infinite log decay is needed, and not even a rounding error's worth of gradient crosses a document start.
T need not be a multiple of C: the tail is padded with q = k = v = 0, beta = 0, g = 0, which neither writes
to nor decays the state and is not returned.

g must be finite (log decays; fla's convention): a -inf would give NaN in the differences of cumulative
sums.  Keys should satisfy beta_t |k_t|^2 <= 2 (L2-normalised keys, as in the paper), where T stays moderate.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from pretrain.ops.common import ChunkDocuments, cast, compute_dtype
from pretrain.ops.gated_delta.common import default_scale


def _chunks(x: torch.Tensor, n: int, c: int) -> torch.Tensor:
    """[B, T, H, D] -> [n, B, H, c, D] (chunk-major, contiguous), zero-padded at the end of the time axis.

    Chunk-major so that the per-chunk slices of the sequential loop are views."""
    B, T, H, D = x.shape
    if n * c != T:
        x = F.pad(x, (0, 0, 0, 0, 0, n * c - T))
    return x.reshape(B, n, c, H, D).permute(1, 0, 3, 2, 4).contiguous()


def _per_chunk(x: torch.Tensor):
    """[n, B, H, a, b] -> n views [B * H, a, b] (for the sequential loop)."""
    return x.reshape(x.shape[0], -1, *x.shape[3:]).unbind(0)


def gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                     initial_state: Optional[torch.Tensor] = None, output_final_state: bool = True,
                     scale: Optional[float] = None, reset: Optional[torch.Tensor] = None,
                     chunk_size: int = 64) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Chunkwise gated delta rule (module docstring); same contract as
    :func:`pretrain.ops.gated_delta.gated_delta_rule`.

    ``chunk_size`` C is capped at T.  Cost O(T C (C + K + V) + T K (K + V)) multiply-adds; the state
    recurrence takes ceil(T/C) sequential steps.  Returns ``(o [B, T, H, V] in v's dtype, final state
    [B, H, K, V] fp32/fp64 or None)``.
    """
    out_dtype = v.dtype
    dt = compute_dtype(q, k, v, g, beta, initial_state)
    q, k, v, g, beta, S = cast(dt, q, k, v, g, beta, initial_state)
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = default_scale(scale, K)
    c = max(1, min(int(chunk_size), T))
    n = math.ceil(T / c)
    if reset is not None and not bool(reset.any()):
        reset = None
    m = None if reset is None else ChunkDocuments(reset, n, c, dt)
    q, k, v = (_chunks(x, n, c) for x in (q, k, v))                 # [n, B, H, c, D]
    beta, g = (_chunks(x[..., None], n, c) for x in (beta, g))      # [n, B, H, c, 1]
    if S is None:
        S = q.new_zeros(B, H, K, V)

    strict = torch.ones(c, c, dtype=torch.bool, device=q.device).tril(-1)
    causal = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    if m is None:
        gam = g.cumsum(-2)                                          # gamma_i, cumulative within the chunk
    else:
        strict, causal = strict & m.same, causal & m.same
        # cumulative within the chunk and the document, without the g of reset positions: nothing (not even a
        # rounding error's worth of gradient) reaches across a document start
        gam = causal.to(dt) @ (g * m.keep)
    diff = gam - gam.transpose(-1, -2)                              # gamma_i - gamma_j   [n, B, H, c, c]
    neg_inf = float("-inf")
    D_strict = diff.masked_fill(~strict, neg_inf).exp()             # exp(gamma_i - gamma_j), j < i, else 0
    D_causal = diff.masked_fill(~causal, neg_inf).exp()             # the same for j <= i
    Gam = gam.exp()                                                 # Gamma_i
    Gam_C = Gam[..., -1:, :]                                        # Gamma_C   [n, B, H, 1, 1]
    to_end = (gam[..., -1:, :] - gam).exp()                         # exp(gamma_C - gamma_j)
    if m is not None:
        Gam = Gam * m.first                                         # only the first document reads the state
        Gam_C = Gam_C * m.carry
        to_end = to_end * m.last                                    # only the last document writes it

    kT = k.transpose(-1, -2)                                        # [n, B, H, K, c]
    kb, vb = k * beta, v * beta
    A = (kb @ kT) * D_strict                                        # strictly lower
    P = (q @ kT) * D_causal                                         # lower, diagonal included
    # the UT transform T = (I + A)^{-1} (unit lower triangular; solve_triangular reads only the strictly
    # lower part of A and takes the unit diagonal as given)
    eye_c = torch.eye(c, dtype=dt, device=q.device)
    T_ut = torch.linalg.solve_triangular(A, eye_c.expand_as(A), upper=False, unitriangular=True)
    Wp, Up = T_ut @ (kb * Gam), T_ut @ vb                           # W' [.., c, K], U' [.., c, V]
    o_intra = P @ Up                                                # [n, B, H, c, V]
    q_state = q * Gam - P @ Wp                                      # O = o_intra + q_state S
    ktT = (k * to_end).transpose(-1, -2)                            # Ktil^T  [n, B, H, K, c]
    write = _per_chunk(ktT @ Up)                                    # Ktil^T U' of each chunk
    S = S.reshape(B * H, K, V)
    states = []
    if K <= c:
        # S <- M S + Ktil^T U' with M = Gamma_C I - Ktil^T W' (one K x K product per chunk)
        M = torch.eye(K, dtype=dt, device=q.device) * Gam_C - ktT @ Wp
        for M_i, write_i in zip(_per_chunk(M), write):
            states.append(S)
            S = torch.baddbmm(write_i, M_i, S)
    else:
        # K > C: S <- Gamma_C S + Ktil^T U' - Ktil^T (W' S), two thin products are cheaper than the K x K one
        for Wp_i, ktT_i, write_i, gc_i in zip(_per_chunk(Wp), _per_chunk(ktT), write,
                                              _per_chunk(Gam_C.expand(n, B, H, 1, 1))):
            states.append(S)
            S = torch.baddbmm(torch.addcmul(write_i, S, gc_i), ktT_i, Wp_i @ S, alpha=-1)
    o = o_intra + q_state @ torch.stack(states).view(n, B, H, K, V)
    o = o.permute(1, 0, 3, 2, 4).reshape(B, n * c, H, V)[:, :T] * scale
    return o.to(out_dtype), (S.view(B, H, K, V) if output_final_state else None)
