"""Engine components on their own (no processes started): the batch that travels through the loops, the memory
slots of the accumulation steps, the progress display, the checkpoint choice."""
import io
import json
import os
import types

import numpy as np
import pytest
import torch

from pretrain.engine.batch import Batch, call_model
from pretrain.engine.memory_slots import MemoryLayoutError, MemorySlots, join_tp_shards
from pretrain.engine.metrics import Progress, format_duration
from pretrain.model import ModelConfig, build_model

BASE = dict(n_layer=2, d_model=16, n_head=2, d_head=8, d_inner=24, vocab_size=31, dropout=0.0,
            tgt_len=4, mem_len=6)


pytestmark = pytest.mark.usefixtures("tp1")


def _model(**kw):
    return build_model(ModelConfig(**{**BASE, **kw})).double().eval()


def _micro_batch(rows=3, length=12, seed=0, reset=None):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 31, (rows, length + 1))
    mask = (rng.random((rows, length)) > 0.3).astype(np.float32)
    return types.SimpleNamespace(tokens=tokens[:, :-1], targets=tokens[:, 1:], loss_mask=mask,
                                 reset=np.zeros(rows, bool) if reset is None else np.asarray(reset))


# ---------------------------------------------------------------------------------------------------- Batch
def test_batch_cuts_segments_and_names_the_model_inputs():
    mb = _micro_batch(reset=[True, False, True])
    b = Batch.from_micro_batch(mb, torch.device("cpu"))
    assert (b.rows, b.length, b.num_scored()) == (3, 12, float(mb.loss_mask.sum()))
    assert b.tokens.dtype == torch.int64 and b.loss_mask.dtype == torch.float32 and b.reset.dtype == torch.bool
    segs = b.segments(3)
    assert [s.length for s in segs] == [4, 4, 4]
    assert torch.equal(torch.cat([s.tokens for s in segs], 1), b.tokens)
    assert torch.equal(torch.cat([s.loss_mask for s in segs], 1), b.loss_mask)
    # the memory is reset before the unroll, never in its middle
    assert segs[0].reset.tolist() == [True, False, True] and not segs[1].reset.any() and not segs[2].reset.any()
    assert set(b.model_inputs()) == {"tokens", "targets"}
    assert b.segment(0, 1) is b
    with pytest.raises(ValueError, match="does not split into 5"):
        b.segment(0, 5)
    with pytest.raises(ValueError, match="out of range"):
        b.segment(3, 3)
    with pytest.raises(ValueError, match="reset has shape"):
        Batch(b.tokens, b.targets, b.loss_mask, torch.zeros(2, dtype=torch.bool))


def test_call_model_passes_the_inputs_in_the_model_signature_order():
    seen = {}

    def forward(tokens, state, targets, **kw):
        seen.update(tokens=tokens, state=state, targets=targets, kw=kw)
        return "out", "state"

    b = Batch.from_micro_batch(_micro_batch(), torch.device("cpu"))
    assert call_model(forward, "S", b, detach_state=False) == ("out", "state")
    assert seen["state"] == "S" and seen["tokens"] is b.tokens and seen["targets"] is b.targets
    assert seen["kw"] == {"detach_state": False}


# ---------------------------------------------------------------------------------------------------- memory
def test_unroll_equals_the_model_called_segment_by_segment():
    model = _model(attn_type=0)
    slots = MemorySlots(model, num_slots=2, rows=3, device=torch.device("cpu"), bptt_segments=3)
    b = Batch.from_micro_batch(_micro_batch(), torch.device("cpu"))
    with torch.no_grad():
        outs = slots.unroll(1, b, model)
        slots.commit(1)
        st = model.init_state(3)
        for j, (seg, out) in enumerate(outs):
            ref, st = model(b.tokens[:, 4 * j:4 * j + 4], st, b.targets[:, 4 * j:4 * j + 4])
            assert torch.equal(ref.nll, out.nll)
    assert slots[1].equal(st) and not slots[0].equal(st)  # only the slot that ran moved on
    assert all(not slots[1][k].requires_grad for k in slots[1].keys())


