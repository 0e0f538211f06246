"""Recurrent Memory Transformer specifics (the registry-driven matrix in test_mixers.py also runs RMT against the
fp64 reference, for leakage, resets, checkpointing, documents inside a segment and generation; test_model_tp.py
runs it at TP 2):

* the attention pattern of LM-RMT, spelled out as tables;
* the last layer's outputs at the write positions are what the next segment reads, at both ends;
* distinct learned initial slots, restored (with their gradient) by a reset;
* backpropagation through k segments as the engine unrolls them: the memory carries the gradient of a loss k - 1
  segments later, and a truncation at the unroll boundary stops it;
* several documents inside one segment: each runs as on its own.
"""
import pytest
import torch

from pretrain.config_base import ConfigError
from pretrain.model import ModelConfig, build_model
from pretrain.model.mixer import SegmentContext
from pretrain.model.positions import causal_mask
from pretrain.model.reference import ReferenceLM

BASE = dict(n_layer=2, d_model=16, n_head=2, d_head=8, d_inner=24, vocab_size=31, dropout=0.0, tgt_len=4)


pytestmark = pytest.mark.usefixtures("tp1")


def _model(**kw):
    cfg = ModelConfig(**{**BASE, **kw})
    return build_model(cfg).double().eval()


def _table(text: str) -> torch.Tensor:
    return torch.tensor([[c == "1" for c in row.replace(" ", "").replace("|", "")] for row in text.split(";")])


# K = 2 memory tokens, N = 3 tokens, M = 2 cache slots.  Columns: cache c0 c1 | read r0 r1 | tokens t0 t1 t2 |
# write w0 w1; rows: r0 r1 t0 t1 t2 w0 w1.
PATTERN = _table("00|11|000|00; 00|11|000|00;"        # read rows: the read rows, both ways; no cache
                 "11|11|100|00; 11|11|110|00; 11|11|111|00;"    # tokens: cache, read memory, causal, no write
                 "00|11|111|11; 00|11|111|11")         # write rows: everything before, the write rows both ways
PATTERN_CACHE = _table("11|11|000|00; 11|11|000|00;"
                       "11|11|100|00; 11|11|110|00; 11|11|111|00;"
                       "11|11|111|11; 11|11|111|11")
# [memory ; tokens] (the write memory is read back from the leading positions)
PATTERN_READ_ONLY = _table("11|11|000; 11|11|000; 11|11|100; 11|11|110; 11|11|111")


@pytest.mark.parametrize("rmt,expected", [
    (dict(num_mem_tokens=2), PATTERN),
    (dict(num_mem_tokens=2, read_mem_from_cache=True), PATTERN_CACHE),
    (dict(num_mem_tokens=2, mem_at_end=False, read_mem_from_cache=True), PATTERN_READ_ONLY),
], ids=["default", "read-cache", "read-only"])
def test_the_attention_pattern_is_lm_rmts(rmt, expected):
    model = _model(attn_type=0, mem_len=2, rmt=rmt)
    mem = model.stack.memories["rmt"]
    N, M = 3, 2
    valid = torch.tensor([2, 1])                       # row 1: only the last cache slot holds a position
    ctx = SegmentContext(n=N, mem_len=M, clamp_len=-1, same_length=False, detach=True, training=False,
                         batch_size=2, valid=valid, device=torch.device("cpu"), dtype=torch.float64)
    state = model.init_state(2, mem_len=M)
    emb = torch.zeros(2, N, BASE["d_model"], dtype=torch.float64)
    x, _ = mem("begin", emb, {"mem": state["rmt.mem"], "fresh": state["rmt.fresh"]}, ctx)
    assert x.shape[1] == ctx.n == expected.shape[0]
    allowed = ctx.attention_mask(causal_mask(ctx.n, M, valid, False, ctx.device)) == 0
    assert torch.equal(allowed[0], expected)
    row1 = expected.clone()
    row1[:, 0] = False                                  # the empty cache slot is seen by nobody
    assert torch.equal(allowed[1], row1)
    # the fp64 reference builds the same pattern from the definition
    ref = ReferenceLM(model.cfg, model.gather_full_state_dict())
    assert torch.equal(ref.stack_allowed(ctx.n, M), expected)


