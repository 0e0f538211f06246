"""Ordered streams: coverage, contiguity, reset flags, resume, layout-change policies, eval mode, errors.

The test datasets hold ``tokens = arange(T)`` (int32), so a token's value is its position and every
property can be checked against positions directly.
"""
import json
import logging
import os

import numpy as np
import pytest

from data_tools.indexed import IndexedDataset, IndexedDatasetWriter
from data_tools.metadata import write_metadata
from data_tools.streams import EvalStream, OrderedStream, StreamStateError


def write_positions(prefix, doc_lengths, mask=None):
    """A dataset whose tokens are their own positions, with the given document lengths."""
    lens = np.asarray(doc_lengths, np.int64)
    total = int(lens.sum())
    with IndexedDatasetWriter(str(prefix), dtype=np.int32) as w:
        w.add_documents(np.arange(total), lens)
    if mask is not None:
        with IndexedDatasetWriter(str(prefix) + ".mask", dtype=np.uint8) as w:
            w.add_documents(np.asarray(mask, np.uint8), lens)
    return str(prefix), total


@pytest.fixture
def ragged(tmp_path):
    lens = np.random.default_rng(0).integers(1, 40, 250)
    return write_positions(tmp_path / "ragged", lens)


def all_batches(make, dp_size, steps):
    """{(rank, step, slot): MicroBatch} for every rank of a layout."""
    out = {}
    for r in range(dp_size):
        s = make(r)
        for t in range(steps):
            for g, mb in enumerate(s.get_step(t)):
                out[r, t, g] = mb
    return out


def reference_starts(positions, previous_last, starts):
    """Every offset j where a document starts or the positions jump (j = 0 compares with the previous
    segment's last input, None at the start of an epoch)."""
    flags = []
    for j, p in enumerate(positions):
        prev = previous_last if j == 0 else positions[j - 1]
        flags.append(p in starts or prev is None or p != prev + 1)
    return flags


def reference_doc_start(positions, previous_last, starts):
    """The last such offset, -1 if none."""
    flags = reference_starts(positions, previous_last, starts)
    return max((j for j, f in enumerate(flags) if f), default=-1)


@pytest.mark.parametrize("align", ["token", "document"])
@pytest.mark.parametrize("roll", [False, True])
def test_every_target_exactly_once_per_epoch(ragged, align, roll):
    prefix, total = ragged
    dp, G, B, N = 2, 2, 3, 7
    make = lambda r: OrderedStream(prefix, r, dp, B, G, N, seed=3, roll=roll, align=align)
    s0 = make(0)
    spe = s0.steps_per_epoch
    for epoch in range(2):
        count = np.zeros(total + 1, np.int64)
        for r in range(dp):
            s = make(r)
            for t in range(epoch * spe, (epoch + 1) * spe):
                for mb in s.get_step(t):
                    assert mb.epoch == epoch
                    real = mb.loss_mask > 0
                    assert (mb.targets[real] == mb.tokens[real] + 1).all()  # true next tokens, even at wraps
                    np.add.at(count, mb.targets[real], 1)
        assert count.max() == 1
        assert count.sum() == s0.tokens_per_epoch
        assert s0.tokens_per_epoch + s0.dropped_tokens == total
        assert count[0] == 0  # nothing predicts the first token


@pytest.mark.parametrize("align", ["token", "document"])
@pytest.mark.parametrize("roll", [False, True])
def test_rows_are_contiguous_and_reset_flags_exact(ragged, align, roll):
    prefix, _ = ragged
    dp, G, B, N = 2, 2, 2, 5
    s0 = OrderedStream(prefix, 0, dp, B, G, N, seed=1, roll=roll, align=align)
    starts = set(IndexedDataset(prefix).document_token_offsets()[:-1].tolist())
    spe = s0.steps_per_epoch
    batches = all_batches(lambda r: OrderedStream(prefix, r, dp, B, G, N, seed=1, roll=roll, align=align),
                          dp, 2 * spe)
    stripes_inputs, jumps = {}, 0
    for (r, t, g), mb in batches.items():
        for b in range(B):
            prev = None if t % spe == 0 else int(batches[r, t - 1, g].tokens[b, -1])
            seq = ([prev] if prev is not None else []) + mb.tokens[b].tolist()
            jumps += int((np.diff(seq) != 1).sum())
            ref = reference_doc_start(mb.tokens[b].tolist(), prev, starts)
            assert mb.doc_start[b] == ref, (r, t, g, b)
            assert mb.reset[b] == (ref >= 0)
            assert mb.doc_starts[b].tolist() == reference_starts(mb.tokens[b].tolist(), prev, starts), (r, t, g, b)
            if not roll and t % spe:
                # consecutive steps continue the same text: targets of t end where inputs of t+1 begin
                assert batches[r, t - 1, g].targets[b, -1] == mb.tokens[b, 0]
            if t < spe:
                stripes_inputs.setdefault((r, g, b), set()).update(mb.tokens[b].tolist())
    sets = list(stripes_inputs.values())
    assert sum(len(x) for x in sets) == len(set().union(*sets))  # stripes never overlap
    assert (jumps > 0) == roll  # only a roll wrap breaks a row's text inside an epoch


