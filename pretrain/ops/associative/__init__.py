"""ARMT's associative memory as an op: the segment-level write and the per-token read.

Rodkin, Kuratov, Bulatov, Burtsev, "Associative Recurrent Memory Transformer" (ICML 2024 NGSM workshop,
arXiv 2407.04841), Sec. 3 (the associative block); the equations are those of the authors' code, which is
followed wherever the paper is silent or differs: RodkinIvan/associative-recurrent-memory-transformer,
``modeling_amt/language_modeling.py`` at commit aa145de (branch main):

* ``DPFP`` (lines 8-24): phi = DPFP_nu with nu = 3 (line 36), identical to ``pretrain.ops.feature_maps.dpfp``;
* ``associate`` (lines 64-78): the read, added to the layer's INPUT hidden states of every token, memory
  tokens included (lines 80-86), skipped in the first segment (a zero state reads 0 anyway);
* ``update_mem`` (lines 94-129): the write from the layer's OUTPUT at the M memory tokens (lines 87-91), all
  M tokens against the state before the write, in one batched step (not token by token).

Per-head layout as in the multi-head version of the same file (branch experimental, commit a62eea3): keys are
split into H heads of Dk = d_mem / H before phi, values into H heads of Dv = d_model / H, one beta per memory
token and head; with H = 1 it is exactly the main-branch code.  ``normalize=True`` adds the L2 normalisation of
phi that the experimental branch has from commit 4587ca0 on.

Shapes (B batch rows, H heads, M memory tokens, T query tokens, Dphi = 2 nu Dk):

* ``A``: ``[B, H, Dphi, Dv]``, the associative matrix (the authors' ``W_mem``);
* ``z``: ``[B, H, Dphi]``, the normaliser;
* ``k``: ``[B, H, M, Dk]`` keys BEFORE phi (``W_mk`` of the memory tokens); ``q``: ``[B, H, T, Dk]`` likewise;
* ``v``: ``[B, H, M, Dv]`` values (``W_mv`` of the memory tokens);
* ``beta``: ``[B, H, M]`` write strengths (``sigmoid(W_mb m)``, applied by the caller), or ``[B, H, M, Dv]``
  (the per-channel "gating" variant of the later code).

Dtypes: floating tensors of any float dtype; the arithmetic runs in fp64 if any input is fp64, else in fp32
(bf16/fp16 are upcast).  The update returns ``(A', z')`` in that compute dtype (keep the state in fp32 or
fp64); the read returns ``o`` in q's dtype.  Gradients reach every input, the initial A and z included (the
authors keep the graph through the state across segments; only gamma is detached).

Errors: ``TypeError`` for a non-tensor or non-floating input (a non-bool ``first_segment``); ``ValueError``
naming the argument for a wrong shape, a wrong ``nu`` or ``eps``, or inputs on different devices.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from pretrain.ops.associative import reference
from pretrain.ops.associative.reference import DEFAULT_EPS, DEFAULT_NU, feature_map
from pretrain.ops.common import check_float_tensors, check_same_device, shape_str

__all__ = ["associative_update", "associative_read", "zero_state", "feature_map", "feature_dim",
           "DEFAULT_NU", "DEFAULT_EPS"]


def feature_dim(dk: int, nu: int = DEFAULT_NU) -> int:
    """Dphi = 2 nu Dk, the width of phi(k) and the rows of A.  ``ValueError`` for a non-positive size."""
    if dk < 1 or isinstance(nu, bool) or not isinstance(nu, int) or nu < 1:
        raise ValueError(f"feature_dim: dk={dk!r} and nu={nu!r} must be integers >= 1")
    return 2 * nu * dk


def _check_tensors(op: str, named) -> None:
    check_float_tensors(op, named)
    check_same_device(op, [t for _, t in named])


def _check_options(op: str, nu, eps) -> None:
    if isinstance(nu, bool) or not isinstance(nu, int) or nu < 1:
        raise ValueError(f"{op}: nu={nu!r} must be an integer >= 1")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"{op}: eps={eps!r} must be a positive number (it keeps z . phi + eps away from 0)")


def _check_state(op: str, A: torch.Tensor, z: torch.Tensor, B: int, H: int, dphi: int, dk: int, nu: int) -> int:
    if A.dim() != 4 or A.shape[0] != B or A.shape[1] != H or A.shape[2] != dphi or A.shape[3] < 1:
        raise ValueError(f"{op}: A has shape {shape_str(A)}, expected [{B}, {H}, {dphi}, Dv] ([B, H, Dphi, Dv] with "
                         f"Dphi = 2 nu Dk = 2*{nu}*{dk})")
    if z.shape != (B, H, dphi):
        raise ValueError(f"{op}: z has shape {shape_str(z)}, expected [{B}, {H}, {dphi}] ([B, H, Dphi])")
    return A.shape[3]


def associative_update(A: torch.Tensor, z: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, *,
                       nu: int = DEFAULT_NU, eps: float = DEFAULT_EPS, correction: bool = True,
                       normalize: bool = False, first_segment: Union[bool, torch.Tensor] = False,
                       detach_gamma: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """Write one segment's M memory tokens into the associative memory (``update_mem``, lines 94-129)::

        phi_i   = DPFP_nu(k_i)            (/ |.|_2 if normalize)
        d_i     = z . phi_i + eps
        vbar_i  = A^T phi_i / d_i                              what the memory holds under k_i now
        gamma_i = clip(1 - d_i / (|phi_i|^2 + eps'), 0, 1)     (paper's gamma correction of z; detached)
        A'      = A + sum_i beta_i phi_i (v_i - vbar_i)^T      (delta rule, all i against the old A, z)
        z'      = z + sum_i gamma_i phi_i                      (no beta here, as in the code)

    eps' = eps, or 0 with ``normalize`` (as the experimental branch writes it).  In a row flagged by
    ``first_segment`` the state is taken as zero (A, z not read), vbar_i = 0 and gamma_i = 1: the authors'
    first-segment branch (lines 110-112), which differs from the general formula on a zero state only in gamma
    (there 1 - eps / (|phi|^2 + eps) instead of 1).

    Args:
        A: ``[B, H, Dphi, Dv]``; z: ``[B, H, Dphi]`` the state before the write (Dphi = 2 nu Dk).
        k: ``[B, H, M, Dk]`` keys before phi; v: ``[B, H, M, Dv]`` values.
        beta: ``[B, H, M]`` (or ``[B, H, M, Dv]``) write strengths, the caller's ``sigmoid(W_mb m)``.
        nu: DPFP order (authors: 3).  eps: added to every z . phi denominator (authors: 1e-5), > 0.
        correction: the gamma correction of z (authors' default; ``--no_correction`` sets gamma = 1).
        normalize: L2-normalise phi (experimental branch, commit 4587ca0).
        first_segment: bool, or a bool tensor ``[B]`` selecting rows that start a document this segment.
        detach_gamma: False lets gradients flow through gamma (for gradient checks; the authors detach).

    Returns ``(A', z')`` of A's and z's shapes in the compute dtype (fp64 if any input is fp64, else fp32).

    Raises ``ValueError`` naming the argument (``A``, ``z``, ``k``, ``v``, ``beta``, ``first_segment``, ``nu``,
    ``eps``) on a bad shape or value, ``TypeError`` on a non-tensor or non-float input.
    """
    op = "associative_update"
    _check_tensors(op, [("A", A), ("z", z), ("k", k), ("v", v), ("beta", beta)])
    _check_options(op, nu, eps)
    if k.dim() != 4 or k.shape[2] < 1 or k.shape[3] < 1:
        raise ValueError(f"{op}: k has shape {shape_str(k)}, expected 4 dims [B, H, M, Dk] with M, Dk >= 1")
    B, H, M, Dk = k.shape
    Dv = _check_state(op, A, z, B, H, 2 * nu * Dk, Dk, nu)
    if v.shape != (B, H, M, Dv):
        raise ValueError(f"{op}: v has shape {shape_str(v)}, expected [{B}, {H}, {M}, {Dv}] ([B, H, M, Dv])")
    if beta.shape != (B, H, M) and beta.shape != (B, H, M, Dv):
        raise ValueError(f"{op}: beta has shape {shape_str(beta)}, expected [{B}, {H}, {M}] or [{B}, {H}, {M}, {Dv}]")
    if isinstance(first_segment, torch.Tensor):
        if first_segment.dtype != torch.bool:
            raise TypeError(f"{op}: first_segment must be a bool or a bool tensor [B], got {first_segment.dtype}")
        if first_segment.shape != (B,):
            raise ValueError(f"{op}: first_segment has shape {shape_str(first_segment)}, expected [{B}]")
    elif not isinstance(first_segment, bool):
        raise TypeError(f"{op}: first_segment must be a bool or a bool tensor [B], got "
                        f"{type(first_segment).__name__}")
    return reference.associative_update(A, z, k, v, beta, nu=nu, eps=eps, correction=correction,
                                        normalize=normalize, first_segment=first_segment,
                                        detach_gamma=detach_gamma)


def associative_read(A: torch.Tensor, z: torch.Tensor, q: torch.Tensor, *, nu: int = DEFAULT_NU,
                     eps: float = DEFAULT_EPS, normalize: bool = False) -> torch.Tensor:
    """Read the associative memory with every query (``associate``, lines 64-78)::

        o_t = A^T phi(q_t) / (z . phi(q_t) + eps)

    The caller adds o (heads merged back to d_model) to the layer's input hidden states (line 82-86).  A zero
    state reads exactly 0 with finite gradients: eps is added to the denominator (not a clamp), and z . phi >= 0
    whenever z was written by :func:`associative_update` (phi >= 0, gamma >= 0); a z with negative entries can
    make the denominator vanish, which is not checked.

    Args:
        A: ``[B, H, Dphi, Dv]``; z: ``[B, H, Dphi]``; q: ``[B, H, T, Dk]`` queries before phi, Dphi = 2 nu Dk.
        nu, eps, normalize: as in :func:`associative_update` (use the same values for both).

    Returns ``o [B, H, T, Dv]`` in q's dtype (computed in fp64 if any input is fp64, else fp32).

    Raises ``ValueError`` naming the argument (``A``, ``z``, ``q``, ``nu``, ``eps``) on a bad shape or value,
    ``TypeError`` on a non-tensor or non-float input.
    """
    op = "associative_read"
    _check_tensors(op, [("A", A), ("z", z), ("q", q)])
    _check_options(op, nu, eps)
    if q.dim() != 4 or q.shape[2] < 1 or q.shape[3] < 1:
        raise ValueError(f"{op}: q has shape {shape_str(q)}, expected 4 dims [B, H, T, Dk] with T, Dk >= 1")
    B, H, T, Dk = q.shape
    _check_state(op, A, z, B, H, 2 * nu * Dk, Dk, nu)
    return reference.associative_read(A, z, q, nu=nu, eps=eps, normalize=normalize)


def zero_state(batch: int, heads: int, dk: int, dv: int, *, nu: int = DEFAULT_NU,
               dtype: torch.dtype = torch.float32,
               device: Optional[torch.device] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The empty memory ``(A, z)``: zeros ``[batch, heads, 2 nu dk, dv]`` and ``[batch, heads, 2 nu dk]`` (the
    authors' ``zero_mem``, lines 132-136, with the batch dimension explicit).  ``ValueError`` for sizes < 1."""
    if min(batch, heads, dv) < 1:
        raise ValueError(f"zero_state: batch={batch}, heads={heads}, dv={dv} must all be >= 1")
    dphi = feature_dim(dk, nu)
    return (torch.zeros(batch, heads, dphi, dv, dtype=dtype, device=device),
            torch.zeros(batch, heads, dphi, dtype=dtype, device=device))
