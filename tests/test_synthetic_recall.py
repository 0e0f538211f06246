"""Recall tasks of the memory evaluation suite: MQAR (Zoology) with a gap, and a bAbI fact in a haystack of real text.

Every example is checked from the files written: the answers follow from the example, the mask covers exactly
the answers, the distances are the ones the options set, and every impossible option is a one-line error
that names the flag."""
import filecmp
import os

import numpy as np
import pytest

from data_tools.indexed import IndexedDataset
from data_tools.metadata import read_metadata
from data_tools.synthetic import (DEFAULT_TEXT, MOVES, NAMES, PLACES, BabiFactsTask, MQARTask, TaskError, generate,
                                  main, read_text)
from data_tools.tokenization import load_tokenizer

SIZES = {"train": 200, "valid": 20, "test": 40}


def examples(prefix):
    ds, mds = IndexedDataset(prefix), IndexedDataset(prefix + ".mask")
    return [(np.asarray(ds.document(d)), np.asarray(mds.document(d))) for d in range(ds.num_documents)]


def make(tmp_path, task, name, seed=0, multiple=1, sizes=SIZES):
    prefix = str(tmp_path / name)
    generate(task, prefix, sizes, seed=seed, segment_multiple=multiple, progress=False)
    return prefix


# ------------------------------------------------------------------------------------------------ mqar
def parse_mqar(words, task):
    """(pairs as {key: (value, position of the key)}, [(query key, its position, answer, answer position)])."""
    P, s, q = task.num_pairs, task.pairs_start, task.queries_start
    pairs = {words[s + 2 * i]: (words[s + 2 * i + 1], s + 2 * i) for i in range(P)}
    queries = [(words[q + 2 * j], q + 2 * j, words[q + 2 * j + 1], q + 2 * j + 1) for j in range(task.num_queries)]
    return pairs, queries


@pytest.mark.parametrize("filler_vocab, example_len", [(1, 0), (3, 40)])
def test_mqar_answers_by_lookup_masks_and_distances(tmp_path, filler_vocab, example_len):
    P, Q, K, V, G = 5, 3, 12, 8, 9
    task = MQARTask(num_pairs=P, num_queries=Q, key_vocab=K, value_vocab=V, gap=G, filler_vocab=filler_vocab,
                    example_len=example_len)
    prefix = make(tmp_path, task, "mqar", multiple=8)
    tokz = load_tokenizer(prefix + "_train")
    meta = read_metadata(prefix + "_train")["task"]
    assert meta["example_len"] == (example_len or 2 * P + G + 2 * Q) and meta["padded_len"] % 8 == 0
    assert (meta["min_distance"], meta["max_distance"]) == (G + 2, 2 * P + G + 2 * Q - 2)
    lookup = ignore = total = 0
    for tok, mask in examples(prefix + "_train"):
        words = [tokz.symbols[t] for t in tok]
        pairs, queries = parse_mqar(words, task)
        keys = [w for w in pairs]
        assert len(pairs) == P and all(k.startswith("k") and v.startswith("v") for k, (v, _) in pairs.items())
        assert len({v for v, _ in pairs.values()}) == P  # distinct values: V >= P
        filler = [w for i, w in enumerate(words[:task.queries_start])
                  if not task.pairs_start <= i < task.pairs_start + 2 * P]
        assert len(filler) == task.lead + G and all(w in {f"f{i}" for i in range(filler_vocab)} for w in filler)
        assert words[task.example_len:] == ["<pad>"] * (tok.size - task.example_len)
        assert len({qk for qk, *_ in queries}) == Q and all(qk in pairs for qk, *_ in queries)
        assert np.flatnonzero(mask).tolist() == [pos for *_, pos in queries]  # the mask: exactly the answers
        for j, (qk, qpos, answer, _) in enumerate(queries):
            value, kpos = pairs[qk]
            lookup += answer == value                       # solves MQAR by lookup in the pairs
            ignore += answer == f"v{int(qk[1:]) % V}"        # a guess that never reads the pairs
            total += 1
            assert qpos - kpos == task.distance(keys.index(qk), j)
            assert G + 2 <= qpos - kpos <= 2 * P + G + 2 * Q - 2
    assert lookup == total == SIZES["train"] * Q
    assert 0.5 / V < ignore / total < 1.8 / V  # chance: 1/V


