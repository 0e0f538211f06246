"""Time-step data for MemBART (data_tools/seq2seq.py, data_tools/dialogue.py): BART's text infilling and sentence
permutation, the ordered unit stream (coverage, resets, exact resume, layout checks), evaluation streams, and the
dialogue format and its preprocessing command."""
import itertools
import json

import numpy as np
import pytest

from data_tools.dialogue import main as dialogue_main
from data_tools.indexed import IndexedDatasetWriter
from data_tools.seq2seq import (NoiseConfig, Seq2SeqEvalStream, Seq2SeqStream, Specials, add_noise, document_chunks,
                                permute_sentences, span_infill)
from data_tools.streams import StreamStateError, _Source

MASK, BOS, PAD, EOS = 1000, 1001, 1002, 1003
SP = Specials(bos=BOS, eos=EOS, pad=PAD)


def _noise(**kw):
    return NoiseConfig(**{"mask_id": MASK, **kw})


# ------------------------------------------------------------------------------------------------- noise

@pytest.mark.parametrize("n", [1, 2, 7, 40, 300])
def test_span_infill_replaces_spans_by_one_mask(n):
    cfg = _noise(mask_ratio=0.3, poisson_lambda=3.0)
    x = np.arange(n, dtype=np.int64)                      # distinct tokens: the unmasked ones are traceable
    for seed in range(20):
        y = span_infill(x, np.random.default_rng(seed), cfg)
        kept = y[y != MASK]
        m = int(np.ceil(0.3 * n))
        assert kept.size == n - m and np.all(np.diff(kept) > 0) and np.isin(kept, x).all()
        assert y.size <= n
        masks = np.flatnonzero(y == MASK)
        assert masks.size >= 1 and not np.any(np.diff(masks) == 1), "adjacent spans must be one mask"
        again = span_infill(x, np.random.default_rng(seed), cfg)
        assert np.array_equal(y, again)


def test_span_lengths_follow_poisson_lambda():
    cfg = _noise(mask_ratio=0.3, poisson_lambda=3.0)
    x = np.arange(2000, dtype=np.int64)
    spans = [int((span_infill(x, np.random.default_rng(s), cfg) == MASK).sum()) for s in range(30)]
    # 600 masked tokens in spans of mean 3 (plus about e^-3 of zero-length insertions): about 200 + 10 spans
    assert 185 < np.mean(spans) < 235, np.mean(spans)
    cfg5 = _noise(mask_ratio=0.3, poisson_lambda=6.0)
    spans5 = [int((span_infill(x, np.random.default_rng(s), cfg5) == MASK).sum()) for s in range(30)]
    assert np.mean(spans5) < 0.6 * np.mean(spans)


def test_random_replacement_and_sentence_permutation():
    x = np.arange(500, dtype=np.int64)
    y = span_infill(x, np.random.default_rng(0), _noise(random_ratio=1.0, random_low=600, random_high=700))
    assert not (y == MASK).any() and ((y >= 600) & (y < 700)).sum() > 0
    with pytest.raises(ValueError, match="random_low < random_high"):
        _noise(random_ratio=0.1, random_low=5, random_high=5).validate()
    with pytest.raises(ValueError, match="sentence_end_ids"):
        _noise(permute_sentences=True).validate()
    s = np.array([5, 6, 9, 7, 9, 8, 8, 8, 9, 4], np.int64)     # 9 ends a sentence; "4" is an unfinished last one
    perms = {tuple(permute_sentences(s, np.random.default_rng(k), [9])) for k in range(30)}
    assert len(perms) > 3
    sentences = [(5, 6, 9), (7, 9), (8, 8, 8, 9), (4,)]
    orders = {sum(o, ()) for o in itertools.permutations(sentences)}
    assert perms <= orders, "sentences must move whole"
    z = add_noise(s, np.random.default_rng(1), _noise(mask_ratio=0.0, permute_sentences=True, sentence_end_ids=[9]))
    assert sorted(z.tolist()) == sorted(s.tolist())


# ------------------------------------------------------------------------------------------------- streams

def _corpus(tmp_path, lengths=(23, 5, 64, 17, 40, 9, 31), name="c"):
    prefix = str(tmp_path / name)
    rng = np.random.default_rng(0)
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        for L in lengths:
            w.add_document(rng.integers(0, 256, L).astype(np.uint16))
    return prefix


def test_document_chunks_cover_every_token(tmp_path):
    prefix = _corpus(tmp_path)
    src = _Source(prefix, None, None)
    t = document_chunks(src, 10)
    assert int(t.length.sum()) == src.num_tokens and (t.length <= 10).all() and (t.length > 0).all()
    assert np.array_equal(np.append(t.start[1:], src.num_tokens), t.start + t.length)
    assert int(t.first.sum()) == 7 and (np.diff(t.episode) >= 0).all()


