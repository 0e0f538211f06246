"""ARMT's associative memory op (pretrain/ops/associative).

The oracle is a transcription of the authors' math, in their einsum notation, from
RodkinIvan/associative-recurrent-memory-transformer, ``modeling_amt/language_modeling.py``:

* branch main, commit aa145de (single head): ``DPFP`` lines 15-24, ``associate`` lines 64-78, ``update_mem``
  lines 94-129, ``zero_mem`` lines 132-136;
* branch experimental, commits a62eea3 / 4587ca0 (heads, L2-normalised phi, no eps in |phi|^2 of gamma).

It works on the projected tensors (the outputs of their ``W_mq``, ``W_mk``, ``W_mv`` and ``sigmoid(W_mb .)``);
everything runs in fp64.  Properties: associative recall of keys orthogonal after phi, overwrite by the delta
rule, gradients to the initial state (gradcheck), a zero state reads zero, bad shapes raise.
"""
import pytest
import torch
import torch.nn.functional as F

from pretrain.ops import feature_maps as fm
from pretrain.ops.associative import (associative_read, associative_update, feature_dim, feature_map,
                                      zero_state)

F64 = torch.float64
r = F.relu


# ----------------------------------------------------------------------------------------------- the oracle
def authors_dpfp(x, nu):
    """``DPFP.__call__`` (main, lines 20-24)."""
    x = torch.cat([r(x), r(-x)], dim=-1)
    x_rolled = torch.cat([x.roll(shifts=j, dims=-1) for j in range(1, nu + 1)], dim=-1)
    x_repeat = torch.cat([x] * nu, dim=-1)
    return x_repeat * x_rolled


class AuthorsMain:
    """State handling and math of ``AssociativeLayerWrapper`` on main (one head, nu = 3, eps 1e-5)."""

    def __init__(self, d_mem, d_model, nu=3, correction=True):
        self.nu, self.correction = nu, correction
        self.W_mem = torch.zeros(1, 2 * nu * d_mem, d_model, dtype=F64)      # zero_mem, lines 134-135
        self.z = torch.zeros(1, 2 * nu * d_mem, dtype=F64)
        self.first_seg = True

    def associate(self, q):                                                  # lines 69-76, q = W_mq(h)
        mq = authors_dpfp(q, self.nu)
        num = torch.einsum('ijk,ikt->ijt', mq, self.W_mem)
        denom = torch.einsum("ik,ijk->ij", self.z, mq)[..., None] + 1e-5
        return num / denom

    def update_mem(self, k, new_mv, mb):                                     # lines 99-127, k = W_mk(m)
        mk = authors_dpfp(k, self.nu)
        if not self.first_seg:
            num = torch.einsum('ijk,ikt->ijt', mk, self.W_mem)
            denom = torch.einsum("ij,ikj->ik", self.z, mk)[..., None] + 1e-5
            prev_mv = num / denom
            if self.correction:
                new_info_coef = 1 - denom / (torch.linalg.norm(mk, dim=-1) ** 2 + 1e-5)[..., None]
                new_info_coef = torch.clip(new_info_coef, 0, 1).detach()
            else:
                new_info_coef = 1
        else:
            prev_mv = torch.zeros_like(new_mv)
            new_info_coef = 1
        mv = new_mv - prev_mv
        self.W_mem = self.W_mem + torch.einsum('ijk,ijt,ij->ikt', mk, mv, mb)
        self.z = self.z + (new_info_coef * mk).sum(dim=1)
        self.first_seg = False


class AuthorsExperimental:
    """The multi-head wrapper of the experimental branch (a62eea3 heads, 4587ca0 normalised phi): tensors
    already split into heads, ``[b, h, n, d]``; beta ``[b, h, n]`` (no gating)."""

    def __init__(self, H, dk_head, dv_head, nu=3, correction=True):
        self.nu, self.correction = nu, correction
        self.W_mem = torch.zeros(1, H, 2 * nu * dk_head, dv_head, dtype=F64)
        self.z = torch.zeros(1, H, 2 * nu * dk_head, dtype=F64)
        self.first_seg = True

    def associate(self, q):
        mq = F.normalize(authors_dpfp(q, self.nu), dim=-1, p=2.0)
        num = torch.einsum('ihjk,ihkt->ihjt', mq, self.W_mem)
        denom = torch.einsum("ihk,ihjk->ihj", self.z, mq)[..., None] + 1e-5
        return num / denom

    def update_mem(self, k, new_mv, mb):
        mk = F.normalize(authors_dpfp(k, self.nu), dim=-1, p=2.0)
        if not self.first_seg:
            num = torch.einsum('ihjk,ihkt->ihjt', mk, self.W_mem)
            denom = torch.einsum("ihj,ihkj->ihk", self.z, mk)[..., None] + 1e-5
            prev_mv = num / denom
            if self.correction:
                new_info_coef = (1 - denom / (torch.linalg.norm(mk, dim=-1) ** 2)[..., None])
                new_info_coef = torch.clip(new_info_coef, 0, 1).detach()
            else:
                new_info_coef = 1
        else:
            prev_mv = torch.zeros_like(new_mv)
            new_info_coef = 1
        mv = new_mv - prev_mv
        self.W_mem = self.W_mem + torch.einsum('ihjk,ihjt,ihj->ihkt', mk, mv, mb)
        self.z = self.z + (new_info_coef * mk).sum(dim=-2)
        self.first_seg = False


