"""Synthetic memory tasks (the Recurrent Memory Transformer paper's, MQAR, bAbI facts in a haystack), written as
indexed datasets.

Tasks (each example is one document, one language-model sequence ``[problem ; answer]``):

* ``copy``: ``X <s> X X``: X is ``--length`` symbols drawn uniformly from ``--num-symbols``; the answer
  is X twice (RMT copies twice).
* ``reverse``: ``X <s> reverse(X)``.
* ``retrieval``: ``k1 v1 ... kK vK q <s> v``: K distinct letter keys with digit values (distinct when
  K <= 10, as RMT), a query key q among them; the answer is its value.
* ``equations``: quadratic equations with integer roots in ``(-max_root, max_root)`` (20% without real
  roots), written as RMT's character-level chunks, each padded to ``--chunk-len``: the scaled equation;
  then the canonical form, the discriminant, the root formula and the answer (the distinct roots, or
  nothing); every chunk ends with ``;``.  ``--score solution`` (default, RMT's training target) scores every
  chunk after the equation, ``--score answer`` only the answer chunk.
* ``mqar``: multi-query associative recall (Zoology, Arora et al. 2023): ``k1 v1 ... kP vP``, ``--gap``
  filler tokens, then ``q1 a1 ... qQ aQ``: Q distinct keys of the pairs, each followed by its value (scored).
  Keys and values come from disjoint vocabularies (``--key-vocab``, ``--value-vocab``); ``--example-len``
  pads the front with filler so the queries end the example.  The query of pair i asked j-th (0-based) lies
  ``2 (P - i) + gap + 2 j`` tokens after the pair's key.
* ``babifacts``: BABILong-style: a bAbI qa1 fact (``Mary went to the kitchen.``) at a chosen depth
  (``--depth`` fraction or ``--depth-tokens``) of ``--haystack-len`` characters of real text (``--text``,
  default tinyshakespeare), then ``Where is Mary?`` and the place, which alone is scored; characters.

Token 0 is the pad in every vocabulary.  Examples are padded at the end to a multiple of
``--segment-multiple`` so that, read by an ordered stream with ``align="document"`` and that segment length,
every segment lies inside one example.  Beside each ``P_{train,valid,test}`` dataset the generator writes
``P.mask`` (uint8, 1 at every answer token that must be predicted: never the problem, a separator or a pad),
the tokenizer (``P.vocab.json``) and ``P.json`` (with ``"loss_mask": "<P basename>.mask"`` and the task's
parameters).  Examples are deduplicated on their problem and the splits are disjoint; the test split is drawn
first, then valid, then train, so growing ``--train-size`` keeps the evaluation sets.  Everything is a pure
function of the options and ``--seed``.

Usage::

    python data_tools/synthetic.py copy --output-prefix data/copy24 --length 24 --segment-multiple 8
    python data_tools/synthetic.py equations --output-prefix data/sqeq --format jsonl
    python data_tools/synthetic.py mqar --output-prefix data/mqar --num-pairs 4 --num-queries 4 --gap 64
    python data_tools/synthetic.py babifacts --output-prefix data/facts --haystack-len 2048 --depth 0.25
"""
if __name__ == "__main__":
    import os, signal, sys  # noqa: E401
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C while starting up: end at once (nothing written yet)
    if not __package__:
        sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from data_tools.cli import (CommandError, CommandParser, bounded, check_output_folder, fail, int_at_least,
                            interrupted, make_folders, remove_folders, sigterm_as_interrupt, signals_deferred)
from data_tools.indexed import IndexedDatasetWriter, bin_path, idx_path, optimal_dtype
from data_tools.metadata import meta_path, write_metadata
from data_tools.progress import Progress
from data_tools.tokenization import VocabTokenizer

PAD, SEP = "<pad>", "<s>"
SYMBOLS = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
LETTERS = "abcdefghijklmnopqrstuvwxyz"
DIGITS = "0123456789"
SPLITS = ("test", "valid", "train")  # drawing order: evaluation sets first
DRAW = 4096  # candidates per draw; fixed so that the output does not depend on the requested sizes


class TaskError(ValueError):
    """Task options that cannot produce the requested data."""


