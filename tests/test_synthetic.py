"""Synthetic tasks: determinism, disjoint splits, exact answer masks, correct answers, padding, file formats."""
import filecmp
import json
import os
import re

import numpy as np
import pytest

from data_tools.indexed import IndexedDataset
from data_tools.metadata import read_metadata
from data_tools.streams import OrderedStream
from data_tools.synthetic import (CopyTask, EquationTask, RetrievalTask, ReverseTask, TaskError, generate, main)
from data_tools.tokenization import load_tokenizer

SIZES = {"train": 300, "valid": 40, "test": 60}


def examples(prefix):
    """(tokens, mask) rows of every example of a split, read back from the files."""
    ds, mds = IndexedDataset(prefix), IndexedDataset(prefix + ".mask")
    assert ds.num_documents == mds.num_documents
    return [(np.asarray(ds.document(d)), np.asarray(mds.document(d))) for d in range(ds.num_documents)]


def make(tmp_path, task, name, seed=0, multiple=1, jsonl=False, sizes=SIZES):
    prefix = str(tmp_path / name)
    generate(task, prefix, sizes, seed=seed, segment_multiple=multiple, jsonl=jsonl, progress=False)
    return prefix


@pytest.fixture(scope="module")
def copy_prefix(tmp_path_factory):
    return make(tmp_path_factory.mktemp("copy"), CopyTask(length=5, num_symbols=4), "copy", multiple=4,
                jsonl=True)


def test_deterministic_in_the_seed(tmp_path):
    task = RetrievalTask(num_pairs=3)
    a, b = make(tmp_path, task, "a", seed=5), make(tmp_path, task, "b", seed=5)
    c = make(tmp_path, task, "c", seed=6)
    for split in SIZES:
        for ext in (".bin", ".idx", ".mask.bin", ".mask.idx"):
            assert filecmp.cmp(f"{a}_{split}{ext}", f"{b}_{split}{ext}", shallow=False)
        assert not filecmp.cmp(f"{a}_{split}.bin", f"{c}_{split}.bin", shallow=False)
    # the evaluation splits are drawn first: a bigger train split leaves them unchanged
    d = make(tmp_path, task, "d", seed=5, sizes={**SIZES, "train": 500})
    assert filecmp.cmp(f"{a}_test.bin", f"{d}_test.bin", shallow=False)
    assert filecmp.cmp(f"{a}_valid.bin", f"{d}_valid.bin", shallow=False)


def test_splits_disjoint_and_deduplicated(copy_prefix):
    problems = {}
    for split, n in SIZES.items():
        rows = examples(f"{copy_prefix}_{split}")
        assert len(rows) == n
        problems[split] = {tok[:5].tobytes() for tok, _ in rows}
        assert len(problems[split]) == n  # no duplicate inside a split
    assert not problems["train"] & problems["valid"]
    assert not problems["train"] & problems["test"]
    assert not problems["valid"] & problems["test"]


def test_copy_answers_masks_and_padding(copy_prefix):
    L = 5
    meta = read_metadata(copy_prefix + "_train")
    assert meta["loss_mask"] == "copy_train.mask" and meta["task"]["padded_len"] == 16  # 3L+1 = 16
    for tok, mask in examples(copy_prefix + "_train"):
        x = tok[:L]
        assert ((2 <= x) & (x < 6)).all() and tok[L] == 1
        assert np.array_equal(tok[L + 1:3 * L + 1], np.concatenate([x, x]))
        assert np.array_equal(mask, np.r_[np.zeros(L + 1), np.ones(2 * L)].astype(np.uint8))