@pytest.mark.parametrize("rmt", [dict(num_mem_tokens=3), dict(num_mem_tokens=3, mem_at_end=False)],
                         ids=["read-write", "read-only"])
def test_the_write_memory_of_a_segment_is_what_the_next_one_reads(rmt):
    model = _model(attn_type=0, mem_len=4, rmt=rmt, pre_lnorm=True)
    K = 3
    seen = {}
    model.stack.layers[0].register_forward_pre_hook(lambda m, args: seen.setdefault("in", []).append(args[0]))
    model.stack.layers[-1].register_forward_hook(lambda m, args, out: seen.setdefault("out", []).append(out[0]))
    tokens = torch.randint(0, 31, (2, 12), generator=torch.Generator().manual_seed(0))
    state = model.init_state(2)
    learned = model.stack.memories["rmt"].memory.detach()
    for s in range(3):
        _, state = model(tokens[:, 4 * s:4 * s + 4], state)
        top = seen["out"][s]
        written = top[:, -K:] if rmt.get("mem_at_end", True) else top[:, :K]
        assert torch.equal(state["rmt.mem"], written), "the memory is the last layer's output at the write rows"
        assert not state["rmt.fresh"].any()
        bottom = seen["in"][s]
        read = learned.expand(2, K, -1) if s == 0 else seen["out"][s - 1][:, -K:] if rmt.get(
            "mem_at_end", True) else seen["out"][s - 1][:, :K]
        assert torch.equal(bottom[:, :K], read), "the read positions get the previous segment's write memory"
        if rmt.get("mem_at_end", True):
            assert torch.equal(bottom[:, -K:], read), "and so do the write positions"
        assert bottom.shape[1] == 4 + (2 * K if rmt.get("mem_at_end", True) else K)


def test_initial_slots_are_distinct_and_scaled_like_embeddings():
    model = build_model(ModelConfig(**{**BASE, "d_model": 64, "d_head": 32, "attn_type": 0, "mem_len": 0,
                                       "rmt": dict(num_mem_tokens=16)}))
    m = model.stack.memories["rmt"].memory.detach()
    assert m.shape == (16, 64)
    gap = torch.cdist(m, m) + torch.eye(16) * 1e9
    assert gap.min() > 0.1 * m.norm(dim=1).mean(), "memory slots must not be copies of one vector"
    assert 0.5 < m.std().item() / (0.02 * 64 ** 0.5) < 1.5     # normal(0, init_std) * sqrt(d_model)


def test_a_reset_row_reads_the_learned_memory_with_its_gradient():
    model = _model(attn_type=0, mem_len=0, rmt=dict(num_mem_tokens=2))
    param = model.stack.memories["rmt"].memory
    tokens = torch.randint(0, 31, (2, 12), generator=torch.Generator().manual_seed(1))
    state = model.init_state(2)
    for s in range(2):
        _, state = model(tokens[:, 4 * s:4 * s + 4], state)
    state = model.reset_state(state, torch.tensor([True, False]))
    assert state["rmt.fresh"].tolist() == [True, False]
    for row, expect_grad in ((0, True), (1, False)):
        model.zero_grad()
        out, _ = model(tokens[:, 8:12], state, tokens[:, 8:12])
        out.nll[row].sum().backward()
        g = 0.0 if param.grad is None else param.grad.abs().sum().item()
        assert (g > 0) == expect_grad, f"row {row}: gradient into the learned memory {g}"
    fresh, _ = model(tokens[:1, 8:12], model.init_state(1), return_logits=True)
    again, _ = model(tokens[:, 8:12], state, return_logits=True)
    assert torch.equal(again.logits[0], fresh.logits[0])