def segments(n, B=2, H=1, M=3, T=5, Dk=4, Dv=6, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        seg = dict(k=torch.randn(B, H, M, Dk, generator=g, dtype=F64),
                   v=torch.randn(B, H, M, Dv, generator=g, dtype=F64),
                   beta=torch.sigmoid(torch.randn(B, H, M, generator=g, dtype=F64)),
                   q=torch.randn(B, H, T, Dk, generator=g, dtype=F64))
        if requires_grad:
            for t in seg.values():
                t.requires_grad_(True)
        out.append(seg)
    return out


# ------------------------------------------------------------------------------------- equal to the oracle
@pytest.mark.parametrize("nu", [1, 2, 3, 4])
def test_dpfp_is_the_authors(nu):
    x = torch.randn(3, 5, 7, dtype=F64)
    assert torch.equal(fm.dpfp(x, nu), authors_dpfp(x, nu))
    assert torch.equal(feature_map(x, nu), authors_dpfp(x, nu))
    assert feature_dim(7, nu) == 2 * nu * 7


@pytest.mark.parametrize("correction", [True, False])
def test_main_branch_segments(correction):
    """Four segments (read before the write in each, as the layer does) equal the authors' single-head code:
    reads, A, z, and the gradients of a loss on the reads with respect to every input."""
    segs = segments(4, H=1, requires_grad=True)
    B, Dk, Dv = 2, 4, 6
    ours_loss, theirs_loss = 0.0, 0.0
    auth = AuthorsMain(Dk, Dv, correction=correction)
    A, z = zero_state(B, 1, Dk, Dv, dtype=F64)
    for s, seg in enumerate(segs):
        o = associative_read(A, z, seg["q"])
        theirs = auth.associate(seg["q"][:, 0]) if s > 0 else torch.zeros(B, 5, Dv, dtype=F64)
        torch.testing.assert_close(o[:, 0], theirs, rtol=1e-12, atol=1e-12)
        A, z = associative_update(A, z, seg["k"], seg["v"], seg["beta"], correction=correction,
                                  first_segment=(s == 0))
        auth.update_mem(seg["k"][:, 0], seg["v"][:, 0], seg["beta"][:, 0])
        torch.testing.assert_close(A[:, 0], auth.W_mem.expand(B, -1, -1), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(z[:, 0], auth.z.expand(B, -1), rtol=1e-12, atol=1e-12)
        w = torch.linspace(-1, 1, Dv, dtype=F64)
        ours_loss = ours_loss + (o[:, 0] * w).sin().sum()
        theirs_loss = theirs_loss + (theirs * w).sin().sum()
    leaves = [t for seg in segs for t in seg.values()]
    g_ours = torch.autograd.grad(ours_loss + (A.sum() + z.sum()) * 0.1, leaves, allow_unused=True)
    g_theirs = torch.autograd.grad(theirs_loss + (auth.W_mem.sum() + auth.z.sum()) * 0.1, leaves,
                                   allow_unused=True)
    for a, b in zip(g_ours, g_theirs):
        if b is None:                      # the first segment's query: the authors skip that read
            assert a is None or torch.count_nonzero(a) == 0
        else:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_experimental_branch_heads_normalised():
    """H = 2 heads with L2-normalised phi equal the experimental branch's multi-head code."""
    B, H, Dk, Dv = 2, 2, 3, 4
    segs = segments(3, B=B, H=H, Dk=Dk, Dv=Dv, seed=1)
    auth = AuthorsExperimental(H, Dk, Dv)
    A, z = zero_state(B, H, Dk, Dv, dtype=F64)
    for s, seg in enumerate(segs):
        o = associative_read(A, z, seg["q"], normalize=True)
        if s > 0:
            torch.testing.assert_close(o, auth.associate(seg["q"]), rtol=1e-12, atol=1e-12)
        A, z = associative_update(A, z, seg["k"], seg["v"], seg["beta"], normalize=True, first_segment=(s == 0))
        auth.update_mem(seg["k"], seg["v"], seg["beta"])
        torch.testing.assert_close(A, auth.W_mem.expand(B, -1, -1, -1), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(z, auth.z.expand(B, -1, -1), rtol=1e-12, atol=1e-12)


def test_first_segment_rows_and_general_formula():
    """A bool [B] first_segment equals running each row with the bool flag; rows flagged ignore their state.
    Without the flag a zero state differs from the authors' first-segment branch only in z (gamma < 1)."""
    B, H, Dk, Dv = 3, 2, 3, 4
    seg = segments(1, B=B, H=H, Dk=Dk, Dv=Dv, seed=2)[0]
    g = torch.Generator().manual_seed(3)
    A0 = torch.randn(B, H, 2 * 3 * Dk, Dv, generator=g, dtype=F64)
    z0 = torch.rand(B, H, 2 * 3 * Dk, generator=g, dtype=F64)
    fresh = torch.tensor([True, False, True])
    A1, z1 = associative_update(A0, z0, seg["k"], seg["v"], seg["beta"], first_segment=fresh)
    for b in range(B):
        Ab, zb = associative_update(A0[b:b + 1], z0[b:b + 1], seg["k"][b:b + 1], seg["v"][b:b + 1],
                                    seg["beta"][b:b + 1], first_segment=bool(fresh[b]))
        torch.testing.assert_close(A1[b:b + 1], Ab, rtol=0, atol=0)
        torch.testing.assert_close(z1[b:b + 1], zb, rtol=0, atol=0)
    Az, zz = zero_state(B, H, Dk, Dv, dtype=F64)
    A2, z2 = associative_update(Az, zz, seg["k"], seg["v"], seg["beta"], first_segment=True)
    A3, z3 = associative_update(Az, zz, seg["k"], seg["v"], seg["beta"], first_segment=False)
    torch.testing.assert_close(A1[0], A2[0], rtol=0, atol=0)
    torch.testing.assert_close(A3, A2, rtol=0, atol=0)
    assert (z3 <= z2).all() and not torch.equal(z3, z2)
    torch.testing.assert_close(z3, z2, rtol=1e-3, atol=0)


# ----------------------------------------------------------------------------------------------- properties
def orthogonal_keys(n, Dk, scale=3.0):
    """n keys whose DPFP features have disjoint supports: key i is scale * (e_{2i} + e_{2i+1}), so
    relu(x) ++ relu(-x) has support {2i, 2i+1} and phi is nonzero only at (2i+1, shift 1)."""
    k = torch.zeros(n, Dk, dtype=F64)
    for i in range(n):
        k[i, 2 * i] = k[i, 2 * i + 1] = scale
    return k


def test_associative_recall_orthogonal_keys():
    """Writing M keys orthogonal after phi with beta = 1 in one segment, each key reads back its own value."""
    B, H, M, Dk, Dv = 2, 2, 3, 8, 5
    keys = orthogonal_keys(M + 1, Dk)                                  # the last one is never written
    phi = feature_map(keys)
    gram = phi @ phi.T
    assert torch.count_nonzero(gram - torch.diag(torch.diagonal(gram))) == 0
    k = keys[:M].expand(B, H, M, Dk)
    v = torch.randn(B, H, M, Dv, dtype=F64)
    A, z = zero_state(B, H, Dk, Dv, dtype=F64)
    A, z = associative_update(A, z, k, v, torch.ones(B, H, M, dtype=F64), first_segment=True)
    o = associative_read(A, z, k)
    # exact value: v |phi|^2 / (|phi|^2 + eps), |phi|^2 = scale^4 = 81
    torch.testing.assert_close(o, v * 81 / (81 + 1e-5), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(o, v, rtol=1e-6, atol=1e-6)
    # a key orthogonal to every written one reads exactly 0
    assert torch.count_nonzero(associative_read(A, z, keys[M:].expand(B, H, 1, Dk))) == 0


@pytest.mark.parametrize("normalize", [False, True])
def test_delta_rule_overwrites(normalize):
    """Key k written with v1, then with v2 in the next segment (beta = 1): it reads back v2; the correction
    leaves z unchanged by the rewrite (gamma = 0), and other keys keep their values."""
    B, H, Dk, Dv = 1, 1, 4, 3
    keys = orthogonal_keys(2, Dk)
    v1, v2, w = (torch.randn(B, H, 1, Dv, dtype=F64) for _ in range(3))
    ones = torch.ones(B, H, 1, dtype=F64)
    A, z = zero_state(B, H, Dk, Dv, dtype=F64)
    kw = dict(normalize=normalize)
    A, z = associative_update(A, z, torch.cat([keys[:1], keys[1:]]).expand(B, H, 2, Dk), torch.cat([v1, w], 2),
                              torch.ones(B, H, 2, dtype=F64), first_segment=True, **kw)
    z_before = z.clone()
    A, z = associative_update(A, z, keys[:1].expand(B, H, 1, Dk), v2, ones, **kw)
    torch.testing.assert_close(associative_read(A, z, keys[:1].expand(B, H, 1, Dk), **kw), v2, rtol=1e-4,
                               atol=1e-4)
    torch.testing.assert_close(associative_read(A, z, keys[1:].expand(B, H, 1, Dk), **kw), w, rtol=1e-4,
                               atol=1e-4)
    torch.testing.assert_close(z, z_before, rtol=0, atol=0)
    # without the correction z keeps growing and the rewritten value reads back at half strength
    A2, z2 = zero_state(B, H, Dk, Dv, dtype=F64)
    A2, z2 = associative_update(A2, z2, keys[:1].expand(B, H, 1, Dk), v1, ones, first_segment=True,
                                correction=False, **kw)
    A2, z2 = associative_update(A2, z2, keys[:1].expand(B, H, 1, Dk), v2, ones, correction=False, **kw)
    torch.testing.assert_close(associative_read(A2, z2, keys[:1].expand(B, H, 1, Dk), **kw), v2 / 2, rtol=1e-4,
                               atol=1e-4)


def test_zero_state_reads_zero():
    """A zero state reads exactly 0 (numerator 0, denominator z . phi + eps = eps), with finite gradients,
    also for queries whose phi is 0 (q = 0)."""
    B, H, T, Dk, Dv = 2, 2, 4, 3, 5
    A, z = zero_state(B, H, Dk, Dv, dtype=F64)
    A.requires_grad_(True)
    z.requires_grad_(True)
    q = torch.randn(B, H, T, Dk, dtype=F64)
    q[:, :, 0] = 0
    q.requires_grad_(True)
    o = associative_read(A, z, q)
    assert torch.count_nonzero(o) == 0 and torch.isfinite(o).all()
    o.sum().backward()
    for t in (A, z, q):
        assert torch.isfinite(t.grad).all()
    # the update of a zero state without the first-segment flag: finite, vbar = 0
    k = torch.zeros(B, H, 1, Dk, dtype=F64)                           # phi(k) = 0: gamma = clip(0) = 0
    A1, z1 = associative_update(A.detach(), z.detach(), k, torch.randn(B, H, 1, Dv, dtype=F64),
                                torch.ones(B, H, 1, dtype=F64))
    assert torch.isfinite(A1).all() and torch.isfinite(z1).all()


@pytest.mark.parametrize("correction,normalize", [(True, False), (False, False), (True, True)])
def test_gradcheck_through_state(correction, normalize):
    """Gradients reach the initial A and z (and k, v, beta, q) through a write and a read: gradcheck in fp64,
    gamma not detached and kept inside (0, 1), inputs away from DPFP's kink at 0."""
    B, H, M, T, Dk, Dv = 1, 2, 2, 2, 2, 2
    g = torch.Generator().manual_seed(5)
    dphi = feature_dim(Dk)

    def away(x):                                                           # |x| >= 0.2
        return torch.sign(x) * (x.abs() + 0.2)

    A0 = torch.randn(B, H, dphi, Dv, generator=g, dtype=F64)
    z0 = torch.rand(B, H, dphi, generator=g, dtype=F64) * 0.05 + 0.05
    k = away(torch.randn(B, H, M, Dk, generator=g, dtype=F64))
    v = torch.randn(B, H, M, Dv, generator=g, dtype=F64)
    beta = torch.rand(B, H, M, generator=g, dtype=F64) * 0.8 + 0.1
    q = away(torch.randn(B, H, T, Dk, generator=g, dtype=F64))
    kw = dict(correction=correction, normalize=normalize)
    phi = feature_map(k, normalize=normalize)
    gamma = 1 - ((z0[:, :, None] * phi).sum(-1) + 1e-5) / (phi.pow(2).sum(-1) + (0 if normalize else 1e-5))
    assert ((gamma > 0.05) & (gamma < 0.95)).all()

    def f(A0, z0, k, v, beta, q):
        A1, z1 = associative_update(A0, z0, k, v, beta, detach_gamma=False, **kw)
        return associative_read(A1, z1, q, normalize=normalize), A1, z1

    inputs = [t.clone().requires_grad_(True) for t in (A0, z0, k, v, beta, q)]
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)
    # the initial state alone, as the carried state seen by the next segment
    o = f(*inputs)[0]
    gA, gz = torch.autograd.grad(o.pow(2).sum(), inputs[:2])
    assert torch.count_nonzero(gA) > 0 and torch.count_nonzero(gz) > 0


def test_gating_beta_and_dtypes():
    """beta per value channel ([B, H, M, Dv]) equal to a per-token beta when constant across channels; bf16
    inputs compute in fp32: the state comes back fp32, the read in q's dtype."""
    B, H, M, Dk, Dv = 2, 1, 3, 2, 4
    seg = segments(1, B=B, H=H, M=M, Dk=Dk, Dv=Dv, seed=7)[0]
    A, z = zero_state(B, H, Dk, Dv, dtype=F64)
    a1 = associative_update(A, z, seg["k"], seg["v"], seg["beta"])
    a2 = associative_update(A, z, seg["k"], seg["v"], seg["beta"][..., None].expand(B, H, M, Dv))
    torch.testing.assert_close(a1, a2, rtol=0, atol=0)
    A32, z32 = zero_state(B, H, Dk, Dv)
    A1, z1 = associative_update(A32, z32, *(seg[n].to(torch.bfloat16) for n in ("k", "v", "beta")),
                                first_segment=True)
    assert A1.dtype == torch.float32 and z1.dtype == torch.float32
    o = associative_read(A1, z1, seg["q"].to(torch.bfloat16))
    assert o.dtype == torch.bfloat16 and o.shape == (B, H, 5, Dv)


def test_bad_shapes_raise():
    B, H, M, T, Dk, Dv = 2, 2, 3, 4, 2, 5
    seg = segments(1, B=B, H=H, M=M, T=T, Dk=Dk, Dv=Dv)[0]
    A, z = zero_state(B, H, Dk, Dv, dtype=F64)
    k, v, beta, q = seg["k"], seg["v"], seg["beta"], seg["q"]
    bad_update = [
        (dict(A=A[:, :, :-1]), "A has shape"), (dict(A=A[0]), "A has shape"), (dict(z=z[:, :1]), "z has shape"),
        (dict(k=k[0]), "k has shape"), (dict(k=k[..., :1]), "A has shape"), (dict(v=v[..., :-1]), "v has shape"),
        (dict(v=v[:, :, :1]), "v has shape"), (dict(beta=beta[..., :1]), "beta has shape"),
        (dict(beta=beta[..., None].expand(B, H, M, 2)), "beta has shape"),
    ]
    for change, msg in bad_update:
        args = dict(A=A, z=z, k=k, v=v, beta=beta)
        args.update(change)
        with pytest.raises(ValueError, match=msg):
            associative_update(args["A"], args["z"], args["k"], args["v"], args["beta"])
    with pytest.raises(ValueError, match="first_segment has shape"):
        associative_update(A, z, k, v, beta, first_segment=torch.ones(3, dtype=torch.bool))
    with pytest.raises(TypeError, match="first_segment"):
        associative_update(A, z, k, v, beta, first_segment=1)
    with pytest.raises(ValueError, match="nu="):
        associative_update(A, z, k, v, beta, nu=0)
    with pytest.raises(ValueError, match="A has shape"):
        associative_update(A, z, k, v, beta, nu=2)
    with pytest.raises(ValueError, match="eps="):
        associative_read(A, z, q, eps=0.0)
    with pytest.raises(ValueError, match="q has shape"):
        associative_read(A, z, q[0])
    with pytest.raises(ValueError, match="A has shape"):
        associative_read(A, z, q[..., :1])
    with pytest.raises(ValueError, match="z has shape"):
        associative_read(A, z[..., :-1], q)
    with pytest.raises(ValueError, match="A has shape"):
        associative_read(A[:1], z[:1], q)
    with pytest.raises(TypeError, match="q must be a floating-point"):
        associative_read(A, z, q.long())
    with pytest.raises(ValueError, match="zero_state"):
        zero_state(0, 1, 2, 3)
