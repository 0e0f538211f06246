"""The registry-driven test matrix: every registered mixer (each of its ``test_configs``) and a set of hybrids
(different mixers at different layers) must

* equal the fp64 reference written from the equations (``pretrain/model/reference.py``): outputs, states and
  gradients over several segments, with the state detached and carried with gradients;
* leak nothing from the future (changing token p changes no output before p);
* give the same result in one long segment as in short segments with the state carried, where the mechanism
  promises it (``recurrence_exact``);
* restart reset rows from the initial state, round-trip the state through save/load, and honour detach;
* replay dropout under activation checkpointing (same loss and gradients as without);
* generate what the model predicts with the context training gave it (greedy decoding = the teacher-forced
  argmax), with no memory, a memory shorter than a segment and one longer than the text, under the decode
  policy that follows from what each layer's state carries (checked against behaviour).

Tensor parallelism (TP 2 = TP 1) for the same cases is in test_model_tp.py; exact resume through the engine in
test_engine_train.py.  A new mechanism is covered by registering it with its test configs.
"""
import io

import pytest
import torch

from pretrain.config_base import ConfigError
from pretrain.model import MemoryState, ModelConfig, build_model, registry
from model_checks import logits_by_segment
from test_model_reference import BASE as REF_BASE, compare

BASE = dict(n_layer=2, d_model=16, n_head=2, d_head=8, d_inner=24, vocab_size=31, dropout=0.0, tgt_len=4)

# Hybrids: several mixers in one stack (LaMemo rows handed up between LaMemo layers and re-cached after a
# non-LaMemo layer; absolute positions with a recurrent layer; a delta-rule majority with one XL layer).
HYBRIDS = {
    "delta3-xl": dict(n_layer=4, layers="delta*3,xl", mem_len=5),
    "xl-lamemo2": dict(n_layer=3, layers="xl,lamemo,lamemo", mem_len=5),
    "lamemo-delta-lamemo": dict(n_layer=3, layers="lamemo,delta,lamemo", mem_len=5),
    "absolute-sum": dict(layers="absolute,linear", mem_len=0),
    "xl-delta-norm-favor": dict(n_layer=3, layers="0,45,44", mem_len=4),
    # fast weights that are not carried: every segment starts from zero (generation re-reads the segment)
    "delta-nocarry": dict(attn_type=24, mem_len=0, fast_weight=dict(carry_state=False)),
    # Memformer slots beside XL layers (the write stream passes the XL layers; the last layer is a slot layer)
    # and beside delta-rule layers (the last slot layer is in the middle of the stack)
    "xl-slots": dict(n_layer=4, layers="xl,slots", mem_len=5, slots=dict(num_slots=3)),
    "delta-slots-delta": dict(n_layer=3, layers="delta,slots,delta", mem_len=0, slots=dict(num_slots=2)),
    # RMT memory tokens over other mixers: delta-rule layers (they just see the longer sequence), a delta/XL
    # hybrid with the XL cache, LaMemo layers (their memory rows look ahead to the first read position)
    "rmt-delta": dict(attn_type=24, mem_len=0, rmt=dict(num_mem_tokens=2)),
    "rmt-delta-xl": dict(n_layer=2, layers="delta,xl", mem_len=5, rmt=dict(num_mem_tokens=2)),
    "rmt-lamemo": dict(attn_type=3, mem_len=5, rmt=dict(num_mem_tokens=2)),
    # Compressive: compressed memory in the top layer only (memory_layers), local attention below, max pooling
    "compressive-top-local": dict(attn_type=60, mem_len=4, compressive=dict(
        memory_layers=[-1], other_layers="local", compression="max", cmem_ratio=3, cmem_len=2)),
    # a recurrent layer under an XL-memory and a compressive layer, pre-LN, mean pooling, GRU-gated residuals
    "delta-compressive-xl-gru": dict(n_layer=3, layers="delta,compressive_xl,compressive", mem_len=4, pre_lnorm=True,
                                     compressive=dict(compression="mean", cmem_ratio=2, cmem_len=2, gru_gating=True)),
}