def test_get_is_pure_and_iteration_matches(ragged):
    prefix, _ = ragged
    s = OrderedStream(prefix, 1, 2, 3, 2, 6, seed=5, roll=True)
    first = [[mb.tokens.copy() for mb in step] for _, step in zip(range(s.steps_per_epoch + 3), s)]
    assert s.position == s.steps_per_epoch + 3
    for t in reversed(range(len(first))):  # any order, any number of times
        for g in range(2):
            mb = s.get(t, g)
            assert np.array_equal(mb.tokens, first[t][g])
            assert mb.tokens.dtype == np.int64 and mb.targets.dtype == np.int64
            assert mb.loss_mask.dtype == np.float32 and mb.tokens.shape == (3, 6)
            assert mb.reset.dtype == bool and mb.doc_start.shape == (3,)


@pytest.mark.parametrize("roll", [False, True])
def test_resume_reproduces_following_batches(ragged, roll):
    prefix, _ = ragged
    make = lambda: OrderedStream(prefix, 1, 2, 2, 3, 6, seed=7, roll=roll)
    ref = make()
    spe = ref.steps_per_epoch
    expected = [[(mb.tokens, mb.targets, mb.reset, mb.doc_start, mb.epoch) for mb in ref.get_step(t)]
                for t in range(4 * spe)]
    for cut in (0, 1, spe - 1, spe, spe + 2, 2 * spe - 1):
        a = make()
        it = iter(a)
        for _ in range(cut):
            next(it)
        state = json.loads(json.dumps(a.state_dict()))  # plain JSON-able
        assert state["step"] == cut and state["epoch"] == cut // spe
        b = make()
        info = b.load_state_dict(state)
        assert info["step"] == cut and not info["reset_memory"]
        for t, step in zip(range(cut, cut + spe + 2), b):
            for mb, exp in zip(step, expected[t]):
                assert mb.step == t
                for got, want in zip((mb.tokens, mb.targets, mb.reset, mb.doc_start, mb.epoch), exp):
                    assert np.array_equal(got, want)