def test_denoising_stream_examples_resets_and_epoch(tmp_path):
    prefix = _corpus(tmp_path)
    toks = np.asarray(_Source(prefix, None, None).tokens, np.int64)
    st = Seq2SeqStream(prefix, "denoising", 10, SP, _noise(), micro_batch=2, grad_accum=2, seed=3)
    t = st.table
    seen = []
    for step in range(st.steps_per_epoch):
        for slot in range(2):
            mb = st.get(step, slot)
            assert mb.tokens.shape == mb.targets.shape == (2, 12)
            for r in range(2):
                u = st.begin[st.stripe(slot, r)] + step
                seen.append(u)
                L = int(t.length[u])
                clean = toks[t.start[u]:t.start[u] + L]
                assert mb.targets[r, 0] == BOS and mb.targets[r, L + 1] == EOS and (mb.targets[r, L + 2:] == PAD).all()
                assert np.array_equal(mb.targets[r, 1:L + 1], clean)
                assert mb.loss_mask[r].sum() == L + 2 and mb.loss_mask[r, :L + 2].all()
                n_src = int(mb.source_mask[r].sum())
                assert mb.tokens[r, 0] == BOS and mb.tokens[r, n_src - 1] == EOS and (mb.tokens[r, n_src:] == PAD).all()
                body = mb.tokens[r, 1:n_src - 1]
                assert (body == MASK).any() and body.size <= L
                assert mb.reset[r] == (bool(t.first[u]) or step == 0) == mb.step_resets[r, 0]
                assert mb.step_in_episode[r, 0] == t.index[u]
    assert sorted(seen) == list(range(st.steps_per_epoch * 4))
    assert st.dropped_units == len(t) - st.steps_per_epoch * 4
    # the next epoch reads the same units with new noise, and resets every row first
    nxt = st.get(st.steps_per_epoch, 0)
    first = st.get(0, 0)
    assert nxt.epoch == 1 and nxt.reset.all() and np.array_equal(nxt.targets, first.targets)
    assert not np.array_equal(nxt.tokens, first.tokens)


def test_noise_is_a_function_of_seed_step_and_stripe_and_resume_is_exact(tmp_path):
    prefix = _corpus(tmp_path, lengths=(200, 150, 90, 120))
    kw = dict(micro_batch=2, grad_accum=2, seed=7)
    a = Seq2SeqStream(prefix, "denoising", 12, SP, _noise(), **kw)
    b = Seq2SeqStream(prefix, "denoising", 12, SP, _noise(), **kw)
    for s in (0, 3, 9):
        assert np.array_equal(a.get(s, 1).tokens, b.get(s, 1).tokens)
    c = Seq2SeqStream(prefix, "denoising", 12, SP, _noise(), micro_batch=2, grad_accum=2, seed=8)
    assert not np.array_equal(a.get(2, 0).tokens, c.get(2, 0).tokens)
    it = iter(a)
    for _ in range(4):
        next(it)
    saved = json.loads(json.dumps(a.state_dict()))
    expected = [next(it) for _ in range(3)]
    b.load_state_dict(saved)
    resumed = iter(b)
    got = [next(resumed) for _ in range(3)]
    for e, g in zip(expected, got):
        for x, y in zip(e, g):
            assert np.array_equal(x.tokens, y.tokens) and np.array_equal(x.targets, y.targets)
            assert np.array_equal(x.reset, y.reset) and x.step == y.step
    other = Seq2SeqStream(prefix, "denoising", 12, SP, _noise(mask_ratio=0.5), **kw)
    with pytest.raises(StreamStateError, match="noise"):
        other.load_state_dict(saved)
    info = other.load_state_dict(saved, policy="restart_epoch")
    assert info["reset_memory"]
    with pytest.raises(StreamStateError, match="another dataset"):
        Seq2SeqStream(_corpus(tmp_path, (300, 100), "d"), "denoising", 12, SP, _noise(), **kw).load_state_dict(saved)


