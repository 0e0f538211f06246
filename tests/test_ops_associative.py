"""ARMT's associative memory op (pretrain/ops/associative).

The oracle here (:func:`phi_of_vector`, :class:`LoopMemory`) is an independent loop form of the equations of
the authors' model, as README.md beside the op states them: explicit Python loops over batch row, head and
memory token / query, one vector at a time, with dot products, outer products and matrix-vector products.
The source of those equations (of the maths, not of any code here) is
RodkinIvan/associative-recurrent-memory-transformer, ``modeling_amt/language_modeling.py``:

* branch main, commit aa145de (single head): the DPFP feature map lines 8-24 (nu = 3, line 36), the read
  lines 64-78, the write lines 94-129 (batched over the memory tokens, gamma correction, first segment), the
  zero state lines 132-136;
* branch experimental, commits a62eea3 / 4587ca0: heads split before phi, L2-normalised phi, and no eps in
  the |phi|^2 of gamma.

The oracle works on the projected tensors (what the layer's W_q, W_k, W_v and sigmoid(W_b .) give); everything
runs in fp64.  Properties: equality to the oracle over 4 segments (reads, A, z, gradients), associative recall of
keys orthogonal after phi, overwrite by the delta rule, gradients to the initial state (gradcheck), a zero state
reads zero, bad shapes raise.
"""
import pytest
import torch

from pretrain.ops import feature_maps as fm
from pretrain.ops.associative import (associative_read, associative_update, feature_dim, feature_map,
                                      zero_state)

F64 = torch.float64
EPS = 1e-5


# ----------------------------------------------------------------------------------------------- the oracle
def phi_of_vector(x, nu, normalize=False):
    """DPFP of ONE vector x [Dk] from its definition: x~ = [relu x; relu -x] (2Dk entries), and for
    j = 1..nu the block x~ * roll(x~, j), where roll(x~, j)[i] = x~[(i - j) mod 2Dk]; the nu blocks are
    concatenated in order of j.  With ``normalize`` the result is divided by its Euclidean length (a zero
    result, possible for nu = 1, stays zero)."""
    assert x.dim() == 1
    x_tilde = torch.cat([torch.clamp(x, min=0), torch.clamp(-x, min=0)])
    n = x_tilde.shape[0]
    blocks = []
    for j in range(1, nu + 1):
        shifted = x_tilde[torch.tensor([(i - j) % n for i in range(n)])]
        blocks.append(x_tilde * shifted)
    out = torch.cat(blocks)
    if normalize and torch.count_nonzero(out) > 0:
        out = out / torch.sqrt(torch.dot(out, out))
    return out


class LoopMemory:
    """The memory of one layer: a matrix A[b][h] [Dphi, Dv] and a vector z[b][h] [Dphi] per batch row and
    head, kept as separate tensors and updated with per-vector arithmetic only.

    read:   o = A^T phi(q) / (z . phi(q) + eps)
    write:  for every memory token i, against the state BEFORE the segment (A_old, z_old):
              d_i = z_old . phi_i + eps,  vbar_i = A_old^T phi_i / d_i,
              gamma_i = clip(1 - d_i / (|phi_i|^2 + eps'), 0, 1) (detached; 1 with correction off),
            and a fresh row (first segment of its document) uses vbar_i = 0, gamma_i = 1 and a zero old state;
            then A = A_old + sum_i outer(phi_i, beta_i (v_i - vbar_i)),  z = z_old + sum_i gamma_i phi_i.
    eps' = eps, or 0 with the normalised phi."""

    def __init__(self, B, H, Dk, Dv, nu=3, correction=True, normalize=False, A0=None, z0=None):
        self.B, self.H, self.nu = B, H, nu
        self.correction, self.normalize = correction, normalize
        width = 2 * nu * Dk
        self.A = [[torch.zeros(width, Dv, dtype=F64) if A0 is None else A0[b, h] for h in range(H)]
                  for b in range(B)]
        self.z = [[torch.zeros(width, dtype=F64) if z0 is None else z0[b, h] for h in range(H)] for b in range(B)]

    def phi(self, x):
        return phi_of_vector(x, self.nu, self.normalize)

    def read(self, q):
        """q [B, H, T, Dk] -> [B, H, T, Dv], one query vector at a time."""
        rows = []
        for b in range(self.B):
            heads = []
            for h in range(self.H):
                outs = []
                for t in range(q.shape[2]):
                    f = self.phi(q[b, h, t])
                    outs.append(torch.mv(self.A[b][h].T, f) / (torch.dot(self.z[b][h], f) + EPS))
                heads.append(torch.stack(outs))
            rows.append(torch.stack(heads))
        return torch.stack(rows)

    def write(self, k, v, beta, fresh=False):
        """k [B, H, M, Dk], v [B, H, M, Dv], beta [B, H, M] (or [B, H, M, Dv]); fresh: bool or list per row."""
        fresh_rows = [fresh] * self.B if isinstance(fresh, bool) else list(fresh)
        for b in range(self.B):
            for h in range(self.H):
                A_old, z_old = self.A[b][h], self.z[b][h]
                if fresh_rows[b]:
                    A_old, z_old = torch.zeros_like(A_old), torch.zeros_like(z_old)
                dA, dz = torch.zeros_like(A_old), torch.zeros_like(z_old)
                for i in range(k.shape[2]):
                    f = self.phi(k[b, h, i])
                    if fresh_rows[b]:
                        v_bar, gamma = torch.zeros(A_old.shape[1], dtype=F64), 1.0
                    else:
                        d = torch.dot(z_old, f) + EPS
                        v_bar = torch.mv(A_old.T, f) / d
                        gamma = 1.0
                        if self.correction:
                            denom = torch.dot(f, f) + (0.0 if self.normalize else EPS)
                            gamma = torch.clamp(1 - d / denom, 0.0, 1.0).detach()
                    dA = dA + torch.outer(f, beta[b, h, i] * (v[b, h, i] - v_bar))
                    dz = dz + gamma * f
                self.A[b][h], self.z[b][h] = A_old + dA, z_old + dz

    def state(self):
        return (torch.stack([torch.stack(row) for row in self.A]), torch.stack([torch.stack(row) for row in self.z]))


