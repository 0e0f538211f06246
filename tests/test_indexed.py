"""MMIDIDX reader and streaming writer: exact byte layout, round trips, both empty-document conventions,
and a clear IndexedDatasetError (naming the file) for every kind of damaged file."""
import os
import struct

import numpy as np
import pytest

from data_tools import indexed
from data_tools.indexed import IndexedDataset, IndexedDatasetError, IndexedDatasetWriter


def write(prefix, docs, dtype=np.uint16):
    with IndexedDatasetWriter(str(prefix), dtype) as w:
        for d in docs:
            w.add_document(np.asarray(d, dtype=np.int64))
    return IndexedDataset(str(prefix))


def test_exact_layout(tmp_path):
    """Header, then int32 lengths, int64 byte pointers, int64 document indices, packed from byte 34."""
    write(tmp_path / "d", [[1, 2, 3], [4], [5, 6]])
    idx = (tmp_path / "d.idx").read_bytes()
    expect = (b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", 8) + struct.pack("<Q", 3)
              + struct.pack("<Q", 4) + np.array([3, 1, 2], "<i4").tobytes() + np.array([0, 6, 8], "<i8").tobytes()
              + np.array([0, 1, 2, 3], "<i8").tobytes())
    assert idx == expect
    assert (tmp_path / "d.bin").read_bytes() == np.arange(1, 7, dtype="<u2").tobytes()


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_round_trip(tmp_path, dtype):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 60000, rng.integers(0, 50)) for _ in range(200)]
    ds = write(tmp_path / "d", docs, dtype)
    assert ds.dtype == np.dtype(dtype) and ds.num_documents == 200 and len(ds) == 200
    assert ds.num_tokens == sum(len(d) for d in docs)
    for i, d in enumerate(docs):
        assert np.array_equal(ds[i], d) and np.array_equal(ds.document(i), d)
    offs = ds.document_token_offsets()
    assert offs[0] == 0 and offs[-1] == ds.num_tokens and np.array_equal(np.diff(offs), [len(d) for d in docs])
    assert np.array_equal(ds.get(3, 1, 2), docs[3][1:3])


def test_writer_paths_agree_and_spill_across_chunks(tmp_path, monkeypatch):
    """add_item/end_document, add_document and add_documents give the same bytes, also when the lengths and
    document boundaries spill to disk in many small chunks."""
    rng = np.random.default_rng(1)
    docs = [rng.integers(0, 1000, rng.integers(1, 9)) for _ in range(50)]
    write(tmp_path / "big_chunks", docs)
    monkeypatch.setattr(indexed, "_CHUNK", 7)
    write(tmp_path / "a", docs)
    with IndexedDatasetWriter(str(tmp_path / "b"), np.uint16) as w:
        for d in docs:
            w.add_item(d)
            w.end_document()
    with IndexedDatasetWriter(str(tmp_path / "c"), np.uint16) as w:
        w.add_documents(np.concatenate(docs[:20]), [len(d) for d in docs[:20]])
        w.add_documents(np.concatenate(docs[20:]), [len(d) for d in docs[20:]])
    for name in "abc":
        for ext in (".bin", ".idx"):
            assert (tmp_path / f"{name}{ext}").read_bytes() == (tmp_path / f"big_chunks{ext}").read_bytes()


def test_multi_sequence_documents(tmp_path):
    with IndexedDatasetWriter(str(tmp_path / "d"), np.int32) as w:
        w.add_document([1, 2, 3, 4, 5], [2, 3])
        w.add_item([6])
        w.add_item([7, 8])
        w.end_document()
    ds = IndexedDataset(str(tmp_path / "d"))
    assert ds.sequence_count == 4 and ds.num_documents == 2
    assert list(ds.document_indices) == [0, 2, 4]
    assert ds.document(0).tolist() == [1, 2, 3, 4, 5] and ds.document(1).tolist() == [6, 7, 8]
    assert ds[1].tolist() == [3, 4, 5]


def test_both_empty_document_conventions(tmp_path):
    """preprocess_data.py writes a repeated document index; add_documents writes a zero-length sequence."""
    with IndexedDatasetWriter(str(tmp_path / "d"), np.uint16) as w:
        w.add_document([1, 2])
        w.add_document([], [])            # boundary only: document_indices repeats
        w.add_documents([3], [0, 1])      # a zero-length sequence, then [3]
        w.add_document([4])
    ds = IndexedDataset(str(tmp_path / "d"))
    assert list(ds.document_indices) == [0, 1, 1, 2, 3, 4]
    assert ds.num_documents == 5 and ds.sequence_count == 4
    assert [ds.document(i).tolist() for i in range(5)] == [[1, 2], [], [], [3], [4]]
    assert ds.document_token_offsets().tolist() == [0, 2, 2, 2, 3, 4]


