"""Tokenizers, and how they are saved beside a dataset and loaded back.

Every tokenizer has ``vocab_size``, ``eod_id`` (or None), ``pad_id`` (or None), ``encode(text) -> list[int]``
and ``decode(ids) -> str``.  ``save(prefix)`` writes whatever files it needs next to the dataset and returns
a JSON-able spec ``{"type": ..., ...}`` (file names relative to the prefix's directory) that goes into
``prefix.json``; ``load_tokenizer(prefix)`` rebuilds the same tokenizer from it.

Kinds (the spec's ``type``):

- ``bytes``: raw bytes, ids 0..255 (+ 256 as EOD).
- ``vocab``: a fixed list of symbols, split into characters or at whitespace (character-level corpora and
  the synthetic tasks).
- ``words``: WikiText-style words: whitespace split plus ``<eos>`` at the end of every line, ``<unk>`` for
  words outside the vocabulary.
- ``gpt2``: GPT-2-style byte-level BPE, from ``vocab.json`` + ``merges.txt`` or a ``tokenizer.json``.  Text
  that spells a special token (``<|endoftext|>``) is ordinary text, as in Megatron's GPT2BPETokenizer and
  tiktoken's ``encode_ordinary``; the EOD id is only ever added by the caller.
- ``hf``: any Hugging Face ``tokenizer.json``, encoded as ``tokenizers`` does with
  ``add_special_tokens=False``.
- ``sentencepiece``: a sentencepiece ``.model``, encoded as the sentencepiece library does.

Fast and reference backends: ``gpt2``, ``hf`` and ``sentencepiece`` run on gigatoken (a Rust BPE that
encodes about 100x faster than ``tokenizers``) where it gives the reference's ids.  For ``gpt2`` that is
established by tests against ``tokenizers``' ByteLevelBPETokenizer and tiktoken; for ``hf`` and
``sentencepiece`` the two are compared on a probe text (and, in preprocessing, on the first documents) and
the reference library is used on any difference or when gigatoken cannot load the file.

The data tools never import torch.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Type

import numpy as np

from data_tools.metadata import read_metadata

_REGISTRY: Dict[str, Type["Tokenizer"]] = {}


class TokenizerError(ValueError):
    """A tokenizer file that is missing, unreadable or of the wrong kind."""


def register(kind: str) -> Callable[[Type["Tokenizer"]], Type["Tokenizer"]]:
    def deco(cls: Type["Tokenizer"]) -> Type["Tokenizer"]:
        cls.kind = kind
        _REGISTRY[kind] = cls
        return cls
    return deco


def registered_kinds() -> List[str]:
    return sorted(_REGISTRY)


class Tokenizer:
    kind: str = "?"
    vocab_size: int
    eod_id: Optional[int] = None
    pad_id: Optional[int] = None
    file_keys: Tuple[str, ...] = ()  # spec fields that name files saved beside the dataset

    def encode(self, text: str) -> List[int]:
        raise NotImplementedError

    def encode_ids(self, text) -> np.ndarray:
        """``encode`` as a numpy integer array (subclasses return their backend's array directly)."""
        return np.asarray(self.encode(text), dtype=np.int64)

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def cut_point(self, text: str) -> int:
        """The largest ``i`` such that ``encode(text[:i] + rest) == encode(text[:i]) + encode(rest)`` for any
        continuation ``rest`` (0 when none is known).  Lets a very long document be encoded in pieces."""
        return 0

    def describe(self) -> str:
        """One line for summaries and logs."""
        return self.kind

    def save(self, prefix: str) -> Dict[str, Any]:
        """Write the tokenizer's files beside ``prefix`` and return its spec."""
        raise NotImplementedError

    @classmethod
    def from_spec(cls, spec: Dict[str, Any], base_dir: str) -> "Tokenizer":
        raise NotImplementedError


def tokenizer_from_spec(spec: Dict[str, Any], base_dir: str) -> Tokenizer:
    """The tokenizer a spec (``prefix.json``'s ``tokenizer``) describes, its files relative to ``base_dir``.
    ``ValueError`` for an unknown type; ``TokenizerError`` for a malformed spec or a missing/bad file."""
    if not isinstance(spec, dict):
        raise TokenizerError(f"tokenizer spec {spec!r}: expected a JSON object with a 'type'")
    kind = spec.get("type")
    if kind not in _REGISTRY:
        raise ValueError(f"unknown tokenizer type {kind!r} in spec (known: {', '.join(registered_kinds())})")
    try:
        return _REGISTRY[kind].from_spec(spec, base_dir)
    except (KeyError, TypeError, AttributeError) as e:
        raise TokenizerError(f"tokenizer spec {spec!r}: missing or malformed field ({type(e).__name__}: {e})") from None


def load_tokenizer(prefix: str) -> Tokenizer:
    """The tokenizer that produced ``prefix.bin``, from ``prefix.json``."""
    meta = read_metadata(prefix)
    if "tokenizer" not in meta:
        raise ValueError(f"{prefix}.json: no 'tokenizer' field")
    return tokenizer_from_spec(meta["tokenizer"], os.path.dirname(os.path.abspath(prefix)))


def tokenizer_fingerprint(spec: Dict[str, Any], base_dir: str) -> Dict[str, Any]:
    """The spec with each tokenizer file replaced by the sha256 of its contents: equal fingerprints mean the
    same tokenizer, whatever the files are called (used to check that datasets can be merged).
    ``TokenizerError`` for a spec that is not a JSON object or names a missing file."""
    if not isinstance(spec, dict):
        raise TokenizerError(f"tokenizer spec {spec!r}: expected a JSON object with a 'type'")
    cls = _REGISTRY.get(spec.get("type"))
    out = dict(spec)
    for key in (cls.file_keys if cls else ()):
        if out.get(key):
            path = os.path.join(base_dir, str(out[key]))
            if not os.path.isfile(path):
                raise TokenizerError(f"{path}: no such tokenizer file (named by the dataset's metadata)")
            out[key] = "sha256:" + _sha256(path)
    return out


def sidecar_name(prefix: str, suffix: str) -> str:
    """File name (relative to the prefix's directory) for a tokenizer file saved beside ``prefix``."""
    return os.path.basename(prefix) + suffix


def _sidecar_path(prefix: str, suffix: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(prefix)), sidecar_name(prefix, suffix))


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 22), b""):
            h.update(b)
    return h.hexdigest()


