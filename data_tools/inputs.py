"""Input corpora: which files, in which format, cut into blocks that can be parsed independently.

Reading is split in two so that parsing can run in worker processes while the file is read once, in order,
by one process:

- ``read_blocks`` (the reading process) reads a file in large chunks, hashes it (sha256 of the bytes as
  stored) and cuts it into ``Block``s at places where no document is split: line ends for JSON lines and
  one-document-per-line text, article starts for WikiText, and for a file that is one document (plain
  text, raw bytes) at places where its tokenizer may cut it (``Tokenizer.cut_point``), so that even a
  huge single document is streamed in bounded memory.
- ``parse_block`` (any process) turns a block into documents, with errors that name the file and line or
  byte offset.

Formats (``--input-format``):

============  ==================================================================================
``jsonl``     one JSON object per line, the text under ``json_key`` (and with ``answer_key`` an answer
              under that key: prompt/answer records); blank lines are skipped
``lines``     one document per line (blank lines are skipped)
``text``      one document per file
``wikitext``  WikiText articles: a document starts at each `` = Title = `` line (one ``=`` on each
              side; `` = = Section = = `` headings do not split); text before the first title belongs
              to the first article
``bytes``     one document per file, read as raw bytes (enwik8 style; ``bytes`` tokenizer only)
``auto``      ``jsonl`` for ``*.jsonl``, ``*.json``, ``*.ndjson``; ``text`` otherwise
============  ==================================================================================

A ``.gz``, ``.xz`` or ``.bz2`` suffix on any input means gzip, xz or bzip2: the file is decompressed while
reading (the checksum is of the file as stored).

A UTF-8 byte-order mark (EF BB BF) at the start of a file is an encoding mark, not text: it is dropped for
every text format (``jsonl``, ``lines``, ``text``, ``wikitext``), so the first word of a file gets the same
token as that word anywhere else.  ``bytes`` input is kept exactly as stored.
"""
from __future__ import annotations

import bz2
import codecs
import glob
import gzip
import hashlib
import json
import lzma
import os
import re
from dataclasses import dataclass, replace
from typing import Callable, Dict, Iterator, List, Optional, Tuple, Union

FORMATS = ("auto", "jsonl", "lines", "text", "wikitext", "bytes")
BLOCK_BYTES = 1 << 20   # target block size for line- and article-based formats
PIECE_BYTES = 16 << 20  # target block size for one-document-per-file formats (a document longer than
                        # this is stored as several sequences of one document)
# suffix -> decompressing reader over a binary file object
COMPRESSED = {".gz": lambda f: gzip.GzipFile(fileobj=f, mode="rb"), ".xz": lambda f: lzma.LZMAFile(f, mode="rb"),
              ".bz2": lambda f: bz2.BZ2File(f, mode="rb")}
BOM = codecs.BOM_UTF8


class InputError(ValueError):
    """Bad input: a missing file, a bad line, undecodable text.  The message names the file (and line)."""


# ---------------------------------------------------------------------------------------- which files
_SPLIT_ARG = re.compile(r"^([A-Za-z][A-Za-z0-9_-]*)=(.+)$")


def resolve_inputs(args: List[str]) -> Dict[Optional[str], List[str]]:
    """``--input`` arguments to ``{split name or None: [paths]}``.

    An argument is a path, a glob (expanded and sorted), or ``NAME=PATH_OR_GLOB`` to put files in the named
    split (``train=a.txt valid=b.txt test=c.txt``; a name may repeat).  Either every argument names a
    split or none does.  Every path must exist.
    """
    out: Dict[Optional[str], List[str]] = {}
    named = []
    for arg in args:
        m = _SPLIT_ARG.match(arg)
        name, pattern = (m.group(1), m.group(2)) if (m and not os.path.exists(arg)) else (None, arg)
        named.append(name is not None)
        if glob.has_magic(pattern):
            paths = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not paths:
                raise InputError(f"--input {arg}: no file matches")
        else:
            if not os.path.exists(pattern):
                raise InputError(f"--input {arg}: no such file")
            if os.path.isdir(pattern):
                raise InputError(f"--input {arg}: is a directory (give the files, or a glob such as {pattern}/*.jsonl)")
            paths = [pattern]
        out.setdefault(name, []).extend(paths)
    if any(named) and not all(named):
        raise InputError("--input: either every input names its split (train=..., valid=...) or none does")
    for name, paths in out.items():
        seen = set()
        for p in paths:
            if os.path.abspath(p) in seen:
                raise InputError(f"--input {p}: given twice{f' in split {name!r}' if name else ''}")
            seen.add(os.path.abspath(p))
    return out


