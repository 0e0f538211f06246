"""Chunkwise-parallel fast-weight rules (the fast path on CPU), differentiated by autograd.

The sequence is cut into chunks of C tokens.  Everything that does not depend on the state carried between
chunks is computed for all chunks at once (batched matrix products and one batched unit-lower-triangular
solve); only the state recurrence, one small matrix product per chunk, runs in a Python loop over the T/C
chunks.

Delta rule (Yang, Wang, Zhang, Shen, Kim, "Parallelizing Linear Transformers with the Delta Rule over
Sequence Length", NeurIPS 2024, arXiv 2406.06484, Sec. 3: WY representation and UT transform; the layout of
flash-linear-attention's ``fla/ops/delta_rule/chunk.py``, transposed to our W in R^{Dk x Dv}).  Inside a chunk
with rows K [C, Dk], V [C, Dv], beta [C] and entering state S, the inserted values u_t = beta_t (v_t - vbar_t)
satisfy  u_t = beta_t (v_t - S^T k_t - sum_{s<t} (k_t . k_s) u_s),  i.e.  A U = diag(beta) (V - K S) with::

    A  = I + strictly_lower(diag(beta) K K^T)                        (unit lower triangular)
    W' = A^{-1} diag(beta) K,   U' = A^{-1} diag(beta) V             (T = A^{-1}: the UT transform)
    U  = U' - W' S
    O  = scale * (Q S + causal_incl_diag(Q K^T) U)
    S <- S + K^T U  =  (I - K^T W') S + K^T U'

so per chunk only ``S <- M S + K^T U'`` with ``M = I - K^T W'`` and ``O = P U' + (Q - P W') S`` (P the masked
Q K^T) involve the state; M, K^T U', P U' and Q - P W' are computed for all chunks beforehand.

Sum rule: the same without the solve: ``O = scale * (Q S + causal_incl_diag(Q K^T) V)``, ``S <- S + K^T V``
(a cumulative sum over chunks when there are no resets).

Resets (``reset[b, t]``: the state is zeroed just before token t) inside a chunk: with document ids
``doc = cumsum(reset)``, the in-chunk interactions (A and Q K^T) are masked to equal documents, the entering
state reaches only positions of the chunk's first document (before the chunk's first reset), and the leaving
state keeps only the contributions of the chunk's last document (from its last reset on), and none of the
entering state when the chunk holds a reset.  T need not be a multiple of C: the tail is padded with
k = v = q = 0, beta = 0, which neither writes to the state nor is returned.

Numerics: the rule is meant for keys with beta_t |k_t|^2 <= 2 (then each step I - beta k k^T is a
contraction), as with sum-normalised or L2-normalised keys, where T = A^{-1} stays moderate; with large
unnormalised keys its entries can grow quickly with C (flash-linear-attention issue #537), and a smaller
chunk_size helps.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from pretrain.ops.common import ChunkDocuments, cast, compute_dtype


def _chunks(x: torch.Tensor, n: int, c: int) -> torch.Tensor:
    """[B, H, T, D] -> [n, B, H, c, D] (chunk-major, contiguous), zero-padded at the end of the time axis.

    Chunk-major so that the per-chunk slices of the sequential loop are views (no copies forward or back)."""
    B, H, T, D = x.shape
    if n * c != T:
        x = F.pad(x, (0, 0, 0, n * c - T))
    return x.reshape(B, H, n, c, D).permute(2, 0, 1, 3, 4).contiguous()


def _prepare(q, k, v, beta, initial_state, reset, chunk_size):
    dt = compute_dtype(q, k, v, beta, initial_state)
    q, k, v, beta, s0 = cast(dt, q, k, v, beta, initial_state)
    B, H, T, Dk = q.shape
    c = max(1, min(int(chunk_size), T))
    n = math.ceil(T / c)
    if reset is not None and not bool(reset.any()):
        reset = None
    masks = None if reset is None else ChunkDocuments(reset, n, c, dt)
    q, k, v = (_chunks(x, n, c) for x in (q, k, v))
    if beta is not None:
        beta = _chunks(beta[..., None], n, c)                      # [n, B, H, c, 1]
    if s0 is None:
        s0 = q.new_zeros(B, H, Dk, v.shape[-1])
    return q, k, v, beta, s0, masks, T


def _finish(o: torch.Tensor, T: int, scale: float, out_dtype: torch.dtype) -> torch.Tensor:
    """[n, B, H, c, Dv] -> [B, H, T, Dv] times scale, in the output dtype."""
    n, B, H, c, Dv = o.shape
    return (o.permute(1, 2, 0, 3, 4).reshape(B, H, n * c, Dv)[:, :, :T] * scale).to(out_dtype)


def _per_chunk(x: torch.Tensor):
    """[n, B, H, a, b] -> n views [B * H, a, b] (for the sequential loop)."""
    return x.reshape(x.shape[0], -1, *x.shape[3:]).unbind(0)


def delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, *, scale: float = 1.0,
               initial_state: Optional[torch.Tensor] = None, output_final_state: bool = True,
               reset: Optional[torch.Tensor] = None,
               chunk_size: int = 64) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Chunkwise delta rule (module docstring); same contract as :func:`pretrain.ops.fast_weight.delta_rule`.

    ``chunk_size`` C is capped at T.  Cost O(T C (C + Dk + Dv) + T Dk (Dk + Dv)) multiply-adds; the state
    recurrence takes T/C sequential steps.  Returns ``(o [B, H, T, Dv] in v's dtype, final state or None)``.
    """
    out_dtype = v.dtype
    q, k, v, beta, S, m, T = _prepare(q, k, v, beta, initial_state, reset, chunk_size)
    n, B, H, c, Dk = q.shape
    Dv = v.shape[-1]
    strict = torch.ones(c, c, dtype=torch.bool, device=q.device).tril(-1)
    causal = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    kT = k.transpose(-1, -2)                                        # [n, B, H, Dk, c]
    kb, vb = k * beta, v * beta

    A = (kb @ kT).masked_fill(~strict, 0)                           # strictly lower part of diag(beta) K K^T
    P = (q @ kT).masked_fill(~causal, 0)                            # causal Q K^T, diagonal included
    if m is not None:
        A, P = A * m.same, P * m.same
    # the UT transform T = (I + A)^{-1} (unit lower triangular; solve_triangular reads only the strictly
    # lower part of A and takes the unit diagonal as given).  Inverting explicitly and multiplying is faster
    # on CPU, forward and backward, than solving for [K V] directly.
    eye_c = torch.eye(c, dtype=q.dtype, device=q.device)
    T_ut = torch.linalg.solve_triangular(A, eye_c.expand_as(A), upper=False, unitriangular=True)
    Wp, Up = T_ut @ kb, T_ut @ vb                                   # W' [.., c, Dk], U' [.., c, Dv]
    if m is not None:
        Wp = Wp * m.first                                           # only the first document reads the state
        q = q * m.first
        kT = (k * m.last).transpose(-1, -2)                         # only the last document writes it
    o_intra = P @ Up                                                # [n, B, H, c, Dv]
    q_state = q - P @ Wp                                            # O = o_intra + q_state S
    write = _per_chunk(kT @ Up)                                     # K^T U' of each chunk
    S = S.reshape(B * H, Dk, Dv)
    states = []
    if Dk <= c:
        # S <- M S + K^T U' with M = carry I - K^T W' (one Dk x Dk product per chunk)
        eye = torch.eye(Dk, dtype=q.dtype, device=q.device)
        M = (eye if m is None else eye * m.carry) - kT @ Wp
        for M_i, write_i in zip(_per_chunk(M), write):
            states.append(S)
            S = torch.baddbmm(write_i, M_i, S)
    else:
        # Dk > c: S <- carry S + K^T U' - K^T (W' S), two thin products are cheaper than the Dk x Dk one
        carry = [None] * n if m is None else _per_chunk(m.carry.expand(n, B, H, 1, 1))
        for Wp_i, kT_i, write_i, carry_i in zip(_per_chunk(Wp), _per_chunk(kT), write, carry):
            states.append(S)
            S_in = S if carry_i is None else S * carry_i
            S = torch.baddbmm(S_in + write_i, kT_i, Wp_i @ S, alpha=-1)
    o = o_intra + q_state @ torch.stack(states).view(n, B, H, Dk, Dv)
    return _finish(o, T, scale, out_dtype), (S.view(B, H, Dk, Dv) if output_final_state else None)