def _write_beside(prefix: str, suffix: str, data: bytes) -> str:
    """Write ``data`` as the sidecar file ``<prefix><suffix>`` atomically; return its relative name."""
    path = _sidecar_path(prefix, suffix)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return sidecar_name(prefix, suffix)


def _copy_beside(prefix: str, suffix: str, src: str) -> str:
    """Copy the file ``src`` beside ``prefix`` (byte for byte, atomically); return its relative name."""
    path = _sidecar_path(prefix, suffix)
    if os.path.abspath(src) != os.path.abspath(path):
        tmp = f"{path}.tmp{os.getpid()}"
        shutil.copyfile(src, tmp)
        os.replace(tmp, path)
    return sidecar_name(prefix, suffix)


def _read_file(path: str, what: str, mode: str = "r"):
    try:
        with open(path, mode, **({"encoding": "utf-8"} if mode == "r" else {})) as f:
            return f.read()
    except FileNotFoundError:
        raise TokenizerError(f"{path}: no such {what}") from None
    except IsADirectoryError:
        raise TokenizerError(f"{path}: is a directory, expected a {what}") from None
    except UnicodeDecodeError as e:
        raise TokenizerError(f"{path}: not UTF-8 text (byte {e.start}); expected a {what}") from None


def _load_json(path: str, what: str) -> Any:
    text = _read_file(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path}:{e.lineno}: invalid JSON in {what}: {e.msg}") from None


# ---------------------------------------------------------------------------------------------- bytes
@register("bytes")
class ByteTokenizer(Tokenizer):
    """Raw bytes: ids 0..255 (enwik8 style).  With ``eod`` the id 256 ends documents."""

    def __init__(self, eod: bool = False):
        self.eod_id = 256 if eod else None
        self.vocab_size = 257 if eod else 256

    def encode(self, text) -> List[int]:
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return list(data)

    def encode_ids(self, text) -> np.ndarray:
        data = text.encode("utf-8") if isinstance(text, str) else text
        return np.frombuffer(data, dtype=np.uint8)

    def cut_point(self, text) -> int:
        return len(text)

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def describe(self) -> str:
        return "bytes" + (" + EOD 256" if self.eod_id is not None else "")

    def save(self, prefix: str) -> Dict[str, Any]:
        return {"type": "bytes", "eod": self.eod_id is not None}

    @classmethod
    def from_spec(cls, spec, base_dir):
        return cls(eod=bool(spec.get("eod", False)))