@pytest.mark.parametrize("multiple", [1, 8])
def test_reverse_answers_masks_and_padding(tmp_path, multiple):
    L = 6
    prefix = make(tmp_path, ReverseTask(length=L, num_symbols=3), "rev", multiple=multiple)
    padded = -(-(2 * L + 1) // multiple) * multiple
    for tok, mask in examples(prefix + "_valid"):
        assert tok.size == padded and tok.size % multiple == 0
        assert np.array_equal(tok[L + 1:2 * L + 1], tok[:L][::-1])
        assert (tok[2 * L + 1:] == 0).all()  # padding: pad token, never scored
        assert np.array_equal(mask, (np.arange(padded) >= L + 1) & (np.arange(padded) < 2 * L + 1))


def test_retrieval_value_belongs_to_the_queried_key(tmp_path):
    K = 5
    prefix = make(tmp_path, RetrievalTask(num_pairs=K), "ret")
    tok_ = load_tokenizer(prefix + "_test")
    for tok, mask in examples(prefix + "_test"):
        words = tok_.decode(tok).split()
        keys, values, query, sep, answer = words[0:2 * K:2], words[1:2 * K:2], words[2 * K], words[2 * K + 1], words[-1]
        assert len(set(keys)) == K and len(set(values)) == K and all(k.isalpha() for k in keys)
        assert sep == "<s>" and answer == values[keys.index(query)]
        assert mask.tolist() == [0] * (2 * K + 2) + [1]


def parse_poly(text):
    """Coefficients (a, b, c) of 'a*x^2+b*x+c=0' in the generator's notation."""
    assert text.endswith("=0"), text
    coef = {2: 0, 1: 0, 0: 0}
    for term in re.findall(r"[+-]?[^+-]+", text[:-2]):
        sign = -1 if term[0] == "-" else 1
        body = term.lstrip("+-")
        power = 2 if body.endswith("x^2") else 1 if body.endswith("x") else 0
        digits = body[: -{2: 3, 1: 1, 0: 0}[power] or None].rstrip("*") if power else body
        coef[power] += sign * (int(digits) if digits else 1)
    return coef[2], coef[1], coef[0]


@pytest.mark.parametrize("score", ["solution", "answer"])
def test_equation_roots_solve_the_equation(tmp_path, score):
    task = EquationTask(max_root=30, score=score)
    C = task.chunk_len
    prefix = make(tmp_path, task, "eq", sizes={"train": 60, "valid": 60, "test": 60})
    tokz = load_tokenizer(prefix + "_train")
    none = 0
    for tok, mask in examples(prefix + "_train"):
        chunks = [tokz.decode(t[t != 0]) for t in tok.reshape(5, C)]
        assert all(ch.endswith(";") for ch in chunks)
        eq, canon, disc, sol, ans = (ch[:-1] for ch in chunks)
        a, b, c = parse_poly(eq)
        assert parse_poly(canon) == (1, b // a, c // a) and b % a == 0 and c % a == 0
        d = b * b - 4 * a * c
        assert disc.startswith(f"D={abs(b // a)}^2-4*1*{c // a}={d // (a * a)}")
        roots = [int(r) for r in ans.split(",")] if ans else []
        if d < 0:
            assert roots == [] and sol == ""
            none += 1
        else:
            assert roots == sorted(set(roots)) and roots
            assert all(a * r * r + b * r + c == 0 for r in roots)
            assert len(roots) == (1 if d == 0 else 2)
            assert all(abs(r) < 30 for r in roots)
        scored = np.zeros_like(mask)
        for j in (range(1, 5) if score == "solution" else (4,)):
            scored[j * C:(j + 1) * C] = tok[j * C:(j + 1) * C] != 0
        assert np.array_equal(mask, scored)
    assert 0 < none < 60  # both kinds occur


def test_files_read_back_and_decode(copy_prefix):
    for split in SIZES:
        prefix = f"{copy_prefix}_{split}"
        meta = read_metadata(prefix)
        tokz = load_tokenizer(prefix)
        ds = IndexedDataset(prefix)
        assert meta["documents"] == ds.num_documents == SIZES[split] and meta["tokens"] == ds.num_tokens
        assert meta["pad_id"] == tokz.pad_id == 0 and meta["vocab_size"] == tokz.vocab_size == 6
        assert meta["task"]["scored_tokens"] == int(np.asarray(IndexedDataset(prefix + ".mask").tokens).sum())
        with open(prefix + ".jsonl") as f:
            records = [json.loads(line) for line in f]
        assert len(records) == SIZES[split]
        for rec, (tok, mask) in zip(records, examples(prefix)):
            assert tokz.decode(tok[tok != 0]) == rec["text"]
            assert tokz.encode(rec["text"]) == tok[tok != 0].tolist()
            assert tokz.decode(tok[mask == 1]) == rec["answer"]


def test_aligned_stream_over_padded_examples(copy_prefix):
    # examples of 16 tokens, segments of 4: each row reads whole examples, reset at each example start
    s = OrderedStream(copy_prefix + "_train", 0, 1, 4, 1, 4, align="document")
    assert s.segments_per_document == 4
    for t in range(8):
        mb = s.get(t)
        assert (mb.reset == (t % 4 == 0)).all() and mb.loss_mask.any() == (t % 4 != 0)


def test_cli_errors_leave_no_output(tmp_path, capsys):
    out = str(tmp_path / "new" / "dirs" / "x")  # folders that do not exist yet: removed again on failure
    assert main(["copy", "--output-prefix", out, "--length", "2", "--num-symbols", "3"]) == 2
    assert "allow only 9" in capsys.readouterr().err
    assert main(["equations", "--output-prefix", out, "--chunk-len", "12", "--train-size", "50",
                 "--valid-size", "5", "--test-size", "5"]) == 2
    assert "more than --chunk-len 12" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []  # nothing half-written, no folder left
    (tmp_path / "file").write_text("")
    assert main(["copy", "--output-prefix", str(tmp_path / "file" / "x"), "--train-size", "5"]) == 2
    assert f"{tmp_path / 'file'} is a file, not a folder" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["copy", "--segment-multiple", "0"], "argument --segment-multiple: must be an integer >= 1, got '0'"),
    (["copy", "--train-size", "-1"], "argument --train-size: must be an integer >= 0, got '-1'"),
    (["copy", "--seed", "-3"], "argument --seed: must be an integer >= 0, got '-3'"),
    (["copy", "--length", "0"], "argument --length: must be an integer >= 1, got '0'"),
    (["reverse", "--num-symbols", "63"], "argument --num-symbols: must be an integer in [1, 62], got '63'"),
    (["retrieval", "--num-pairs", "27"], "argument --num-pairs: must be an integer in [1, 26], got '27'"),
    (["equations", "--max-root", "0"], "argument --max-root: must be an integer >= 1, got '0'"),
    (["equations", "--max-scale", "x"], "argument --max-scale: must be an integer >= 1, got 'x'"),
    (["equations", "--no-root-fraction", "1.5"], "argument --no-root-fraction: must be a number in [0, 1], got '1.5'"),
    (["equations", "--no-root-fraction", "nan"], "argument --no-root-fraction: must be a number in [0, 1], got 'nan'"),
    (["equations", "--chunk-len", "-1"], "argument --chunk-len: must be an integer >= 0 (0 = longest possible)"),
])
def test_cli_numeric_options_are_checked(tmp_path, capsys, argv, message):
    """Every numeric option is checked against its meaning before anything is written: one line naming the
    flag, exit status 2."""
    with pytest.raises(SystemExit) as e:
        main(argv[:1] + ["--output-prefix", str(tmp_path / "x")] + argv[1:])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and message in err, err
    assert os.listdir(tmp_path) == []
    with pytest.raises(SystemExit) as e:
        main(["copy"])
    assert e.value.code == 2 and "--output-prefix" in capsys.readouterr().err