def _unrolled_grads(model, tokens, k, n=4):
    """The engine's unroll (pretrain/engine/trainer.py): windows of k segments, the state carried with gradients
    inside a window (detach_state only on its last segment) and detached between windows; the loss is the
    last segment's only.  Returns the gradients of the learned memory and of the embedding table."""
    model.zero_grad()
    segs = tokens.shape[1] // n
    state = model.init_state(tokens.shape[0])
    for w in range(0, segs, k):
        st = state
        for j in range(k):
            s = w + j
            out, st = model(tokens[:, s * n:s * n + n], st, tokens[:, s * n:s * n + n], detach_state=(j == k - 1))
            if s == segs - 1:
                out.nll.sum().backward()
        assert not any(t.requires_grad for t in st.tensors.values())
        state = st
    p = model.stack.memories["rmt"].memory.grad
    return (torch.zeros(()) if p is None else p.abs().sum()), model.embedding.tables[0].weight.grad


@pytest.mark.parametrize("kw", [dict(attn_type=0, mem_len=0), dict(layers="delta,xl", mem_len=0)],
                         ids=["rmt", "rmt-over-delta"])
def test_backprop_through_k_segments_and_truncation_at_k(kw):
    """Segment s holds only token ids 4s..4s+3 (4 segments); the loss is segment 3's.  The carried state is the
    only path between segments (no XL cache: the memory tokens, and the fast weights of the hybrid), so the
    gradient reaches segment s's tokens iff s is in the last unroll window, and the learned initial memory
    (read by segment 0) only when the window spans all four segments."""
    model = _model(**kw, rmt=dict(num_mem_tokens=2), tie_weight=False)    # input rows: gradient from inputs only
    tokens = torch.arange(16).view(1, 16).repeat(2, 1)
    for k, reached in ((4, [0, 1, 2, 3]), (2, [2, 3]), (1, [3])):
        g_mem, g_emb = _unrolled_grads(model, tokens, k)
        for s in range(4):
            g = g_emb[4 * s:4 * s + 4].abs().sum().item()
            assert (g > 0) == (s in reached), f"k={k}: segment {s}'s tokens got gradient {g}"
        assert (g_mem > 0) == (k == 4), f"k={k}: the learned memory (read by segment 0) got {g_mem}"


def test_several_documents_inside_one_segment_each_run_on_their_own():
    model = _model(attn_type=0, mem_len=5, rmt=dict(num_mem_tokens=2))
    g = torch.Generator().manual_seed(2)
    hist, seg, nxt = (torch.randint(0, 31, (3, 6), generator=g) for _ in range(3))
    reset = torch.zeros(3, 6, dtype=torch.bool)
    reset[0, [2, 4]] = True                             # row 0: documents [0, 2), [2, 4), [4, 6)
    reset[1, 4] = True                                  # row 1: the same length as row 0's last document
    _, state = model(hist, model.init_state(3))
    plain, _ = model(seg, state, return_logits=True)
    out, st = model(seg, state, return_logits=True, reset=reset)
    after, _ = model(nxt, st, return_logits=True)
    assert torch.equal(out.logits[0, :2], plain.logits[0, :2]) and torch.equal(out.logits[2], plain.logits[2])
    for b, docs in ((0, [(2, 4), (4, 6)]), (1, [(4, 6)])):
        for a, e in docs:
            alone, st_alone = model(seg[b:b + 1, a:e], model.init_state(1), return_logits=True)
            assert (out.logits[b, a:e] - alone.logits[0]).abs().max() < 1e-10
        after_alone, _ = model(nxt[b:b + 1], st_alone, return_logits=True)
        assert (after.logits[b] - after_alone.logits[0]).abs().max() < 1e-10
    # gradients flow through the split passes
    out, st = model(seg, state, seg, reset=reset, detach_state=False)
    (out.nll.sum() + st["rmt.mem"].sum()).backward()
    assert model.stack.memories["rmt"].memory.grad.abs().sum() > 0


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError) as e:
        ModelConfig(**BASE, rmt=dict(num_mem_tokens=-1)).validate()
    assert e.value.field == "rmt.num_mem_tokens"
    with pytest.raises(ConfigError, match="model.rmt") as e:
        ModelConfig(**BASE, mechanism="rmt").validate()
    assert e.value.field == "mechanism"