# ---------------------------------------------------------------------------------------------- vocab
@register("vocab")
class VocabTokenizer(Tokenizer):
    """A fixed list of symbols; id = position in the list.

    ``split``: ``"chars"`` (every character is a symbol) or ``"whitespace"`` (words).  ``joiner`` is put
    between symbols when decoding ("" for characters, " " for words).  ``unk`` (a symbol of the list) is used
    for unknown input; without it unknown input is an error.  ``eod``/``pad`` name symbols used as EOD/pad.
    """

    file_keys = ("file",)

    def __init__(self, symbols: Sequence[str], split: str = "whitespace", joiner: Optional[str] = None,
                 unk: Optional[str] = None, eod: Optional[str] = None, pad: Optional[str] = None):
        if split not in ("chars", "whitespace"):
            raise ValueError(f"split must be 'chars' or 'whitespace', got {split!r}")
        self.symbols = list(symbols)
        self.index = {s: i for i, s in enumerate(self.symbols)}
        if len(self.index) != len(self.symbols):
            raise ValueError("vocabulary has duplicate symbols")
        self.split = split
        self.joiner = ("" if split == "chars" else " ") if joiner is None else joiner
        for name, sym in (("unk", unk), ("eod", eod), ("pad", pad)):
            if sym is not None and sym not in self.index:
                raise ValueError(f"{name} symbol {sym!r} is not in the vocabulary")
        self.unk, self.eod, self.pad = unk, eod, pad
        self.unk_id = self.index[unk] if unk is not None else None
        self.eod_id = self.index[eod] if eod is not None else None
        self.pad_id = self.index[pad] if pad is not None else None
        self.vocab_size = len(self.symbols)
        self._char_table: Optional[np.ndarray] = None

    def pieces(self, text: str) -> List[str]:
        return list(text) if self.split == "chars" else text.split()

    def encode(self, text: str) -> List[int]:
        idx, unk = self.index, self.unk_id
        if unk is not None:
            return [idx.get(p, unk) for p in self.pieces(text)]
        try:
            return [idx[p] for p in self.pieces(text)]
        except KeyError as e:
            raise ValueError(f"symbol {e.args[0]!r} is not in the vocabulary and there is no unk symbol") from None

    def encode_ids(self, text: str) -> np.ndarray:
        if self.split != "chars":
            return super().encode_ids(text)
        # Characters: one table lookup over the code points instead of a dict lookup per character.
        if self._char_table is None:
            singles = {ord(s): i for s, i in self.index.items() if len(s) == 1}
            table = np.full(max(singles, default=0) + 1, -1, np.int64)
            for cp, i in singles.items():
                table[cp] = i
            self._char_table = table
        cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        table = self._char_table
        ids = table[np.minimum(cps, len(table) - 1)]
        bad = (ids < 0) | (cps >= len(table))
        if bad.any():
            if self.unk_id is None:
                ch = chr(int(cps[int(np.argmax(bad))]))
                raise ValueError(f"symbol {ch!r} is not in the vocabulary and there is no unk symbol")
            ids[bad] = self.unk_id
        return ids

    def cut_point(self, text: str) -> int:
        return len(text) if self.split == "chars" else 0

    def decode(self, ids: Iterable[int]) -> str:
        return self.joiner.join(self.symbols[int(i)] for i in ids)

    def describe(self) -> str:
        return f"vocab ({self.split}, {self.vocab_size} symbols)"

    def _spec(self, prefix: str) -> Dict[str, Any]:
        name = _write_beside(prefix, ".vocab.json", json.dumps(self.symbols, ensure_ascii=False).encode("utf-8"))
        return {"type": self.kind, "file": name, "split": self.split, "joiner": self.joiner,
                "unk": self.unk, "eod": self.eod, "pad": self.pad}

    def save(self, prefix: str) -> Dict[str, Any]:
        return self._spec(prefix)

    @classmethod
    def _symbols(cls, spec, base_dir) -> List[str]:
        """The symbol list of the spec's vocabulary file; ``TokenizerError`` naming the file unless it is a
        JSON list of distinct strings."""
        path = os.path.join(base_dir, spec["file"])
        symbols = _load_json(path, "vocabulary file")
        if not isinstance(symbols, list) or not all(isinstance(x, str) for x in symbols):
            raise TokenizerError(f"{path}: not a vocabulary (expected a JSON list of symbols, got "
                                 f"{type(symbols).__name__})")
        return symbols

    @classmethod
    def from_spec(cls, spec, base_dir):
        try:
            return cls(cls._symbols(spec, base_dir), split=spec.get("split", "whitespace"),
                       joiner=spec.get("joiner"), unk=spec.get("unk"), eod=spec.get("eod"), pad=spec.get("pad"))
        except TokenizerError:
            raise
        except ValueError as e:
            raise TokenizerError(f"{os.path.join(base_dir, spec['file'])}: {e}") from None


