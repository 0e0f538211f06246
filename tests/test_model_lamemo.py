"""LaMemo look-ahead memory: the window and masks as specified, the interpolation as attention over the
union of key sets, memory refreshed only from the memory and the first current token, and the variants
3 / 31 / 32 / 33 differing only where they should."""
import pytest
import torch

from conftest import stacked

from pretrain.model import ModelConfig, build_model
from pretrain.model.mechanisms.lamemo.mixer import merge
from pretrain.model.positions import lookahead_mask

BASE = dict(n_layer=3, d_model=16, n_head=2, d_head=8, d_inner=24, vocab_size=31, dropout=0.0)


pytestmark = pytest.mark.usefixtures("tp1")


def _model(**kw):
    return build_model(ModelConfig(**{**BASE, **kw})).double().eval()


def _segments(model, tokens, n, mem_len, hook_layers=False):
    """Run all segments; returns (log-probs per segment, states, refreshed memory hidden per layer)."""
    refreshed = []
    handles = []
    if hook_layers:
        for layer in model.stack.layers[:-1]:
            handles.append(layer.register_forward_hook(lambda mod, args, out: refreshed.append(out[2]["lamemo"])))
    state = model.init_state(tokens.shape[0], mem_len=mem_len)
    outs, states = [], []
    for s in range(0, tokens.shape[1], n):
        out, state = model(tokens[:, s:s + n], state, return_logits=True)
        outs.append(out.logits)
        states.append(state)
    for h in handles:
        h.remove()
    return outs, states, refreshed


def test_lookahead_window_causal():
    """Memory query i sees window key j = m - w + 1 + c iff j > i: strictly to its right, never past the
    first current token (key m), whatever the row's valid count."""
    m, n = 6, 4
    w = min(m, n)
    mask = lookahead_mask(m, w, n, torch.tensor([6, 2, 0]), full=False)
    assert mask.shape == (1, m, w)
    for i in range(m):
        for c in range(w):
            assert (mask[0, i, c] == 0) == (m - w + 1 + c > i)
    assert (mask[0, :, -1] == 0).all(), "the first current token is visible to every memory query"


def test_lookahead_window_full():
    """attn_type 33: no order inside the window; a row with v < n valid positions sees the last v
    positions ending at the first current token (the window LaMemo forms over a shorter memory)."""
    m, n = 6, 4
    w = min(m, n)
    valid = torch.tensor([6, 4, 2, 0])
    mask = lookahead_mask(m, w, n, valid, full=True)
    assert mask.shape == (4, 1, w)
    for b in range(4):
        first = m - max(min(int(valid[b]), n), 1)
        for c in range(w):
            assert (mask[b, 0, c] == 0) == (m - w + 1 + c > first)