def _cases():
    out = {}
    for name, mech in registry.mechanisms().items():
        for tc in mech.test_configs:
            kw = dict(tc)
            label = kw.pop("label", kw["attn_type"])
            kw.setdefault("mem_len", 5)
            out[f"{name}-{label}"] = kw
    out.update({f"hybrid-{k}": v for k, v in HYBRIDS.items()})
    return out


CASES = _cases()


def _cfg(case, **kw):
    return ModelConfig(**{**BASE, **CASES[case], **kw})


def _exact(cfg) -> bool:
    """Whether every layer promises that recurrence over short segments equals one long segment: not with
    absolute positions (counted per segment), nor with fast weights that are not carried."""
    if cfg.absolute_positions() or not cfg.fast_weight.carry_state:
        return False
    return all(registry.mechanism(s.mechanism).recurrence_exact for s in cfg.layer_specs()) and \
        all(m.recurrence_exact for m in registry.stack_memories(cfg))


def _model(cfg):
    return build_model(cfg).double().eval()


pytestmark = pytest.mark.usefixtures("tp1")


def test_the_matrix_covers_every_registered_code():
    covered = {c.code for case in CASES for c in _cfg(case).layer_specs()}
    tested = {kw["attn_type"] for m in registry.mechanisms().values() for kw in m.test_configs}
    assert tested <= covered
    on = {m.name for case in CASES for m in registry.stack_memories(_cfg(case))}
    assert on == set(registry.mechanisms("stack")), "a stack-level memory is never turned on by its test configs"
    for name, mech in registry.mechanisms().items():
        assert mech.test_configs, f"mechanism {name} registers no test configs"


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("detach", [True, False], ids=["detached", "bptt"])
def test_matches_the_reference(case, detach):
    kw = {**REF_BASE, **CASES[case], "tgt_len": 4}
    cfg = ModelConfig(**kw)
    compare(cfg, 4, cfg.mem_len, detach=detach)


@pytest.mark.parametrize("case", sorted(CASES))
def test_no_future_leakage(case):
    """Changing the token at position p (in any segment) changes no output before p, and changes p's."""
    cfg = _cfg(case)
    model = _model(cfg)
    torch.manual_seed(0)
    tokens = torch.randint(0, BASE["vocab_size"], (2, 12))
    base = logits_by_segment(model, tokens, 4, cfg.mem_len)
    for p in (1, 5, 6, 9):                  # inside the first segment, first/second token of later ones
        changed = tokens.clone()
        changed[:, p:] = (changed[:, p:] + 1 + torch.arange(12 - p)) % BASE["vocab_size"]
        out = logits_by_segment(model, changed, 4, cfg.mem_len)
        assert torch.equal(out[:, :p], base[:, :p]), f"position {p} leaks into earlier outputs"
        assert (out[:, p] - base[:, p]).abs().max() > 1e-9, "the changed position itself must change"


@pytest.mark.parametrize("case", sorted(c for c in CASES if _exact(_cfg(c))))
def test_recurrence_equals_long_context(case):
    """Short segments with the state carried equal one long segment (memory covering every earlier token)."""
    total = 12
    cfg = _cfg(case, mem_len=total if _cfg(case).mem_len else 0)
    model = _model(cfg)
    torch.manual_seed(1)
    tokens = torch.randint(0, BASE["vocab_size"], (3, total))
    pieces = logits_by_segment(model, tokens, 4, cfg.mem_len)
    whole = logits_by_segment(model, tokens, total, cfg.mem_len)
    assert (pieces - whole).abs().max().item() < 1e-6          # fp32 softmax of fp64 hidden states