def build_char_vocab(chars: Iterable[str], eod: Optional[str] = None) -> VocabTokenizer:
    """Character vocabulary: the sorted distinct characters (nanoGPT's ``sorted(set(text))``), plus an EOD
    symbol at the end when asked for."""
    symbols = sorted(set(chars))
    if eod is not None:
        if eod in symbols:
            raise ValueError(f"EOD symbol {eod!r} occurs in the text")
        symbols.append(eod)
    return VocabTokenizer(symbols, split="chars", eod=eod)


# ---------------------------------------------------------------------------------------------- words
@register("words")
class WordTokenizer(VocabTokenizer):
    """WikiText-style word-level tokens: the words of each line (``line.split()``) and ``<eos>`` for its
    newline; words outside the vocabulary become ``<unk>``.  On a file (every line ends with a newline) this
    is ``line.split() + ["<eos>"]`` per line, empty lines included: how the published WikiText token counts
    are made (pytorch/examples ``word_language_model``, Transformer-XL).  A text whose last line has no
    newline (a prompt) gets no ``<eos>`` after it.  ``<eos>`` is the EOD id and decodes as a newline."""

    EOS, UNK = "<eos>", "<unk>"

    def __init__(self, symbols: Sequence[str], pad: Optional[str] = None, **_):
        super().__init__(symbols, split="whitespace", joiner=" ", unk=self.UNK, eod=self.EOS, pad=pad)

    def encode(self, text: str) -> List[int]:
        idx, unk, eos = self.index, self.unk_id, self.eod_id
        *lines, tail = text.split("\n")
        out: List[int] = []
        for line in lines:
            out.extend([idx.get(w, unk) for w in line.split()])
            out.append(eos)
        out.extend([idx.get(w, unk) for w in tail.split()])
        return out

    def encode_ids(self, text: str) -> np.ndarray:
        return np.asarray(self.encode(text), dtype=np.int64)

    def cut_point(self, text: str) -> int:
        return text.rfind("\n") + 1

    def decode(self, ids: Iterable[int]) -> str:
        out, line, eos = [], [], self.eod_id
        for i in ids:
            i = int(i)
            if i == eos:
                out.append(" ".join(line) + "\n")
                line = []
            else:
                line.append(self.symbols[i])
        out.append(" ".join(line))
        return "".join(out)

    def describe(self) -> str:
        return f"words ({self.vocab_size} symbols incl. <eos>, <unk>)"

    @classmethod
    def from_spec(cls, spec, base_dir):
        try:
            return cls(cls._symbols(spec, base_dir), pad=spec.get("pad"))
        except TokenizerError:
            raise
        except ValueError as e:
            raise TokenizerError(f"{os.path.join(base_dir, spec['file'])}: {e}") from None


def count_words(text: str, counts: Dict[str, int]) -> int:
    """Add the words of ``text`` to ``counts``; return ``len(WordTokenizer.encode(text))`` (its words and one
    ``<eos>`` per newline)."""
    n = text.count("\n")
    for w in text.split():
        counts[w] = counts.get(w, 0) + 1
        n += 1
    return n