def test_gradients_flow_through_the_memory_inside_the_unroll_only():
    """With k = 2 the second segment's loss reaches the first segment's inputs through the memory; with two
    unrolls of one segment (truncated backpropagation) it does not."""
    def grad_of_second_loss(k):
        model = _model(attn_type=0, tie_weight=False)  # input embedding rows get gradients from inputs only
        emb = model.embedding.tables[0].weight
        b = Batch.from_micro_batch(_micro_batch(length=8), torch.device("cpu"))
        slots = MemorySlots(model, 1, 3, torch.device("cpu"), bptt_segments=k)
        if k == 2:
            outs = slots.unroll(0, b, model)
            loss = outs[1][1].nll.sum()
        else:
            slots.unroll(0, b.segment(0, 2), model)
            slots.commit(0)
            loss = slots.unroll(0, b.segment(1, 2), model)[0][1].nll.sum()
        (g,) = torch.autograd.grad(loss, emb)
        first_only = sorted(set(b.tokens[:, :4].flatten().tolist()) - set(b.tokens[:, 4:].flatten().tolist())
                            - set(b.targets[:, 4:].flatten().tolist()))
        return g[first_only].abs().sum().item()

    assert grad_of_second_loss(2) > 0
    assert grad_of_second_loss(1) == 0


def test_rows_flagged_by_the_batch_start_from_the_initial_memory():
    model = _model(attn_type=3)
    slots = MemorySlots(model, 1, 3, torch.device("cpu"), reset_memory=True)
    with torch.no_grad():
        slots.unroll(0, Batch.from_micro_batch(_micro_batch(length=4, seed=1), torch.device("cpu")), model)
        slots.commit(0)
        before = slots[0]
        flagged = _micro_batch(length=4, seed=2, reset=[False, True, False])
        out_slots = slots.unroll(0, Batch.from_micro_batch(flagged, torch.device("cpu")), model)[0][1]
        manual = model.reset_state(before, torch.tensor([False, True, False]))
        ref, _ = model(torch.from_numpy(flagged.tokens), manual, torch.from_numpy(flagged.targets))
        kept, _ = model(torch.from_numpy(flagged.tokens), before, torch.from_numpy(flagged.targets))
    assert torch.equal(out_slots.nll, ref.nll)
    assert not torch.equal(out_slots.nll[1], kept.nll[1]) and torch.equal(out_slots.nll[0], kept.nll[0])


def test_a_non_finite_step_puts_every_slot_back():
    model = _model(attn_type=0)
    slots = MemorySlots(model, 2, 3, torch.device("cpu"))
    b = Batch.from_micro_batch(_micro_batch(length=4), torch.device("cpu"))
    with torch.no_grad():
        slots.begin_step()
        for s in (0, 1):
            slots.unroll(s, b, model)
            slots.commit(s)
        slots.end_step(True)
        kept = [slots[s] for s in (0, 1)]
        slots.begin_step()
        for s in (0, 1):
            slots.unroll(s, b, model)
            slots.commit(s)
        assert not slots[0].equal(kept[0])
        slots.end_step(False)
    assert slots[0].equal(kept[0]) and slots[1].equal(kept[1])


def _filled_slots(model):
    """Memory slots of 2 accumulation steps of 3 rows, each unrolled (without a graph) over a 4-token micro-batch
    (seeds 0 and 1) and committed."""
    slots = MemorySlots(model, 2, 3, torch.device("cpu"))
    with torch.no_grad():
        for s in (0, 1):
            slots.unroll(s, Batch.from_micro_batch(_micro_batch(length=4, seed=s), torch.device("cpu")), model)
            slots.commit(s)
    return slots


def test_slots_round_trip_and_refuse_what_does_not_fit():
    model = _model(attn_type=3)
    slots = _filled_slots(model)
    buf = io.BytesIO()
    torch.save(slots.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=False)
    other = MemorySlots(model, 2, 3, torch.device("cpu"))
    other.load_state_dict(sd)
    assert all(other[s].equal(slots[s]) for s in (0, 1))
    other.load_state_dict(sd["slots"])  # a plain list (checkpoints written before the format field)
    assert other[1].equal(slots[1])
    with pytest.raises(MemoryLayoutError, match="2. saved accumulation slot.*this run has 3"):
        MemorySlots(model, 3, 3, torch.device("cpu")).load_state_dict(sd)
    with pytest.raises(MemoryLayoutError, match="3 rows per slot, this run has 4"):
        MemorySlots(model, 2, 4, torch.device("cpu")).load_state_dict(sd)
    with pytest.raises(MemoryLayoutError, match="mem_len 6, this run has 9"):
        MemorySlots(_model(attn_type=3, mem_len=9), 2, 3, torch.device("cpu")).load_state_dict(sd)
    with pytest.raises(MemoryLayoutError, match="mechanism 'lamemo'"):
        MemorySlots(_model(attn_type=0), 2, 3, torch.device("cpu")).load_state_dict(sd)