def sum_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float = 1.0,
             initial_state: Optional[torch.Tensor] = None, output_final_state: bool = True,
             reset: Optional[torch.Tensor] = None,
             chunk_size: int = 64) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Chunkwise sum rule (module docstring); same contract as :func:`pretrain.ops.fast_weight.sum_rule`."""
    out_dtype = v.dtype
    q, k, v, _, S, m, T = _prepare(q, k, v, None, initial_state, reset, chunk_size)
    n, B, H, c, Dk = q.shape
    Dv = v.shape[-1]
    causal = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    P = (q @ k.transpose(-1, -2)).masked_fill(~causal, 0)
    if m is not None:
        P = P * m.same
        q = q * m.first
        k = k * m.last
    o_intra = P @ v
    write = k.transpose(-1, -2) @ v                                 # [n, B, H, Dk, Dv]
    if m is None:
        # S entering chunk i = S_0 + sum_{j < i} K_j^T V_j
        acc = write.cumsum(0)
        entering = torch.cat([S[None], S[None] + acc[:-1]], dim=0)
        final = S + acc[-1]
    else:
        S = S.reshape(B * H, Dk, Dv)
        states = []
        for write_i, carry_i in zip(_per_chunk(write), _per_chunk(m.carry.expand(n, B, H, 1, 1))):
            states.append(S)
            S = torch.addcmul(write_i, S, carry_i)
        entering, final = torch.stack(states).view(n, B, H, Dk, Dv), S.view(B, H, Dk, Dv)
    o = o_intra + q @ entering
    return _finish(o, T, scale, out_dtype), (final if output_final_state else None)


def key_sum(k: torch.Tensor, *, initial: Optional[torch.Tensor] = None,
            reset: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Running key sum ``z_t = z_{t-1} + k_t`` (zeroed before t where ``reset[b, t]``) by cumulative sums.

    The sums are accumulated in fp64 (a document's sum is a difference of two prefix sums, which in fp32 would
    lose digits over long segments), except on devices without fp64 (MPS).  Returns ``(z [B, H, T, Dk],
    z_T [B, H, Dk])`` in fp32 (fp64 for fp64 inputs)."""
    dt = compute_dtype(k, initial)
    acc = dt if k.device.type == "mps" else torch.float64
    k_, z0 = cast(acc, k, initial)
    cs = k_.cumsum(2)
    if reset is not None and not bool(reset.any()):
        reset = None
    if reset is None:
        z = cs if z0 is None else cs + z0[:, :, None]
    else:
        B, H, T, Dk = k_.shape
        pos = torch.arange(T, device=k.device).expand(B, T)
        start = torch.where(reset, pos, -1).cummax(1).values        # last reset at or before t, -1 if none
        idx = start.clamp(min=0)[:, None, :, None].expand(B, H, T, Dk)
        since_reset = cs - (cs - k_).gather(2, idx)                  # sum_{s = start}^{t} k_s
        before = cs if z0 is None else cs + z0[:, :, None]
        z = torch.where((start >= 0)[:, None, :, None], since_reset, before)
    z = z.to(dt)
    return z, z[:, :, -1]