def build_word_vocab(counts: Dict[str, int], min_count: int = 1, max_vocab: Optional[int] = None) -> WordTokenizer:
    """``<eos>``, ``<unk>``, then the words by decreasing count (ties: first occurrence first); words seen
    fewer than ``min_count`` times, or past ``max_vocab`` symbols in all, are left to ``<unk>``."""
    specials = [WordTokenizer.EOS, WordTokenizer.UNK]
    words = sorted(((w, c) for w, c in counts.items() if c >= min_count and w not in specials),
                   key=lambda wc: -wc[1])  # stable: ties keep the counter's first-occurrence order
    symbols = specials + [w for w, _ in words]
    if max_vocab is not None:
        if max_vocab < len(specials):
            raise ValueError(f"max_vocab {max_vocab} leaves no room for {specials}")
        symbols = symbols[:max_vocab]
    return WordTokenizer(symbols)


# ---------------------------------------------------------------------------------- byte-level BPE (gpt2)
_GPT2_EOD = "<|endoftext|>"
# After a newline that has a non-space character on both sides, GPT-2's pre-tokenizer regex always starts
# a new pre-token, so the text can be cut there (see GPT2Tokenizer.cut_point).
_GPT2_CUT = re.compile(r"(?<=\S)\n(?=\S)")
# A probe for comparing a fast backend with its reference: scripts, digits, contractions, whitespace runs,
# special-token spellings, emoji, combining marks.
PROBE_TEXT = (
    "Hello world! It's 2024; they'll've 12,345.67 items @ $8.\n\n  Indented\tline  \r\n"
    "Ünïcödé café naïve — «quotes» ‘single’ “double” … Ελληνικά Русский 中文字符 日本語テキスト 한국어\n"
    "emoji 🙂👍🏽 zero-width\u200bjoin  e\u0301 <|endoftext|> </s> <s> [CLS] <unk> <eos>\n"
    "code: def f(x):\n    return x**2  # comment\n\n\n   trailing   \n"
)


def byte_level_bpe_json(vocab_json: str, merges_json: str) -> str:
    """A Hugging Face ``tokenizer.json`` for a GPT-2-style byte-level BPE with no added tokens: exactly the
    tokenizer that ``tokenizers.ByteLevelBPETokenizer(vocab, merges)`` builds.  ``vocab_json`` (an object
    token -> id) and ``merges_json`` (a list of ``"a b"`` strings or ``[a, b]`` pairs) are JSON texts, spliced
    in as they are: re-serializing a 50k-entry vocabulary would cost more than loading the tokenizer."""
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    template = json.dumps({
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
        "pre_tokenizer": byte_level,
        "post_processor": dict(byte_level, trim_offsets=False),
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": 0, "merges": 1},
    })
    head, _, rest = template.partition('"vocab": 0')
    middle, _, tail = rest.partition('"merges": 1')
    return f'{head}"vocab": {vocab_json}{middle}"merges": {merges_json}{tail}'


def _read_merges(path: str) -> List[str]:
    """The merges of a ``merges.txt`` as ``"a b"`` strings (the ``#version`` line and blank lines skipped)."""
    merges = _read_file(path, "merges file").split("\n")
    if merges and merges[0].startswith("#version"):
        merges = merges[1:]
    merges = [m for m in merges if m]
    for n, m in enumerate(merges):
        if m.count(" ") != 1:
            raise TokenizerError(f"{path}: merge {n + 1} is {m!r}; expected two space-separated symbols")
    return merges


def _find_id(vocab_json: str, token: str) -> Optional[int]:
    """``token``'s id in the text of a JSON vocabulary object, without parsing all of it."""
    m = re.search(r'[{,]\s*"' + re.escape(token) + r'"\s*:\s*(\d+)', vocab_json)
    return int(m.group(1)) if m else None


