"""Megatron's memory-mapped indexed dataset (``MMIDIDX``): a ``.bin`` of raw tokens and an ``.idx`` index.

Byte layout (identical to ``megatron.core.datasets.indexed_dataset``; little-endian, no padding)::

    0   9 bytes   magic  b"MMIDIDX\\x00\\x00"
    9   uint64    version (1)
    17  uint8     dtype code of the tokens (8 = uint16, 4 = int32, table below)
    18  uint64    sequence_count  N
    26  uint64    document_count  M  (= number of documents + 1)
    34  int32[N]  sequence_lengths (tokens)
        int64[N]  sequence_pointers (byte offset of each sequence in .bin)
        int64[M]  document_indices (sequence-index boundaries, [0] = 0, [-1] = N)
        int8[N]   sequence_modes (multimodal datasets only; not flagged in the header)

The reader validates every field against the file sizes and fails with a message naming the file and the
field.  The writer streams: lengths and document boundaries are spilled to temporary files in fixed-size
numpy chunks, so memory stays bounded whatever the corpus size, and the final ``.bin``/``.idx`` appear only
when complete (written under temporary names, renamed at the end).  This module needs numpy only.
"""
from __future__ import annotations

import os
import struct
from typing import Iterable, Optional

import numpy as np

HEADER = b"MMIDIDX\x00\x00"
HEADER_SIZE = 34
VERSION = 1

# megatron-core's DType enum.  Codes 6 and 7 disagree between implementations (GPT-NeoX swaps them);
# token files only ever use 4 (int32) and 8 (uint16).
DTYPE_OF_CODE = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
CODE_OF_DTYPE = {np.dtype(v): k for k, v in DTYPE_OF_CODE.items()}

_CHUNK = 1 << 20  # entries per chunk when streaming index arrays


class IndexedDatasetError(ValueError):
    """A ``.bin``/``.idx`` pair that is missing, truncated or inconsistent."""


def optimal_dtype(vocab_size: int) -> type:
    """The token dtype Megatron picks for a vocabulary: uint16 below 65,500 entries, int32 otherwise."""
    if vocab_size is None or vocab_size < 0:
        raise ValueError(f"vocab_size must be a non-negative integer, got {vocab_size!r}")
    return np.uint16 if vocab_size < 65500 else np.int32


def idx_path(prefix: str) -> str:
    return prefix + ".idx"


def bin_path(prefix: str) -> str:
    return prefix + ".bin"


def exists(prefix: str) -> bool:
    return os.path.isfile(idx_path(prefix)) and os.path.isfile(bin_path(prefix))


