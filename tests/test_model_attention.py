"""Causality and recurrence: no future leakage for any variant, XL recurrence equals one long pass, an
empty memory equals no memory, and the position realignment / masks against their definitions."""
import pytest
import torch

from model_checks import logits_by_segment
from pretrain.model import ModelConfig, build_model
from pretrain.model.modules.attention import position_scores
from pretrain.model.positions import (causal_distances, causal_mask, lookahead_distances,
                                      lookahead_skew_offset)

BASE = dict(n_layer=2, d_model=16, n_head=2, d_head=8, d_inner=24, vocab_size=31, dropout=0.0)
ALL_TYPES = [0, 1, 2, 3, 31, 32, 33]


pytestmark = pytest.mark.usefixtures("tp1")


def _model(**kw):
    return build_model(ModelConfig(**{**BASE, **kw})).double().eval()


@pytest.mark.parametrize("attn_type", ALL_TYPES)
def test_no_future_leakage(attn_type):
    """Changing the token at position p (in any segment) changes no output before p, and changes p's."""
    n, m = 4, 0 if attn_type == 2 else 5
    model = _model(attn_type=attn_type, tgt_len=n, mem_len=m)
    torch.manual_seed(0)
    tokens = torch.randint(0, BASE["vocab_size"], (2, 12))
    base = logits_by_segment(model, tokens, n, m)
    for p in (1, 5, 6, 9):                  # inside the first segment, first/second token of later ones
        changed = tokens.clone()
        changed[:, p:] = (changed[:, p:] + 1 + torch.arange(12 - p)) % BASE["vocab_size"]
        out = logits_by_segment(model, changed, n, m)
        assert torch.equal(out[:, :p], base[:, :p]), f"position {p} leaks into earlier outputs"
        assert (out[:, p] - base[:, p]).abs().max() > 1e-9, "the changed position itself must change"


@pytest.mark.parametrize("attn_type", [0, 1])
@pytest.mark.parametrize("n,m", [(6, 6), (4, 8)])
def test_recurrence_equals_long_context(attn_type, n, m):
    """With memory covering all earlier tokens, segment-by-segment equals one pass over everything."""
    model = _model(attn_type=attn_type, tgt_len=n, mem_len=m)
    hidden = []
    model.stack.register_forward_hook(lambda mod, args, out: hidden.append(out[0]))
    torch.manual_seed(1)
    tokens = torch.randint(0, BASE["vocab_size"], (3, 2 * n if m >= n else n + m))
    segments = logits_by_segment(model, tokens, n, m)
    seg_hidden = torch.cat(hidden, 1)
    hidden.clear()
    whole = logits_by_segment(model, tokens, tokens.shape[1], 0)
    assert (seg_hidden - hidden[0]).abs().max().item() < 1e-12
    assert (segments - whole).abs().max().item() < 1e-6          # fp32 softmax of fp64 hidden states


@pytest.mark.parametrize("attn_type", [0, 1])
def test_empty_memory_equals_no_memory(attn_type):
    """A fresh state (valid = 0) masks every memory slot: the first segment equals mem_len 0."""
    model = _model(attn_type=attn_type, tgt_len=5, mem_len=7)
    tokens = torch.randint(0, BASE["vocab_size"], (2, 5))
    with_mem, _ = model(tokens, model.init_state(2), return_logits=True)
    without, _ = model(tokens, model.init_state(2, mem_len=0), return_logits=True)
    assert (with_mem.logits - without.logits).abs().max().item() < 1e-12


def test_memory_is_used():
    """Sanity for the tests above: the second segment does depend on the first."""
    model = _model(attn_type=0, tgt_len=4, mem_len=4)
    tokens = torch.randint(0, BASE["vocab_size"], (1, 8))
    other = tokens.clone()
    other[:, :4] = (other[:, :4] + 1) % BASE["vocab_size"]
    changed = logits_by_segment(model, tokens, 4, 4)[:, 4:] - logits_by_segment(model, other, 4, 4)[:, 4:]
    assert changed.abs().max() > 1e-9


def test_causal_mask_definition():
    n, m = 4, 6
    valid = torch.tensor([6, 2, 0])
    mask = causal_mask(n, m, valid, False, torch.device("cpu"))
    same = causal_mask(n, m, valid, True, torch.device("cpu"))
    for b in range(3):
        for i in range(n):
            for j in range(m + n):
                visible = j <= m + i and j >= m - int(valid[b])
                assert (mask[b, i, j] == 0) == visible
                assert (same[b, i, j] == 0) == (visible and m + i - j < m)
    assert ((same[0] == 0).sum(-1) == m).all(), "same_length: every query sees exactly mem_len keys"


def _table(dist, H, dh):
    """Distinct random position keys per distinct distance value, as [H, P, dh] and a lookup dict."""
    vals = {float(d): torch.randn(H, dh, dtype=torch.float64) for d in dist.unique()}
    return torch.stack([vals[float(d)] for d in dist], 1), vals


@pytest.mark.parametrize("n,m", [(4, 4), (3, 6), (5, 2)])
def test_causal_realignment(n, m):
    """Column j of query i holds the position term of distance m + i - j (for every visible key)."""
    H, B, dh = 2, 3, 4
    dist = causal_distances(n, m, -1)
    r, table = _table(dist, H, dh)
    q = torch.randn(H, B, n, dh, dtype=torch.float64)
    got = position_scores(q, r, m + n, n - 1)
    for i in range(n):
        for j in range(m + i + 1):
            want = (q[:, :, i] * table[float(m + i - j)][:, None]).sum(-1)
            assert torch.allclose(got[:, :, i, j], want)


@pytest.mark.parametrize("full,negative", [(False, False), (False, True), (True, False)])
@pytest.mark.parametrize("m,w", [(5, 5), (6, 3), (4, 1)])
def test_lookahead_realignment(full, negative, m, w):
    """Memory query i, window column c (key j = m - w + 1 + c): distance j - i (|j - i| for the full
    look-ahead, -(j - i) for attn_type 31), at every entry the mask can leave visible."""
    H, B, dh = 2, 2, 4
    dist = lookahead_distances(m, w, full, negative, -1)
    r, table = _table(dist, H, dh)
    q = torch.randn(H, B, m, dh, dtype=torch.float64)
    got = position_scores(q, r, w, lookahead_skew_offset(m, w, full))

    def value(i, c):
        d = (m - w + 1 + c) - i
        return float(abs(d) if full else (-d if negative else d))
    for i in range(m):
        for c in range(w):
            if full or (m - w + 1 + c) > i:
                want = (q[:, :, i] * table[value(i, c)][:, None]).sum(-1)
                assert torch.allclose(got[:, :, i, c], want)
