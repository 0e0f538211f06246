"""preprocess.py end to end: every input kind and tokenizer, exact split cut points, metadata, worker
order, bounded streaming of huge documents, prompt/answer data with its answer mask, merge and summarize,
and a clear one-line error with no output left behind for every kind of bad input."""
import gzip
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, shared_path
from corpora import corpus, gpt2_files, gpt2_tokenizer_json, text as corpus_text
from data_tools import inputs
from data_tools.indexed import IndexedDataset, IndexedDatasetWriter
from data_tools.merge import main as merge_main
from data_tools.metadata import read_metadata, write_metadata
from data_tools.preprocess import copy_token_range, main, split_cuts
from data_tools.streams import OrderedStream
from data_tools.summarize import main as summarize_main
from data_tools.synthetic import main as synthetic_main
from data_tools.tokenization import GPT2Tokenizer, build_word_vocab, load_tokenizer

SCRIPT = os.path.join(ROOT, "data_tools", "preprocess.py")


def run(capsys, *argv):
    """Run the CLI in-process; return (exit code, stderr)."""
    try:
        rc = main([str(a) for a in argv] + ["--no-progress"])
    except SystemExit as e:  # a command-line error, from argparse
        rc = e.code
    return rc, capsys.readouterr().err


def docs_of(prefix):
    ds = IndexedDataset(str(prefix))
    return [np.asarray(ds.document(i)).tolist() for i in range(ds.num_documents)]