def test_add_index_concatenates(tmp_path):
    write(tmp_path / "a", [[1, 2], [3]])
    write(tmp_path / "b", [[4], [5, 6, 7]])
    with IndexedDatasetWriter(str(tmp_path / "ab"), np.uint16) as w:
        w.add_index(str(tmp_path / "a"))
        w.add_index(str(tmp_path / "b"))
    ds = IndexedDataset(str(tmp_path / "ab"))
    assert [ds.document(i).tolist() for i in range(4)] == [[1, 2], [3], [4], [5, 6, 7]]
    write(tmp_path / "c", [[1]], np.int32)
    with pytest.raises(IndexedDatasetError, match="c.idx.*dtype"):
        with IndexedDatasetWriter(str(tmp_path / "x"), np.uint16) as w:
            w.add_index(str(tmp_path / "c"))


def test_failure_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with IndexedDatasetWriter(str(tmp_path / "d"), np.uint16) as w:
            w.add_document([1, 2, 3])
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="does not fit"):
        with IndexedDatasetWriter(str(tmp_path / "d"), np.uint16) as w:
            w.add_document([70000])
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------------- damaged files
N_DOCS = 3  # in the damaged dataset
# an index field overwritten: (byte offset, new bytes); the header is 34 bytes, then sizes (4 bytes per sequence),
# sequence pointers and document indices (8 bytes each)
INDEX_DAMAGE = {
    "magic": (0, b"TNTIDX\x00\x00\x00"),
    "version": (9, struct.pack("<Q", 2)),
    "dtype code": (17, bytes([9])),
    "pointers": (34 + 4 * N_DOCS + 8, struct.pack("<q", 4)),
    "doc end": (34 + 12 * N_DOCS + 8 * 3, struct.pack("<q", 2)),
    "doc start": (34 + 12 * N_DOCS, struct.pack("<q", 1)),
    "doc order": (34 + 12 * N_DOCS + 8, struct.pack("<q", 3)),
}


def _damage(tmp_path, how):
    prefix = tmp_path / "d"
    write(prefix, [[1, 2, 3], [4, 5], [6]])
    idx, binf = tmp_path / "d.idx", tmp_path / "d.bin"
    raw = bytearray(idx.read_bytes())
    if how == "truncated bin":
        binf.write_bytes(binf.read_bytes()[:-2])
    elif how == "odd bin":
        binf.write_bytes(binf.read_bytes()[:-1])
    elif how == "long bin":
        binf.write_bytes(binf.read_bytes() + b"\x00\x00")
    elif how == "truncated idx":
        idx.write_bytes(raw[:-5])
    elif how == "tiny idx":
        idx.write_bytes(raw[:20])
    elif how in INDEX_DAMAGE:
        offset, data = INDEX_DAMAGE[how]
        raw[offset:offset + len(data)] = data
        idx.write_bytes(raw)
    elif how == "missing bin":
        binf.unlink()
    return prefix


@pytest.mark.parametrize("how, file, words", [
    ("truncated bin", "d.bin", "truncated data file"),
    ("odd bin", "d.bin", "multiple"),
    ("long bin", "d.bin", "trailing bytes"),
    ("truncated idx", "d.idx", "truncated index"),
    ("tiny idx", "d.idx", "header"),
    ("magic", "d.idx", "bad magic"),
    ("version", "d.idx", "version 2"),
    ("dtype code", "d.idx", "unknown dtype code 9"),
    ("pointers", "d.idx", "sequence_pointers"),
    ("doc end", "d.idx", "document_indices\\[-1\\]"),
    ("doc start", "d.idx", "document_indices\\[0\\]"),
    ("doc order", "d.idx", "decreases"),
    ("missing bin", "d.bin", "no such file"),
])
def test_damaged_files_fail_clearly(tmp_path, how, file, words):
    prefix = _damage(tmp_path, how)
    with pytest.raises(IndexedDatasetError, match=words) as e:
        IndexedDataset(str(prefix))
    assert str(tmp_path / file) in str(e.value) and "\n" not in str(e.value)