def test_interpolation_is_attention_over_the_union():
    torch.manual_seed(0)
    q = torch.randn(5, 8, dtype=torch.float64)
    k_old, v_old = torch.randn(7, 8, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
    k_new, v_new = torch.randn(4, 8, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)

    def attention(k, v):
        s = q @ k.T
        return torch.softmax(s, -1) @ v, torch.logsumexp(s, -1)
    a_old, z_old = attention(k_old, v_old)
    a_new, z_new = attention(k_new, v_new)
    a, z = merge(a_old, z_old, a_new, z_new)
    a_all, z_all = attention(torch.cat([k_old, k_new]), torch.cat([v_old, v_new]))
    assert torch.allclose(a, a_all) and torch.allclose(z, z_all)


@pytest.mark.parametrize("attn_type", [3, 31, 32, 33])
@pytest.mark.parametrize("n,m", [(4, 4), (3, 6)])
def test_memory_refresh_ignores_later_current_tokens(attn_type, n, m):
    """The refreshed memory (every layer's memory rows, and the cached vectors kept from them) depends on
    the memory and the first current token only."""
    model = _model(attn_type=attn_type, tgt_len=n, mem_len=m)
    torch.manual_seed(2)
    tokens = torch.randint(0, BASE["vocab_size"], (2, 3 * n))
    _, states, refreshed = _segments(model, tokens, n, m, hook_layers=True)
    changed = tokens.clone()
    changed[:, 2 * n + 1:] = (changed[:, 2 * n + 1:] + 3) % BASE["vocab_size"]   # third segment, after first
    _, states2, refreshed2 = _segments(model, changed, n, m, hook_layers=True)
    per_seg = len(refreshed) // 3
    for a, b in zip(refreshed[2 * per_seg:], refreshed2[2 * per_seg:]):
        assert torch.equal(a, b), "memory rows read a current token after the first"
    kept = m - n                                      # state slots that come from refreshed memory
    if kept > 0:
        a, a2 = stacked(states[2], "attn"), stacked(states2[2], "attn")
        z, z2 = stacked(states[2], "lse"), stacked(states2[2], "lse")
        assert torch.equal(a[:, :, :, :kept], a2[:, :, :, :kept])
        assert torch.equal(z[:, :, :, :kept], z2[:, :, :, :kept])
    assert not torch.equal(stacked(states[2], "attn"), stacked(states2[2], "attn")), \
        "sanity: the current part changes"


def _differs(a, b):
    return (a - b).abs().max().item() > 1e-9


def _transplant(src, dst_cfg, **extra):
    """A model of dst_cfg with src's weights (shared names), plus ``extra`` full tensors."""
    dst = build_model(dst_cfg).double().eval()
    full = dst.gather_full_state_dict()
    for k, v in src.gather_full_state_dict().items():
        if k in full:
            full[k] = v
    full.update(extra)
    dst.load_full_state_dict(full)
    return dst


def test_variant_32_with_equal_content_bias_is_variant_3():
    m3 = _model(attn_type=3, tgt_len=4, mem_len=4)
    u = m3.gather_full_state_dict()["stack.biases.u"]
    m32 = _transplant(m3, ModelConfig(**{**BASE, "attn_type": 32, "tgt_len": 4, "mem_len": 4}),
                      **{"stack.biases.u_fut": u})
    tokens = torch.randint(0, BASE["vocab_size"], (2, 12))
    for a, b in zip(_segments(m3, tokens, 4, 4)[0], _segments(m32, tokens, 4, 4)[0]):
        assert (a - b).abs().max().item() < 1e-12
    other = _transplant(m3, ModelConfig(**{**BASE, "attn_type": 32, "tgt_len": 4, "mem_len": 4}))
    assert _differs(_segments(m3, tokens, 4, 4)[0][2], _segments(other, tokens, 4, 4)[0][2])


def test_full_lookahead_equals_causal_for_single_token_segments():
    """With N = 1 the window is the first current token only, to the right of every memory query, so
    33 (no order constraint) equals 3; with N > 1 they differ."""
    m3 = _model(attn_type=3, tgt_len=1, mem_len=4)
    m33 = _transplant(m3, ModelConfig(**{**BASE, "attn_type": 33, "tgt_len": 1, "mem_len": 4}))
    tokens = torch.randint(0, BASE["vocab_size"], (2, 8))
    for a, b in zip(_segments(m3, tokens, 1, 4)[0], _segments(m33, tokens, 1, 4)[0]):
        assert (a - b).abs().max().item() < 1e-12
    a, b = _segments(m3, tokens, 4, 4)[0], _segments(m33, tokens, 4, 4)[0]
    assert _differs(a[1], b[1])


@pytest.mark.parametrize("attn_type", [3, 31, 32, 33])
def test_first_segment_is_xl(attn_type):
    """With an empty memory the look-ahead has nothing to refresh: every variant's first segment is XL's
    relative attention (same weights); the next segments differ from XL."""
    xl = _model(attn_type=0, tgt_len=4, mem_len=4)
    lm = _transplant(xl, ModelConfig(**{**BASE, "attn_type": attn_type, "tgt_len": 4, "mem_len": 4}))
    tokens = torch.randint(0, BASE["vocab_size"], (2, 8))
    out_xl, out_lm = _segments(xl, tokens, 4, 4)[0], _segments(lm, tokens, 4, 4)[0]
    assert (out_xl[0] - out_lm[0]).abs().max().item() < 1e-12
    assert _differs(out_xl[1], out_lm[1])