def test_rollouts_hold_consecutive_steps_with_resets_inside(tmp_path):
    prefix = _corpus(tmp_path)
    one = Seq2SeqStream(prefix, "denoising", 10, SP, _noise(), micro_batch=2, seed=4)
    roll = Seq2SeqStream(prefix, "denoising", 10, SP, _noise(), micro_batch=2, seed=4, horizon=3)
    assert roll.steps_per_epoch == (len(roll.table) // 2 // 3) and roll.stripe_units % 3 == 0
    t = roll.table
    for k in range(roll.steps_per_epoch):
        mb = roll.get(k)
        assert mb.tokens.shape == (2, 3 * 12) and mb.width == 12 and mb.horizon == 3
        for r in range(2):
            for j in range(3):
                u = roll.begin[r] + 3 * k + j
                cols = slice(12 * j, 12 * j + 12)
                L = int(t.length[u])
                assert np.array_equal(mb.targets[r, cols][1:L + 1], one.src.tokens[t.start[u]:t.start[u] + L])
                assert mb.step_resets[r, j] == (bool(t.first[u]) or (k == 0 and j == 0))
                assert mb.step_in_episode[r, j] == t.index[u]
                assert mb.loss_mask[r, cols].sum() == L + 2
        assert np.array_equal(mb.reset, mb.step_resets[:, 0])
    inside = [roll.get(k).step_resets[:, 1:].any() for k in range(roll.steps_per_epoch)]
    assert any(inside), "this corpus has documents starting inside a rollout"


def test_eval_stream_scores_every_unit_once(tmp_path):
    prefix = _corpus(tmp_path)
    units = []
    for rank in range(2):
        ev = Seq2SeqEvalStream(prefix, "denoising", 10, SP, _noise(), num_streams=2, dp_rank=rank, dp_size=2)
        for mb in ev:
            live = mb.step_in_episode[:, 0] >= 0
            assert (mb.loss_mask[~live] == 0).all()
            for r in np.flatnonzero(live):
                units.append((int(mb.targets[r, 1:int(mb.loss_mask[r].sum()) - 1].sum()), int(mb.step_in_episode[r, 0])))
            assert (mb.reset[live] == ((mb.step_in_episode[live, 0] == 0) | (mb.step == 0))).all()
    st = Seq2SeqStream(prefix, "denoising", 10, SP, _noise())
    assert len(units) == len(st.table)
    with pytest.raises(ValueError, match="episodes"):
        Seq2SeqEvalStream(prefix, "denoising", 10, SP, _noise(), num_streams=8)


def test_stream_errors(tmp_path):
    prefix = _corpus(tmp_path, lengths=(10, 10))
    with pytest.raises(ValueError, match="do not fill the 8 stripes"):
        Seq2SeqStream(prefix, "denoising", 10, SP, _noise(), micro_batch=8)
    with pytest.raises(ValueError, match="task"):
        Seq2SeqStream(prefix, "translation", 10, SP, _noise())
    with pytest.raises(ValueError, match="NoiseConfig"):
        Seq2SeqStream(prefix, "denoising", 10, SP)


# ------------------------------------------------------------------------------------------------- dialogue

def _dialogues(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"id": "a", "turns": ["hi", "hello there", "how are you", "fine"]},
            {"turns": [{"speaker": "A", "text": "one turn only"}]},
            {"turns": ["ab", {"text": "cd"}, "efg"]}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    return path


def test_dialogue_preprocess_and_stream(tmp_path, capsys):
    path = _dialogues(tmp_path)
    prefix = str(tmp_path / "out" / "dlg")
    assert dialogue_main(["--input", str(path), "--tokenizer", "bytes", "--output-prefix", prefix]) == 0
    meta = json.loads(open(prefix + ".json").read())
    assert meta["documents"] == 3 and meta["sequences"] == 8 and meta["responses"] == 5 and meta["turns"]
    st = Seq2SeqStream(prefix, "dialogue", 16, SP, micro_batch=1, history_turns=0)
    assert len(st.table) == 5 and st.steps_per_epoch == 5
    texts = lambda row, mask: bytes(int(t) for t, m in zip(row, mask) if m and t < 256).decode()
    got = []
    for k in range(5):
        mb = st.get(k)
        src = mb.tokens[0][mb.source_mask[0]]
        assert src[0] == BOS and src[-1] == EOS
        got.append((bytes(int(t) for t in src[1:-1] if t < 256).decode(), texts(mb.targets[0], mb.loss_mask[0]),
                    bool(mb.reset[0]), int(mb.step_in_episode[0, 0]), int((src[1:-1] == EOS).sum())))
    # sources: the earlier turns, each followed by EOS, cut from the left to 16 tokens
    assert got == [("hi", "hello there", True, 0, 1), ("hihello there", "how are you", False, 1, 2),
                   ("erehow are you", "fine", False, 2, 2), ("ab", "cd", True, 0, 1), ("abcd", "efg", False, 1, 2)]
    one = Seq2SeqStream(prefix, "dialogue", 16, SP, history_turns=1)
    mb = one.get(1)
    assert bytes(int(t) for t in mb.tokens[0][mb.source_mask[0]][1:-1] if t < 256).decode() == "hello there"


def test_dialogue_bad_input_names_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"turns": ["ok", "fine"]}) + "\n" + '{"turns": ["x", 3]}\n' + "not json\n")
    prefix = str(tmp_path / "o")
    assert dialogue_main(["--input", str(bad), "--tokenizer", "bytes", "--output-prefix", prefix]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2: turn 1 is not a non-empty string" in err and err.count("\n") == 1
    assert not list(tmp_path.glob("o*")), "nothing written on bad input"
    assert dialogue_main(["--input", str(bad), "--tokenizer", "bytes", "--output-prefix", prefix,
                          "--skip-bad-lines"]) == 0
    assert json.loads(open(prefix + ".json").read())["skipped_bad_lines"] == 2
    assert dialogue_main(["--input", str(tmp_path / "missing.jsonl"), "--tokenizer", "bytes", "--output-prefix",
                          prefix]) == 2
    assert "no such file" in capsys.readouterr().err
    assert dialogue_main(["--input", str(bad), "--tokenizer", "hf", "--output-prefix", prefix]) == 2
    assert "--tokenizer-file is required" in capsys.readouterr().err