def test_head_shards_of_another_tensor_parallel_size_are_joined_and_resplit():
    model = _model(attn_type=3)
    slots = _filled_slots(model)
    full = [slots[s] for s in (0, 1)]
    assert any(full[0].head_dims[k] is not None for k in full[0].keys())
    # what 2 tensor-parallel ranks saved: each its head shard of every slot
    saved = [{"format": "memtrain.memory_slots/1", "slots": [st.tp_split(r, 2).state_dict() for st in full]}
             for r in (0, 1)]
    assert join_tp_shards([full[0].tp_split(r, 2) for r in (0, 1)]).equal(full[0])
    other = MemorySlots(model, 2, 3, torch.device("cpu"))
    other.load_state_dict(saved)  # this process has tensor-parallel size 1: the full heads
    assert other[0].equal(full[0]) and other[1].equal(full[1])
    with pytest.raises(MemoryLayoutError, match="not ranks 0..1"):
        join_tp_shards([full[0].tp_split(1, 2), full[0].tp_split(0, 2)])


# ---------------------------------------------------------------------------------------------------- progress
class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_progress_without_a_terminal_writes_a_few_lines_with_rate_and_eta():
    out, clock = io.StringIO(), _Clock()
    p = Progress(1000, initial=0, file=out, every_seconds=30.0, every_steps=0, clock=clock)
    assert not p.tty
    for i in range(1000):
        clock.t += 0.5  # 2 steps/s: a line every 60 steps
        p.update(1, loss=f"{2.0 - i / 1000:.4f}")
    p.close()
    text = out.getvalue()
    lines = text.splitlines()
    assert "\r" not in text
    assert len(lines) == 1000 // 60 + 1, len(lines)  # every 30 s, and the last step at close()
    assert lines[0].startswith("train: step 60/1000 (6.0%) | 2 steps/s | elapsed 0:30 | ETA 7:50 | loss 1.94")
    assert lines[-1].startswith("train: step 1000/1000 (100.0%)") and "ETA 0:00" in lines[-1]


def test_progress_by_steps_and_resumed_runs():
    out, clock = io.StringIO(), _Clock()
    p = Progress(100, initial=40, file=out, every_seconds=0, every_steps=25, clock=clock)
    for _ in range(60):
        clock.t += 2.0
        p.update()
    p.close()
    lines = out.getvalue().splitlines()
    assert [ln.split(" (")[0] for ln in lines] == ["train: step 65/100", "train: step 90/100", "train: step 100/100"]
    assert "0.5 steps/s" in lines[0] and "ETA 1:10" in lines[0]  # 35 steps left at the rate of this process


def test_progress_on_a_terminal_is_a_bar():
    class Tty(io.StringIO):
        def isatty(self):
            return True
    out = Tty()
    p = Progress(10, file=out)
    assert p.tty
    for _ in range(10):
        p.update()
    p.close()
    assert "\r" in out.getvalue() and "10/10" in out.getvalue()
    assert format_duration(3725) == "1:02:05" and format_duration(65) == "1:05" and format_duration(None) == "?"


# ---------------------------------------------------------------------------------------------------- checkpoints
def _fake_checkpoint(root, step, files=None, latest=True):
    from pretrain.engine.checkpoint import tag_for
    tag = tag_for(step)
    os.makedirs(os.path.join(root, tag, "memtrain"), exist_ok=True)
    sizes = {}
    for rel, data in (files or {"memtrain/rank_dp0_tp0.pt": b"x" * 10, "mp_rank_00_model_states.pt": b"y" * 20}
                      ).items():
        with open(os.path.join(root, tag, rel), "wb") as f:
            f.write(data)
        sizes[rel] = len(data)
    with open(os.path.join(root, tag, "memtrain", "meta.json"), "w") as f:
        json.dump({"step": step, "files": sizes}, f)
    if latest:
        with open(os.path.join(root, "latest"), "w") as f:
            f.write(tag)
    return tag