def _bpe_from_tokenizer_json(path: str) -> Tuple[Dict[str, int], List[List[str]]]:
    """Vocabulary (added tokens included) and merges of a byte-level BPE ``tokenizer.json``; anything else is
    refused, since the ``gpt2`` kind would silently tokenize it differently."""
    cfg = _load_json(path, "tokenizer file")
    model = cfg.get("model") if isinstance(cfg, dict) else None
    pre = (cfg.get("pre_tokenizer") or {}) if isinstance(cfg, dict) else {}
    if not isinstance(model, dict) or model.get("type") != "BPE" or pre.get("type") != "ByteLevel" \
            or pre.get("add_prefix_space") or not pre.get("use_regex", True) or cfg.get("normalizer"):
        raise TokenizerError(f"{path}: not a GPT-2-style byte-level BPE tokenizer.json (use --tokenizer hf)")
    vocab = dict(model["vocab"])
    for t in cfg.get("added_tokens") or []:
        vocab.setdefault(t["content"], int(t["id"]))
    merges = [m.split(" ") if isinstance(m, str) else list(m) for m in model.get("merges", [])]
    return vocab, merges


@register("gpt2")
class GPT2Tokenizer(Tokenizer):
    """GPT-2-style byte-level BPE from ``vocab.json`` + ``merges.txt`` (OpenAI ``encoder.json`` +
    ``vocab.bpe``, Megatron's ``--vocab-file``/``--merge-file``) or from a byte-level BPE ``tokenizer.json``.

    The EOD id is ``<|endoftext|>``'s.  ``backend``: ``"gigatoken"``, ``"tokenizers"`` (the reference), or
    ``"auto"`` (gigatoken when installed).
    """

    file_keys = ("vocab", "merges", "file")

    def __init__(self, vocab_file: Optional[str] = None, merges_file: Optional[str] = None,
                 tokenizer_file: Optional[str] = None, backend: str = "auto"):
        if tokenizer_file is not None:
            vocab, merges = _bpe_from_tokenizer_json(tokenizer_file)
            vocab_json, merges_json = json.dumps(vocab, ensure_ascii=False), json.dumps(merges, ensure_ascii=False)
            self.eod_id = vocab.get(_GPT2_EOD)
            self.files = {"file": tokenizer_file}
        elif vocab_file is not None and merges_file is not None:
            vocab_json = _read_file(vocab_file, "vocabulary file")
            if not vocab_json.lstrip().startswith("{"):
                raise TokenizerError(f"{vocab_file}: not a GPT-2 vocabulary (a JSON object token -> id)")
            merges_json = json.dumps(_read_merges(merges_file), ensure_ascii=False)
            self.eod_id = _find_id(vocab_json, _GPT2_EOD)
            self.files = {"vocab": vocab_file, "merges": merges_file}
        else:
            raise TokenizerError("a GPT-2 BPE needs a vocabulary and a merges file, or a tokenizer.json")
        self._json = byte_level_bpe_json(vocab_json, merges_json)
        self.backend = _pick_backend(backend)
        try:
            self._load()
        except Exception as e:
            files = " + ".join(v for v in self.files.values() if v)
            raise TokenizerError(f"{files}: not a byte-level BPE ({str(e).splitlines()[0]})") from None
        self.vocab_size = (self._giga.vocab_size if self.backend == "gigatoken"
                           else self._hf.get_vocab_size(with_added_tokens=True))

    def _load(self) -> None:
        if self.backend == "gigatoken":
            import gigatoken
            self._giga = gigatoken.Tokenizer.from_json(self._json)
        else:
            import tokenizers
            self._hf = tokenizers.Tokenizer.from_str(self._json)

    def __getstate__(self):  # picklable for worker processes: rebuild the backend from the JSON
        return {k: v for k, v in self.__dict__.items() if k not in ("_giga", "_hf")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._load()

    def encode_ids(self, text) -> np.ndarray:
        if self.backend == "gigatoken":
            return self._giga.encode(text)
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return np.asarray(self._hf.encode(text, add_special_tokens=False).ids, dtype=np.uint32)

    def encode(self, text) -> List[int]:
        return self.encode_ids(text).tolist()

    def decode(self, ids: Iterable[int]) -> str:
        ids = np.asarray(ids if isinstance(ids, np.ndarray) else list(ids), dtype=np.int64)
        if self.backend == "gigatoken":
            return self._giga.decode(ids.astype(np.uint32)).decode("utf-8", errors="replace")
        return self._hf.decode(ids.tolist(), skip_special_tokens=False)

    def cut_point(self, text: str) -> int:
        last = None
        for last in _GPT2_CUT.finditer(text):
            pass
        return last.end() if last is not None else 0

    def describe(self) -> str:
        return f"gpt2 byte-level BPE ({self.vocab_size} ids, backend {self.backend})"

    def save(self, prefix: str) -> Dict[str, Any]:
        if "file" in self.files:
            return {"type": "gpt2", "file": _copy_beside(prefix, ".tokenizer.json", self.files["file"])}
        return {"type": "gpt2", "vocab": _copy_beside(prefix, ".vocab.json", self.files["vocab"]),
                "merges": _copy_beside(prefix, ".merges.txt", self.files["merges"])}

    @classmethod
    def from_spec(cls, spec, base_dir):
        path = lambda key: os.path.join(base_dir, spec[key]) if spec.get(key) else None  # noqa: E731
        return cls(path("vocab"), path("merges"), path("file"))


def train_byte_bpe(texts: Iterable[str], vocab_size: int, prefix: str, min_frequency: int = 2) -> GPT2Tokenizer:
    """Train a GPT-2-style byte-level BPE (``tokenizers``' ByteLevelBPETokenizer, all 256 bytes in the
    alphabet, ``<|endoftext|>`` as the one special token) on ``texts`` and save it as
    ``<prefix>.tokenizer.json``."""
    import tokenizers
    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=min_frequency,
                            special_tokens=[_GPT2_EOD], show_progress=False)
    path = _sidecar_path(prefix, ".tokenizer.json")
    _write_beside(prefix, ".tokenizer.json", bpe.to_str().encode("utf-8"))
    return GPT2Tokenizer(tokenizer_file=path)