@pytest.mark.parametrize("case", sorted(CASES))
def test_reset_save_load_and_detach(case):
    cfg = _cfg(case, tie_weight=False)
    model = _model(cfg)
    torch.manual_seed(3)
    history, nxt = torch.randint(0, 31, (3, 8)), torch.randint(0, 31, (3, 4))
    state = model.init_state(3)
    for s in (0, 4):
        _, state = model(history[:, s:s + 4], state)
    # reset rows 0 and 2: they continue exactly as from a fresh state, row 1 as before
    rows = torch.tensor([True, False, True])
    reset = model.reset_state(state, rows)
    out, _ = model(nxt, reset, return_logits=True)
    fresh, _ = model(nxt, model.init_state(3), return_logits=True)
    kept, _ = model(nxt, state, return_logits=True)
    assert torch.equal(out.logits[rows], fresh.logits[rows])
    assert torch.equal(out.logits[~rows], kept.logits[~rows])
    stateful = any(sp.uses_memory or (sp.mechanism == "fast_weight" and cfg.fast_weight.carry_state)
                   for sp in cfg.layer_specs())
    assert not stateful or (fresh.logits - kept.logits).abs().max() > 1e-9, "sanity: the state mattered"
    # save / load
    buf = io.BytesIO()
    torch.save(state.state_dict(), buf)
    buf.seek(0)
    loaded = MemoryState.from_state_dict(torch.load(buf))
    assert loaded.equal(state) and loaded.batch_dims == state.batch_dims and loaded.head_dims == state.head_dims
    again, _ = model(nxt, loaded, return_logits=True)
    assert torch.equal(again.logits, kept.logits)
    # detach: the second segment's loss reaches the first segment's tokens only through a non-detached state
    first, second = torch.full((2, 4), 30), torch.randint(0, 20, (2, 4))
    grads = {}
    for detach in (True, False):
        model.zero_grad()
        _, st = model(first, model.init_state(2), detach_state=detach)
        assert all(t.requires_grad != detach for t in st.tensors.values() if t.is_floating_point() and t.numel())
        o, _ = model(second, st, second)
        o.nll.sum().backward()
        grads[detach] = model.embedding.tables[0].weight.grad[30].abs().sum().item()
    assert grads[True] == 0.0 and (grads[False] > 0.0 or not stateful)


@pytest.mark.parametrize("case", sorted(CASES))
def test_activation_checkpointing_replays_dropout(case):
    cfg = _cfg(case, dropout=0.2, dropatt=0.1)
    tokens = torch.randint(0, 31, (2, 9), generator=torch.Generator().manual_seed(5))
    res = []
    for ckpt in (False, True):
        cfg.checkpoint_activations = ckpt
        torch.manual_seed(0)
        model = build_model(cfg).double().train()
        torch.manual_seed(7)
        out1, st = model(tokens[:, :4], model.init_state(2), tokens[:, 1:5])
        out2, st = model(tokens[:, 4:8], st, tokens[:, 5:9])
        loss = out1.nll.sum() + out2.nll.sum()
        loss.backward()
        # (a parameter may get no gradient: LaMemo's look-ahead biases when no LaMemo layer reads its rows)
        res.append((loss.item(), [p.grad if p.grad is None else p.grad.clone() for p in model.parameters()]))
    assert res[0][0] == res[1][0]
    for a, b in zip(res[0][1], res[1][1]):
        assert (a is None and b is None) or torch.allclose(a, b, atol=1e-12, rtol=0)


# Generation also runs on fast weights with absolute positions (lmtool's setting without carry-over, and with it:
# the recurrence is then exact but positions are counted within the segment).
GEN_EXTRA = {"delta-absolute": dict(attn_type=24, mem_len=0, fast_weight=dict(positions="absolute")),
             "delta-absolute-nocarry": dict(attn_type=24, mem_len=0,
                                            fast_weight=dict(positions="absolute", carry_state=False))}


def _gen_cfg(case, **kw):
    return ModelConfig(**{**BASE, **{**CASES, **GEN_EXTRA}[case], **kw})


def _valid(case, **kw) -> bool:
    try:
        _gen_cfg(case, **kw).validate()
    except ConfigError:
        return False
    return True


# Memory settings of the generation tests: none, shorter than a segment (tgt_len 4), longer than the whole text;
# each where the model accepts it (LaMemo needs a memory; a model without memory layers takes none).
GEN_MEMORY = (0, 2, 24)
GEN_CASES = [(case, m) for case in sorted({**CASES, **GEN_EXTRA}) for m in GEN_MEMORY if _valid(case, mem_len=m)]