def test_candidates_are_newest_first_and_note_what_latest_names_when_missing(tmp_path):
    from pretrain.engine import checkpoint as ckpt
    root = str(tmp_path)
    _fake_checkpoint(root, 2)
    _fake_checkpoint(root, 4)
    os.makedirs(os.path.join(root, "iter_0000006"))  # incomplete: no meta.json
    assert ckpt.candidates(root) == (["iter_0000004", "iter_0000002"], [])
    with open(os.path.join(root, "latest"), "w") as f:
        f.write("iter_0000002")
    assert ckpt.candidates(root)[0] == ["iter_0000004", "iter_0000002"]   # never older while a newer is complete
    for named, what in (("iter_0000099", "missing"), ("iter_0000006", "incomplete")):
        with open(os.path.join(root, "latest"), "w") as f:
            f.write(named)
        tags, notes = ckpt.candidates(root)
        assert tags == ["iter_0000004", "iter_0000002"] and what in notes[0] and named in notes[0]


def test_verify_finds_truncated_and_missing_files(tmp_path):
    from pretrain.engine import checkpoint as ckpt
    root = str(tmp_path)
    tag = _fake_checkpoint(root, 4)
    meta = ckpt.read_meta(root, tag)
    assert ckpt.verify(root, tag, meta) is None
    with open(os.path.join(root, tag, "mp_rank_00_model_states.pt"), "wb") as f:
        f.write(b"y" * 7)
    assert "mp_rank_00_model_states.pt has 7 bytes, 20 were written" in ckpt.verify(root, tag, meta)
    os.remove(os.path.join(root, tag, "memtrain", "rank_dp0_tp0.pt"))
    assert ckpt.verify(root, tag, meta).endswith("rank_dp0_tp0.pt is missing")
    bad = os.path.join(root, "bad.pt")
    with open(bad, "wb") as f:
        f.write(b"PK\x03\x04 not a zip archive")
    with pytest.raises(ckpt.CheckpointError, match="bad.pt: truncated or corrupt"):
        ckpt.load_torch_file(bad)


@pytest.mark.parametrize("attn_type", [0, 24])
def test_documents_starting_inside_segments_equal_separate_passes(tmp_path, attn_type):
    """With data.reset_memory, a document that starts in the middle of a segment is read as if on its own: every
    input position of the second document gets exactly the log-probabilities of a pass over that document alone,
    and the first document's positions keep their own context (the stream's document starts reach the model).
    (Transformer-XL and the delta rule, whose outputs do not depend on where segments end; every mechanism, LaMemo
    included, is held to the same rule with equal segment lengths in tests/test_mixers.py.)"""
    from data_tools.indexed import IndexedDatasetWriter
    from data_tools.streams import EvalStream
    lens = [10, 9]
    rng = np.random.default_rng(3)
    docs = [rng.integers(0, 31, n) for n in lens]
    prefix = str(tmp_path / "two_docs")
    with IndexedDatasetWriter(prefix, np.int32) as w:
        w.add_documents(np.concatenate(docs), np.array(lens))
    model = _model(attn_type=attn_type, mem_len=0 if attn_type == 24 else 6)
    stream = EvalStream(prefix, seq_len=4, num_streams=1)
    state = model.init_state(1)
    logits = []
    with torch.no_grad():
        for step in range(len(stream)):
            b = Batch.from_micro_batch(stream.get(step), torch.device("cpu"), reset_memory=True)
            out, state = call_model(model, state, b, return_logits=True)
            logits.append(out.logits[0])
    logits = torch.cat(logits)[:sum(lens) - 1]        # input positions 0 .. T-2 (the last input has no target)

    def alone(doc, n, offset):
        """The document on its own from a fresh memory, cut where the stream cuts it (segment boundaries at
        multiples of 4 in stream positions: LaMemo's memory refresh depends on where segments end)."""
        st, outs = model.init_state(1), []
        t = torch.as_tensor(doc)[None]
        cuts = sorted({0, n} | {c - offset for c in range(0, offset + n, 4) if 0 < c - offset < n})
        for a, e in zip(cuts, cuts[1:]):
            o, st = model(t[:, a:e], st, return_logits=True)
            outs.append(o.logits[0])
        return torch.cat(outs)

    first, second = alone(docs[0], lens[0], 0), alone(docs[1], lens[1] - 1, lens[0])
    assert (logits[:lens[0]] - first).abs().max() < 1e-10
    assert (logits[lens[0]:] - second).abs().max() < 1e-10, "the second document saw the first"