def segments(n, B=2, H=1, M=3, T=5, Dk=4, Dv=6, seed=0, requires_grad=False, gating=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        seg = dict(k=torch.randn(B, H, M, Dk, generator=g, dtype=F64),
                   v=torch.randn(B, H, M, Dv, generator=g, dtype=F64),
                   beta=torch.sigmoid(torch.randn(*((B, H, M, Dv) if gating else (B, H, M)), generator=g,
                                                  dtype=F64)),
                   q=torch.randn(B, H, T, Dk, generator=g, dtype=F64))
        if requires_grad:
            for t in seg.values():
                t.requires_grad_(True)
        out.append(seg)
    return out


# ------------------------------------------------------------------------------------- equal to the oracle
@pytest.mark.parametrize("nu", [1, 2, 3, 4])
def test_dpfp_matches_definition(nu):
    x = torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(nu), dtype=F64)
    x[0, 0, :3] = 0                                                        # exact zeros: relu's kink
    x[0, 1] = torch.tensor([1.0, -1.0] * 3 + [1.0])                        # alternating signs: phi = 0 at nu = 1
    loop = torch.stack([torch.stack([phi_of_vector(x[a, c], nu) for c in range(5)]) for a in range(3)])
    assert torch.equal(fm.dpfp(x, nu), loop)
    assert torch.equal(feature_map(x, nu), loop)
    loop_n = torch.stack([torch.stack([phi_of_vector(x[a, c], nu, True) for c in range(5)]) for a in range(3)])
    torch.testing.assert_close(feature_map(x, nu, normalize=True), loop_n, rtol=1e-14, atol=1e-15)
    assert feature_dim(7, nu) == 2 * nu * 7


@pytest.mark.parametrize("H,correction,normalize,gating", [
    (1, True, False, False),           # main branch
    (1, False, False, False),          # main branch, --no_correction
    (2, True, True, False),            # experimental branch: heads, normalised phi
    (2, True, False, True),            # per-channel beta
])
def test_segments_equal_loop_oracle(H, correction, normalize, gating):
    """Four segments (read before the write in each, as the layer does) equal the loop oracle: reads, A, z,
    and the gradients of a loss on the reads and the final state with respect to every input."""
    B, Dk, Dv, T = 2, 4, 6, 5
    segs = segments(4, B=B, H=H, Dk=Dk, Dv=Dv, T=T, requires_grad=True, gating=gating)
    kw = dict(correction=correction, normalize=normalize)
    oracle = LoopMemory(B, H, Dk, Dv, **kw)
    A, z = zero_state(B, H, Dk, Dv, dtype=F64)
    w = torch.linspace(-1, 1, Dv, dtype=F64)
    ours_loss, oracle_loss = 0.0, 0.0
    for s, seg in enumerate(segs):
        o = associative_read(A, z, seg["q"], normalize=normalize)
        o_ref = oracle.read(seg["q"])
        torch.testing.assert_close(o, o_ref, rtol=1e-12, atol=1e-12)
        if s == 0:
            assert torch.count_nonzero(o) == 0                            # the zero state reads 0
        A, z = associative_update(A, z, seg["k"], seg["v"], seg["beta"], first_segment=(s == 0), **kw)
        oracle.write(seg["k"], seg["v"], seg["beta"], fresh=(s == 0))
        A_ref, z_ref = oracle.state()
        torch.testing.assert_close(A, A_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(z, z_ref, rtol=1e-12, atol=1e-12)
        ours_loss = ours_loss + (o * w).sin().sum()
        oracle_loss = oracle_loss + (o_ref * w).sin().sum()
    leaves = [t for seg in segs for t in seg.values()]
    g_ours = torch.autograd.grad(ours_loss + (A.sum() + z.sum()) * 0.1, leaves)
    g_oracle = torch.autograd.grad(oracle_loss + (A_ref.sum() + z_ref.sum()) * 0.1, leaves)
    for a, b in zip(g_ours, g_oracle):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert all(torch.count_nonzero(g) > 0 for g in g_ours[4:])            # every later segment's input matters


def test_first_segment_rows_and_general_formula():
    """A bool [B] first_segment equals the oracle with those rows fresh (their A, z ignored) and the others
    written from a random state, and equals running each row with the bool flag.  Without the flag a zero
    state differs from the first-segment branch only in z (gamma < 1)."""
    B, H, Dk, Dv = 3, 2, 3, 4
    seg = segments(1, B=B, H=H, Dk=Dk, Dv=Dv, seed=2)[0]
    g = torch.Generator().manual_seed(3)
    A0 = torch.randn(B, H, 2 * 3 * Dk, Dv, generator=g, dtype=F64)
    z0 = torch.rand(B, H, 2 * 3 * Dk, generator=g, dtype=F64)
    fresh = torch.tensor([True, False, True])
    A1, z1 = associative_update(A0, z0, seg["k"], seg["v"], seg["beta"], first_segment=fresh)
    oracle = LoopMemory(B, H, Dk, Dv, A0=A0, z0=z0)
    oracle.write(seg["k"], seg["v"], seg["beta"], fresh=fresh.tolist())
    A_ref, z_ref = oracle.state()
    torch.testing.assert_close(A1, A_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(z1, z_ref, rtol=1e-12, atol=1e-12)
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