@pytest.mark.parametrize("case, mem_len", GEN_CASES, ids=[f"{c}-mem{m}" for c, m in GEN_CASES])
def test_decode_policy_follows_what_the_state_carries(case, mem_len):
    """The decode policy is derived from the mixers' ``carries`` declarations; check them against behaviour:
    ``window`` exactly when a segment's outputs do not depend on the state carried into it, ``token`` only where
    one-token segments give what training segments give."""
    cfg = _gen_cfg(case, mem_len=mem_len)
    model = _model(cfg)
    policy = model.decode_policy
    assert policy == model.decode_policy_for(mem_len) and policy in ("window", "token", "segment")
    tokens = torch.randint(0, BASE["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(8))
    _, state = model(tokens[:, :4], model.init_state(2, mem_len=mem_len))
    carried, _ = model(tokens[:, 4:8], state, return_logits=True)
    fresh, _ = model(tokens[:, 4:8], model.init_state(2, mem_len=mem_len), return_logits=True)
    state_matters = (carried.logits - fresh.logits).abs().max().item() > 1e-9
    assert (policy == "window") == (not state_matters), (policy, model.stack.carries(mem_len))
    if policy == "token":
        by_token = logits_by_segment(model, tokens, 1, mem_len)
        assert (by_token - logits_by_segment(model, tokens, 4, mem_len)).abs().max().item() < 1e-6


def test_decode_policy_of_a_new_mechanism_follows_its_declared_state():
    """A mixer or memory that declares nothing about decoding gets its policy from its state entries: none (or
    only empty ones) -> it carries nothing (a sliding window); a state holding values -> part of the past
    (segments as in training).  Transformer-XL declares nothing of its own."""
    from pretrain.model.mixer import Mixer, StackMemory, StateEntry
    from pretrain.model.mechanisms.xl.mixer import XLMixer
    assert XLMixer.carries is Mixer.carries
    model = _model(_cfg("xl-0", mem_len=0))
    assert model.stack.carries(0) == {"layers.0": "nothing", "layers.1": "nothing"}     # a memory of 0 positions
    assert set(model.stack.carries(3).values()) == {"part"}
    assert model.decode_policy_for(0) == "window" and model.decode_policy_for(3) == "segment"

    class Stateless(StackMemory):
        name = "stateless"

    class Summary(StackMemory):
        name = "summary"

        def initial_state(self, batch_size, mem_len, device, dtype):
            return {"m": StateEntry(torch.zeros(batch_size, 2, 4, device=device, dtype=dtype), 0)}

    cfg = _cfg("xl-0")
    assert Stateless(cfg, None, []).carries(5) == "nothing" and Summary(cfg, None, []).carries(0) == "part"
    with pytest.raises(ValueError, match="LaMemo needs a memory"):
        _model(_cfg("lamemo-3")).decode_policy_for(0)


def _padded(seq, n, seed=11):
    """``seq`` followed by random tokens up to a whole number of segments of ``n`` (which, by causality, change
    nothing before them)."""
    extra = -len(seq) % n
    return seq + torch.randint(0, BASE["vocab_size"], (extra,), generator=torch.Generator().manual_seed(seed)).tolist()


def _teacher_forced(model, seq, n, mem_len, policy):
    """The model's log-probabilities [len(seq), V] after every position of ``seq`` (a list of ids) with the context
    training gave it: a teacher-forced pass over ``seq`` in training segments of ``n`` with the state carried
    (the last segment completed with other tokens); for a model whose state carries nothing (``policy``
    "window"), the training segment that ends at the position (the first segment while fewer than ``n``
    positions exist): a sliding window."""
    full = torch.tensor([_padded(seq, n)])
    if policy != "window":
        return logits_by_segment(model, full, n, mem_len)[0, :len(seq)]
    rows = []
    for p in range(len(seq)):
        s = max(0, p - n + 1)
        o, _ = model(full[:, s:s + n], model.init_state(1, mem_len=mem_len), return_logits=True)
        rows.append(o.logits[0, p - s])
    return torch.stack(rows)


@pytest.mark.parametrize("case, mem_len", GEN_CASES, ids=[f"{c}-mem{m}" for c, m in GEN_CASES])
def test_greedy_generation_equals_teacher_forcing(case, mem_len, monkeypatch):
    """Every mechanism, every memory setting (none, shorter than a segment, longer than the text): each new
    token is drawn from the distribution the model predicts with the context training gave it
    (``_teacher_forced``), so greedy decoding gives the teacher-forced argmax.  Prompts shorter and longer than a
    segment (neither a whole number of segments); the output crosses several segment boundaries.  The weights are
    large enough that the context changes the predictions (checked: else a decode that drops the context would
    pass)."""
    import pretrain.decoding as dec
    import pretrain.generate as gen
    cfg = _gen_cfg(case, mem_len=mem_len, init_std=0.3)
    model = _model(cfg)
    n = cfg.tgt_len
    seen = []
    sample_next = dec.sample_next
    monkeypatch.setattr(dec, "sample_next", lambda lp, *a: seen.append(lp[0]) or sample_next(lp, *a))
    for length in (2, 6):
        prompt = torch.randint(0, BASE["vocab_size"], (length,), generator=torch.Generator().manual_seed(4)).tolist()
        seen.clear()
        new = gen.generate(model, prompt, max_new_tokens=11, temperature=0.0, top_k=0, top_p=1.0, generator=None,
                           mem_len=mem_len, segment_len=n)
        assert len(new) == 11 == len(seen)
        seq = prompt + new
        forced = _teacher_forced(model, seq, n, mem_len, model.decode_policy)[length - 1:-1]
        assert (torch.stack(seen) - forced).abs().max().item() < 1e-6, f"prompt of {length}"
        assert new == forced.argmax(-1).tolist()
        alone, _ = model(torch.tensor(seq)[:, None], model.init_state(len(seq), mem_len=mem_len), return_logits=True)
        assert (alone.logits[length - 1:-1, 0] - forced).abs().max() > 1e-2, "sanity: the context must matter"


@pytest.mark.parametrize("case", sorted(CASES))
def test_documents_inside_a_segment_equal_separate_passes(case):
    """A document starting at position p inside a segment (``reset`` flags): positions before p are as without
    the start; from p on, and in the next segment, the row is exactly the new document run on its own from a
    fresh state (no token of the new document sees the old one or the memory)."""
    cfg = _cfg(case)
    model = _model(cfg)
    torch.manual_seed(6)
    n, M = 6, cfg.mem_len
    hist, seg, nxt = (torch.randint(0, BASE["vocab_size"], (3, n)) for _ in range(3))
    starts = torch.tensor([2, 5, -1])                   # row 2 has no document start
    reset = torch.zeros(3, n, dtype=torch.bool)
    for b, p in enumerate(starts.tolist()):
        if p >= 0:
            reset[b, p] = True
    _, state = model(hist, model.init_state(3))
    plain, _ = model(seg, state, return_logits=True)
    out, st = model(seg, state, return_logits=True, reset=reset)
    after, _ = model(nxt, st, return_logits=True)
    for b, p in enumerate(starts.tolist()):
        if p < 0:
            assert torch.equal(out.logits[b], plain.logits[b]), "a row without a start must not change"
            continue
        assert torch.equal(out.logits[b, :p], plain.logits[b, :p]), "tokens before the start keep their context"
        alone, st_alone = model(seg[b:b + 1, p:], model.init_state(1), return_logits=True)
        assert (out.logits[b, p:] - alone.logits[0]).abs().max() < 1e-10, "the new document sees the old one"
        after_alone, _ = model(nxt[b:b + 1], st_alone, return_logits=True)
        assert (after.logits[b] - after_alone.logits[0]).abs().max() < 1e-10, \
            "the next segment sees the old document"
    # a start at position 0 is a reset of the row before the segment
    r0 = torch.zeros(3, n, dtype=torch.bool)
    r0[1, 0] = True
    out0, _ = model(seg, state, return_logits=True, reset=r0)
    fresh, _ = model(seg[1:2], model.init_state(1), return_logits=True)
    assert (out0.logits[1] - fresh.logits[0]).abs().max() < 1e-10