def _check_int(flag: str, value: Any, low: int, high: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low or (
            high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise TaskError(f"{flag} must be an integer {bound}, got {value!r}")
    return int(value)


@dataclass
class Batch:
    """Candidate examples: unpadded ``tokens`` and ``mask`` [n, example_len], problem ``keys`` for dedup."""

    tokens: np.ndarray
    mask: np.ndarray
    keys: List[bytes]


class Task:
    """One synthetic task: its vocabulary, its fixed example length and a vectorised sampler."""

    name: str
    symbols: List[str]
    split = "whitespace"
    example_len: int
    draw = DRAW  # candidates per draw, a function of the options only

    def tokenizer(self) -> VocabTokenizer:
        return VocabTokenizer(self.symbols, split=self.split, pad=PAD)

    def sample(self, rng: np.random.Generator, n: int) -> Batch:
        raise NotImplementedError

    def space_size(self) -> Optional[int]:
        """Number of distinct problems, where it is known exactly."""
        return None

    def params(self) -> Dict[str, Any]:
        raise NotImplementedError


def _keys(problems: np.ndarray) -> List[bytes]:
    problems = np.ascontiguousarray(problems, dtype=np.uint16)
    return [row.tobytes() for row in problems]


class CopyTask(Task):
    name = "copy"

    def __init__(self, length: int = 24, num_symbols: int = 8):
        self.length = _check_int("--length", length, 1)
        self.num_symbols = _check_int("--num-symbols", num_symbols, 1, len(SYMBOLS))
        self.symbols = [PAD, SEP] + list(SYMBOLS[:self.num_symbols])
        self.example_len = self.length + 1 + self.answer_len

    @property
    def answer_len(self) -> int:
        return 2 * self.length

    def answer(self, x: np.ndarray) -> np.ndarray:
        return np.concatenate([x, x], axis=1)

    def sample(self, rng, n):
        x = rng.integers(2, 2 + self.num_symbols, size=(n, self.length))
        tokens = np.concatenate([x, np.ones((n, 1), x.dtype), self.answer(x)], axis=1)
        mask = np.zeros(tokens.shape, np.uint8)
        mask[:, self.length + 1:] = 1
        return Batch(tokens, mask, _keys(x))

    def space_size(self):
        return self.num_symbols ** self.length

    def params(self):
        return {"name": self.name, "length": self.length, "num_symbols": self.num_symbols}


class ReverseTask(CopyTask):
    name = "reverse"

    @property
    def answer_len(self) -> int:
        return self.length

    def answer(self, x):
        return x[:, ::-1]


class RetrievalTask(Task):
    name = "retrieval"

    def __init__(self, num_pairs: int = 4):
        self.num_pairs = _check_int("--num-pairs", num_pairs, 1, len(LETTERS))
        self.symbols = [PAD, SEP] + list(DIGITS) + list(LETTERS)
        self.example_len = 2 * self.num_pairs + 3

    def sample(self, rng, n):
        K = self.num_pairs
        keys = np.argsort(rng.random((n, len(LETTERS))), axis=1)[:, :K] + 2 + len(DIGITS)
        if K <= len(DIGITS):  # distinct values as in RMT, whenever there are enough digits
            values = np.argsort(rng.random((n, len(DIGITS))), axis=1)[:, :K] + 2
        else:
            values = rng.integers(0, len(DIGITS), size=(n, K)) + 2
        which = rng.integers(0, K, size=n)
        rows = np.arange(n)
        tokens = np.empty((n, self.example_len), np.int64)
        tokens[:, 0:2 * K:2] = keys
        tokens[:, 1:2 * K:2] = values
        tokens[:, 2 * K] = keys[rows, which]
        tokens[:, 2 * K + 1] = 1
        tokens[:, 2 * K + 2] = values[rows, which]
        mask = np.zeros(tokens.shape, np.uint8)
        mask[:, -1] = 1
        return Batch(tokens, mask, _keys(tokens[:, :2 * K + 1]))

    def space_size(self):
        K = self.num_pairs
        values = math.perm(len(DIGITS), K) if K <= len(DIGITS) else len(DIGITS) ** K
        return math.perm(len(LETTERS), K) * values * K

    def params(self):
        return {"name": self.name, "num_pairs": self.num_pairs}


# ------------------------------------------------------------------------------------------ equations
def _poly(a: int, b: int, c: int) -> str:
    """``a*x^2+b*x+c`` in RMT's notation: unit coefficients drop the ``1*``, zero terms vanish."""
    out = []
    for coef, power in ((a, 2), (b, 1), (c, 0)):
        if coef == 0:
            continue
        var = {2: "x^2", 1: "x", 0: ""}[power]
        sign = "-" if coef < 0 else ("" if not out else "+")
        mag = abs(coef)
        if power and mag == 1:
            out.append(sign + var)
        else:
            out.append(f"{sign}{mag}" + (f"*{var}" if power else ""))
    return "".join(out)


def _digits(bound: int) -> int:
    return len(str(abs(int(bound))))


class EquationTask(Task):
    name = "equations"
    split = "chars"
    chunks = ("equation", "canonical", "discriminant", "solution", "answer")

    def __init__(self, max_root: int = 100, max_scale: int = 10, no_root_fraction: float = 0.2,
                 chunk_len: int = 0, score: str = "solution"):
        self.max_root = _check_int("--max-root", max_root, 1)
        self.max_scale = _check_int("--max-scale", max_scale, 1)
        if not 0.0 <= float(no_root_fraction) <= 1.0:
            raise TaskError(f"--no-root-fraction must be in [0, 1], got {no_root_fraction!r}")
        self.no_root_fraction = float(no_root_fraction)
        if score not in ("solution", "answer"):
            raise TaskError(f"--score must be 'solution' or 'answer', got {score!r}")
        self.score = score
        self.symbols = [PAD] + list(DIGITS) + list("+-*/^=()xD;,")
        self.index = {s: i for i, s in enumerate(self.symbols)}
        bound = self.longest_chunk()
        self.chunk_len = bound if chunk_len == 0 else _check_int("--chunk-len", chunk_len, 1)
        self.example_len = len(self.chunks) * self.chunk_len

    def longest_chunk(self) -> int:
        """An upper bound on any chunk's length (``;`` included) for these options."""
        R, S = self.max_root, self.max_scale
        b, c, d, root = 2 * R - 1, R * R, 4 * R * R, R - 1  # |b|, |c|, |D|, |root| over both kinds
        sq = 2 * R - 2
        equation = (1 + _digits(S) + 4) + (1 + _digits(S * b) + 2) + (1 + _digits(S * c)) + 3
        canonical = 3 + (1 + _digits(b) + 2) + (1 + _digits(c)) + 3
        discriminant = 2 + _digits(b) + 7 + (1 + _digits(c)) + 1 + (1 + _digits(d)) + 1 + _digits(sq) + 3
        solution = 2 * (3 + (1 + _digits(b)) + 1 + _digits(sq) + 4 + (1 + _digits(root))) + 2
        answer = 2 * (1 + _digits(root)) + 2
        return max(equation, canonical, discriminant, solution, answer)

    def texts(self, rng: np.random.Generator) -> List[str]:
        """The five chunk texts of one example (without the ``;`` terminators)."""
        R = self.max_root
        scale = int(rng.integers(1, self.max_scale + 1)) * (1 if rng.random() < 0.5 else -1)
        if rng.random() < self.no_root_fraction:
            b = int(rng.integers(-2 * R + 1, 2 * R))
            c = int(rng.integers(b * b // 4 + 1, R * R + 1))  # b^2 - 4c < 0: no real root
            disc = b * b - 4 * c
            discriminant = f"D={abs(b)}^2-4*1*{c}={disc}"
            solution, answer = "", ""
        else:
            r1, r2 = sorted(int(r) for r in rng.integers(-R + 1, R, size=2))
            b, c = -(r1 + r2), r1 * r2
            disc, sq = b * b - 4 * c, r2 - r1
            discriminant = f"D={abs(b)}^2-4*1*{c}={disc}={sq}^2"
            solution = f"x=({-b}-{sq})/2={r1};x=({-b}+{sq})/2={r2}"
            answer = ",".join(str(r) for r in sorted({r1, r2}))
        return [_poly(scale, scale * b, scale * c) + "=0", _poly(1, b, c) + "=0", discriminant, solution, answer]

    def sample(self, rng, n):
        C = self.chunk_len
        tokens = np.zeros((n, self.example_len), np.int64)
        mask = np.zeros((n, self.example_len), np.uint8)
        scored = range(1, len(self.chunks)) if self.score == "solution" else (len(self.chunks) - 1,)
        for i in range(n):
            for j, text in enumerate(self.texts(rng)):
                ids = [self.index[ch] for ch in text + ";"]
                if len(ids) > C:
                    raise TaskError(f"the {self.chunks[j]} chunk {text + ';'!r} has {len(ids)} tokens, more "
                                    f"than --chunk-len {C}; use --chunk-len {self.longest_chunk()} or leave it "
                                    f"unset (0 picks the longest possible chunk for these options)")
                tokens[i, j * C:j * C + len(ids)] = ids
                if j in scored:
                    mask[i, j * C:j * C + len(ids)] = 1
        return Batch(tokens, mask, _keys(tokens[:, :C]))

    def params(self):
        return {"name": self.name, "max_root": self.max_root, "max_scale": self.max_scale,
                "no_root_fraction": self.no_root_fraction, "chunk_len": self.chunk_len, "score": self.score,
                "chunks": list(self.chunks)}


# --------------------------------------------------------------------------------------------- mqar
def _distinct(rng: np.random.Generator, n: int, pool: int, k: int) -> np.ndarray:
    """[n, k] integers in [0, pool), distinct within each row, uniformly ordered."""
    if n * pool <= 1 << 22:
        return np.argsort(rng.random((n, pool)), axis=1)[:, :k]
    return np.stack([rng.choice(pool, size=k, replace=False) for _ in range(n)])


def _draw_size(example_len: int) -> int:
    """Examples per draw: DRAW, fewer for long examples (about 16M tokens a draw), a function of the options."""
    return max(16, min(DRAW, (1 << 24) // max(1, example_len)))


class MQARTask(Task):
    """Multi-query associative recall (Arora et al. 2023, Zoology), with filler between pairs and queries.

    Layout: ``[lead filler][k1 v1 ... kP vP][gap filler][q1 a1 ... qQ aQ]``.  Keys are distinct tokens of
    ``--key-vocab``, values tokens of the disjoint ``--value-vocab`` (distinct when it has at least P of
    them, as Zoology), the queries Q distinct keys of the pairs in random order; each answer ``a`` is the
    value paired with the query just before it, and only the answers are scored.  The query of pair i
    (0-based) asked j-th lies ``2 (P - i) + G + 2 j`` tokens after that pair's key.  ``--example-len``
    pads the front with filler so the queries end the example whatever the gap.
    """

    name = "mqar"

    def __init__(self, num_pairs: int = 8, num_queries: int = 8, key_vocab: int = 64, value_vocab: int = 64,
                 gap: int = 0, filler_vocab: int = 1, example_len: int = 0):
        self.num_pairs = P = _check_int("--num-pairs", num_pairs, 1)
        self.num_queries = Q = _check_int("--num-queries", num_queries, 1)
        self.key_vocab = K = _check_int("--key-vocab", key_vocab, 1)
        self.value_vocab = V = _check_int("--value-vocab", value_vocab, 1)
        self.gap = G = _check_int("--gap", gap, 0)
        self.filler_vocab = F = _check_int("--filler-vocab", filler_vocab, 1)
        length = _check_int("--example-len", example_len, 0)
        if Q > P:
            raise TaskError(f"--num-queries {Q} is more than --num-pairs {P}: every query asks a distinct key "
                            f"of the pairs; lower --num-queries or raise --num-pairs")
        if K < P:
            raise TaskError(f"--key-vocab {K} is too small for --num-pairs {P} distinct keys; "
                            f"use --key-vocab {P} or more")
        core = 2 * P + 2 * Q
        if length and core > length:
            raise TaskError(f"an example needs {2 * P} pair tokens and {2 * Q} query tokens, {core} in all, more "
                            f"than --example-len {length}; raise --example-len or lower --num-pairs/--num-queries")
        if length and core + G > length:
            raise TaskError(f"--gap {G} puts the pairs before the start of the example: with --example-len {length}, "
                            f"--num-pairs {P} and --num-queries {Q} the gap is at most {length - core} "
                            f"(or raise --example-len to {core + G}, or leave it 0)")
        self.example_len = length or core + G
        self.lead = self.example_len - core - G
        if K + V + F + 1 > np.iinfo(np.int32).max:
            raise TaskError("--key-vocab + --value-vocab + --filler-vocab must stay below 2^31")
        self.symbols = ([PAD] + [f"k{i}" for i in range(K)] + [f"v{i}" for i in range(V)]
                        + [f"f{i}" for i in range(F)])
        self.draw = _draw_size(self.example_len)

    @property
    def pairs_start(self) -> int:
        return self.lead

    @property
    def queries_start(self) -> int:
        return self.lead + 2 * self.num_pairs + self.gap

    def distance(self, pair: int, query: int) -> int:
        """Tokens from the key of pair ``pair`` to its query when it is asked ``query``-th (both 0-based)."""
        return 2 * (self.num_pairs - pair) + self.gap + 2 * query

    def sample(self, rng, n):
        P, Q, K, V, F = self.num_pairs, self.num_queries, self.key_vocab, self.value_vocab, self.filler_vocab
        keys = _distinct(rng, n, K, P) + 1
        values = (_distinct(rng, n, V, P) if V >= P else rng.integers(0, V, size=(n, P))) + 1 + K
        which = np.argsort(rng.random((n, P)), axis=1)[:, :Q]
        dtype = optimal_dtype(len(self.symbols))
        filler_id = 1 + K + V
        tokens = np.full((n, self.example_len), filler_id, dtype)
        free = self.lead + self.gap
        fill = rng.integers(0, F, size=(n, free)) + filler_id if F > 1 else None
        if fill is not None:
            tokens[:, :self.lead] = fill[:, :self.lead]
            tokens[:, self.lead + 2 * P:self.queries_start] = fill[:, self.lead:]
        s, q = self.pairs_start, self.queries_start
        tokens[:, s:s + 2 * P:2] = keys
        tokens[:, s + 1:s + 2 * P:2] = values
        tokens[:, q::2] = np.take_along_axis(keys, which, axis=1)
        tokens[:, q + 1::2] = np.take_along_axis(values, which, axis=1)
        mask = np.zeros(tokens.shape, np.uint8)
        mask[:, q + 1::2] = 1
        parts = [keys, values, which] + ([fill] if fill is not None else [])
        problems = np.ascontiguousarray(np.concatenate(parts, axis=1), dtype=np.int32)
        return Batch(tokens, mask, [row.tobytes() for row in problems])

    def space_size(self):
        P, Q, K, V = self.num_pairs, self.num_queries, self.key_vocab, self.value_vocab
        values = math.perm(V, P) if V >= P else V ** P
        return math.perm(K, P) * values * math.perm(P, Q) * self.filler_vocab ** (self.lead + self.gap)

    def params(self):
        return {"name": self.name, "num_pairs": self.num_pairs, "num_queries": self.num_queries,
                "key_vocab": self.key_vocab, "value_vocab": self.value_vocab, "gap": self.gap,
                "filler_vocab": self.filler_vocab, "lead": self.lead, "pairs_start": self.pairs_start,
                "queries_start": self.queries_start, "min_distance": self.distance(self.num_pairs - 1, 0),
                "max_distance": self.distance(0, self.num_queries - 1)}


# ---------------------------------------------------------------------------------------- babifacts
DEFAULT_TEXT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "corpora", "tinyshakespeare", "input.txt.xz")
NAMES = ("Mary", "John", "Daniel", "Sandra", "Fred", "Bill", "Julie", "Emily")  # bAbI's people
PLACES = ("bathroom", "hallway", "garden", "office", "bedroom", "kitchen")        # bAbI qa1's locations
MOVES = ("went to", "moved to", "journeyed to", "travelled to", "went back to")     # bAbI qa1's verbs


def read_text(path: str) -> str:
    """A UTF-8 text file, ``.xz`` files decompressed with lzma."""
    import lzma
    try:
        with (lzma.open(path, "rt", encoding="utf-8") if path.endswith(".xz") else
              open(path, encoding="utf-8")) as f:
            return f.read()
    except (OSError, UnicodeDecodeError, lzma.LZMAError) as e:
        raise TaskError(f"--text {path}: cannot read it as UTF-8 text ({getattr(e, 'strerror', None) or e})") \
            from None


class BabiFactsTask(Task):
    """BABILong-style fact in a haystack: one bAbI qa1 fact inside real text, then its question.

    Layout (characters): ``text[s:s+d] "\\n<Name> <moved> to the <place>.\\n" text[s+d:s+H]
    "\\nWhere is <Name>?\\n" <place>``, padded to the longest example; ``s`` is a random offset into
    ``--text``, ``H`` is ``--haystack-len`` and ``d`` the depth (``--depth`` as a fraction of H, rounded, or
    ``--depth-tokens``).  Only the place after the question is scored.
    """

    name = "babifacts"
    split = "chars"

    def __init__(self, haystack_len: int = 1024, depth: Optional[float] = None, depth_tokens: Optional[int] = None,
                 text: Optional[str] = None):
        self.text_path = DEFAULT_TEXT if text is None else str(text)
        corpus = read_text(self.text_path)
        self.haystack_len = H = _check_int("--haystack-len", haystack_len, 1)
        if H > len(corpus):
            raise TaskError(f"--haystack-len {H} is longer than the text --text {self.text_path} "
                            f"({len(corpus)} characters); lower --haystack-len or give a longer --text")
        if depth is not None and depth_tokens is not None:
            raise TaskError("give --depth (a fraction of the haystack) or --depth-tokens, not both")
        if depth_tokens is not None:
            d = _check_int("--depth-tokens", depth_tokens, 0)
            if d > H:
                raise TaskError(f"--depth-tokens {d} lies outside the haystack: at most --haystack-len {H}")
            self.depth = None
        else:
            depth = 0.5 if depth is None else depth
            if isinstance(depth, bool) or not isinstance(depth, (int, float, np.floating)) or not 0 <= depth <= 1:
                raise TaskError(f"--depth must be a number in [0, 1] (the fraction of --haystack-len before the "
                                f"fact), got {depth!r}")
            self.depth = float(depth)
            d = int(round(self.depth * H))
        self.depth_tokens = d
        facts = [self.fact(n, m, p) for n in NAMES for m in MOVES for p in PLACES]
        extra = sorted(set("".join(facts) + "".join(self.question(n) for n in NAMES)) - set(corpus))
        self.symbols = [PAD] + sorted(set(corpus)) + extra
        tok = self.tokenizer()
        self.corpus = tok.encode_ids(corpus).astype(optimal_dtype(len(self.symbols)))
        self.text_chars = len(corpus)
        import hashlib
        self.text_sha256 = hashlib.sha256(corpus.encode("utf-8")).hexdigest()
        self._facts = [tok.encode_ids(f) for f in facts]
        self._questions = [tok.encode_ids(self.question(n)) for n in NAMES]
        self._answers = [tok.encode_ids(p) for p in PLACES]
        self.example_len = (H + max(map(len, self._facts)) + max(map(len, self._questions))
                            + max(map(len, self._answers)))
        self.draw = _draw_size(self.example_len)

    @staticmethod
    def fact(name: str, move: str, place: str) -> str:
        return f"\n{name} {move} the {place}.\n"

    @staticmethod
    def question(name: str) -> str:
        return f"\nWhere is {name}?\n"

    def sample(self, rng, n):
        H, d = self.haystack_len, self.depth_tokens
        start = rng.integers(0, len(self.corpus) - H + 1, size=n)
        name = rng.integers(0, len(NAMES), size=n)
        move = rng.integers(0, len(MOVES), size=n)
        place = rng.integers(0, len(PLACES), size=n)
        tokens = np.zeros((n, self.example_len), self.corpus.dtype)
        mask = np.zeros((n, self.example_len), np.uint8)
        per_name = len(MOVES) * len(PLACES)
        for i in range(n):
            s = int(start[i])
            fact = self._facts[name[i] * per_name + move[i] * len(PLACES) + place[i]]
            q, a = self._questions[name[i]], self._answers[place[i]]
            tokens[i, :d] = self.corpus[s:s + d]
            e = d + len(fact)
            tokens[i, d:e] = fact
            tokens[i, e:e + H - d] = self.corpus[s + d:s + H]
            e += H - d
            tokens[i, e:e + len(q)] = q
            e += len(q)
            tokens[i, e:e + len(a)] = a
            mask[i, e:e + len(a)] = 1
        problems = np.stack([start, name, move, place], axis=1).astype(np.int64)
        return Batch(tokens, mask, [row.tobytes() for row in problems])

    def space_size(self):
        return (len(self.corpus) - self.haystack_len + 1) * len(NAMES) * len(MOVES) * len(PLACES)

    def params(self):
        return {"name": self.name, "text": self.text_path, "text_chars": self.text_chars,
                "text_sha256": self.text_sha256, "haystack_len": self.haystack_len, "depth": self.depth,
                "depth_tokens": self.depth_tokens, "names": list(NAMES), "moves": list(MOVES),
                "places": list(PLACES)}


TASKS = {"copy": CopyTask, "reverse": ReverseTask, "retrieval": RetrievalTask, "equations": EquationTask,
         "mqar": MQARTask, "babifacts": BabiFactsTask}


# ------------------------------------------------------------------------------------------- generation
def draw_splits(task: Task, sizes: Dict[str, int], seed: int, progress: bool = False):
    """Yield ``(split, tokens, mask)`` blocks of distinct examples, test first, then valid, then train.

    Candidates come from ``numpy.random.default_rng(seed)`` in fixed-size draws; a candidate whose problem
    was already drawn (in any split) is skipped, so the splits are disjoint and free of duplicates.
    """
    need = sum(sizes.values())
    space = task.space_size()
    if space is not None and need > space:
        raise TaskError(f"{need} distinct {task.name} examples requested, but these options allow only "
                        f"{space}; lower the split sizes or enlarge the task (length, symbols, pairs)")
    rng = np.random.default_rng(seed)
    seen: set = set()
    order = [(s, sizes[s]) for s in SPLITS if sizes.get(s, 0) > 0]
    split_i, filled, drawn = 0, 0, 0
    budget = 20 * need + 100 * DRAW
    bar = Progress("synthetic.py", f"{task.name} examples", need, unit="examples", enabled=progress)
    try:
        while split_i < len(order):
            if drawn > budget:
                raise TaskError(f"only {len(seen)} distinct {task.name} examples found in {drawn} draws for "
                                f"{need} requested; the task's problem space is too small for these sizes")
            batch = task.sample(rng, task.draw)
            drawn += task.draw
            fresh = []
            for i, key in enumerate(batch.keys):
                if key not in seen:
                    seen.add(key)
                    fresh.append(i)
            pos = 0
            while pos < len(fresh) and split_i < len(order):
                name, size = order[split_i]
                take = fresh[pos:pos + size - filled]
                yield name, batch.tokens[take], batch.mask[take]
                bar.update(len(take))
                pos += len(take)
                filled += len(take)
                if filled == size:
                    split_i, filled = split_i + 1, 0
    finally:
        bar.close()


def _pad_to(arr: np.ndarray, length: int) -> np.ndarray:
    out = np.zeros((arr.shape[0], length), arr.dtype)
    out[:, :arr.shape[1]] = arr
    return out


def _record(tok: VocabTokenizer, split: str, index: int, row: np.ndarray, mask: np.ndarray) -> Dict[str, Any]:
    real = row != 0
    first_answer = int(np.argmax(mask)) if mask.any() else row.size
    return {"split": split, "index": index, "text": tok.decode(row[real]),
            "problem": tok.decode(row[:first_answer][real[:first_answer]]),
            "answer": tok.decode(row[mask.astype(bool)])}


def generate(task: Task, output_prefix: str, sizes: Dict[str, int], seed: int = 0, segment_multiple: int = 1,
             jsonl: bool = False, progress: Optional[bool] = None) -> Dict[str, Any]:
    """Write ``{output_prefix}_{train,valid,test}`` (+ ``.mask``, tokenizer, ``.json``, optional ``.jsonl``).

    Nothing appears under the final names until every split is complete.  Returns a summary per split.
    """
    for split in sizes:
        if split not in SPLITS:
            raise TaskError(f"unknown split {split!r} (splits: {', '.join(SPLITS)})")
        _check_int(f"--{split}-size", sizes[split], 0)
    if sum(sizes.values()) == 0:
        raise TaskError("every split size is 0: nothing to generate")
    seed = _check_int("--seed", seed, 0)
    m = _check_int("--segment-multiple", segment_multiple, 1)
    padded = -(-task.example_len // m) * m
    tok = task.tokenizer()
    dtype = optimal_dtype(tok.vocab_size)
    if progress is None:
        progress = sum(sizes.values()) >= 20000
    check_output_folder(output_prefix, "--output-prefix")
    tag = f".partial{os.getpid()}"
    prefixes = {s: f"{output_prefix}_{s}" for s in SPLITS if sizes.get(s, 0) > 0}
    writers: Dict[str, tuple] = {}
    jsonl_files: Dict[str, Any] = {}
    counts = {s: 0 for s in prefixes}
    scored = {s: 0 for s in prefixes}
    created: List[str] = []  # final files renamed into place so far
    folders = make_folders(os.path.dirname(os.path.abspath(output_prefix)))
    try:
        for s, p in prefixes.items():
            writers[s] = (IndexedDatasetWriter(p + tag, dtype=dtype), IndexedDatasetWriter(p + tag + ".mask",
                                                                                         dtype=np.uint8))
            if jsonl:
                jsonl_files[s] = open(p + ".jsonl" + tag, "w")
        for split, tokens, mask in draw_splits(task, sizes, seed, progress):
            tokens, mask = _pad_to(tokens, padded), _pad_to(mask, padded)
            lengths = np.full(tokens.shape[0], padded, np.int64)
            writers[split][0].add_documents(tokens.reshape(-1), lengths)
            writers[split][1].add_documents(mask.reshape(-1), lengths)
            if jsonl:
                f = jsonl_files[split]
                for row, mrow in zip(tokens, mask):
                    f.write(json.dumps(_record(tok, split, counts[split], row, mrow)) + "\n")
                    counts[split] += 1
            else:
                counts[split] += tokens.shape[0]
            scored[split] += int(mask.sum())
        for s in prefixes:
            for w in writers[s]:
                w.finalize()
            if jsonl:
                jsonl_files[s].close()
        summary = {}
        for s, p in prefixes.items():
            for src, dst in ((bin_path(p + tag), bin_path(p)), (idx_path(p + tag), idx_path(p)),
                             (bin_path(p + tag + ".mask"), bin_path(p + ".mask")),
                             (idx_path(p + tag + ".mask"), idx_path(p + ".mask"))):
                os.replace(src, dst)
                created.append(dst)
            if jsonl:
                os.replace(p + ".jsonl" + tag, p + ".jsonl")
                created.append(p + ".jsonl")
            spec = tok.save(p)
            created.append(os.path.join(os.path.dirname(os.path.abspath(p)), spec["file"]))
            meta = {
                "format": "MMIDIDX", "dtype": np.dtype(dtype).name, "vocab_size": tok.vocab_size,
                "eod_id": None, "pad_id": tok.pad_id, "tokenizer": spec,
                "documents": counts[s], "sequences": counts[s], "tokens": counts[s] * padded,
                "producer": "synthetic", "split": s, "loss_mask": os.path.basename(p) + ".mask",
                "task": {**task.params(), "seed": seed, "sizes": {k: sizes.get(k, 0) for k in SPLITS},
                         "segment_multiple": m, "example_len": task.example_len, "padded_len": padded,
                         "scored_tokens": scored[s]},
            }
            created.append(meta_path(p))
            write_metadata(p, meta)  # written last: its presence marks a complete split
            summary[s] = {"prefix": p, "examples": counts[s], "tokens": counts[s] * padded, "scored": scored[s]}
    except BaseException:
        with signals_deferred():
            for pair in writers.values():
                for w in pair:
                    w.abort()
            for s, f in jsonl_files.items():
                f.close()
            for s, p in prefixes.items():
                created += [bin_path(p + tag), idx_path(p + tag), bin_path(p + tag + ".mask"),
                            idx_path(p + tag + ".mask"), p + ".jsonl" + tag]
            for path in created:
                if os.path.exists(path):
                    os.remove(path)
            remove_folders(folders)
        raise
    return summary


# ------------------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="synthetic.py",
                           description="Generate synthetic memory tasks (RMT's, MQAR, bAbI facts in a haystack) as "
                                       "indexed datasets with answer masks.")
    sub = parser.add_subparsers(dest="task", required=True, metavar="TASK")
    common = CommandParser(add_help=False)
    common.add_argument("--output-prefix", required=True,
                        help="writes PREFIX_train, PREFIX_valid, PREFIX_test (.bin/.idx/.json, .mask, .vocab.json)")
    common.add_argument("--train-size", type=int_at_least(0), default=100_000, help="examples (default 100000)")
    common.add_argument("--valid-size", type=int_at_least(0), default=10_000, help="examples (default 10000)")
    common.add_argument("--test-size", type=int_at_least(0), default=20_000, help="examples (default 20000)")
    common.add_argument("--seed", type=int_at_least(0), default=0, help="random seed (default 0)")
    common.add_argument("--segment-multiple", type=int_at_least(1), default=1,
                        help="pad every example to a multiple of this many tokens (the training segment length)")
    common.add_argument("--format", choices=("indexed", "jsonl"), default="indexed",
                        help="'jsonl' also writes PREFIX_split.jsonl (one example per line, as text)")
    common.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bar (default: on from 20000 examples)")
    for name, helptext in (("copy", "X <s> X X"), ("reverse", "X <s> reverse(X)")):
        p = sub.add_parser(name, parents=[common], help=helptext)
        p.add_argument("--length", type=int_at_least(1), default=24, help="length L of X (default 24)")
        p.add_argument("--num-symbols", type=bounded(int, 1, len(SYMBOLS)), default=8,
                       help=f"alphabet size, at most {len(SYMBOLS)} (default 8)")
    p = sub.add_parser("retrieval", parents=[common], help="k1 v1 ... kK vK q <s> v")
    p.add_argument("--num-pairs", type=bounded(int, 1, len(LETTERS)), default=4,
                   help="key-value pairs K, at most 26 (default 4)")
    p = sub.add_parser("equations", parents=[common], help="quadratic equations, RMT chunk layout")
    p.add_argument("--max-root", type=int_at_least(1), default=100, help="integer roots in (-R, R) (default 100)")
    p.add_argument("--max-scale", type=int_at_least(1), default=10, help="equation scaled by +-[1, S] (default 10)")
    p.add_argument("--no-root-fraction", type=bounded(float, 0, 1), default=0.2,
                   help="share without real roots (default 0.2)")
    p.add_argument("--chunk-len", type=int_at_least(0, "0 = longest possible"), default=0,
                   help="tokens per chunk; 0 = longest possible (default)")
    p.add_argument("--score", choices=("solution", "answer"), default="solution",
                   help="mask every chunk after the equation (default) or the answer chunk only")
    p = sub.add_parser("mqar", parents=[common], help="k1 v1 ... kP vP <gap filler> q1 a1 ... qQ aQ (Zoology's MQAR)")
    p.add_argument("--num-pairs", type=int_at_least(1), default=8, help="key-value pairs P (default 8)")
    p.add_argument("--num-queries", type=int_at_least(1), default=8,
                   help="queries Q, distinct keys of the pairs, Q <= P (default 8)")
    p.add_argument("--key-vocab", type=int_at_least(1), default=64, help="key tokens, at least P (default 64)")
    p.add_argument("--value-vocab", type=int_at_least(1), default=64,
                   help="value tokens, disjoint from the keys (default 64)")
    p.add_argument("--gap", type=int_at_least(0), default=0,
                   help="filler tokens between the last pair and the first query (default 0); k*N with segments "
                        "of N tokens puts k segments of filler between every pair and its query")
    p.add_argument("--filler-vocab", type=int_at_least(1), default=1,
                   help="filler tokens drawn uniformly from this many symbols; 1 = one constant filler (default)")
    p.add_argument("--example-len", type=int_at_least(0, "0 = 2P + gap + 2Q"), default=0,
                   help="pad the front with filler to this many tokens, so the queries end every example "
                        "whatever the gap; 0 = 2P + gap + 2Q (default)")
    p = sub.add_parser("babifacts", parents=[common], help="a bAbI fact at a chosen depth of real text, its question")
    p.add_argument("--text", default=None,
                   help="UTF-8 text file of the haystack, .xz read with lzma "
                        "(default: the repository's corpora/tinyshakespeare/input.txt.xz)")
    p.add_argument("--haystack-len", type=int_at_least(1), default=1024,
                   help="characters of text around the fact (default 1024)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--depth", type=bounded(float, 0, 1), default=None,
                       help="share of the haystack before the fact: 0 = first, 1 = just before the question "
                            "(default 0.5)")
    where.add_argument("--depth-tokens", type=int_at_least(0), default=None,
                       help="haystack characters before the fact, at most --haystack-len")
    return parser


def make_task(args: argparse.Namespace) -> Task:
    if args.task in ("copy", "reverse"):
        return TASKS[args.task](length=args.length, num_symbols=args.num_symbols)
    if args.task == "retrieval":
        return RetrievalTask(num_pairs=args.num_pairs)
    if args.task == "mqar":
        return MQARTask(num_pairs=args.num_pairs, num_queries=args.num_queries, key_vocab=args.key_vocab,
                        value_vocab=args.value_vocab, gap=args.gap, filler_vocab=args.filler_vocab,
                        example_len=args.example_len)
    if args.task == "babifacts":
        return BabiFactsTask(haystack_len=args.haystack_len, depth=args.depth, depth_tokens=args.depth_tokens,
                             text=args.text)
    return EquationTask(max_root=args.max_root, max_scale=args.max_scale, no_root_fraction=args.no_root_fraction,
                        chunk_len=args.chunk_len, score=args.score)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command: exit status 0, 2 on bad options (one line on stderr), 130 when interrupted; nothing is
    left behind unless it succeeds."""
    args = build_parser().parse_args(argv)
    try:
        with sigterm_as_interrupt():
            task = make_task(args)
            summary = generate(task, args.output_prefix,
                               {"train": args.train_size, "valid": args.valid_size, "test": args.test_size},
                               seed=args.seed, segment_multiple=args.segment_multiple,
                               jsonl=args.format == "jsonl", progress=args.progress)
    except (TaskError, CommandError) as e:
        return fail("synthetic.py", e)
    except OSError as e:
        return fail("synthetic.py", f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}")
    except KeyboardInterrupt:
        return interrupted("synthetic.py")
    for split, info in summary.items():
        print(f"{split}: {info['examples']} examples, {info['tokens']} tokens, {info['scored']} scored "
              f"-> {info['prefix']}.{{bin,idx,json}} + {os.path.basename(info['prefix'])}.mask")
    return 0


if __name__ == "__main__":
    sys.exit(main())
