"""The relative-attention op (pretrain/ops/rel_attention): its reference is exactly the mixers' arithmetic.

The Transformer-XL and LaMemo mixers compute their attention with ``pretrain/model/modules/attention.py`` (biased queries, the
position term realigned by ``positions.skew``, masked fp32 scores, softmax with log-normalisers) and the
masks of ``positions.py``; the op's reference computes the same from its definition (a gathered position row
per pair, the visibility rule of ``common.py``), with the frames the mixers pass on their fused path
(``rel_attention.xl_frame``, ``lamemo.lookahead_frame``).  They must agree to rounding in fp64 on every frame the mixers
use: partial memories, same_length, documents inside the segment, every look-ahead variant.
"""
import types

import pytest
import torch

from pretrain.model.modules.attention import attend, biased, masked_scores, position_scores
from pretrain.model.mechanisms.lamemo.mixer import lookahead_frame
from pretrain.model.modules.rel_attention import xl_frame
from pretrain.model.positions import (causal_mask, document_mask, lookahead_distances, lookahead_mask,
                                      lookahead_skew_offset)
from pretrain.ops.rel_attention import rel_attention

F64 = torch.float64


def _rand(*shape, g, scale=1.0):
    return torch.randn(*shape, generator=g, dtype=F64) * scale


@pytest.mark.parametrize("n,m,same_length,docs", [
    (n, m, sl, docs) for n, m in [(7, 5), (6, 6), (5, 9), (8, 0)] for sl in (False, True) for docs in (False, True)
    if m or not sl])                                              # same_length needs a memory
