"""Tokenizers, and how they are saved beside a dataset and loaded back.

Every tokenizer has ``vocab_size``, ``eod_id`` (or None), ``pad_id`` (or None), ``encode(text) -> list[int]``
and ``decode(ids) -> str``.  ``save(prefix)`` writes whatever files it needs next to the dataset and returns
a JSON-able spec ``{"type": ..., ...}`` (file names relative to the prefix's directory) that goes into
``prefix.json``; ``load_tokenizer(prefix)`` rebuilds the same tokenizer from it.

This module holds the base class, the registry and the two simplest kinds (``bytes`` and ``vocab``, a fixed
list of symbols used by the character- and word-level tokenizers and by the synthetic tasks).  The data
tools never import torch.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Type

from data_tools.metadata import read_metadata

_REGISTRY: Dict[str, Type["Tokenizer"]] = {}


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

    def encode(self, text: str) -> List[int]:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def save(self, prefix: str) -> Dict[str, Any]:
        """Write the tokenizer's files beside ``prefix`` and return its spec."""
        raise NotImplementedError

    @classmethod
    def from_spec(cls, spec: Dict[str, Any], base_dir: str) -> "Tokenizer":
        raise NotImplementedError


def tokenizer_from_spec(spec: Dict[str, Any], base_dir: str) -> Tokenizer:
    kind = spec.get("type")
    if kind not in _REGISTRY:
        raise ValueError(f"unknown tokenizer type {kind!r} in spec (known: {', '.join(registered_kinds())})")
    return _REGISTRY[kind].from_spec(spec, base_dir)


def load_tokenizer(prefix: str) -> Tokenizer:
    """The tokenizer that produced ``prefix.bin``, from ``prefix.json``."""
    meta = read_metadata(prefix)
    if "tokenizer" not in meta:
        raise ValueError(f"{prefix}.json: no 'tokenizer' field")
    return tokenizer_from_spec(meta["tokenizer"], os.path.dirname(os.path.abspath(prefix)))


def sidecar_name(prefix: str, suffix: str) -> str:
    """File name (relative to the prefix's directory) for a tokenizer file saved beside ``prefix``."""
    return os.path.basename(prefix) + suffix


@register("bytes")
class ByteTokenizer(Tokenizer):
    """Raw bytes: ids 0..255 (enwik8 style).  With ``eod`` the id 256 ends documents."""

    def __init__(self, eod: bool = False):
        self.eod_id = 256 if eod else None
        self.vocab_size = 257 if eod else 256

    def encode(self, text) -> List[int]:
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return list(data)

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def save(self, prefix: str) -> Dict[str, Any]:
        return {"type": "bytes", "eod": self.eod_id is not None}

    @classmethod
    def from_spec(cls, spec, base_dir):
        return cls(eod=bool(spec.get("eod", False)))


@register("vocab")
class VocabTokenizer(Tokenizer):
    """A fixed list of symbols; id = position in the list.

    ``split``: ``"chars"`` (every character is a symbol) or ``"whitespace"`` (words).  ``joiner`` is put
    between symbols when decoding ("" for characters, " " for words).  ``unk`` (a symbol of the list) is used
    for unknown input; without it unknown input is an error.  ``eod``/``pad`` name symbols used as EOD/pad.
    """

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

    def decode(self, ids: Iterable[int]) -> str:
        return self.joiner.join(self.symbols[int(i)] for i in ids)

    def save(self, prefix: str) -> Dict[str, Any]:
        name = sidecar_name(prefix, ".vocab.json")
        path = os.path.join(os.path.dirname(os.path.abspath(prefix)), name)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(self.symbols, f, ensure_ascii=False)
        os.replace(tmp, path)
        return {"type": "vocab", "file": name, "split": self.split, "joiner": self.joiner,
                "unk": self.unk, "eod": self.eod, "pad": self.pad}

    @classmethod
    def from_spec(cls, spec, base_dir):
        path = os.path.join(base_dir, spec["file"])
        with open(path) as f:
            symbols = json.load(f)
        return cls(symbols, split=spec.get("split", "whitespace"), joiner=spec.get("joiner"),
                   unk=spec.get("unk"), eod=spec.get("eod"), pad=spec.get("pad"))
