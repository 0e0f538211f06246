"""Feature maps phi: R^d -> R^{d_dot} applied to keys and queries before the fast-weight rules.

As in lmtool-fwms (Schlag, Irie, Schmidhuber, ICML 2021, arXiv 2102.11174, Sec. 5 and its ``utils``):

* ``elu_plus_one``: Katharopoulos et al. 2020 ("Transformers are RNNs", arXiv 2006.16236, Sec. 3.2), d_dot = d;
* ``dpfp``: deterministic parameter-free projection (Schlag et al. 2021, Sec. 5), d_dot = 2 nu d;
* ``favor_plus``: positive orthogonal random features (Choromanski et al., "Rethinking Attention with
  Performers", ICLR 2021, arXiv 2009.14794, Sec. 2.3-2.4), d_dot = 2 m, with ``draw_favor_projection``;
* ``sum_normalise``: phi / sum_j phi_j, applied to keys and queries of the delta rule (Schlag et al. 2021,
  Sec. 4.2: "crucial for stable training").

Every map works on any leading dimensions and maps the last one.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["elu_plus_one", "dpfp", "favor_plus", "draw_favor_projection", "sum_normalise", "feature_dim",
           "FEATURE_MAPS"]

FEATURE_MAPS = ("elu_plus_one", "dpfp", "favor_plus")


def feature_dim(name: str, d: int, *, nu: int = 1, m: int = 16) -> int:
    """Output width d_dot of the feature map ``name`` on inputs of width ``d`` (``nu`` for DPFP, ``m`` random
    features for FAVOR+).  Raises ``ValueError`` for an unknown name or a non-positive size."""
    if d < 1 or nu < 1 or m < 1:
        raise ValueError(f"feature_dim: d={d}, nu={nu}, m={m} must all be >= 1")
    if name == "elu_plus_one":
        return d
    if name == "dpfp":
        return 2 * nu * d
    if name == "favor_plus":
        return 2 * m
    raise ValueError(f"feature_dim: unknown feature map {name!r}, expected one of {FEATURE_MAPS}")


def elu_plus_one(x: torch.Tensor) -> torch.Tensor:
    """phi(x) = elu(x) + 1 > 0, elementwise (Katharopoulos et al. 2020, Sec. 3.2.1); ``[..., d] -> [..., d]``,
    same dtype."""
    return F.elu(x) + 1.0


def dpfp(x: torch.Tensor, nu: int = 1) -> torch.Tensor:
    """Deterministic parameter-free projection (Schlag et al. 2021, Sec. 5)::

        x~  = [relu(x) ; relu(-x)]                                  in R^{2d}
        phi = concat_{i=1..nu} ( x~ * roll(x~, i) )                 in R^{2 nu d}

    ``roll`` shifts the last dimension cyclically by i (``torch.roll``: x~_{j-i} lands at j), as in
    lmtool-fwms.  ``[..., d] -> [..., 2 nu d]``, same dtype.  Raises ``ValueError`` for ``nu < 1``.
    """
    if isinstance(nu, bool) or not isinstance(nu, int) or nu < 1:
        raise ValueError(f"dpfp: nu={nu!r} must be an integer >= 1")
    xt = torch.cat([F.relu(x), F.relu(-x)], dim=-1)
    return torch.cat([xt * xt.roll(shifts=i, dims=-1) for i in range(1, nu + 1)], dim=-1)


def favor_plus(x: torch.Tensor, proj: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """FAVOR+ positive random features (Choromanski et al. 2021, Lemma 1, the hyperbolic variant)::

        phi(x) = (2m)^{-1/2} ( [exp(W^T x - |x|^2/2) ; exp(-W^T x - |x|^2/2)] + eps )     in R^{2m}

    so that E_W[phi(x) . phi(y)] = exp(x . y) up to the eps terms, for W with N(0, I_d) columns.  ``eps`` is
    added before the factor, as lmtool-fwms' ``prime`` does (it keeps every feature positive); no d^{-1/4}
    input scaling is applied (as there).

    Args:
        x: ``[..., d]``.
        proj: ``[d, m]`` from :func:`draw_favor_projection` (lmtool-fwms redraws it at every training forward
            and keeps the last draw for evaluation: the caller's choice).
        eps: added to every feature.

    Returns ``[..., 2m]`` in x's dtype (computed in at least fp32).  Raises ``ValueError`` when the last
    dimension of x is not ``proj.shape[0]``.
    """
    if proj.dim() != 2 or x.shape[-1] != proj.shape[0]:
        raise ValueError(f"favor_plus: proj has shape {list(proj.shape)}, expected [{x.shape[-1]}, m] for x of "
                         f"shape {list(x.shape)}")
    dt = torch.promote_types(torch.promote_types(x.dtype, proj.dtype), torch.float32)
    xf, w = x.to(dt), proj.to(dt)
    m = proj.shape[1]
    u = xf @ w
    offset = -0.5 * (xf * xf).sum(-1, keepdim=True)
    phi = (torch.cat([torch.exp(u + offset), torch.exp(offset - u)], dim=-1) + eps) * (2 * m) ** -0.5
    return phi.to(x.dtype)


def draw_favor_projection(d: int, m: int, generator: Optional[torch.Generator] = None,
                          device: Optional[torch.device] = None,
                          dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Random projection ``[d, m]`` for :func:`favor_plus`: m features w_j in R^d (the columns), orthogonal
    within blocks of d (QR of a d x d Gaussian matrix, signs fixed by diag(R) so the block is Haar-distributed;
    a last partial block for m mod d), each rescaled by the norm of an independent N(0, I_d) vector, so that
    every column is N(0, I_d)-distributed (Choromanski et al. 2021, Sec. 2.4, "orthogonal random features";
    the construction of performer-pytorch's ``gaussian_orthogonal_random_matrix``, transposed).

    Note: lmtool-fwms calls that helper as ``(d_head, proj_dim)``, which makes the d rows orthogonal instead
    of the m feature columns; the columns then have the right second moments but are not Gaussian.  Here
    the features follow the paper.

    Args:
        d: input width; m: number of random features (phi has 2m outputs).
        generator: a ``torch.Generator`` for a reproducible draw (the numbers are drawn on its device);
            None uses the global generator.
        device, dtype: of the result (default: the generator's device, ``torch.get_default_dtype()``).

    Raises ``ValueError`` when d or m is below 1.
    """
    if d < 1 or m < 1:
        raise ValueError(f"draw_favor_projection: d={d} and m={m} must be >= 1")
    gen_device = generator.device if generator is not None else torch.device("cpu")
    f64 = dict(dtype=torch.float64, device=gen_device, generator=generator)
    blocks = []
    for _ in range(math.ceil(m / d)):
        q, r = torch.linalg.qr(torch.randn(d, d, **f64))
        blocks.append(q * torch.sign(torch.diagonal(r)).masked_fill(torch.diagonal(r) == 0, 1.0))
    w = torch.cat(blocks, dim=1)[:, :m]                               # columns orthonormal within each block
    w = w * torch.randn(d, m, **f64).norm(dim=0)                      # chi_d lengths
    return w.to(device=device if device is not None else gen_device,
                dtype=dtype if dtype is not None else torch.get_default_dtype())


def sum_normalise(x: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """phi(x) / (sum_j phi(x)_j + eps) over the last dimension (Schlag et al. 2021, Sec. 4.2).

    For non-negative features the result sums to 1.  With ``eps = 0`` (lmtool-fwms) an all-zero feature
    vector (DPFP of x = 0) gives NaN; a small ``eps`` avoids it.  ``[..., d_dot] -> [..., d_dot]``, same dtype.
    """
    return x / (x.sum(-1, keepdim=True) + eps)