def _pick_backend(backend: str) -> str:
    if backend not in ("auto", "gigatoken", "tokenizers"):
        raise ValueError(f"backend must be auto, gigatoken or tokenizers, got {backend!r}")
    if backend == "auto":
        try:
            import gigatoken  # noqa: F401
            return "gigatoken"
        except ImportError:
            return "tokenizers"
    return backend


class _CheckedFastBackend:
    """A gigatoken tokenizer used only where it matches the reference.  Texts containing one of ``_guard``
    (strings the two treat differently, e.g. sentencepiece control symbols, which gigatoken matches as
    special tokens and sentencepiece spells out) always go to the reference; ``verify(texts)`` compares the
    two and drops the fast one at the first difference."""

    _guard: Tuple[str, ...] = ()

    def _init_fast(self, make_fast: Callable[[], Any], backend: str) -> None:
        """Load gigatoken through ``make_fast`` unless told otherwise, and check it on the probe text."""
        self._giga = None
        self.backend = "reference"
        self.fast_unavailable: Optional[str] = None
        if _pick_backend(backend) == "gigatoken":
            try:
                self._giga = make_fast()
            except Exception as e:  # gigatoken supports byte-level and byte-fallback BPE only
                self.fast_unavailable = f"gigatoken cannot load it ({str(e).splitlines()[0]})"
            else:
                self.backend = "gigatoken"
                self.verify([PROBE_TEXT])

    def verify(self, texts: Iterable[str]) -> bool:
        """True when the fast backend gives the reference's ids on every text (else it is dropped)."""
        if self._giga is None:
            return False
        for t in texts:
            if self.encode(t) != self._reference_encode(t):
                self._giga, self.backend = None, "reference"
                self.fast_unavailable = "gigatoken's ids differ from the reference's"
                return False
        return True

    def encode_ids(self, text) -> np.ndarray:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        if self._giga is not None and not any(g in text for g in self._guard):
            return self._giga.encode(text)
        return np.asarray(self._reference_encode(text), dtype=np.int64)

    def encode(self, text) -> List[int]:
        return self.encode_ids(text).tolist()

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("_giga", "_ref")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._load_reference()
        self._giga = self._fast() if self.backend == "gigatoken" else None