def unrolled_gradients(slots, batch, model, loss_fn, mode):
    """The parameter gradients of ``loss_fn(segment, output)`` summed over the segments of ``batch`` unrolled from
    accumulation slot 0 of ``slots`` (not committed), the model's gradients zeroed and the default generator
    seeded with 123 first: ``mode`` "bptt" back-propagates through the whole unroll, "mrbp" through the engine's
    memory replay.  Returns a clone of each gradient (None where a parameter has none), in parameter order."""
    model.zero_grad()
    torch.manual_seed(123)
    if mode == "bptt":
        outs = slots.unroll(0, batch, model)
        sum(loss_fn(seg, out) for seg, out in outs).backward()
    else:
        replay = slots.replay_forward(0, batch, model)
        replay.backward(loss_fn, lambda loss, last: (loss.backward(), 1.0)[1])
    return [p.grad.clone() if p.grad is not None else None for p in model.parameters()]


@pytest.mark.parametrize("case", ["xl", "lamemo", "delta", "slots", "rmt", "compressive", "gdn", "armt"])
def test_memory_replay_backprop_equals_backprop_through_the_unroll(case):
    """MRBP (forward without a graph, then recompute and backpropagate one segment at a time, last first, carrying
    the state gradient) gives the gradients of ordinary backpropagation through the same k segments, with the
    same dropout masks (the random generators are replayed), and leaves the same final state."""
    kw = {"xl": dict(attn_type=0), "lamemo": dict(attn_type=3), "delta": dict(attn_type=24, mem_len=0),
          "slots": dict(attn_type=50, mem_len=0, slots=dict(num_slots=3)),
          "rmt": dict(attn_type=0, rmt=dict(num_mem_tokens=2)),
          "compressive": dict(attn_type=60, compressive=dict(cmem_ratio=2, cmem_len=2)),
          "gdn": dict(attn_type=70, mem_len=0, gated_deltanet=dict(conv_size=3)),
          # eps 1: ARMT's read divides by z^T phi(q) + eps, and with the default 1e-5 and a nearly empty memory the
          # two orders of summation differ by 1e-10 relative even in fp64 (1e-13 with eps 1)
          "armt": dict(attn_type=0, mem_len=0, armt=dict(num_mem_tokens=2, d_mem=8, value_init="weight", eps=1.0))}[case]
    k = 3
    torch.manual_seed(0)
    model = build_model(ModelConfig(**{**BASE, **kw, "dropout": 0.2, "dropatt": 0.1})).double().train()
    b = Batch.from_micro_batch(_micro_batch(length=4 * k, seed=4), torch.device("cpu"))
    count = b.num_scored()

    def loss_fn(seg, out):
        loss = seg.masked_nll_sum(out.nll) / count
        return loss if out.aux_loss is None else loss + out.aux_loss / k

    results = []
    for mode in ("bptt", "mrbp"):
        torch.manual_seed(77)
        slots = MemorySlots(model, 1, 3, torch.device("cpu"), bptt_segments=k)
        warm = Batch.from_micro_batch(_micro_batch(length=4, seed=9), torch.device("cpu"))
        slots.k = 1
        with torch.no_grad():
            slots.unroll(0, warm, model)          # a carried memory entering the unroll
        slots.commit(0)
        slots.k = k
        grads = unrolled_gradients(slots, b, model, loss_fn, mode)
        after = torch.rand(3)                     # the generators end where the plain unroll left them
        slots.commit(0)
        results.append((grads, slots[0], after))
    (g1, s1, r1), (g2, s2, r2) = results
    assert torch.equal(r1, r2)
    assert s1.equal(s2, atol=1e-12)
    assert any(g is not None and g.abs().sum() > 0 for g in g1)
    for a, c in zip(g1, g2):
        assert (a is None) == (c is None) and (a is None or torch.allclose(a, c, atol=1e-10, rtol=1e-8))


def test_a_log_window_without_scored_tokens_says_so_instead_of_nan():
    from pretrain.engine.metrics import format_console
    line = format_console({"step": 3, "total": 9, "loss": None, "scored": 0, "lr": 1e-3, "skipped": 0})
    assert line.startswith("step 3/9 | no scored tokens |") and "nan" not in line
    assert "no scored tokens" not in format_console({"step": 3, "loss": None, "scored": 0, "skipped": 1})