def detect_format(path: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    base = os.path.splitext(path)[0] if is_compressed(path) else path
    return "jsonl" if base.endswith((".jsonl", ".json", ".ndjson")) else "text"


def is_compressed(path: str) -> bool:
    """Whether ``path`` is read through a decompressor (``.gz``, ``.xz``, ``.bz2``)."""
    return os.path.splitext(path)[1] in COMPRESSED


# ---------------------------------------------------------------------------------------------- blocks
@dataclass
class Block:
    """A run of whole documents from one file (or one piece of a document that continues in the next
    block, when ``continues``).  ``line`` (1-based) and ``offset`` locate ``data[0]`` in the decompressed
    file, for error messages; ``first`` marks the file's first block; ``raw_bytes`` is how much of the file
    as stored was read for it (progress)."""
    path: str
    fmt: str
    data: Optional[bytes]
    line: int
    offset: int
    first: bool
    continues: bool = False
    raw_bytes: int = 0
    size: int = 0

    def by_reference(self) -> "Block":
        """This block without its bytes, which ``payload`` reads back from the file (a worker process then
        gets a few numbers instead of a megabyte through a pipe); compressed files keep their bytes."""
        if is_compressed(self.path) or self.data is None:
            return self
        return replace(self, data=None, size=len(self.data))

    def payload(self) -> bytes:
        if self.data is not None:
            return self.data
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise InputError(f"{self.path}: changed while being read (expected {self.size} bytes at byte offset "
                             f"{self.offset}, got {len(data)})")
        return data


class _HashingReader:
    """Wraps a binary file: hashes and counts every byte read (the file as stored)."""

    def __init__(self, f):
        self.f, self.sha256, self.nbytes = f, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        b = self.f.read(n)
        self.sha256.update(b)
        self.nbytes += len(b)
        return b

    def readable(self) -> bool:
        return True


@dataclass
class FileInfo:
    path: str
    bytes: int
    sha256: str


# WikiText article title: a line " = Title = " with a single '=' on each side (section headings are
# " = = Section = = ").
_TITLE_BYTES = re.compile(rb"^ *= (?!=)[^\n]*?(?<!=) = *\r?$", re.M)
_TITLE = re.compile(r"^ *= (?!=)[^\n]*?(?<!=) = *\r?$", re.M)


def _cut_lines(buf: bytes, first_block: bool) -> int:
    return buf.rfind(b"\n") + 1


def _cut_articles(buf: bytes, first_block: bool) -> int:
    """Start of the last article title in ``buf`` (never the file's first title: text before it joins the
    first article)."""
    starts = [m.start() for m in _TITLE_BYTES.finditer(buf)]
    if first_block:
        starts = starts[1:]
    return starts[-1] if starts and starts[-1] > 0 else 0


def _cut_anywhere(buf: bytes, first_block: bool) -> int:
    return len(buf)


def text_cutter(cut_point: Callable[[str], int]) -> Callable[[bytes, bool], int]:
    """Cut a one-document file where its tokenizer allows (``Tokenizer.cut_point`` on the decoded tail of
    the buffer, mapped back to a byte offset); 0 keeps reading."""
    def cut(buf: bytes, first_block: bool) -> int:
        start = max(0, len(buf) - (1 << 16))
        while start < len(buf) and 0x80 <= buf[start] < 0xC0:  # start on a character boundary
            start += 1
        try:
            tail = codecs.getincrementaldecoder("utf-8")().decode(buf[start:], final=False)
        except UnicodeDecodeError:
            return 0  # reported with its location when the block is parsed
        c = cut_point(tail)
        return start + len(tail[:c].encode("utf-8", "surrogatepass")) if c > 0 else 0
    return cut


def read_blocks(path: str, fmt: str, info: List[FileInfo],
                cut_point: Optional[Callable[[str], int]] = None) -> Iterator[Block]:
    """The blocks of one input file, in order.  When the file has been read to the end its size and
    checksum are appended to ``info``."""
    if fmt in ("jsonl", "lines"):
        cutter, size = _cut_lines, BLOCK_BYTES
    elif fmt == "wikitext":
        cutter, size = _cut_articles, BLOCK_BYTES
    elif fmt == "text":
        cutter, size = (text_cutter(cut_point) if cut_point else (lambda b, f: 0)), PIECE_BYTES
    elif fmt == "bytes":
        cutter, size = _cut_anywhere, PIECE_BYTES
    else:
        raise ValueError(f"unknown input format {fmt!r}")
    one_doc = fmt in ("text", "bytes")
    try:
        raw = open(path, "rb")
    except OSError as e:
        raise InputError(f"{path}: cannot open ({e.strerror})") from None
    with raw:
        hashing = _HashingReader(raw)
        opener = COMPRESSED.get(os.path.splitext(path)[1])
        src = opener(hashing) if opener else hashing
        pieces = _pieces(src, cutter, size, path)
        # One piece of look-ahead tells whether a one-document file continues after this piece.
        data = next(pieces, None)
        if data is None and one_doc:
            data = b""  # an empty file is one empty document
        line, offset, first, reported = 1, 0, True, 0
        while data is not None:
            following = next(pieces, None)
            yield Block(path, fmt, data, line, offset, first, continues=one_doc and following is not None,
                        raw_bytes=hashing.nbytes - reported)
            reported = hashing.nbytes
            line += data.count(b"\n")
            offset += len(data)
            first = False
            data = following
    info.append(FileInfo(os.path.abspath(path), os.path.getsize(path), hashing.sha256.hexdigest()))


def _pieces(src, cutter: Callable[[bytes, bool], int], size: int, path: str) -> Iterator[bytes]:
    """Non-empty pieces of ``src`` of at least ``size`` bytes (the last may be shorter), cut by ``cutter``;
    while it finds no cut the reads grow geometrically, so a huge uncuttable unit costs linear time."""
    buf, first = b"", True
    while True:
        try:
            chunk = src.read(max(size, len(buf)))
        except (OSError, EOFError, lzma.LZMAError) as e:
            raise InputError(f"{path}: cannot read ({e})") from None
        if not chunk:
            if buf:
                yield buf
            return
        buf += chunk
        if len(buf) >= size:
            cut = cutter(buf, first)
            if cut > 0:
                yield buf[:cut]
                buf, first = buf[cut:], False


# ------------------------------------------------------------------------------------------- parsing
Doc = Union[str, bytes]


@dataclass
class Parsed:
    docs: List[Doc]
    continues: bool = False       # the last document continues in the next block
    lines: Optional[List[int]] = None  # line number of each document (line-based formats)
    skipped: int = 0              # bad lines skipped
    first_skip: Optional[str] = None
    answers: Optional[List[str]] = None  # the answer of each document (JSON lines with an answer key)

    def records(self) -> Iterator[Tuple[Doc, ...]]:
        """Each document's texts in token order: ``(text,)``, or ``(prompt, answer)`` with answers."""
        if self.answers is None:
            return ((d,) for d in self.docs)
        return zip(self.docs, self.answers)


def _decode(data: bytes, block: Block, skip: int = 0) -> str:
    """``data`` (the block's bytes after ``skip`` leading ones) as UTF-8 text; an ``InputError`` naming the
    file, line and byte offset if it is not."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        where = block.offset + skip + e.start
        line = block.line + data.count(b"\n", 0, e.start)
        raise InputError(f"{block.path}:{line}: invalid UTF-8 at byte offset {where} ({e.reason})") from None


def parse_block(block: Block, json_key: str = "text", skip_bad_lines: bool = False,
                answer_key: Optional[str] = None) -> Parsed:
    """The documents in ``block``.  A bad line (bad JSON, no ``json_key``, a value that is not a string,
    undecodable text in a line-based format) raises ``InputError`` naming the file and line, or with
    ``skip_bad_lines`` is counted and skipped.  With ``answer_key`` (JSON lines only) every record also
    gives an answer, in ``Parsed.answers``; a record without one, or with one that is not a string, is a
    bad line too."""
    fmt, data = block.fmt, block.payload()
    if fmt == "bytes":
        return Parsed([data], block.continues)
    skip = len(BOM) if block.first and data.startswith(BOM) else 0  # a byte-order mark is not text
    data = data[skip:]
    if fmt == "text":
        return Parsed([_decode(data, block, skip)], block.continues)
    if fmt == "wikitext":
        return Parsed(split_articles(_decode(data, block, skip), block.first))
    if answer_key is not None and fmt != "jsonl":
        raise InputError(f"{block.path}: --answer-key needs JSON lines, but this input is read as {fmt}")
    out = Parsed([], lines=[], answers=None if answer_key is None else [])
    pos = 0
    for n, line in enumerate(data.split(b"\n")):
        start, pos = pos, pos + len(line) + 1
        if not line.strip():
            continue
        try:
            if answer_key is not None:
                obj = _load_json_object(line)
                doc = _string_field(obj, json_key, "--json-key")
                out.answers.append(_string_field(obj, answer_key, "--answer-key"))
            elif fmt == "jsonl":
                doc = _parse_json_line(line, json_key)
            else:
                doc = _parse_text_line(line)
            out.docs.append(doc)
            out.lines.append(block.line + n)
        except InputError as e:
            lineno = block.line + n
            msg = f"{block.path}:{lineno}: {e}"
            if isinstance(e.__cause__, UnicodeDecodeError):
                msg += f" at byte offset {block.offset + skip + start + e.__cause__.start}"
            if not skip_bad_lines:
                raise InputError(msg) from None
            out.skipped += 1
            out.first_skip = out.first_skip or msg
    return out


def _parse_json_line(line: bytes, key: str) -> str:
    return _string_field(_load_json_object(line), key, "--json-key")


def _load_json_object(line: bytes) -> dict:
    try:
        obj = json.loads(line)
    except UnicodeDecodeError as e:
        raise InputError(f"invalid UTF-8 ({e.reason})") from e
    except ValueError as e:
        raise InputError(f"invalid JSON ({getattr(e, 'msg', e)} at column {getattr(e, 'colno', '?')})") from None
    if not isinstance(obj, dict):
        raise InputError(f"expected a JSON object, got {type(obj).__name__}")
    return obj


def _string_field(obj: dict, key: str, flag: str) -> str:
    """``obj[key]``, which must be Unicode text; ``flag`` is the option that names the key."""
    if key not in obj:
        keys = ", ".join(list(obj)[:8])
        raise InputError(f"no key {key!r} (keys: {keys or 'none'}; choose one with {flag})")
    text = obj[key]
    if not isinstance(text, str):
        raise InputError(f"{key!r} is a {type(text).__name__}, expected a string")
    if not text.isascii():  # a JSON escape can spell a lone surrogate, which is not Unicode text
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InputError(f"{key!r} holds a lone surrogate (\\u{ord(text[e.start]):04x} at character "
                             f"{e.start})") from None
    return text


def _parse_text_line(line: bytes) -> str:
    try:
        return line.rstrip(b"\r").decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"invalid UTF-8 ({e.reason})") from e


def split_articles(text: str, first: bool = True) -> List[str]:
    """WikiText articles of ``text``: each starts at a title line; text before the first title joins the
    first article when ``first`` (the start of a file), else stands alone."""
    starts = [m.start() for m in _TITLE.finditer(text)]
    if first and starts:
        starts[0] = 0
    if not starts or starts[0] != 0:
        starts.insert(0, 0)
    bounds = starts + [len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]