@register("hf")
class HFTokenizer(_CheckedFastBackend, Tokenizer):
    """Any Hugging Face ``tokenizer.json``: ids as ``tokenizers.Tokenizer.encode(text,
    add_special_tokens=False)`` gives them (special tokens spelled in the text are recognised, no BOS/EOS
    is added).  EOD: ``eod_token`` if given, else the first of the usual end-of-text tokens present."""

    file_keys = ("file",)
    EOD_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>", "[SEP]")

    def __init__(self, tokenizer_file: str, eod_token: Optional[str] = None, backend: str = "auto"):
        if os.path.isdir(tokenizer_file):
            tokenizer_file = os.path.join(tokenizer_file, "tokenizer.json")
        self.path = tokenizer_file
        self._load_reference()
        vocab = self._ref.get_vocab(with_added_tokens=True)
        self.vocab_size = self._ref.get_vocab_size(with_added_tokens=True)
        if eod_token is not None and eod_token not in vocab:
            raise TokenizerError(f"{tokenizer_file}: EOD token {eod_token!r} is not in the vocabulary")
        self.eod_token = eod_token or next((t for t in self.EOD_CANDIDATES if t in vocab), None)
        self.eod_id = vocab.get(self.eod_token) if self.eod_token else None
        pad = next((t for t in ("<pad>", "[PAD]", "<|pad|>") if t in vocab), None)
        self.pad_id = vocab.get(pad) if pad else None
        self._init_fast(self._fast, backend)

    def _load_reference(self) -> None:
        import tokenizers
        text = _read_file(self.path, "tokenizer file")
        try:
            self._ref = tokenizers.Tokenizer.from_str(text)
        except Exception as e:
            raise TokenizerError(f"{self.path}: not a Hugging Face tokenizer.json ({str(e).splitlines()[0]})") from None
        self._json = text

    def _fast(self):
        import gigatoken
        return gigatoken.Tokenizer.from_json(self._json)

    def _reference_encode(self, text: str) -> List[int]:
        return self._ref.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._ref.decode([int(i) for i in ids], skip_special_tokens=False)

    def describe(self) -> str:
        return f"hf tokenizer.json ({self.vocab_size} ids, backend {self.backend})"

    def save(self, prefix: str) -> Dict[str, Any]:
        return {"type": "hf", "file": _copy_beside(prefix, ".tokenizer.json", self.path), "eod_token": self.eod_token}

    @classmethod
    def from_spec(cls, spec, base_dir):
        return cls(os.path.join(base_dir, spec["file"]), eod_token=spec.get("eod_token"))


@register("sentencepiece")
class SentencePieceTokenizer(_CheckedFastBackend, Tokenizer):
    """A sentencepiece ``.model``: ids as ``SentencePieceProcessor.encode(text)`` gives them (no BOS/EOS);
    EOD is the model's ``eos_id``, pad its ``pad_id`` (None where the model has none)."""

    file_keys = ("model",)

    def __init__(self, model_file: str, backend: str = "auto"):
        self.path = model_file
        self._load_reference()
        self.vocab_size = self._ref.get_piece_size()
        self._guard = tuple(self._ref.id_to_piece(i) for i in range(self.vocab_size) if self._ref.is_control(i))
        self.eod_id = self._ref.eos_id() if self._ref.eos_id() >= 0 else None
        self.pad_id = self._ref.pad_id() if self._ref.pad_id() >= 0 else None
        self._init_fast(self._fast, backend)

    def _load_reference(self) -> None:
        import sentencepiece
        data = _read_file(self.path, "sentencepiece model", "rb")
        self._ref = sentencepiece.SentencePieceProcessor()
        try:
            self._ref.LoadFromSerializedProto(data)
        except Exception as e:
            raise TokenizerError(f"{self.path}: not a sentencepiece model ({str(e).splitlines()[0]})") from None

    def _fast(self):
        import gigatoken
        return gigatoken.Tokenizer.from_sentencepiece(self.path)

    def _reference_encode(self, text: str) -> List[int]:
        return self._ref.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self._ref.decode([int(i) for i in ids])

    def describe(self) -> str:
        return f"sentencepiece ({self.vocab_size} pieces, backend {self.backend})"

    def save(self, prefix: str) -> Dict[str, Any]:
        return {"type": "sentencepiece", "model": _copy_beside(prefix, ".model", self.path)}

    @classmethod
    def from_spec(cls, spec, base_dir):
        return cls(os.path.join(base_dir, spec["model"]))