def test_cli_writes_every_split(tmp_path, capsys):
    out = str(tmp_path / "r")
    assert main(["retrieval", "--output-prefix", out, "--train-size", "20", "--valid-size", "0",
                 "--test-size", "7", "--format", "jsonl"]) == 0
    assert "train: 20 examples" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path)) == sorted(
        f"r_{s}{ext}" for s in ("train", "test")
        for ext in (".bin", ".idx", ".json", ".jsonl", ".mask.bin", ".mask.idx", ".vocab.json"))


def test_task_space_checks():
    with pytest.raises(TaskError, match="--length must be"):
        CopyTask(length=0)
    with pytest.raises(TaskError, match="--no-root-fraction"):
        EquationTask(no_root_fraction=1.5)
    assert EquationTask(max_root=100).chunk_len >= 36  # x=(-150-48)/2=-99;x=(-150+48)/2=-51; fits


def test_no_root_equations_have_negative_discriminant():
    # a small root range makes the boundary case b^2 = 4c (a double root, not "no root") likely
    task, rng = EquationTask(max_root=3, no_root_fraction=1.0), np.random.default_rng(0)
    for _ in range(500):
        eq, canon, disc, sol, ans = task.texts(rng)
        a, b, c = parse_poly(canon)
        assert b * b - 4 * a * c < 0 and sol == ans == "" and disc.endswith(f"={b * b - 4 * c}")