class IndexedDataset:
    """Read-only, memory-mapped view of a ``prefix.bin`` / ``prefix.idx`` pair.

    ``sequence_lengths``, ``sequence_pointers`` and ``document_indices`` are numpy memmaps of the index;
    ``tokens`` is the whole ``.bin`` as one flat token array (sequences are contiguous in every file that
    Megatron or we write, and the reader checks it).  Both empty-document conventions are accepted:
    repeated values in ``document_indices`` (``preprocess_data.py``) and zero-length sequences
    (``add_documents``).
    """

    def __init__(self, prefix: str, multimodal: bool = False, validate: bool = True):
        self.prefix = prefix
        ipath, bpath = idx_path(prefix), bin_path(prefix)
        for p in (ipath, bpath):
            if not os.path.isfile(p):
                raise IndexedDatasetError(f"{p}: no such file (dataset prefix {prefix!r})")
        isize = os.path.getsize(ipath)
        if isize < HEADER_SIZE:
            raise IndexedDatasetError(f"{ipath}: truncated index: {isize} bytes, the header alone is {HEADER_SIZE}")
        with open(ipath, "rb") as f:
            head = f.read(HEADER_SIZE)
        magic = head[:9]
        if magic != HEADER:
            raise IndexedDatasetError(f"{ipath}: bad magic {magic!r}, expected {HEADER!r} (not an MMIDIDX index)")
        (version,) = struct.unpack("<Q", head[9:17])
        if version != VERSION:
            raise IndexedDatasetError(f"{ipath}: unsupported version {version}, expected {VERSION}")
        code = head[17]
        if code not in DTYPE_OF_CODE:
            raise IndexedDatasetError(f"{ipath}: unknown dtype code {code} (valid: {sorted(DTYPE_OF_CODE)})")
        self.dtype_code = code
        self.dtype = np.dtype(DTYPE_OF_CODE[code])
        (n,) = struct.unpack("<Q", head[18:26])
        (m,) = struct.unpack("<Q", head[26:34])
        if m < 1:
            raise IndexedDatasetError(f"{ipath}: document_count is {m}; it must be at least 1 (a leading 0)")
        expected = HEADER_SIZE + 12 * n + 8 * m + (n if multimodal else 0)
        if isize != expected:
            what = "truncated" if isize < expected else "trailing bytes in"
            raise IndexedDatasetError(
                f"{ipath}: {what} index: {isize} bytes, header says {n} sequences and {m} document indices "
                f"({expected} bytes{' with sequence_modes' if multimodal else ''})"
            )
        self.sequence_count, self.document_count = n, m
        off = HEADER_SIZE
        self.sequence_lengths = np.memmap(ipath, np.int32, "r", off, (n,)) if n else np.zeros(0, np.int32)
        off += 4 * n
        self.sequence_pointers = np.memmap(ipath, np.int64, "r", off, (n,)) if n else np.zeros(0, np.int64)
        off += 8 * n
        self.document_indices = np.memmap(ipath, np.int64, "r", off, (m,))
        off += 8 * m
        self.sequence_modes = np.memmap(ipath, np.int8, "r", off, (n,)) if (multimodal and n) else None
        bsize = os.path.getsize(bpath)
        if bsize % self.dtype.itemsize:
            raise IndexedDatasetError(f"{bpath}: size {bsize} is not a multiple of the {self.dtype} item size")
        if validate:
            self._validate(bsize)
        self.num_tokens = bsize // self.dtype.itemsize
        self.tokens = np.memmap(bpath, self.dtype, "r") if bsize else np.zeros(0, self.dtype)

    def _validate(self, bsize: int) -> None:
        ipath, bpath = idx_path(self.prefix), bin_path(self.prefix)
        n, item = self.sequence_count, self.dtype.itemsize
        di = self.document_indices
        if di[0] != 0:
            raise IndexedDatasetError(f"{ipath}: document_indices[0] is {di[0]}, must be 0")
        if di[-1] != n:
            raise IndexedDatasetError(
                f"{ipath}: document_indices[-1] is {di[-1]} but sequence_count is {n}")
        total = 0  # running byte offset
        for s in range(0, n, _CHUNK):
            lens = np.asarray(self.sequence_lengths[s:s + _CHUNK], dtype=np.int64)
            if (lens < 0).any():
                bad = s + int(np.argmax(lens < 0))
                raise IndexedDatasetError(f"{ipath}: sequence_lengths[{bad}] is negative")
            ptr = np.asarray(self.sequence_pointers[s:s + _CHUNK])
            expect = total + np.concatenate([[0], np.cumsum(lens[:-1] * item)])
            if not np.array_equal(ptr, expect):
                bad = s + int(np.argmax(ptr != expect))
                raise IndexedDatasetError(
                    f"{ipath}: sequence_pointers[{bad}] is {int(self.sequence_pointers[bad])}, expected "
                    f"{int(expect[bad - s])} (pointers must follow the lengths; corrupted index?)")
            total = int(expect[-1] + lens[-1] * item)
        for s in range(0, len(di) - 1, _CHUNK):
            d = np.asarray(di[s:s + _CHUNK + 1])
            if (np.diff(d) < 0).any():
                bad = s + int(np.argmax(np.diff(d) < 0)) + 1
                raise IndexedDatasetError(f"{ipath}: document_indices[{bad}] decreases")
        if total != bsize:
            what = "truncated" if bsize < total else "trailing bytes in"
            raise IndexedDatasetError(
                f"{bpath}: {what} data file: {bsize} bytes, the index describes {total} bytes")

    # ----------------------------------------------------------------- access
    def __len__(self) -> int:
        return self.sequence_count

    @property
    def num_documents(self) -> int:
        return self.document_count - 1

    def get(self, i: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        """Tokens of sequence ``i`` (a slice of it with ``offset``/``length``, as Megatron's ``get``)."""
        if not -self.sequence_count <= i < self.sequence_count:
            raise IndexError(f"sequence {i} out of range for {self.sequence_count} sequences in {self.prefix}")
        i %= self.sequence_count
        start = int(self.sequence_pointers[i]) // self.dtype.itemsize
        n = int(self.sequence_lengths[i])
        if length is None:
            length = n - offset
        return self.tokens[start + offset:start + offset + length]

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(i)

    def document(self, d: int) -> np.ndarray:
        """All tokens of document ``d`` (its sequences are contiguous)."""
        lo, hi = int(self.document_indices[d]), int(self.document_indices[d + 1])
        if lo == hi:
            return self.tokens[0:0]
        start = int(self.sequence_pointers[lo]) // self.dtype.itemsize
        end = int(self.sequence_pointers[hi - 1]) // self.dtype.itemsize + int(self.sequence_lengths[hi - 1])
        return self.tokens[start:end]

    def document_token_offsets(self) -> np.ndarray:
        """int64 token offset where each document starts, plus the total at the end (length docs + 1)."""
        di = np.asarray(self.document_indices, dtype=np.int64)
        starts = np.zeros(self.sequence_count + 1, np.int64)
        if self.sequence_count:
            starts[:-1] = np.asarray(self.sequence_pointers) // self.dtype.itemsize
            starts[-1] = self.num_tokens
        return starts[di]


class IndexedDatasetWriter:
    """Streaming writer of a ``.bin``/``.idx`` pair, byte-compatible with megatron-core's builder.

    ``add_item`` / ``end_document`` / ``add_document`` / ``add_index`` / ``finalize`` behave like
    ``IndexedDatasetBuilder``'s methods of the same names (so the same calls give identical bytes), but
    the sequence lengths and document boundaries go to temporary spill files instead of Python lists, and
    nothing appears under ``prefix`` until ``finalize`` renames the completed files into place.
    Use as a context manager: an exception inside the ``with`` removes every temporary file.
    """

    def __init__(self, prefix: str, dtype=np.int32, multimodal: bool = False):
        if multimodal:
            raise NotImplementedError("multimodal (sequence_modes) datasets are read-only here")
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF_DTYPE:
            raise ValueError(f"dtype {self.dtype} has no MMIDIDX code")
        d = os.path.dirname(os.path.abspath(prefix))
        os.makedirs(d, exist_ok=True)
        tag = f".tmp{os.getpid()}"
        self._bin_tmp = bin_path(prefix) + tag
        self._idx_tmp = idx_path(prefix) + tag
        self._len_tmp = prefix + ".lengths" + tag
        self._doc_tmp = prefix + ".docs" + tag
        self._bin = open(self._bin_tmp, "wb", buffering=1 << 22)
        self._lenf = open(self._len_tmp, "wb")
        self._docf = open(self._doc_tmp, "wb")
        self._lbuf = np.empty(_CHUNK, np.int32)
        self._nl = 0
        self._dbuf = np.empty(_CHUNK, np.int64)
        self._nd = 0
        self.sequence_count = 0
        self.document_count = 0  # boundaries appended after the leading 0
        self.num_tokens = 0
        self._closed = False
        self._append_doc(0)

    # ------------------------------------------------------------ internals
    def _append_len(self, lengths: np.ndarray) -> None:
        lengths = np.asarray(lengths)
        if lengths.size and (lengths.min() < 0 or lengths.max() > np.iinfo(np.int32).max):
            raise ValueError("sequence length out of int32 range")
        while lengths.size:
            k = min(lengths.size, _CHUNK - self._nl)
            self._lbuf[self._nl:self._nl + k] = lengths[:k]
            self._nl += k
            lengths = lengths[k:]
            if self._nl == _CHUNK:
                self._lenf.write(self._lbuf.tobytes())
                self._nl = 0

    def _append_doc(self, index: int) -> None:
        self._dbuf[self._nd] = index
        self._nd += 1
        if self._nd == _CHUNK:
            self._docf.write(self._dbuf.tobytes())
            self._nd = 0

    def _write_tokens(self, arr) -> int:
        a = np.asarray(arr)
        if a.dtype != self.dtype:
            if a.size and a.dtype.kind in "iu":
                info = np.iinfo(self.dtype)
                lo, hi = int(a.min()), int(a.max())
                if lo < info.min or hi > info.max:
                    raise ValueError(f"token id {hi if hi > info.max else lo} does not fit {self.dtype}")
            a = a.astype(self.dtype)
        self._bin.write(np.ascontiguousarray(a).tobytes())
        return int(a.size)

    # ------------------------------------------------------------ Megatron API
    def add_item(self, tokens) -> None:
        """Append one sequence (Megatron's ``add_item``)."""
        n = self._write_tokens(np.asarray(tokens).reshape(-1))
        self._append_len(np.array([n]))
        self.sequence_count += 1
        self.num_tokens += n

    def end_document(self) -> None:
        """Close the current document (Megatron's ``end_document``)."""
        self._append_doc(self.sequence_count)
        self.document_count += 1

    def add_document(self, tokens, lengths: Optional[Iterable[int]] = None) -> None:
        """Append one document made of sequences of ``lengths`` (default: one sequence of all tokens).
        ``lengths=[]`` with no tokens appends only a boundary, as ``preprocess_data.py`` does for an empty
        document."""
        tokens = np.asarray(tokens).reshape(-1)
        lengths = np.array([tokens.size] if lengths is None else list(lengths), dtype=np.int64)
        if int(lengths.sum()) != tokens.size:
            raise ValueError(f"lengths sum to {int(lengths.sum())} but the document has {tokens.size} tokens")
        self._write_tokens(tokens)
        self._append_len(lengths)
        self.sequence_count += lengths.size
        self.num_tokens += tokens.size
        self.end_document()

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append many one-sequence documents at once: ``tokens`` is their concatenation."""
        tokens = np.asarray(tokens).reshape(-1)
        lengths = np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != tokens.size:
            raise ValueError(f"lengths sum to {int(lengths.sum())} but {tokens.size} tokens were given")
        self._write_tokens(tokens)
        self._append_len(lengths)
        first = self.sequence_count
        for k in range(1, lengths.size + 1):
            self._append_doc(first + k)
        self.sequence_count += lengths.size
        self.document_count += lengths.size
        self.num_tokens += tokens.size

    def add_index(self, prefix: str) -> None:
        """Append every sequence and document of another dataset (Megatron's ``add_index``)."""
        other = IndexedDataset(prefix)
        if other.dtype != self.dtype:
            raise IndexedDatasetError(
                f"{idx_path(prefix)}: dtype {other.dtype} differs from the output's {self.dtype}")
        base = self.sequence_count
        for s in range(0, other.sequence_count, _CHUNK):
            self._append_len(np.asarray(other.sequence_lengths[s:s + _CHUNK]))
        for d in np.asarray(other.document_indices[1:]):
            self._append_doc(base + int(d))
        self.sequence_count += other.sequence_count
        self.document_count += other.num_documents
        with open(bin_path(prefix), "rb") as f:
            while True:
                b = f.read(1 << 24)
                if not b:
                    break
                self._bin.write(b)
        self.num_tokens += other.num_tokens

    # ------------------------------------------------------------ completion
    def finalize(self, idx: Optional[str] = None) -> None:
        """Write the index and move both files into place (``idx`` may name the .idx path, as Megatron's)."""
        if self._closed:
            raise RuntimeError("writer already finalized or aborted")
        if idx is not None and os.path.abspath(idx) != os.path.abspath(idx_path(self.prefix)):
            raise ValueError(f"index path {idx} does not match prefix {self.prefix}")
        self._lenf.write(self._lbuf[:self._nl].tobytes())
        self._docf.write(self._dbuf[:self._nd].tobytes())
        for f in (self._bin, self._lenf, self._docf):
            f.close()
        n, m, item = self.sequence_count, self.document_count + 1, self.dtype.itemsize
        with open(self._idx_tmp, "wb") as out:
            out.write(HEADER)
            out.write(struct.pack("<Q", VERSION))
            out.write(struct.pack("<B", CODE_OF_DTYPE[self.dtype]))
            out.write(struct.pack("<Q", n))
            out.write(struct.pack("<Q", m))
            _copy_file(self._len_tmp, out)
            total = 0
            with open(self._len_tmp, "rb") as lf:
                while True:
                    b = lf.read(4 * _CHUNK)
                    if not b:
                        break
                    lens = np.frombuffer(b, np.int32).astype(np.int64) * item
                    ptr = np.empty_like(lens)
                    ptr[0] = total
                    np.cumsum(lens[:-1], out=ptr[1:])
                    ptr[1:] += total
                    total = int(ptr[-1] + lens[-1])
                    out.write(ptr.tobytes())
            _copy_file(self._doc_tmp, out)
        os.replace(self._bin_tmp, bin_path(self.prefix))
        os.replace(self._idx_tmp, idx_path(self.prefix))
        os.remove(self._len_tmp)
        os.remove(self._doc_tmp)
        self._closed = True

    def abort(self) -> None:
        """Remove every temporary file; nothing is left under the prefix."""
        if self._closed:
            return
        for f in (self._bin, self._lenf, self._docf):
            try:
                f.close()
            except Exception:
                pass
        for p in (self._bin_tmp, self._idx_tmp, self._len_tmp, self._doc_tmp):
            if os.path.exists(p):
                os.remove(p)
        self._closed = True

    def __enter__(self) -> "IndexedDatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.finalize()


def _copy_file(src: str, out) -> None:
    with open(src, "rb") as f:
        while True:
            b = f.read(1 << 24)
            if not b:
                break
            out.write(b)