def write_jsonl(path, texts, key="text"):
    path.write_text("".join(json.dumps({key: t}) + "\n" for t in texts), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def gpt2_args():
    vocab, merges = gpt2_files()
    return ["--tokenizer", "gpt2", "--vocab-file", vocab, "--merge-file", merges]


@pytest.fixture(scope="module")
def gpt2(gpt2_args):
    return GPT2Tokenizer(gpt2_args[3], gpt2_args[5])


def shakespeare_docs(n=400):
    return corpus_text("tinyshakespeare/input.txt").split("\n\n")[:n]


# -------------------------------------------------------------------------------------------- outputs
def test_jsonl_gpt2_tokens_and_metadata(tmp_path, capsys, gpt2_args, gpt2):
    texts = shakespeare_docs() + ["", "naïve 🙂 <|endoftext|>"]
    src = write_jsonl(tmp_path / "corpus.jsonl", texts)
    rc, err = run(capsys, "--input", src, *gpt2_args, "--append-eod", "--output-prefix", tmp_path / "out" / "c")
    assert rc == 0, err
    assert docs_of(tmp_path / "out" / "c") == [gpt2.encode(t) + [50256] for t in texts]
    meta = read_metadata(str(tmp_path / "out" / "c"))
    assert meta["format"] == "MMIDIDX" and meta["dtype"] == "uint16" and meta["dtype_code"] == 8
    assert (meta["vocab_size"], meta["eod_id"], meta["documents"], meta["sequences"]) == (50257, 50256, 402, 402)
    assert meta["tokens"] == IndexedDataset(str(tmp_path / "out" / "c")).num_tokens
    assert meta["input"]["paths"] == [str(src)] and meta["input"]["bytes"] == [src.stat().st_size]
    assert meta["input"]["sha256"] == [hashlib.sha256(src.read_bytes()).hexdigest()]
    assert meta["tokenizer"] == {"type": "gpt2", "vocab": "c.vocab.json", "merges": "c.merges.txt"}
    tok = load_tokenizer(str(tmp_path / "out" / "c"))
    assert tok.decode(docs_of(tmp_path / "out" / "c")[-1][:-1]) == texts[-1]
    assert sorted(os.listdir(tmp_path / "out")) == ["c.bin", "c.idx", "c.json", "c.merges.txt", "c.vocab.json"]


def test_workers_keep_order_and_bytes(tmp_path, gpt2_args):
    """--workers 2 writes exactly the bytes --workers 1 writes (several blocks, gzip input)."""
    texts = corpus_text("tinyshakespeare/input.txt").split("\n\n") * 3  # ~3.4 MB: several 1 MiB blocks
    src = tmp_path / "c.jsonl.gz"
    with gzip.open(src, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    outs = []
    for w in (1, 2):
        out = tmp_path / f"w{w}"
        r = subprocess.run([sys.executable, SCRIPT, "--input", str(src), *gpt2_args, "--append-eod", "--workers",
                            str(w), "--output-prefix", str(out)], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert "docs/s" in r.stderr and "MB/s" in r.stderr  # the progress bar and the summary
        outs.append([(out.parent / (out.name + e)).read_bytes() for e in (".bin", ".idx")])
    assert outs[0] == outs[1]
    assert IndexedDataset(str(tmp_path / "w2")).num_documents == len(texts)
    assert read_metadata(str(tmp_path / "w2"))["input"]["sha256"] == [hashlib.sha256(src.read_bytes()).hexdigest()]


def test_no_torch_import(tmp_path):
    src = write_jsonl(tmp_path / "c.jsonl", ["hello world"])
    r = subprocess.run([sys.executable, "-X", "importtime", SCRIPT, "--input", str(src), "--tokenizer", "bytes",
                        "--output-prefix", str(tmp_path / "o"), "--no-progress"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    modules = {line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
    assert "numpy" in modules and not any(m == "torch" or m.startswith("torch.") for m in modules)


@pytest.mark.parametrize("workers", [1, 2])
def test_text_formats_and_globs(tmp_path, capsys, workers):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "b.txt").write_text("second file\n")
    (tmp_path / "in" / "a.txt").write_text("first file\nline two\n")
    rc, err = run(capsys, "--input", tmp_path / "in" / "*.txt", "--tokenizer", "bytes", "--workers", workers,
                  "--output-prefix", tmp_path / "t")
    assert rc == 0, err
    assert docs_of(tmp_path / "t") == [list(b"first file\nline two\n"), list(b"second file\n")]
    rc, err = run(capsys, "--input", tmp_path / "in" / "a.txt", tmp_path / "in" / "b.txt", "--input-format", "lines",
                  "--tokenizer", "bytes", "--output-prefix", tmp_path / "l")
    assert rc == 0, err
    assert docs_of(tmp_path / "l") == [list(b"first file"), list(b"line two"), list(b"second file")]


def test_wikitext_articles(tmp_path, capsys):
    raw = corpus_text("wikitext-2/test.txt")
    rc, err = run(capsys, "--input", corpus("wikitext-2/test.txt"), "--input-format", "wikitext",
                  "--tokenizer", "bytes", "--output-prefix", tmp_path / "w")
    assert rc == 0, err
    docs = [bytes(d).decode() for d in docs_of(tmp_path / "w")]
    assert "".join(docs) == raw and len(docs) == 62
    assert docs[0].startswith(" \n = Robert <unk> = \n")  # the blank line before the first title joins it
    assert all(d.lstrip(" \n").startswith("= ") and not d.lstrip(" \n").startswith("= =") for d in docs)
    assert inputs.split_articles(" = A = \n x \n = = S = = \n y \n = B = \n z\n") == \
        [" = A = \n x \n = = S = = \n y \n", " = B = \n z\n"]


def test_words_reproduce_published_counts(tmp_path, capsys):
    valid, test = corpus("wikitext-2/valid.txt"), corpus("wikitext-2/test.txt")
    rc, err = run(capsys, "--input", f"train={valid}", f"valid={valid}", f"test={test}", "--input-format", "wikitext",
                  "--tokenizer", "words", "--output-prefix", tmp_path / "wt2")
    assert rc == 0, err
    metas = {s: read_metadata(str(tmp_path / f"wt2_{s}")) for s in ("train", "valid", "test")}
    assert metas["valid"]["tokens"] == 217646 and metas["test"]["tokens"] == 245569
    assert {m["tokenizer"]["file"] for m in metas.values()} == {"wt2.vocab.json"}  # one shared tokenizer file
    assert metas["test"]["split"] == {"name": "test"} and metas["test"]["input"]["paths"] == [test]
    tok = load_tokenizer(str(tmp_path / "wt2_test"))
    ids = IndexedDataset(str(tmp_path / "wt2_test")).tokens
    assert (ids == tok.unk_id).sum() > 15218  # test words never seen in the train split became <unk> too
    assert not (tmp_path / "wt2.bin").exists()


def test_words_vocabulary_from_the_train_share_of_a_split(tmp_path, capsys):
    """With --split, the words vocabulary counts only the tokens before the first cut (one cut inside a
    document, inside a line)."""
    src = corpus("wikitext-2/valid.txt")
    rc, err = run(capsys, "--input", src, "--input-format", "wikitext", "--tokenizer", "words", "--split", "50,50",
                  "--workers", "2", "--output-prefix", tmp_path / "w")
    assert rc == 0, err
    stream = []
    for line in open(src, encoding="utf-8").read().split("\n")[:-1]:
        stream += line.split() + [None]
    cut = len(stream) // 2
    counts = {}
    for w in stream[:cut]:
        if w is not None:
            counts[w] = counts.get(w, 0) + 1
    assert load_tokenizer(str(tmp_path / "w_train")).symbols == build_word_vocab(counts).symbols
    assert read_metadata(str(tmp_path / "w_train"))["tokens"] == cut == 217646 // 2


def test_chars_split_like_nanogpt(tmp_path, capsys):
    src = corpus("tinyshakespeare/input.txt")
    rc, err = run(capsys, "--input", src, "--tokenizer", "chars", "--split", "90,10", "--output-prefix", tmp_path / "s")
    assert rc == 0, err
    text = open(src, encoding="utf-8").read()
    n = int(0.9 * len(text))
    tok = load_tokenizer(str(tmp_path / "s_train"))
    assert tok.vocab_size == 65
    for split, part in (("train", text[:n]), ("valid", text[n:])):
        ds = IndexedDataset(str(tmp_path / f"s_{split}"))
        assert tok.decode(ds.tokens) == part
    assert read_metadata(str(tmp_path / "s_valid"))["split"] == {"name": "valid", "weights": [90, 10],
                                                                   "token_range": [n, len(text)]}


def test_bytes_split_exact_cuts_and_straddling_documents(tmp_path, capsys):
    """enwik8-style: raw bytes, 90/5/5 at exact byte positions; JSON documents across a cut are cut in two."""
    data = np.random.default_rng(0).integers(0, 256, 10_000, dtype=np.uint8).tobytes()
    (tmp_path / "raw").write_bytes(data)
    rc, err = run(capsys, "--input", tmp_path / "raw", "--input-format", "bytes", "--tokenizer", "bytes",
                  "--split", "90,5,5", "--output-prefix", tmp_path / "e")
    assert rc == 0, err
    parts = [IndexedDataset(str(tmp_path / f"e_{s}")).tokens.tolist() for s in ("train", "valid", "test")]
    assert [len(p) for p in parts] == [9000, 500, 500] and bytes(sum(parts, [])) == data
    assert IndexedDataset(str(tmp_path / "e_train")).dtype == np.uint16

    texts = ["a" * 7, "b" * 5, "", "c" * 9, "d"]  # 22 bytes + 5 EOD = 27 tokens; cuts at 24 and 25
    rc, err = run(capsys, "--input", write_jsonl(tmp_path / "d.jsonl", texts), "--tokenizer", "bytes", "--append-eod",
                  "--split", "90,5,5", "--output-prefix", tmp_path / "j")
    assert rc == 0, err
    a, eod = ord("a"), 256
    stream = sum(([ord(t[0])] * len(t) + [eod] if t else [eod] for t in texts), [])
    assert split_cuts(27, [90, 5, 5]) == [("train", 0, 24), ("valid", 24, 25), ("test", 25, 27)]
    assert docs_of(tmp_path / "j_train") == [stream[0:8], stream[8:14], stream[14:15], stream[15:24]]
    assert stream[:8] == [a] * 7 + [eod]
    assert docs_of(tmp_path / "j_valid") == [stream[24:25]] and docs_of(tmp_path / "j_test") == [stream[25:27]]


def test_copy_token_range_matches_brute_force(tmp_path):
    """Any token range of a dataset with multi-sequence and empty documents (both conventions)."""
    rng = np.random.default_rng(3)
    prefix = str(tmp_path / "src")
    docs = []
    with IndexedDatasetWriter(prefix, np.int32) as w:
        for k in range(60):
            kind = k % 5
            if kind == 0:
                w.add_document([], [])
                docs.append([])
            elif kind == 1:
                w.add_documents([], [0])
                docs.append([])
            else:
                lens = rng.integers(1, 6, kind - 1)
                toks = rng.integers(0, 1000, int(lens.sum()))
                w.add_document(toks, lens)
                docs.append(toks.tolist())
    src = IndexedDataset(prefix)
    starts = np.cumsum([0] + [len(d) for d in docs])
    total = int(starts[-1])
    for cut in sorted(set(rng.integers(0, total + 1, 12).tolist()) | {0, total}):
        for lo, hi, last in ((0, cut, cut == total), (cut, total, True)):
            out = str(tmp_path / f"o{lo}_{hi}")
            with IndexedDatasetWriter(out, np.int32) as w:
                copy_token_range(src, w, lo, hi, last=last, max_tokens=7)
            expect = []
            for d, s in zip(docs, starts):
                e = s + len(d)
                if (e > s and e > lo and s < hi) or (e == s and (lo <= s < hi or (last and s == hi))):
                    expect.append(d[max(lo - s, 0):max(min(hi, e) - s, 0)])
            assert docs_of(out) == expect, (lo, hi)


def test_huge_document_is_streamed_in_pieces(tmp_path, capsys, monkeypatch, gpt2_args, gpt2):
    """A one-document file longer than a piece becomes several sequences of one document, cut only where
    the tokenizer allows: the tokens equal encoding the whole text."""
    monkeypatch.setattr(inputs, "PIECE_BYTES", 50_000)
    src = corpus("tinyshakespeare/input.txt")
    text = open(src, encoding="utf-8").read()
    for args, expect in ((gpt2_args, gpt2.encode(text) + [50256]), (["--tokenizer", "bytes"], list(text.encode()) + [256])):
        rc, err = run(capsys, "--input", src, *args, "--append-eod", "--output-prefix", tmp_path / "h")
        assert rc == 0, err
        ds = IndexedDataset(str(tmp_path / "h"))
        assert ds.num_documents == 1 and ds.sequence_count > 10 and ds.document(0).tolist() == expect


def test_train_bpe(tmp_path, capsys):
    text = "\n\n".join(shakespeare_docs(800))
    src = write_jsonl(tmp_path / "c.jsonl", text.split("\n\n"))
    rc, err = run(capsys, "--input", src, "--train-bpe", "300", "--append-eod", "--output-prefix", tmp_path / "b")
    assert rc == 0, err
    meta = read_metadata(str(tmp_path / "b"))
    assert meta["tokenizer"] == {"type": "gpt2", "file": "b.tokenizer.json"} and meta["vocab_size"] == 300
    tok = load_tokenizer(str(tmp_path / "b"))
    first = docs_of(tmp_path / "b")[0]
    assert first[-1] == tok.eod_id and tok.decode(first[:-1]) == text.split("\n\n")[0]


def test_hf_and_sentencepiece(tmp_path, capsys):
    spm = pytest.importorskip("sentencepiece")
    texts = shakespeare_docs(300)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_prefix=str(tmp_path / "sp"), vocab_size=400,
                                   model_type="bpe", byte_fallback=True, minloglevel=2)
    src = write_jsonl(tmp_path / "c.jsonl", texts + ["</s> is text here"])
    rc, err = run(capsys, "--input", src, "--tokenizer", "SentencePieceTokenizer", "--tokenizer-model",
                  tmp_path / "sp.model", "--append-eod", "--output-prefix", tmp_path / "o" / "sp")
    assert rc == 0, err
    ref = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    assert docs_of(tmp_path / "o" / "sp") == [ref.encode(t) + [ref.eos_id()] for t in texts + ["</s> is text here"]]
    assert (tmp_path / "o" / "sp.model").read_bytes() == (tmp_path / "sp.model").read_bytes()
    tj = gpt2_tokenizer_json()
    rc, err = run(capsys, "--input", src, "--tokenizer", "hf", "--tokenizer-file", tj, "--output-prefix", tmp_path / "hf")
    assert rc == 0, err
    assert read_metadata(str(tmp_path / "hf"))["eod_id"] == 50256
    assert load_tokenizer(str(tmp_path / "hf")).decode(docs_of(tmp_path / "hf")[1]) == texts[1]


def test_vocabulary_size_picks_dtype(tmp_path, capsys):
    words = " ".join(f"w{i}" for i in range(70_000)) + "\n"
    (tmp_path / "many.txt").write_text(words)
    rc, err = run(capsys, "--input", tmp_path / "many.txt", "--tokenizer", "words", "--output-prefix", tmp_path / "m")
    assert rc == 0, err
    assert read_metadata(str(tmp_path / "m"))["dtype"] == "int32" and IndexedDataset(str(tmp_path / "m")).dtype == np.int32
    rc, err = run(capsys, "--input", tmp_path / "many.txt", "--tokenizer", "words", "--dtype", "uint16",
                  "--output-prefix", tmp_path / "out" / "m")
    assert rc == 2 and "70,002 ids, more than uint16 holds" in err and not (tmp_path / "out").exists()


def test_skip_bad_lines(tmp_path, capsys):
    src = tmp_path / "c.jsonl"
    src.write_bytes(b'{"text": "good"}\n{"text": \n{"body": "x"}\n{"text": 5}\n\n{"text": "\xff"}\n'
                    b'{"text": "lone \\ud800"}\n{"text": "ok \\ud83d\\ude42"}\n')
    rc, err = run(capsys, "--input", src, "--tokenizer", "bytes", "--skip-bad-lines", "--output-prefix", tmp_path / "o")
    assert rc == 0, err
    assert docs_of(tmp_path / "o") == [list(b"good"), list("ok 🙂".encode())]
    assert read_metadata(str(tmp_path / "o"))["skipped_bad_lines"] == 5
    assert "skipped 5 bad lines (first: " + str(src) + ":2: invalid JSON" in err


# ---------------------------------------------------------------------------------- prompt/answer data
def qa_records(n=60):
    """Prompt/answer records from tinyshakespeare (the speaker's line, then the speech, often several
    lines), plus an empty answer, an empty record, an answer alone, and a word and a character that occur
    in an answer only (vocabularies built from the data must include them)."""
    recs = []
    for para in shakespeare_docs(n):
        speaker, _, speech = para.partition("\n")
        recs.append({"prompt": speaker + "\n", "answer": speech})
    return recs + [{"prompt": "Who speaks?", "answer": ""}, {"prompt": "", "answer": ""},
                   {"prompt": "", "answer": "only an answer"}, {"prompt": "Spell it:", "answer": " zyzzyva \u01c2"}]


def mask_of(prefix):
    return IndexedDataset(str(prefix) + ".mask")


def same_structure(a, b):
    return (np.array_equal(a.sequence_lengths, b.sequence_lengths)
            and np.array_equal(a.document_indices, b.document_indices))


def words_text(text):
    """What the words tokenizer gives back: the words of each line, single-spaced."""
    return "\n".join(" ".join(line.split()) for line in text.split("\n"))


@pytest.mark.parametrize("kind", ["words", "gpt2", "chars", "train-bpe"])
def test_answer_mask_marks_exactly_the_answer_tokens(tmp_path, capsys, gpt2_args, kind):
    """Each document is the prompt's tokens then the answer's; the mask is 1 exactly on the answer (and the
    EOD): the masked tokens decode to the answer, the others to the prompt."""
    recs = qa_records()
    src = tmp_path / "qa.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    tok_args = {"words": ["--tokenizer", "words"], "gpt2": gpt2_args + ["--append-eod"],
                "chars": ["--tokenizer", "chars", "--append-eod"], "train-bpe": ["--train-bpe", "300", "--append-eod"]}
    prefix = tmp_path / "out" / "qa"  # in a folder that does not exist yet
    rc, err = run(capsys, "--input", src, "--json-key", "prompt", "--answer-key", "answer", *tok_args[kind],
                  "--output-prefix", prefix)
    assert rc == 0, err
    tok = load_tokenizer(str(prefix))
    ds, mask = IndexedDataset(str(prefix)), mask_of(prefix)
    assert mask.dtype == np.uint8 and same_structure(ds, mask) and ds.num_documents == len(recs)
    eod = None if kind == "words" else tok.eod_id
    norm = words_text if kind == "words" else (lambda t: t)
    for d, r in enumerate(recs):
        toks, m = np.asarray(ds.document(d)), np.asarray(mask.document(d))
        assert (np.diff(m.astype(int)) >= 0).all()  # the prompt, then the scored part
        scored = toks[m == 1].tolist()
        if eod is not None:
            assert scored[-1] == eod
            scored = scored[:-1]
        assert tok.decode(scored) == norm(r["answer"]) and tok.decode(toks[m == 0].tolist()) == norm(r["prompt"])
        assert scored == tok.encode(r["answer"])  # the answer is encoded on its own
    if kind == "words":
        assert not (np.asarray(ds.tokens) == tok.unk_id).any()  # the vocabulary saw the answers' words
        assert mask.document(len(recs) - 4).size == ds.document(len(recs) - 4).size > 0  # empty answer:
        assert not np.asarray(mask.document(len(recs) - 4)).any()                           # nothing scored
        assert ds.document(len(recs) - 3).size == 0  # an empty record is an empty document
    if kind == "train-bpe":
        assert len(tok.encode(" the")) == 1  # a merge of the speeches (answers), never seen in a speaker's name
    meta = read_metadata(str(prefix))
    assert meta["loss_mask"] == "qa.mask" and meta["input"]["answer_key"] == "answer"
    assert meta["scored_tokens"] == int(np.count_nonzero(mask.tokens))


def test_answer_mask_with_token_split_and_summary(tmp_path, capsys, gpt2_args):
    """--split cuts the mask at the token positions of the tokens: the split masks concatenate to the
    unsplit mask, each with the documents of its split; summarize reports the scored share.  With words, the
    train-share vocabulary counts the answers' words too, up to the cut."""
    recs = qa_records()
    src = tmp_path / "qa.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    qa = ["--input", src, "--json-key", "prompt", "--answer-key", "answer"]
    rc, err = run(capsys, *qa, *gpt2_args, "--append-eod", "--output-prefix", tmp_path / "all")
    assert rc == 0, err
    rc, err = run(capsys, *qa, *gpt2_args, "--append-eod", "--split", "80,13,7", "--output-prefix", tmp_path / "s")
    assert rc == 0, err
    names = [tmp_path / f"s_{n}" for n in ("train", "valid", "test")]
    for p in names:
        assert same_structure(IndexedDataset(str(p)), mask_of(p))
        assert read_metadata(str(p))["loss_mask"] == p.name + ".mask"
    whole, whole_mask = IndexedDataset(str(tmp_path / "all")), mask_of(tmp_path / "all")
    assert np.concatenate([IndexedDataset(str(p)).tokens for p in names]).tolist() == whole.tokens.tolist()
    assert np.concatenate([mask_of(p).tokens for p in names]).tolist() == whole_mask.tokens.tolist()
    assert sorted(os.listdir(tmp_path)) == sorted(["qa.jsonl", "all.bin", "all.idx", "all.json", "all.mask.bin",
                                                   "all.mask.idx", "all.vocab.json", "all.merges.txt",
                                                   "s.vocab.json", "s.merges.txt"]
                                                  + [p.name + e for p in names for e in
                                                     (".bin", ".idx", ".json", ".mask.bin", ".mask.idx")])
    scored = int(np.count_nonzero(whole_mask.tokens))
    assert sum(read_metadata(str(p))["scored_tokens"] for p in names) == scored
    assert summarize_main([str(tmp_path / "all")]) == 0
    out = capsys.readouterr().out
    assert f"loss mask   all.mask: {scored:,} of {whole.num_tokens:,} tokens scored" in out and "all.mask.bin" in out
    meta = read_metadata(str(tmp_path / "all"))
    write_metadata(str(tmp_path / "all"), dict(meta, loss_mask="s_valid.mask"))  # a mask of other documents
    assert summarize_main([str(tmp_path / "all")]) == 0
    assert "warning     loss mask s_valid.mask: " in capsys.readouterr().out

    rc, err = run(capsys, *qa, "--tokenizer", "words", "--split", "45,55", "--output-prefix", tmp_path / "w")
    assert rc == 0, err
    stream, source = [], []  # every token (a word, or None for a newline's <eos>) and the text it comes from
    for d, r in enumerate(recs):
        for part in ("prompt", "answer"):
            *lines, tail = r[part].split("\n")
            for line in lines:
                stream += line.split() + [None]
            stream += tail.split()
            source += [(d, part)] * (len(stream) - len(source))
    cut = len(stream) * 45 // 100
    assert source[cut - 1] == source[cut] and source[cut][1] == "answer"  # the cut falls inside an answer
    counts = {}
    for w in stream[:cut]:
        if w is not None:
            counts[w] = counts.get(w, 0) + 1
    assert load_tokenizer(str(tmp_path / "w_train")).symbols == build_word_vocab(counts).symbols


def test_answer_mask_workers_write_the_same_bytes(tmp_path, monkeypatch, capsys, gpt2_args):
    monkeypatch.setattr(inputs, "BLOCK_BYTES", 4096)  # many blocks
    recs = qa_records(400)
    src = tmp_path / "qa.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    outs = []
    for w in (1, 2):
        rc, err = run(capsys, "--input", src, "--json-key", "prompt", "--answer-key", "answer", *gpt2_args,
                      "--append-eod", "--workers", w, "--output-prefix", tmp_path / f"w{w}")
        assert rc == 0, err
        outs.append([(tmp_path / f"w{w}{e}").read_bytes() for e in (".bin", ".idx", ".mask.bin", ".mask.idx")])
    assert outs[0] == outs[1] and mask_of(tmp_path / "w2").num_documents == len(recs)


def test_ordered_stream_picks_up_the_answer_mask(tmp_path, capsys):
    recs = qa_records()
    src = tmp_path / "qa.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    rc, err = run(capsys, "--input", src, "--json-key", "prompt", "--answer-key", "answer", "--tokenizer", "bytes",
                  "--append-eod", "--output-prefix", tmp_path / "qa")
    assert rc == 0, err
    mask = np.asarray(mask_of(tmp_path / "qa").tokens)
    stream = OrderedStream(str(tmp_path / "qa"), micro_batch=2, grad_accum=2, seq_len=64)
    for step in (0, 3):
        for slot in (0, 1):
            b = stream.get(step, slot)
            for row in range(2):
                at = int(stream.begin[stream.stripe(slot, row)]) + step * 64 + 1  # the row's first target
                assert b.loss_mask[row].tolist() == mask[at:at + 64].astype(np.float32).tolist()
    assert 0 < stream.get(0).loss_mask.sum() < stream.get(0).loss_mask.size


def test_synthetic_jsonl_round_trip(tmp_path, capsys):
    """The synthetic task's JSONL (problem, answer), preprocessed with the words tokenizer from named split
    files: every document's scored tokens decode to its answer, as many as the task scores."""
    syn = str(tmp_path / "syn" / "copy")
    assert synthetic_main(["copy", "--output-prefix", syn, "--length", "5", "--num-symbols", "4", "--train-size",
                           "120", "--valid-size", "20", "--test-size", "20", "--format", "jsonl"]) == 0
    capsys.readouterr()
    rc, err = run(capsys, "--input", *(f"{s}={syn}_{s}.jsonl" for s in ("train", "valid", "test")),
                  "--json-key", "problem", "--answer-key", "answer", "--tokenizer", "words", "--min-count", "1",
                  "--output-prefix", tmp_path / "c")
    assert rc == 0, err
    for split in ("train", "valid", "test"):
        prefix = str(tmp_path / f"c_{split}")
        with open(f"{syn}_{split}.jsonl") as f:
            recs = [json.loads(line) for line in f]
        tok, ds, mask = load_tokenizer(prefix), IndexedDataset(prefix), mask_of(prefix)
        assert ds.num_documents == len(recs) and same_structure(ds, mask)
        for d, r in enumerate(recs):
            toks, m = np.asarray(ds.document(d)), np.asarray(mask.document(d)).astype(bool)
            assert tok.decode(toks[m].tolist()) == r["answer"] and tok.decode(toks[~m].tolist()) == r["problem"]
        assert read_metadata(prefix)["scored_tokens"] == read_metadata(f"{syn}_{split}")["task"]["scored_tokens"]


def test_answer_skip_bad_lines(tmp_path, capsys):
    src = tmp_path / "qa.jsonl"
    src.write_bytes(b'{"text": "q1", "answer": "a1"}\n{"text": "q2"}\n{"text": "q3", "answer": 3}\n'
                    b'{"text": "q4", "answer": "\\udc00"}\n{"text": "q5", "answer": ""}\n')
    rc, err = run(capsys, "--input", src, "--answer-key", "answer", "--tokenizer", "bytes", "--skip-bad-lines",
                  "--output-prefix", tmp_path / "o")
    assert rc == 0, err
    assert docs_of(tmp_path / "o") == [list(b"q1a1"), list(b"q5")]
    assert docs_of(str(tmp_path / "o") + ".mask") == [[0, 0, 1, 1], [0, 0]]
    assert read_metadata(str(tmp_path / "o"))["skipped_bad_lines"] == 3
    assert f"skipped 3 bad lines (first: {src}:2: no key 'answer' (keys: text; choose one with --answer-key))" in err


# ----------------------------------------------------------------------------------------- bad input
def _word_level(d):
    """A tokenizer.json with no end-of-text token."""
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({"fine": 0, "ok": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(d / "wl.json"))
    return d / "wl.json"


def _bad_inputs(tmp_path, gpt2_args):
    d = tmp_path / "in"
    d.mkdir()
    (d / "bad.jsonl").write_bytes(b'{"text": "a"}\n' * 3 + b'{"text": "b",}\n')
    (d / "nokey.jsonl").write_bytes(b'{"text": "a"}\n{"body": "b"}\n')
    (d / "latin1.txt").write_bytes(b"line one\ncaf\xe9\n")
    (d / "latin1.jsonl").write_bytes(b'{"text": "a"}\n{"text": "caf\xe9"}\n')
    (d / "empty.jsonl").write_bytes(b"")
    (d / "surrogate.jsonl").write_bytes(b'{"text": "bad \\ud800"}\n')
    (d / "ok.txt").write_text("fine\n")
    (d / "qa.jsonl").write_bytes(b'{"text": "q", "answer": "a"}\n{"text": "q", "reply": "a"}\n')
    (d / "qa_list.jsonl").write_bytes(b'{"text": "q", "answer": ["a"]}\n')
    vocab = gpt2_args[3]
    return {
        "missing file": (["--input", d / "nope.jsonl", "--tokenizer", "bytes"], "nope.jsonl: no such file"),
        "no glob match": (["--input", d / "*.parquet", "--tokenizer", "bytes"], "no file matches"),
        "bad json line": (["--input", d / "bad.jsonl", "--tokenizer", "bytes"], "bad.jsonl:4: invalid JSON"),
        "missing key": (["--input", d / "nokey.jsonl", "--tokenizer", "bytes"], "nokey.jsonl:2: no key 'text' (keys: body"),
        "undecodable text": (["--input", d / "latin1.txt", "--tokenizer", "bytes"],
                             "latin1.txt:2: invalid UTF-8 at byte offset 12"),
        "undecodable json": (["--input", d / "latin1.jsonl", "--tokenizer", "bytes"],
                             "latin1.jsonl:2: invalid UTF-8 (invalid continuation byte) at byte offset 27"),
        "empty input": (["--input", d / "empty.jsonl", "--tokenizer", "bytes"], "no tokens in the input"),
        "lone surrogate": (["--input", d / "surrogate.jsonl", "--tokenizer", "chars"],
                           "surrogate.jsonl:1: 'text' holds a lone surrogate (\\ud800 at character 4)"),
        "unknown tokenizer": (["--input", d / "ok.txt", "--tokenizer", "bpe3000"], "--tokenizer bpe3000: unknown"),
        "no tokenizer": (["--input", d / "ok.txt"], "--tokenizer is required"),
        "missing merges": (["--input", d / "ok.txt", "--tokenizer", "gpt2", "--vocab-file", vocab, "--merge-file",
                            d / "merges.txt"], "--merge-file " + str(d / "merges.txt") + ": no such file"),
        "gpt2 without files": (["--input", d / "ok.txt", "--tokenizer", "gpt2"], "needs --vocab-file and --merge-file"),
        "split and named": (["--input", f"train={d / 'ok.txt'}", "--tokenizer", "bytes", "--split", "9,1"],
                            "--split cuts one input stream"),
        "bad split": (["--input", d / "ok.txt", "--tokenizer", "bytes", "--split", "a,b"],
                      "argument --split: expected comma-separated integers such as 90,5,5, got 'a,b'"),
        "empty split": (["--input", d / "ok.txt", "--tokenizer", "bytes", "--split", "98,1,1"],
                        "split 'valid' would be empty"),
        "words without train": (["--input", f"valid={d / 'ok.txt'}", "--tokenizer", "words"], "train split"),
        "raw bytes need bytes": (["--input", d / "ok.txt", "--input-format", "bytes", "--tokenizer", "chars"],
                                 "needs --tokenizer bytes"),
        "not a tokenizer.json": (["--input", d / "ok.txt", "--tokenizer", "hf", "--tokenizer-file",
                                  vocab], "vocab.json: not a Hugging Face tokenizer.json"),
        "eod without one": (["--input", d / "ok.txt", "--tokenizer", "hf", "--tokenizer-file", _word_level(d),
                             "--append-eod"], "--append-eod: the tokenizer (hf tokenizer.json (3 ids, backend "
                                              "reference)) has no EOD token (name one with --eod-token)"),
        "answer key on text": (["--input", d / "qa.jsonl", d / "ok.txt", "--answer-key", "answer", "--tokenizer",
                                "bytes"], f"--answer-key answer reads prompt/answer records from JSON lines, but "
                                          f"{d / 'ok.txt'} is read as text"),
        "missing answer": (["--input", d / "qa.jsonl", "--answer-key", "answer", "--tokenizer", "chars"],
                           "qa.jsonl:2: no key 'answer' (keys: text, reply; choose one with --answer-key)"),
        "answer not a string": (["--input", d / "qa_list.jsonl", "--answer-key", "answer", "--tokenizer", "bytes"],
                                "qa_list.jsonl:1: 'answer' is a list, expected a string"),
        "answer key is the prompt key": (["--input", d / "qa.jsonl", "--answer-key", "text", "--tokenizer", "bytes"],
                                         "--answer-key text: the same key as --json-key"),
        "output under a file": (["--input", d / "ok.txt", "--tokenizer", "bytes", "--output-prefix",
                                 d / "ok.txt" / "x"], f"--output-prefix {d / 'ok.txt' / 'x'}: {d / 'ok.txt'} is a file"),
    }


@pytest.mark.parametrize("case", ["missing file", "no glob match", "bad json line", "missing key", "undecodable text",
                                  "undecodable json", "empty input", "lone surrogate", "unknown tokenizer",
                                  "no tokenizer",
                                  "missing merges", "gpt2 without files", "split and named", "bad split",
                                  "empty split", "words without train", "raw bytes need bytes", "not a tokenizer.json",
                                  "eod without one", "answer key on text", "missing answer", "answer not a string",
                                  "answer key is the prompt key", "output under a file"])
def test_bad_input_fails_cleanly(tmp_path, capsys, gpt2_args, case):
    """One line naming the file / line / flag, exit status 2, and nothing left: not even the folders created
    for the output (three levels here)."""
    argv, words = _bad_inputs(tmp_path, gpt2_args)[case]
    out = tmp_path / "out"
    rc, err = run(capsys, "--output-prefix", out / "a" / "b" / "x", *argv)
    assert rc == 2, err
    assert err.count("\n") == 1 and err.startswith("preprocess.py: error: ") and words in err, err
    assert not out.exists()


def test_bad_line_after_many_blocks_leaves_nothing(tmp_path, monkeypatch):
    """A failure deep into the input, with worker processes and part of the output already written."""
    src = tmp_path / "c.jsonl"
    good = "".join(json.dumps({"text": t}) + "\n" for t in shakespeare_docs(10_000))
    src.write_text(good * 3 + '{"text": oops}\n')
    out = tmp_path / "out"
    out.mkdir()
    r = subprocess.run([sys.executable, SCRIPT, "--input", str(src), "--tokenizer", "bytes", "--workers", "2",
                        "--output-prefix", str(out / "x")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("preprocess.py: error: ") and f"c.jsonl:{3 * good.count(chr(10)) + 1}: invalid JSON" in last
    assert "Traceback" not in r.stderr and os.listdir(out) == []


def test_argparse_errors_are_one_line(tmp_path):
    r = subprocess.run([sys.executable, SCRIPT, "--input", "x"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--output-prefix" in r.stderr
    r = subprocess.run([sys.executable, SCRIPT, "--help"], capture_output=True, text=True, timeout=60)
    options = [line.split()[0] for line in r.stdout.splitlines() if line.startswith("  --") and "help" not in line]
    text = " ".join(r.stdout.split())
    assert len(options) > 15 and text.count("(default:") + text.count("(required, no default)") >= len(options)


@pytest.mark.parametrize("argv, message", [
    (["--workers", "0"], "argument --workers: must be an integer >= 1, got '0'"),
    (["--workers", "two"], "argument --workers: must be an integer >= 1, got 'two'"),
    (["--min-count", "0"], "argument --min-count: must be an integer >= 1, got '0'"),
    (["--max-vocab", "1"], "argument --max-vocab: must be an integer >= 2 (<eos> and <unk> included), got '1'"),
    (["--train-bpe", "256"], "argument --train-bpe: must be an integer >= 257 (256 bytes + <|endoftext|>), got '256'"),
    (["--bpe-min-frequency", "-1"], "argument --bpe-min-frequency: must be an integer >= 1, got '-1'"),
    (["--split", "90,-5,15"], "argument --split: give 1 to 3 non-negative weights"),
    (["--split", "0,0"], "argument --split: give 1 to 3 non-negative weights"),
    (["--split", "8,1,1,0"], "argument --split: give 1 to 3 non-negative weights"),
])
def test_numeric_options_are_checked(tmp_path, capsys, argv, message):
    """Every numeric option is checked against its meaning before any work: one line naming the flag."""
    (tmp_path / "in.txt").write_text("a b\n")
    rc, err = run(capsys, "--input", tmp_path / "in.txt", "--tokenizer", "words", *argv,
                  "--output-prefix", tmp_path / "out" / "x")
    assert rc == 2 and err.count("\n") == 1 and err.startswith("preprocess.py: error: ") and message in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("layout", ["plain", "split", "answers", "tokenizer file", "metadata"])
def test_output_never_overwrites_an_input(tmp_path, capsys, gpt2_args, layout):
    """An --output-prefix whose outputs would include an input file is refused before anything is written,
    naming both; the input is untouched."""
    d = tmp_path
    victim = {"plain": d / "d.bin", "split": d / "d_valid.idx", "answers": d / "d.mask.bin",
              "tokenizer file": d / "d.vocab.json", "metadata": d / "d.json"}[layout]
    if layout == "tokenizer file":
        victim.write_bytes(open(gpt2_args[3], "rb").read())
        argv = ["--input", write_jsonl(d / "c.jsonl", ["hello"]), "--tokenizer", "gpt2", "--vocab-file", victim,
                "--merge-file", gpt2_args[5]]
        flag = "--vocab-file"
    else:
        victim.write_text(json.dumps({"text": "q", "answer": "a"}) + "\n")
        argv = ["--input", victim, "--input-format", "jsonl", "--tokenizer", "bytes"]
        argv += {"split": ["--split", "8,1,1"], "answers": ["--answer-key", "answer"]}.get(layout, [])
        flag = "--input"
    before = sorted(os.listdir(d)), victim.read_bytes()
    rc, err = run(capsys, *argv, "--output-prefix", d / "d")
    assert rc == 2 and err.count("\n") == 1, err
    assert f"--output-prefix {d / 'd'} writes {victim}, which is the input {flag} {victim}" in err, err
    assert (sorted(os.listdir(d)), victim.read_bytes()) == before


@pytest.mark.parametrize("fmt", ["lines", "text", "wikitext", "jsonl"])
def test_byte_order_mark_is_not_text(tmp_path, capsys, fmt):
    """A UTF-8 BOM starting a file is dropped for every text format: the first word gets the id it gets
    elsewhere, bytes start with the text; byte offsets in errors are still those of the file."""
    body = {"jsonl": '{"text": "Hello world"}\n{"text": "Hello again"}\n',
            "wikitext": " = Hello = \n Hello world \n"}.get(fmt, "Hello world\nHello again\n")
    src = tmp_path / "bom.txt"
    src.write_bytes(b"\xef\xbb\xbf" + body.encode())
    rc, err = run(capsys, "--input", src, "--input-format", fmt, "--tokenizer", "words", "--output-prefix",
                  tmp_path / "w")
    assert rc == 0, err
    symbols = load_tokenizer(str(tmp_path / "w")).symbols
    assert "Hello" in symbols and not any("\ufeff" in w for w in symbols), symbols
    rc, err = run(capsys, "--input", src, "--input-format", fmt, "--tokenizer", "bytes", "--output-prefix",
                  tmp_path / "b")
    assert rc == 0, err
    assert bytes(docs_of(tmp_path / "b")[0][:5]) == (b" = He" if fmt == "wikitext" else b"Hello")
    rc, err = run(capsys, "--input", src, "--input-format", "bytes", "--tokenizer", "bytes", "--output-prefix",
                  tmp_path / "raw")
    assert rc == 0 and docs_of(tmp_path / "raw")[0][:3] == [0xEF, 0xBB, 0xBF]  # raw bytes stay as stored
    if fmt in ("text", "lines"):
        (tmp_path / "bad.txt").write_bytes(b"\xef\xbb\xbfab\ncd\xff\n")
        rc, err = run(capsys, "--input", tmp_path / "bad.txt", "--input-format", fmt, "--tokenizer", "bytes",
                      "--output-prefix", tmp_path / "x")
        assert rc == 2 and "bad.txt:2: invalid UTF-8" in err and "at byte offset 8" in err, err


def test_compressed_inputs_read_as_stored(tmp_path, capsys):
    """.xz (the shipped corpus itself), .gz and .bz2 inputs give the tokens of the plain file; the metadata
    keeps the checksum of the file as stored."""
    import bz2
    shipped = os.path.join(ROOT, "corpora", "tinyshakespeare", "input.txt.xz")
    plain = corpus("tinyshakespeare/input.txt")
    raw = open(plain, "rb").read()
    (tmp_path / "c.txt.gz").write_bytes(gzip.compress(raw))
    (tmp_path / "c.txt.bz2").write_bytes(bz2.compress(raw))
    outs = []
    for k, src in enumerate([plain, shipped, tmp_path / "c.txt.gz", tmp_path / "c.txt.bz2"]):
        rc, err = run(capsys, "--input", src, "--tokenizer", "chars", "--split", "90,10", "--output-prefix",
                      tmp_path / f"o{k}" / "s")
        assert rc == 0, err
        outs.append([(tmp_path / f"o{k}" / f"s_{x}").read_bytes() for x in ("train.bin", "valid.bin", "train.idx")])
        meta = read_metadata(str(tmp_path / f"o{k}" / "s_valid"))
        assert meta["input"]["sha256"] == [hashlib.sha256(open(src, "rb").read()).hexdigest()]
        assert meta["split"]["token_range"] == [1003854, 1115394]  # nanoGPT's int(0.9 * n)
    assert all(o == outs[0] for o in outs[1:])


def _processes_mentioning(text):
    found = []
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    found.append(pid)
        except OSError:
            pass
    return found


def test_interrupt_with_workers_ends_promptly_and_leaves_nothing(tmp_path):
    """Ctrl-C (SIGINT to the process group, as a terminal sends it) at several moments of a run with worker
    processes: every time the command exits 130 within seconds, with one line and no traceback, leaving no
    output, no temporary file, no folder it created and no worker process."""
    import random
    import signal
    import time
    big = tmp_path / "big.txt"
    with open(big, "w") as f:
        f.write(corpus_text("tinyshakespeare/input.txt") * 20)  # 22 MB: several seconds with the words tokenizer
    rng = random.Random(0)
    interrupted = 0
    for attempt in range(6):
        out = tmp_path / f"run{attempt}"
        p = subprocess.Popen([sys.executable, SCRIPT, "--input", str(big), "--tokenizer", "words", "--split", "90,5,5",
                              "--workers", "2", "--output-prefix", str(out / "new" / "d")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        deadline = time.monotonic() + 60
        while not (out / "new").exists() and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)  # the job has started: its output folder exists
        time.sleep(rng.random() * 2.0)
        os.killpg(p.pid, signal.SIGINT)
        sent = time.monotonic()
        try:
            _, err = p.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
            pytest.fail(f"attempt {attempt}: still running 20 s after SIGINT")
        took = time.monotonic() - sent
        assert "Traceback" not in err, err
        assert not _processes_mentioning(str(out)), "worker processes left"
        if p.returncode == 0:  # finished before the signal: complete output, nothing more to check
            continue
        assert not out.exists() or os.listdir(out) == [], os.listdir(out)
        interrupted += 1
        assert p.returncode == 130 and took < 10, (attempt, p.returncode, took, err)
        assert err.strip().splitlines()[-1] == "preprocess.py: interrupted; no output written", err
    assert interrupted >= 4


def test_progress_off_a_terminal_is_periodic_lines():
    """Off a terminal the progress is a line every interval with done/total, rate and ETA, never a redrawn
    bar; on a terminal it is tqdm's bar."""
    import io
    from data_tools.progress import Progress
    buf = io.StringIO()
    bar = Progress("prog", "encoding", 4e6, "B", interval=0.0, stream=buf, tty=False,
                   postfix=lambda: "7 docs/s")
    for _ in range(4):
        bar.update(1e6)
    bar.close()
    lines = buf.getvalue().splitlines()
    assert len(lines) == 4 and "\r" not in buf.getvalue()
    assert lines[1].startswith("prog: encoding: 2.0 of 4.0 MB (50%), ") and " MB/s, 7 docs/s | elapsed 0:00:00" in lines[1]
    assert "ETA" in lines[1]
    quiet = io.StringIO()
    with Progress("prog", "encoding", 10, "examples", interval=3600, stream=quiet, tty=False) as bar:
        bar.update(10)
    assert quiet.getvalue() == ""  # shorter than the interval: no line at all
    tty = io.StringIO()
    with Progress("prog", "encoding", 10, "examples", stream=tty, tty=True) as bar:
        bar.update(10)
    assert "10/10" in tty.getvalue()


def test_progress_of_the_command_off_a_terminal_has_no_bar(tmp_path):
    src = write_jsonl(tmp_path / "c.jsonl", shakespeare_docs(200))
    r = subprocess.run([sys.executable, SCRIPT, "--input", str(src), "--tokenizer", "bytes", "--workers", "2",
                        "--output-prefix", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stderr and "%|" not in r.stderr
    assert all(line.startswith("preprocess.py: ") for line in r.stderr.splitlines()), r.stderr


# ------------------------------------------------------------------------------------ merge, summarize
def test_merge_and_summarize(tmp_path, capsys, gpt2_args):
    texts = shakespeare_docs(60)
    for k in (0, 1):
        write_jsonl(tmp_path / f"p{k}.jsonl", texts[30 * k:30 * (k + 1)])
        rc, err = run(capsys, "--input", tmp_path / f"p{k}.jsonl", *gpt2_args, "--append-eod",
                      "--output-prefix", tmp_path / "shards" / f"s{k}")
        assert rc == 0, err
    assert merge_main(["--input", str(tmp_path / "shards"), "--output-prefix", str(tmp_path / "all")]) == 0
    assert docs_of(tmp_path / "all") == docs_of(tmp_path / "shards" / "s0") + docs_of(tmp_path / "shards" / "s1")
    meta = read_metadata(str(tmp_path / "all"))
    assert meta["documents"] == 60 and meta["producer"] == "merge" and len(meta["input"]["sha256"]) == 2
    assert load_tokenizer(str(tmp_path / "all")).eod_id == 50256

    rc, err = run(capsys, "--input", tmp_path / "p0.jsonl", "--tokenizer", "bytes", "--output-prefix", tmp_path / "b")
    capsys.readouterr()
    assert merge_main(["--input", str(tmp_path / "all"), str(tmp_path / "b"), "--output-prefix", str(tmp_path / "o" / "x")]) == 2
    assert "tokenizer differs" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() or not os.listdir(tmp_path / "o")
    with IndexedDatasetWriter(str(tmp_path / "i32"), np.int32) as w:
        w.add_document([1, 2])
    assert merge_main(["--input", str(tmp_path / "all"), str(tmp_path / "i32"), "--output-prefix", str(tmp_path / "y")]) == 2
    assert "dtype int32 differs" in capsys.readouterr().err and not (tmp_path / "y.bin").exists()

    assert summarize_main([str(tmp_path / "all"), "--tokens", "12"]) == 0
    out = capsys.readouterr().out
    for field in ("all.bin", "all.idx", "all.json", "uint16 (code 8)", "gpt2 byte-level BPE", "50,257", "EOD id      50256",
                  "documents   60", "sequences   60", "doc length  min", "first 12 tokens", "decoded: 'First Citizen"):
        assert field in out, field


def test_summarize_megatron_sample_without_json(capsys):
    why = ("a corpus written by Megatron-DeepSpeed's preprocess_data.py from OpenWebText pages, whose licence is "
           "not stated, so it is not shipped")
    prefix = shared_path("megatron-sample", "meg-gpt2-openwebtext_text_document.idx", why=why)[:-4]
    assert summarize_main([prefix, "--vocab-file", shared_path("megatron-sample", "gpt2-tiny-vocab.json", why=why),
                           "--merge-file", shared_path("megatron-sample", "gpt2-tiny-merges.txt", why=why)]) == 0
    out = capsys.readouterr().out
    assert "1,361,845" in out and "EOD id      4999" in out and 'decoded: "A magazine supplement' in out
    assert summarize_main([prefix]) == 0
    out = capsys.readouterr().out
    assert "none (ids only)" in out and "first 40 tokens: [32, 2153" in out


def test_merge_and_summarize_bad_inputs_fail_cleanly(tmp_path, capsys):
    """Missing, truncated or malformed datasets, metadata and tokenizer specs, and an output that would
    replace an input: one line naming the file, exit status 2, nothing written, no folder left."""
    src = write_jsonl(tmp_path / "c.jsonl", ["hello world", "again"])
    rc, err = run(capsys, "--input", src, "--tokenizer", "chars", "--output-prefix", tmp_path / "ok")
    assert rc == 0, err
    for name, vocab in (("dictvocab", '{"a": 0}'), ("dupvocab", '["a", "a"]')):
        rc, err = run(capsys, "--input", src, "--tokenizer", "chars", "--output-prefix", tmp_path / name)
        assert rc == 0, err
        (tmp_path / (name + ".vocab.json")).write_text(vocab)
    for ext in (".bin", ".idx", ".json", ".vocab.json"):
        (tmp_path / ("cut" + ext)).write_bytes((tmp_path / ("ok" + ext)).read_bytes())
    (tmp_path / "cut.idx").write_bytes((tmp_path / "ok.idx").read_bytes()[:20])
    for name, meta in (("list", "[]"), ("badspec", '{"tokenizer": "chars"}'), ("nojson", "{oops")):
        for ext in (".bin", ".idx"):
            (tmp_path / (name + ext)).write_bytes((tmp_path / ("ok" + ext)).read_bytes())
        (tmp_path / (name + ".json")).write_text(meta)
    cases = [
        (["missing"], "missing.idx: no such file"),
        (["cut"], "cut.idx: truncated index"),
        (["list"], "list.json: expected a JSON object"),
        (["badspec"], "tokenizer spec 'chars': expected a JSON object"),
        (["nojson"], "nojson.json:1: invalid JSON"),
        (["dictvocab"], "dictvocab.vocab.json: not a vocabulary (expected a JSON list of symbols, got dict)"),
        (["dupvocab"], "dupvocab.vocab.json: vocabulary has duplicate symbols"),
    ]
    for inputs, message in cases:
        out = tmp_path / "new" / "m"
        assert merge_main(["--input", *(str(tmp_path / i) for i in inputs), "--output-prefix", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("merge.py: error: ") and message in err, (inputs, err)
        assert not (tmp_path / "new").exists()
        if inputs[0] != "missing":
            assert summarize_main([str(tmp_path / inputs[0])]) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and err.startswith("summarize.py: error: ") and message in err, (inputs, err)
    before = (tmp_path / "ok.bin").read_bytes()
    assert merge_main(["--input", str(tmp_path / "ok"), "--output-prefix", str(tmp_path / "ok")]) == 2
    assert f"writes {tmp_path / 'ok.bin'}, which is the input --input {tmp_path / 'ok.bin'}" in capsys.readouterr().err
    assert merge_main(["--input", str(tmp_path / "ok"), "--output-prefix", str(tmp_path / "c.jsonl" / "m")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert (tmp_path / "ok.bin").read_bytes() == before
    with pytest.raises(SystemExit) as e:
        summarize_main([str(tmp_path / "ok"), "--tokens", "-1"])
    assert e.value.code == 2 and "argument --tokens: must be an integer >= 0, got '-1'" in capsys.readouterr().err