def test_state_is_rank_independent(ragged):
    prefix, _ = ragged
    a = OrderedStream(prefix, 0, 2, 2, 1, 6)
    a.load_state_dict({**a.state_dict(), "step": 4, "epoch": 4 // a.steps_per_epoch})
    b = OrderedStream(prefix, 1, 2, 2, 1, 6)
    assert b.load_state_dict(a.state_dict())["step"] == 4  # a rank may load any rank's state


def test_layout_change_policies(ragged, caplog):
    prefix, _ = ragged
    old = OrderedStream(prefix, 0, 2, 2, 2, 6, seed=1)
    spe_old = old.steps_per_epoch
    state = {**old.state_dict(), "step": spe_old + 5, "epoch": 1}
    new = OrderedStream(prefix, 0, 4, 2, 2, 6, seed=1)
    with pytest.raises(StreamStateError, match=r"dp_size 2 -> 4.*restart_epoch.*proportional"):
        new.load_state_dict(state)
    assert new.position == 0  # an error leaves the stream untouched

    with caplog.at_level(logging.INFO, logger="data_tools.streams"):
        info = new.load_state_dict(state, policy="restart_epoch")
    assert info["reset_memory"] and info["changed"] == {"dp_size": [2, 4]}
    assert new.position == new.steps_per_epoch  # epoch 1, step 0 of the new layout
    assert new.get(new.position).epoch == 1 and new.get(new.position).reset.all()
    assert "restart_epoch" in caplog.text and "reset the memory" in info["message"]
    assert all(r.levelno < logging.WARNING for r in caplog.records)   # the caller shows the message, once

    info = new.load_state_dict(state, policy="proportional")
    assert info["step"] == new.steps_per_epoch + (5 * new.steps_per_epoch) // spe_old
    assert new.epoch == 1

    other_len = OrderedStream(prefix, 0, 2, 2, 2, 5, seed=1)
    info = other_len.load_state_dict(state, policy="proportional")
    assert info["changed"] == {"seq_len": [6, 5]}
    assert info["step"] == other_len.steps_per_epoch + (5 * other_len.steps_per_epoch) // spe_old

    with pytest.raises(StreamStateError, match="seed"):  # with roll the seed is part of the layout
        OrderedStream(prefix, 0, 2, 2, 2, 6, seed=2, roll=True).load_state_dict(
            OrderedStream(prefix, 0, 2, 2, 2, 6, seed=1, roll=True).state_dict())
    with pytest.raises(ValueError, match="policy must be one of"):
        new.load_state_dict(state, policy="remap")


def test_state_from_other_dataset_or_malformed_is_refused(tmp_path, ragged):
    prefix, _ = ragged
    other, _ = write_positions(tmp_path / "other", [50] * 20)
    state = OrderedStream(other, 0, 1, 2, 1, 6).state_dict()
    s = OrderedStream(prefix, 0, 1, 2, 1, 6)
    with pytest.raises(StreamStateError, match="another dataset"):
        s.load_state_dict(state, policy="proportional")
    good = s.state_dict()
    with pytest.raises(StreamStateError, match="missing field 'layout'"):
        s.load_state_dict({k: v for k, v in good.items() if k != "layout"})
    with pytest.raises(StreamStateError, match="not in epoch"):
        s.load_state_dict({**good, "step": 3 * s.steps_per_epoch, "epoch": 0})
    with pytest.raises(StreamStateError, match="'format'"):
        s.load_state_dict({**good, "format": "megatron"})


def test_roll_offsets_seeded_per_epoch_and_stripe(ragged):
    prefix, _ = ragged
    make = lambda seed, align="token": OrderedStream(prefix, 0, 2, 4, 2, 5, seed=seed, roll=True, align=align)
    a, b = make(1), make(1)
    e0, e1 = a.roll_offsets(0), a.roll_offsets(1)
    assert np.array_equal(e0, b.roll_offsets(0)) and np.array_equal(e1, b.roll_offsets(1))
    assert not np.array_equal(e0, e1)
    assert len(set(e0.tolist())) > 1  # different per stripe
    assert not np.array_equal(e0, make(2).roll_offsets(0))
    assert ((0 <= e0) & (e0 < a.stripe_len)).all() and (e0 % 5).any()  # any pair, not only segment starts
    assert not OrderedStream(prefix, 0, 2, 4, 2, 5).roll_offsets(0).any()  # no roll, no rotation
    d = make(1, "document")
    starts = set(IndexedDataset(prefix).document_token_offsets().tolist())
    assert all(int(b + o) in starts for b, o in zip(d.begin, d.roll_offsets(3)))


@pytest.mark.parametrize("roll", [False, True])
def test_document_alignment_for_fixed_length_examples(tmp_path, roll):
    N, k, E = 4, 3, 53  # examples of 3 segments, 53 of them
    mask = np.tile(np.r_[np.zeros(2 * N), np.ones(N)], E)  # last segment of each example is the answer
    prefix, total = write_positions(tmp_path / "task", [k * N] * E, mask)
    write_metadata(prefix, {"loss_mask": "task.mask", "pad_id": 0})
    dp, G, B = 2, 1, 3
    s = OrderedStream(prefix, 0, dp, B, G, N, seed=4, roll=roll, align="document")
    assert s.segments_per_document == k and s.steps_per_epoch % k == 0
    assert s.steps_per_epoch == (E // (dp * G * B)) * k
    scored, seen_virtual, real_targets = 0, False, 0
    for r in range(dp):
        s = OrderedStream(prefix, r, dp, B, G, N, seed=4, roll=roll, align="document")
        for t in range(2 * s.steps_per_epoch):
            mb = s.get(t)
            example = mb.tokens // (k * N)
            assert (example == example[:, :1]).all()  # every segment inside one example
            assert (mb.reset == (t % k == 0)).all()  # exactly the first segment of each example
            assert (mb.doc_start == np.where(t % k == 0, 0, -1)).all()
            virtual = mb.tokens == total - 1  # the data's last token has no next token: pad, never scored
            assert (mb.targets[~virtual] == mb.tokens[~virtual] + 1).all()
            assert np.array_equal(mb.loss_mask[~virtual], mask[mb.targets[~virtual]])  # companion mask, "auto"
            assert (mb.loss_mask[virtual] == 0).all() and (mb.targets[virtual] == 0).all()
            seen_virtual |= bool(virtual.any())
            real_targets += int((~virtual).sum())
            scored += mb.num_scored
    assert scored == 2 * (E // (dp * B)) * dp * B * N  # every answer of the examples in use, twice
    assert seen_virtual
    assert real_targets == 2 * s.tokens_per_epoch and s.tokens_per_epoch + s.dropped_tokens == total


def test_document_alignment_on_a_skewed_corpus(tmp_path):
    # one long document, then short ones: stripes must still start at distinct documents
    prefix, total = write_positions(tmp_path / "skew", [200] + [3] * 9)
    starts = set(IndexedDataset(prefix).document_token_offsets().tolist())
    count = np.zeros(total + 1, np.int64)
    for r in range(2):
        s = OrderedStream(prefix, r, 2, 2, 1, 3, align="document")
        assert all(int(b) in starts for b in s.begin) and len(set(s.begin.tolist())) == 4
        for t in range(s.steps_per_epoch):
            mb = s.get(t)
            np.add.at(count, mb.targets[mb.loss_mask > 0], 1)
    assert count.max() == 1 and count.sum() == s.tokens_per_epoch


def test_explicit_and_mismatched_loss_mask(tmp_path):
    prefix, total = write_positions(tmp_path / "d", [10, 20, 30], mask=np.arange(60) % 2)
    s = OrderedStream(prefix, 0, 1, 2, 1, 5, loss_mask=prefix + ".mask")
    mb = s.get(1)
    assert np.array_equal(mb.loss_mask, (mb.targets % 2).astype(np.float32))
    assert OrderedStream(prefix, 0, 1, 2, 1, 5).get(1).loss_mask.all()  # no prefix.json: no mask
    write_positions(tmp_path / "bad", [10, 20, 31], mask=np.ones(61))
    with pytest.raises(ValueError, match=r"bad\.mask.*61 tokens"):
        OrderedStream(prefix, 0, 1, 2, 1, 5, loss_mask=str(tmp_path / "bad.mask"))
    write_metadata(prefix, {"loss_mask": "missing.mask"})
    with pytest.raises(ValueError, match=r"d\.json: field 'loss_mask'"):
        OrderedStream(prefix, 0, 1, 2, 1, 5)


@pytest.mark.parametrize("align", ["token", "document"])
def test_eval_scores_every_target_once(ragged, align):
    prefix, total = ragged
    N, K, dp = 16, 3, 2
    count = np.zeros(total, np.int64)
    local = 0
    for r in range(dp):
        e = EvalStream(prefix, N, num_streams=K, dp_rank=r, dp_size=dp, align=align)
        short = False
        doc_starts = set(IndexedDataset(prefix).document_token_offsets()[:-1].tolist())
        for mb in e:
            real = mb.loss_mask > 0
            for b in range(K):          # new text starts at documents and at each stream's first position
                prev = None if mb.step == 0 else int(e.get(mb.step - 1).tokens[b, -1])
                n = int(real[b].sum())
                want = reference_starts(mb.tokens[b, :n].tolist(), prev, doc_starts) + [False] * (N - n)
                assert mb.doc_starts[b].tolist() == want
                assert mb.reset[b] == any(want)
            np.add.at(count, mb.targets[real], 1)
            assert (mb.targets[real] == mb.tokens[real] + 1).all()
            pad = ~real
            assert (mb.tokens[pad] == 0).all() and (mb.targets[pad] == 0).all()
            short |= bool(pad.any())
        assert short  # some stream ends with a short, padded segment
        local += e.local_scored_tokens
        if align == "document":
            starts = set(IndexedDataset(prefix).document_token_offsets().tolist())
            assert all(int(b) in starts for b in e.begin)
    assert count[0] == 0 and (count[1:] == 1).all()
    assert e.scored_tokens == total - 1 == local == e.num_targets


def test_eval_with_loss_mask_counts_scored_tokens(tmp_path):
    mask = np.random.default_rng(1).integers(0, 2, 100)
    prefix, total = write_positions(tmp_path / "m", [25] * 4, mask)
    e = EvalStream(prefix, 8, num_streams=2, loss_mask=prefix + ".mask", align="document")
    got = sum(mb.num_scored for mb in e)
    assert got == e.scored_tokens == int(mask[1:].sum())
    mb = e.get(0)
    assert mb.reset.all() and (mb.doc_start == 0).all()


def test_bad_arguments_name_the_argument(tmp_path, ragged):
    prefix, total = ragged
    with pytest.raises(ValueError, match=r"seq_len=5000 is too large .*shortest stripe"):
        OrderedStream(prefix, 0, 2, 4, 2, 5000)
    with pytest.raises(ValueError, match=r"dp_rank=2 is out of range for dp_size=2"):
        OrderedStream(prefix, 2, 2, 4, 2, 5)
    with pytest.raises(ValueError, match="micro_batch must be a positive integer"):
        OrderedStream(prefix, 0, 1, 0, 1, 5)
    with pytest.raises(ValueError, match="align must be one of"):
        OrderedStream(prefix, 0, 1, 1, 1, 5, align="sentence")
    few, _ = write_positions(tmp_path / "few", [30] * 5)
    with pytest.raises(ValueError, match=r"align='document' needs at least one document per stripe.*5 non-empty"):
        OrderedStream(few, 0, 2, 4, 1, 5, align="document")
    with pytest.raises(ValueError, match="slot=2 is out of range for grad_accum=2"):
        OrderedStream(prefix, 0, 1, 1, 2, 5).get(0, 2)
    with pytest.raises(ValueError, match="step=.* out of range"):
        EvalStream(prefix, 8).get(10 ** 6)
    with pytest.raises(ValueError, match="fewer than the 6 streams"):
        EvalStream(write_positions(tmp_path / "tiny", [3])[0], 4, num_streams=3, dp_size=2)
    with pytest.raises(ValueError, match=r"no such file"):
        OrderedStream(str(tmp_path / "absent"), 0, 1, 1, 1, 5)


def test_int64_offsets_on_a_sparse_multi_billion_token_dataset(tmp_path):
    """Three documents of 2^31 - 1 uint16 tokens (12.9 GB, sparse on disk): stripes begin past 2^32."""
    import struct
    prefix = str(tmp_path / "huge")
    n = 2 ** 31 - 1
    with open(prefix + ".bin", "wb") as f:
        f.truncate(3 * n * 2)
    if os.stat(prefix + ".bin").st_blocks * 512 > 1 << 20:
        pytest.skip("the temporary filesystem does not support sparse files")
    with open(prefix + ".idx", "wb") as f:  # the MMIDIDX layout, written by hand
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", 8) + struct.pack("<QQ", 3, 4))
        f.write(np.full(3, n, np.int32).tobytes() + (np.arange(3, dtype=np.int64) * n * 2).tobytes())
        f.write(np.arange(4, dtype=np.int64).tobytes())
    s = OrderedStream(prefix, 1, 2, 2, 1, 4, loss_mask=None)  # rank 1 reads stripes 2 and 3
    assert s.begin[3] > 2 ** 32 and s.tokens_per_epoch + s.dropped_tokens == 3 * n
    last = s.steps_per_epoch - 1
    value = lambda pos: (pos % 60001).astype(np.uint16)  # a position-derived token value
    with open(prefix + ".bin", "r+b") as f:  # write the tokens where rank 1 reads its first and last segments
        for stripe in (2, 3):
            for k in (0, last):
                pos = s.begin[stripe] + k * 4 + np.arange(5)
                f.seek(int(pos[0]) * 2)
                f.write(value(pos).tobytes())
    s = OrderedStream(prefix, 1, 2, 2, 1, 4, loss_mask=None)
    for k in (0, last):
        mb = s.get(k)
        for row, stripe in enumerate((2, 3)):
            expect = value(s.begin[stripe] + k * 4 + np.arange(5)).astype(np.int64)
            assert np.array_equal(mb.tokens[row], expect[:4]) and np.array_equal(mb.targets[row], expect[1:])
    assert s.get(0).doc_start.tolist() == [0, 0] and s.get(1).doc_start.tolist() == [-1, -1]
    k, j = divmod(int(2 * n - s.begin[2]), 4)  # the third document starts inside stripe 2
    assert s.get(k).doc_start[0] == j and s.get(k).reset[0]
