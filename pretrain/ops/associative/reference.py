"""Plain reference of ARMT's associative memory: one batched write per segment, one read per token.

Rodkin, Kuratov, Bulatov, Burtsev, "Associative Recurrent Memory Transformer" (arXiv 2407.04841), as the
authors' code computes it: RodkinIvan/associative-recurrent-memory-transformer,
``modeling_amt/language_modeling.py`` (commit aa145de, branch main, the code the paper links):
``DPFP`` lines 15-24, ``AssociativeLayerWrapper.associate`` (the read) lines 64-78, ``forward`` lines
80-92, ``update_mem`` (the write) lines 94-129; the per-head layout of the multi-head version on the
``experimental`` branch (commit a62eea3, "add multihead armt") and its L2-normalised features (commit
4587ca0, ``normalize=True`` here).  README.md beside this file gives the equations and every choice.

Everything is written per (batch row b, head h); the functions here assume inputs already checked by the
public entry points of :mod:`pretrain.ops.associative` (shapes, dtypes, devices).

Dtype rule: the arithmetic runs in fp64 if any floating input (state included) is fp64, else in fp32 (bf16 and
fp16 inputs are upcast); the written state comes back in that dtype, the read in the dtype of the queries.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

from pretrain.ops.feature_maps import dpfp

DEFAULT_NU = 3          # modeling_amt/language_modeling.py line 36: ``nu = 3``
DEFAULT_EPS = 1e-5      # lines 75, 103, 106: ``+ 1e-5``


def compute_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    """fp64 if any given tensor is fp64, else fp32 (the arithmetic and state dtype)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def feature_map(x: torch.Tensor, nu: int = DEFAULT_NU, normalize: bool = False) -> torch.Tensor:
    """phi(x) = DPFP_nu(x) (Schlag et al. 2021, Sec. 5; the authors' ``DPFP``, lines 15-24), optionally divided
    by its L2 norm (``F.normalize``, as the experimental branch does from commit 4587ca0 on).
    ``[..., Dk] -> [..., 2 nu Dk]``, same dtype."""
    phi = dpfp(x, nu)
    if normalize:
        phi = F.normalize(phi, p=2.0, dim=-1)
    return phi


def _fresh_rows(first_segment: Union[bool, torch.Tensor], B: int, device, dtype) -> Optional[torch.Tensor]:
    """None when no row is fresh, else a float mask [B, 1, 1, 1]: 1 for a row taking the first-segment branch."""
    if isinstance(first_segment, torch.Tensor):
        return first_segment.to(device=device, dtype=dtype).reshape(B, 1, 1, 1)
    return torch.ones(B, 1, 1, 1, device=device, dtype=dtype) if first_segment else None


def associative_update(A: torch.Tensor, z: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, *,
                       nu: int = DEFAULT_NU, eps: float = DEFAULT_EPS, correction: bool = True,
                       normalize: bool = False, first_segment: Union[bool, torch.Tensor] = False,
                       detach_gamma: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """One segment's write of M memory tokens, all against the state BEFORE the write (one batched step)::

        phi_i  = feature_map(k_i)                                          [Dphi]
        d_i    = z . phi_i + eps
        vbar_i = A^T phi_i / d_i                                           [Dv]   (0 in a fresh row)
        gamma_i = clip(1 - d_i / (|phi_i|^2 + eps'), 0, 1)                 (1 in a fresh row, or correction off)
        A'     = A + sum_i phi_i (beta_i * (v_i - vbar_i))^T               [Dphi, Dv]
        z'     = z + sum_i gamma_i phi_i                                   [Dphi]

    with eps' = eps, or 0 when ``normalize`` (the experimental branch drops it there).  Rows flagged by
    ``first_segment`` start from the zero state: their A and z are not read (the authors' ``first_seg``
    branch, lines 110-112).  gamma is detached unless ``detach_gamma=False`` (line 107 detaches it).
    """
    dt = compute_dtype(A, z, k, v, beta)
    A, z, k, v, beta = (t.to(dt) for t in (A, z, k, v, beta))
    B = k.shape[0]
    phi = feature_map(k, nu, normalize)                                   # [B, H, M, Dphi]
    fresh = _fresh_rows(first_segment, B, k.device, dt)
    if fresh is not None:
        A = A * (1 - fresh)
        z = z * (1 - fresh[..., 0])
    # per (b, h), phi [M, Dphi] holds phi_i as its rows: each sum over i below is one matrix product
    d = phi @ z.unsqueeze(-1) + eps                                       # [B, H, M, 1]   z . phi_i + eps
    vbar = (phi @ A) / d                                                  # [B, H, M, Dv]  A^T phi_i / d_i
    if correction:
        sq_norm = (phi * phi).sum(dim=-1, keepdim=True)                   # [B, H, M, 1]   |phi_i|^2
        gamma = torch.clamp(1 - d / (sq_norm + (0.0 if normalize else eps)), min=0.0, max=1.0)
        if detach_gamma:
            gamma = gamma.detach()
    else:
        gamma = torch.ones_like(d)
    if fresh is not None:
        vbar = vbar * (1 - fresh)                                         # exactly 0 already (A = 0)
        gamma = gamma * (1 - fresh) + fresh
    strength = beta.unsqueeze(-1) if beta.dim() == 3 else beta            # [B, H, M, 1] or [B, H, M, Dv]
    phi_t = phi.transpose(-2, -1)                                         # [B, H, Dphi, M]
    A_new = A + phi_t @ (strength * (v - vbar))                           # sum_i phi_i (beta_i (v_i - vbar_i))^T
    z_new = z + (phi_t @ gamma).squeeze(-1)                               # sum_i gamma_i phi_i
    return A_new, z_new


def associative_read(A: torch.Tensor, z: torch.Tensor, q: torch.Tensor, *, nu: int = DEFAULT_NU,
                     eps: float = DEFAULT_EPS, normalize: bool = False) -> torch.Tensor:
    """Read of every query against the state (lines 69-76)::

        o_t = A^T phi(q_t) / (z . phi(q_t) + eps)                           [B, H, T, Dv]

    A zero state reads exactly 0 (0 / eps); for z >= 0 (what the update writes) the denominator is >= eps.
    Returned in q's dtype.
    """
    dt = compute_dtype(A, z, q)
    out_dtype = q.dtype
    A, z, q = (t.to(dt) for t in (A, z, q))
    phi = feature_map(q, nu, normalize)                                   # [B, H, T, Dphi]
    numer = phi @ A                                                       # [B, H, T, Dv]  A^T phi(q_t)
    denom = phi @ z.unsqueeze(-1) + eps                                   # [B, H, T, 1]   z . phi(q_t) + eps
    return (numer / denom).to(out_dtype)
