"""Interoperability with megatron-core's indexed dataset, in both directions and byte for byte.

megatron-core imports torch: that is fine here, never in data_tools."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, shared_path
from corpora import gpt2_files, text as corpus_text
from data_tools.indexed import IndexedDataset, IndexedDatasetWriter
from data_tools.tokenization import GPT2Tokenizer

megatron_indexed = pytest.importorskip("megatron.core.datasets.indexed_dataset")
torch = pytest.importorskip("torch")

SAMPLE = "megatron-sample/meg-gpt2-openwebtext_text_document"
SAMPLE_WHY = "a corpus written by Megatron-DeepSpeed's preprocess_data.py from OpenWebText pages, whose licence is not stated, so it is not shipped"


def _files(prefix):
    return [open(prefix + ext, "rb").read() for ext in (".bin", ".idx")]


def _megatron_write(prefix, docs, dtype):
    """Megatron's builder: one add_item + end_document per document, as preprocess_data.py does."""
    b = megatron_indexed.IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for d in docs:
        b.add_item(torch.tensor(np.asarray(d, dtype=np.int64)))
        b.end_document()
    b.finalize(prefix + ".idx")


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_megatron_reads_our_files(tmp_path, dtype):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 50000, rng.integers(1, 40)) for _ in range(64)]
    prefix = str(tmp_path / "ours")
    with IndexedDatasetWriter(prefix, dtype) as w:
        for d in docs[:32]:
            w.add_document(d)
        w.add_document(np.concatenate(docs[32:34]), [len(docs[32]), len(docs[33])])  # two sequences
        w.add_document([], [])                                                    # empty: repeated index
        w.add_documents(np.concatenate(docs[34:]), [len(d) for d in docs[34:]])
    theirs = megatron_indexed.IndexedDataset(prefix)
    ours = IndexedDataset(prefix)
    assert len(theirs) == len(ours) == 64
    assert np.array_equal(theirs.sequence_lengths, ours.sequence_lengths)
    assert np.array_equal(theirs.document_indices, ours.document_indices)
    for i in range(len(ours)):
        assert np.array_equal(theirs[i], ours[i])
    assert np.array_equal(theirs.get(33, offset=1, length=3), ours.get(33, 1, 3))


def test_builders_write_identical_bytes(tmp_path):
    rng = np.random.default_rng(1)
    docs = [rng.integers(0, 65000, rng.integers(0, 30)) for _ in range(100)]
    _megatron_write(str(tmp_path / "theirs"), docs, np.uint16)
    with IndexedDatasetWriter(str(tmp_path / "ours"), np.uint16) as w:
        for d in docs:
            w.add_item(d)
            w.end_document()
    assert _files(str(tmp_path / "ours")) == _files(str(tmp_path / "theirs"))
    # multi-sequence documents through add_document
    b = megatron_indexed.IndexedDatasetBuilder(str(tmp_path / "theirs2.bin"), dtype=np.int32)
    with IndexedDatasetWriter(str(tmp_path / "ours2"), np.int32) as w:
        for k in range(0, 100, 4):
            tokens = np.concatenate(docs[k:k + 4])
            lengths = [len(d) for d in docs[k:k + 4]]
            b.add_document(torch.tensor(tokens), lengths)
            w.add_document(tokens, lengths)
    b.finalize(str(tmp_path / "theirs2.idx"))
    assert _files(str(tmp_path / "ours2")) == _files(str(tmp_path / "theirs2"))


def test_megatron_sample_read_decode_reencode_rewrite(tmp_path):
    """A real Megatron corpus: we read it, decode it with its tokenizer, re-encoding gives the stored ids,
    and rewriting its documents with our writer reproduces both files byte for byte."""
    prefix = shared_path(SAMPLE + ".idx", why=SAMPLE_WHY)[:-4]
    vocab = shared_path("megatron-sample/gpt2-tiny-vocab.json", why=SAMPLE_WHY)
    merges = shared_path("megatron-sample/gpt2-tiny-merges.txt", why=SAMPLE_WHY)
    ds = IndexedDataset(prefix)
    assert (ds.dtype, ds.num_documents, ds.num_tokens) == (np.uint16, 1000, 1361845)
    tok = GPT2Tokenizer(vocab, merges)
    assert (tok.vocab_size, tok.eod_id) == (5000, 4999)
    with IndexedDatasetWriter(str(tmp_path / "copy"), np.uint16) as w:
        for i in range(ds.num_documents):
            doc = np.asarray(ds.document(i))
            assert doc[-1] == tok.eod_id
            text = tok.decode(doc[:-1])
            assert np.array_equal(tok.encode_ids(text), doc[:-1]), f"document {i}"
            w.add_document(doc)
    assert _files(str(tmp_path / "copy")) == _files(prefix)


def test_preprocess_cli_matches_megatron_builder(tmp_path):
    """Our CLI's output equals megatron-core's builder fed with the reference tokenizer's ids
    (HF ByteLevelBPETokenizer on GPT-2's vocab.json + merges.txt, + EOD per document)."""
    tokenizers = pytest.importorskip("tokenizers")
    vocab, merges = gpt2_files()
    docs = [p for p in corpus_text("tinyshakespeare/input.txt").split("\n\n")[:300]] + ["", "emoji 🙂 and <|endoftext|> as text"]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    out = tmp_path / "out" / "shakes"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "data_tools", "preprocess.py"), "--input", str(corpus),
                        "--tokenizer", "gpt2", "--vocab-file", vocab, "--merge-file", merges, "--append-eod",
                        "--output-prefix", str(out), "--no-progress"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    ref = tokenizers.ByteLevelBPETokenizer(vocab, merges)
    ids = [ref.encode(d).ids + [50256] for d in docs]
    _megatron_write(str(tmp_path / "theirs"), ids, np.uint16)
    assert _files(str(out)) == _files(str(tmp_path / "theirs"))
    assert megatron_indexed.IndexedDataset(str(out)).sequence_lengths.tolist() == [len(i) for i in ids]