def test_reference_is_the_xl_arithmetic(n, m, same_length, docs):
    g = torch.Generator().manual_seed(n * 31 + m)
    H, B, D = 3, 3, 4
    K = m + n
    q, k, v = _rand(H, B, n, D, g=g, scale=0.5), _rand(H, B, K, D, g=g), _rand(H, B, K, D, g=g)
    r, u, w = _rand(H, K + 1, D, g=g), _rand(H, D, g=g, scale=0.3), _rand(H, D, g=g, scale=0.3)
    valid = torch.tensor([m, m // 2, 1 if m else 0])
    doc = None
    mask = causal_mask(n, m, valid, same_length, q.device)
    if docs:
        reset = torch.zeros(B, n, dtype=torch.bool)
        reset[0, 2] = reset[1, 1] = reset[1, n - 1] = True
        doc = torch.cumsum(reset.long(), 1)
        mask = mask + document_mask(doc, m)
    # the mixer's arithmetic (xl.py: position_scores, masked_scores, attend with the log-normalisers)
    scores = masked_scores(position_scores(biased(q, w, 1.0), r, K, n - 1), biased(q, u, 1.0), k, mask)
    a_ref, z_ref = attend(scores, v, 0.0, False, lse=True)
    ctx = types.SimpleNamespace(same_length=same_length, valid=valid, doc=doc)
    a, z = rel_attention(q, k, v, r, u, w, impl="reference", **xl_frame(ctx, m, n))
    torch.testing.assert_close(a, a_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(z, z_ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("full,negative", [(False, False), (False, True), (True, False)])
@pytest.mark.parametrize("m,n", [(6, 4), (4, 6), (5, 5)])
def test_reference_is_the_lamemo_lookahead_arithmetic(full, negative, m, n):
    """Memory queries over the window (attn_type 3/32: causal, 31: the same mask with negative distances,
    33: full look-ahead with per-row valid counts)."""
    g = torch.Generator().manual_seed(m * 7 + n + full)
    H, B, D = 2, 4, 5
    w_ = min(m, n)
    lo = m - w_ + 1
    P = len(lookahead_distances(m, w_, full, negative, 0))
    qm, k, v = _rand(H, B, m, D, g=g, scale=0.5), _rand(H, B, m + n, D, g=g), _rand(H, B, m + n, D, g=g)
    r, u, w = _rand(H, P, D, g=g), _rand(H, D, g=g, scale=0.3), _rand(H, D, g=g, scale=0.3)
    valid = torch.tensor([m, 2, 1, 0])
    offset = lookahead_skew_offset(m, w_, full)
    scores = masked_scores(position_scores(biased(qm, w, 1.0), r, w_, offset), biased(qm, u, 1.0),
                           k[:, :, lo:m + 1], lookahead_mask(m, w_, n, valid, full))
    a_ref, z_ref = attend(scores, v[:, :, lo:m + 1], 0.0, False, lse=True)
    a, z = rel_attention(qm, k[:, :, lo:m + 1], v[:, :, lo:m + 1], r, u, w, impl="reference",
                         **lookahead_frame(m, n, full, valid))
    torch.testing.assert_close(a, a_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(z, z_ref, rtol=0, atol=1e-12)


def test_gradients_match_the_mixer_arithmetic():
    """The reference's gradients (q, k, v, r, both biases, through o and lse) equal the mixer path's."""
    g = torch.Generator().manual_seed(0)
    H, B, n, m, D = 2, 2, 6, 5, 4
    K = m + n
    base = [_rand(H, B, n, D, g=g, scale=0.5), _rand(H, B, K, D, g=g), _rand(H, B, K, D, g=g),
            _rand(H, K + 1, D, g=g), _rand(H, D, g=g), _rand(H, D, g=g)]
    go, gz = _rand(H, B, n, D, g=g), _rand(H, B, n, g=g)
    valid = torch.tensor([5, 2])

    def grads(fn):
        leaves = [t.clone().requires_grad_(True) for t in base]
        a, z = fn(*leaves)
        ((a * go).sum() + (z * gz).sum()).backward()
        return [t.grad for t in leaves]

    def mixer(q, k, v, r, u, w):
        s = masked_scores(position_scores(biased(q, w, 1.0), r, K, n - 1), biased(q, u, 1.0), k,
                          causal_mask(n, m, valid, False, q.device))
        return attend(s, v, 0.0, False, lse=True)

    ctx = types.SimpleNamespace(same_length=False, valid=valid, doc=None)
    op = lambda *t: rel_attention(*t, impl="reference", **xl_frame(ctx, m, n))  # noqa: E731
    for name, a, b in zip("q k v r u w".split(), grads(op), grads(mixer)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=f"grad {name}")


def test_query_without_visible_keys():
    """A query that sees no key gets o = 0 and lse = -inf (the mixers never build one)."""
    q = torch.randn(1, 1, 3, 2, dtype=F64)
    k = torch.randn(1, 1, 4, 2, dtype=F64)
    z = torch.zeros(1, 2, dtype=F64)
    o, lse = rel_attention(q, k, k, torch.randn(1, 8, 2, dtype=F64), z, z, r_offset=3, q_start=0, order="past",
                           key_start=torch.tensor([1]))
    assert torch.equal(o[0, 0, 0], torch.zeros(2, dtype=F64)) and lse[0, 0, 0] == float("-inf")
    assert torch.isfinite(lse[0, 0, 1:]).all() and torch.isfinite(o).all()


def test_auto_on_cpu_is_the_reference():
    g = torch.Generator().manual_seed(1)
    q, k, r, u = _rand(2, 1, 5, 3, g=g), _rand(2, 1, 9, 3, g=g), _rand(2, 10, 3, g=g), _rand(2, 3, g=g)
    kw = dict(r_offset=4, q_start=4, order="past")
    a1, z1 = rel_attention(q, k, k, r, u, u, impl="auto", **kw)
    a2, z2 = rel_attention(q, k, k, r, u, u, impl="reference", **kw)
    assert torch.equal(a1, a2) and torch.equal(z1, z2)


@pytest.mark.parametrize("change,error,match", [
    (dict(r=torch.zeros(2, 8, 3)), ValueError, "position rows 0..8"),
    (dict(order="causal"), ValueError, "order='causal'"),
    (dict(k=torch.zeros(2, 1, 9, 4)), ValueError, "k has shape"),
    (dict(u=torch.zeros(3)), ValueError, r"u has shape \[3\]"),
    (dict(q_doc=torch.zeros(1, 5, dtype=torch.long)), ValueError, "go together"),
    (dict(key_start=torch.zeros(2, dtype=torch.long)), ValueError, "key_start"),
    (dict(window=-1), ValueError, "window=-1"),
    (dict(impl="triton"), ValueError, "impl='triton'"),
    (dict(impl="fused"), RuntimeError, "runs on CUDA"),
])
def test_bad_input_is_named(change, error, match):
    args = dict(q=torch.zeros(2, 1, 5, 3), k=torch.zeros(2, 1, 9, 3), v=torch.zeros(2, 1, 9, 3),
                r=torch.zeros(2, 10, 3), u=torch.zeros(2, 3), w=torch.zeros(2, 3))
    kw = dict(r_offset=4, q_start=4, order="past")
    for key, val in change.items():
        (args if key in args else kw)[key] = val
    with pytest.raises(error, match=match):
        rel_attention(*args.values(), **kw)