def test_mqar_segments_back():
    """--example-len (k+1)N --gap kN - 2Q: pairs in the first segment, queries in the last, k segments apart."""
    N, k, P, Q = 8, 3, 4, 3
    task = MQARTask(num_pairs=P, num_queries=Q, key_vocab=10, value_vocab=10, gap=k * N - 2 * Q,
                    example_len=(k + 1) * N)
    batch = task.sample(np.random.default_rng(0), 50)
    for tok, mask in zip(batch.tokens, batch.mask):
        for a in np.flatnonzero(mask):
            kpos = int(np.flatnonzero(tok[:task.queries_start] == tok[a - 1])[0])
            assert tok[kpos + 1] == tok[a] and a // N - kpos // N == k
    # the simpler recipe: --gap kN puts at least k segments between a pair and its query
    task = MQARTask(num_pairs=P, num_queries=Q, key_vocab=10, value_vocab=10, gap=k * N)
    assert all(task.queries_start // N - (task.pairs_start + 2 * i) // N >= k for i in range(P))


def test_mqar_deterministic_in_the_seed(tmp_path):
    task = MQARTask(num_pairs=3, num_queries=2, key_vocab=6, value_vocab=6, gap=4, filler_vocab=2)
    a, b, c = (make(tmp_path, task, n, seed=s) for n, s in (("a", 4), ("b", 4), ("c", 5)))
    for split in SIZES:
        for ext in (".bin", ".idx", ".mask.bin", ".mask.idx"):
            assert filecmp.cmp(f"{a}_{split}{ext}", f"{b}_{split}{ext}", shallow=False)
        assert not filecmp.cmp(f"{a}_{split}.bin", f"{c}_{split}.bin", shallow=False)


@pytest.mark.parametrize("kwargs, message", [
    ({"num_pairs": 3, "num_queries": 4}, "--num-queries 4 is more than --num-pairs 3"),
    ({"num_pairs": 9, "key_vocab": 8}, "--key-vocab 8 is too small for --num-pairs 9 distinct keys"),
    ({"num_pairs": 4, "num_queries": 4, "example_len": 12}, "16 in all, more than --example-len 12"),
    ({"num_pairs": 2, "num_queries": 2, "gap": 9, "example_len": 16},
     "--gap 9 puts the pairs before the start of the example: with --example-len 16, --num-pairs 2 and "
     "--num-queries 2 the gap is at most 8"),
    ({"gap": -1}, "--gap must be an integer >= 0, got -1"),
    ({"value_vocab": 0}, "--value-vocab must be an integer >= 1, got 0"),
])
def test_mqar_errors(kwargs, message):
    with pytest.raises(TaskError) as e:
        MQARTask(**kwargs)
    assert message in str(e.value)


# ------------------------------------------------------------------------------------------- babifacts
@pytest.fixture(scope="module")
def corpus():
    return read_text(DEFAULT_TEXT)


@pytest.mark.parametrize("depth, depth_tokens, expected", [(0.25, None, 50), (None, 0, 0), (None, 200, 200)])
def test_babifacts_fact_at_depth_in_corpus_text(tmp_path, corpus, depth, depth_tokens, expected):
    H = 200
    task = BabiFactsTask(haystack_len=H, depth=depth, depth_tokens=depth_tokens)
    prefix = make(tmp_path, task, "facts", multiple=16, sizes={"train": 30, "valid": 5, "test": 10})
    tokz = load_tokenizer(prefix + "_test")
    assert read_metadata(prefix + "_test")["task"]["depth_tokens"] == expected
    d = expected
    places = set()
    for tok, mask in examples(prefix + "_test"):
        text = tokz.decode(tok[tok != 0])
        head, rest = text[:d], text[d:]
        assert rest.startswith("\n")
        fact, rest = rest[:rest.index(".\n") + 2], rest[rest.index(".\n") + 2:]
        name, place = fact.split()[0], fact.split()[-1][:-1]
        assert fact == f"\n{name} {fact[len(name) + 2:fact.index(' the ')]} the {place}.\n"
        assert name in NAMES and place in PLACES and fact[len(name) + 2:fact.index(" the ")] in MOVES
        tail, question = rest[:H - d], rest[H - d:]
        assert head + tail in corpus                # the text around the fact is the corpus's, contiguous
        assert question == f"\nWhere is {name}?\n{place}"
        answer = tokz.decode(tok[mask == 1])
        assert answer == place and text.endswith(answer) and mask.sum() == len(place)
        assert (mask[tok == 0] == 0).all()
        places.add(place)
    assert len(places) > 1


def test_babifacts_text_flag_and_determinism(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. " * 4)
    task = BabiFactsTask(haystack_len=40, depth=1.0, text=str(path))
    sizes = {"train": 20, "valid": 0, "test": 5}
    a, b = make(tmp_path, task, "a", seed=1, sizes=sizes), make(tmp_path, task, "b", seed=1, sizes=sizes)
    c = make(tmp_path, task, "c", seed=2, sizes=sizes)
    for split in ("train", "test"):
        for ext in (".bin", ".idx", ".mask.bin", ".mask.idx"):
            assert filecmp.cmp(f"{a}_{split}{ext}", f"{b}_{split}{ext}", shallow=False)
    assert not filecmp.cmp(f"{a}_train.bin", f"{c}_train.bin", shallow=False)
    meta = read_metadata(a + "_train")["task"]
    assert meta["text"] == str(path) and meta["text_chars"] == 180 and meta["depth_tokens"] == 40


@pytest.mark.parametrize("kwargs, message", [
    ({"haystack_len": 400}, "--haystack-len 400 is longer than the text --text"),
    ({"haystack_len": 50, "depth": 1.5}, "--depth must be a number in [0, 1]"),
    ({"haystack_len": 50, "depth": -0.1}, "--depth must be a number in [0, 1]"),
    ({"haystack_len": 50, "depth_tokens": 51},
     "--depth-tokens 51 lies outside the haystack: at most --haystack-len 50"),
    ({"haystack_len": 50, "depth": 0.5, "depth_tokens": 5},
     "give --depth (a fraction of the haystack) or --depth-tokens"),
    ({"haystack_len": 0}, "--haystack-len must be an integer >= 1, got 0"),
    ({"haystack_len": 10, "text": "/nonexistent/x.txt"}, "--text /nonexistent/x.txt: cannot read it"),
])
def test_babifacts_errors(tmp_path, kwargs, message):
    path = tmp_path / "t.txt"
    path.write_text("x" * 300)
    with pytest.raises(TaskError) as e:
        BabiFactsTask(**{"text": str(path), **kwargs})
    assert message in str(e.value)


# ------------------------------------------------------------------------------------------------- CLI
def test_cli_new_tasks(tmp_path, capsys):
    out = str(tmp_path / "m")
    assert main(["mqar", "--output-prefix", out, "--num-pairs", "4", "--num-queries", "2", "--key-vocab", "8",
                 "--value-vocab", "8", "--gap", "16", "--train-size", "10", "--valid-size", "0",
                 "--test-size", "3", "--format", "jsonl"]) == 0
    assert "test: 3 examples, 84 tokens, 6 scored" in capsys.readouterr().out
    out = str(tmp_path / "b")
    assert main(["babifacts", "--output-prefix", out, "--haystack-len", "64", "--depth-tokens", "10",
                 "--train-size", "4", "--valid-size", "0", "--test-size", "2"]) == 0
    assert "train: 4 examples" in capsys.readouterr().out
    err = str(tmp_path / "e")
    assert main(["mqar", "--output-prefix", err, "--num-pairs", "2", "--num-queries", "3"]) == 2
    assert "--num-queries 3 is more than --num-pairs 2" in capsys.readouterr().err
    assert main(["babifacts", "--output-prefix", err, "--haystack-len", "9999999"]) == 2
    assert "--haystack-len 9999999 is longer than the text" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["babifacts", "--output-prefix", err, "--depth", "0.5", "--depth-tokens", "3"])
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["babifacts", "--output-prefix", err, "--depth", "2"])
    assert e.value.code == 2 and "argument --depth: must be a number in [0, 1], got '2'" in capsys.readouterr().err
    assert not os.path.exists(err + "_train.bin")
