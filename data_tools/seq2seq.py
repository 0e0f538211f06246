"""Time-step data for an encoder-decoder with a memory (MemBART): BART's denoising pretraining on ordered
documents, and dialogue turns; ordered, resumable, numpy only.

Units and episodes.  A *unit* is one time step of one row: a chunk of a document (``denoising``: every document
cut into consecutive chunks of at most ``step_len`` tokens) or a response turn of a dialogue (``dialogue``: turn t
>= 1 of a dialogue stored as one document of turn sequences by ``data_tools/dialogue.py``).  An *episode* is the
document or dialogue; the memory is carried from unit to unit inside an episode and reset at its first unit.

Layout (as ``OrderedStream``'s, in units instead of tokens).  The table of all units, in dataset order, is cut into
``S = dp_size * grad_accum * micro_batch`` contiguous stripes of ``L`` units, a multiple of the rollout length
``horizon`` H (the remainder, at the end, is not used in the epoch); stripe ``s = (dp_rank * grad_accum + slot) *
micro_batch + row`` reads units ``begin[s] + k H + j`` (j < H) at step ``k`` of an epoch: a micro-batch is a rollout
of H consecutive time steps per row.  A step's reset flag is True at an episode's first unit and at the first unit
of every epoch (a stripe may begin inside an episode; a new epoch goes back to the stripe's start).

Examples.  ``denoising`` (Lewis et al. 2019, BART §2.2 "text infilling", optional "sentence permutation"): the
source is the noised chunk, the target the clean chunk.  ``dialogue`` (MemBART's fine-tuning, arXiv 2209.07634):
the source is the history (the last ``history_turns`` turns before t, each followed by ``eos``, cut from the left
to ``step_len`` tokens), the target turn t (cut to ``step_len``).  Both are ``[bos] tokens [eos]`` padded with
``pad`` to ``step_len + 2``; ``loss_mask`` is 1 on the target's real tokens (BOS and EOS included, as BART's
labels).

Noise is a pure function of (seed, stream step, stripe, time step in the rollout), i.e. of (seed, step, data-parallel
rank, slot, row, j), drawn from ``numpy.random.default_rng(SeedSequence([seed, step, stripe, j]))``: ``get(step, slot)`` needs no history, so a
resume is exact and the stream's state is a handful of integers (``state_dict()``).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence

import numpy as np

from data_tools.indexed import IndexedDataset
from data_tools.streams import POLICIES, SteppedStream, StreamStateError, _Source, _positive_int

STATE_FORMAT = "memtrain.seq2seq_stream"
STATE_VERSION = 1
TASKS = ("denoising", "dialogue")


# ----------------------------------------------------------------------------------------------------- noise
@dataclass(frozen=True)
class NoiseConfig:
    """BART's noise (fairseq ``DenoisingDataset`` with ``mask_length span-poisson``, ``replace_length 1``):
    ``mask_ratio`` of the tokens (rounded up) are masked in spans of Poisson(``poisson_lambda``) lengths, each span
    replaced by one ``mask_id`` (a zero-length span inserts one); ``random_ratio`` of those masks become a random
    token of ``[random_low, random_high)``; ``permute_sentences`` shuffles the sentences (ending after a token of
    ``sentence_end_ids``) before masking."""
    mask_id: int
    mask_ratio: float = 0.3
    poisson_lambda: float = 3.0
    random_ratio: float = 0.0
    random_low: int = 0
    random_high: int = 1
    permute_sentences: bool = False
    sentence_end_ids: Sequence[int] = ()

    def validate(self) -> None:
        if not 0.0 <= self.mask_ratio <= 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1], got {self.mask_ratio}")
        if self.poisson_lambda <= 0:
            raise ValueError(f"poisson_lambda must be > 0, got {self.poisson_lambda}")
        if not 0.0 <= self.random_ratio <= 1.0:
            raise ValueError(f"random_ratio must be in [0, 1], got {self.random_ratio}")
        if self.random_ratio and self.random_high <= self.random_low:
            raise ValueError(f"random tokens need random_low < random_high, got [{self.random_low}, "
                             f"{self.random_high})")
        if self.permute_sentences and not self.sentence_end_ids:
            raise ValueError("permute_sentences needs sentence_end_ids (the tokens that end a sentence)")


def permute_sentences(tokens: np.ndarray, rng: np.random.Generator, end_ids: Sequence[int]) -> np.ndarray:
    """The sentences of ``tokens`` (each ends after a token of ``end_ids``; a last one may end without) in a random
    order (BART's sentence permutation).  Same tokens, same length."""
    if tokens.size == 0:
        return tokens
    ends = np.flatnonzero(np.isin(tokens, np.asarray(end_ids))) + 1
    bounds = np.unique(np.concatenate([[0], ends, [tokens.size]]))
    pieces = [tokens[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    return np.concatenate([pieces[i] for i in rng.permutation(len(pieces))]) if len(pieces) > 1 else tokens


def span_infill(tokens: np.ndarray, rng: np.random.Generator, cfg: NoiseConfig) -> np.ndarray:
    """BART's text infilling of ``tokens`` [n]: ``m = ceil(mask_ratio n)`` tokens in spans with Poisson lengths
    (drawn until they cover ``m``, the last one cut to fit), spans placed uniformly at random between the unmasked
    tokens (never adjacent, so every span is one mask token; spans beyond the ``n - m + 1`` gaps are merged into
    others; zero-length spans beyond ``m`` spans in all are dropped, so the output is never longer than the input),
    each span replaced by ``mask_id`` (or, with probability ``random_ratio``, a random token).  Returns int64 [n']."""
    n = int(tokens.size)
    m = min(n, int(math.ceil(n * cfg.mask_ratio)))
    if m == 0:
        return tokens.astype(np.int64)
    lengths: List[int] = []
    total = 0
    while total < m:
        L = int(rng.poisson(cfg.poisson_lambda))
        lengths.append(L)
        total += L
    lengths[-1] -= total - m
    lengths = np.asarray(lengths, np.int64)
    zeros = np.flatnonzero(lengths == 0)
    if lengths.size > m and zeros.size:                    # keep the output no longer than the input
        drop = zeros[:lengths.size - m]
        lengths = np.delete(lengths, drop)
    u = n - m
    if lengths.size > u + 1:                               # more spans than gaps: merge the surplus into others
        extra = lengths[u + 1:]
        lengths = lengths[:u + 1].copy()
        np.add.at(lengths, rng.integers(0, u + 1, extra.size), extra)
    k = lengths.size
    gaps = np.sort(rng.choice(u + 1, size=k, replace=False))
    repl = np.full(k, cfg.mask_id, np.int64)
    if cfg.random_ratio:
        rnd = rng.random(k) < cfg.random_ratio
        repl[rnd] = rng.integers(cfg.random_low, cfg.random_high, int(rnd.sum()))
    out = np.empty(u + k, np.int64)
    src = 0          # next token of the input
    o = 0
    span = 0
    for g in range(u + 1):
        if span < k and gaps[span] == g:
            out[o] = repl[span]
            o += 1
            src += int(lengths[span])
            span += 1
        if g < u:
            out[o] = tokens[src]
            o += 1
            src += 1
    return out


def add_noise(tokens: np.ndarray, rng: np.random.Generator, cfg: NoiseConfig) -> np.ndarray:
    """Sentence permutation (if enabled), then text infilling."""
    if cfg.permute_sentences:
        tokens = permute_sentences(tokens, rng, cfg.sentence_end_ids)
    return span_infill(tokens, rng, cfg)


# ----------------------------------------------------------------------------------------------------- units
@dataclass
class UnitTable:
    """All time steps of a dataset, in order: ``start`` / ``length`` (token offset and count of the unit's target
    tokens), ``episode`` (its document / dialogue), ``index`` (its position in the episode, 0 = first).  For
    dialogue units ``seq`` is the dataset sequence (turn) of the target, else None."""
    start: np.ndarray
    length: np.ndarray
    episode: np.ndarray
    index: np.ndarray
    seq: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return int(self.start.size)

    @property
    def first(self) -> np.ndarray:
        return self.index == 0


def document_chunks(src: _Source, step_len: int) -> UnitTable:
    """Every document cut into consecutive chunks of at most ``step_len`` tokens (the last one shorter)."""
    starts, lengths = src.doc_starts, src.doc_lengths
    n = -(-lengths // step_len)                                         # chunks per document
    doc = np.repeat(np.arange(starts.size, dtype=np.int64), n)
    first = np.cumsum(n) - n
    index = np.arange(int(n.sum()), dtype=np.int64) - np.repeat(first, n)
    start = starts[doc] + index * step_len
    length = np.minimum(step_len, starts[doc] + lengths[doc] - start)
    return UnitTable(start, length, doc, index)


def dialogue_turns(ds: IndexedDataset) -> UnitTable:
    """The response turns (turn t >= 1) of every dialogue (document) of a dataset whose sequences are turns."""
    seq_starts = np.asarray(ds.sequence_pointers, np.int64) // ds.dtype.itemsize
    seq_lengths = np.asarray(ds.sequence_lengths, np.int64)
    di = np.asarray(ds.document_indices, np.int64)
    turns = np.diff(di)
    dialogue = np.repeat(np.arange(turns.size, dtype=np.int64), turns)
    turn = np.arange(int(di[-1]), dtype=np.int64) - np.repeat(di[:-1], turns)
    keep = turn >= 1
    seq = np.flatnonzero(keep).astype(np.int64)
    return UnitTable(seq_starts[seq], seq_lengths[seq], dialogue[seq], turn[seq] - 1, seq)


# ----------------------------------------------------------------------------------------------------- batches
@dataclass
class Seq2SeqMicroBatch:
    """One micro-batch: ``H`` consecutive time steps (a rollout) of B rows, each step ``W = step_len + 2`` wide,
    the steps side by side along dim 1 (time step j at columns ``[j W, (j + 1) W)``).

    ``tokens`` int64 [B, H W]: the encoder inputs ``[bos] source [eos]`` padded with ``pad``; ``source_mask`` bool
    [B, H W]: their real tokens; ``targets`` int64 [B, H W]: ``[bos] target [eos]`` padded; ``loss_mask`` float32
    [B, H W]: 1 on the targets' real tokens; ``step_resets`` bool [B, H]: the row's memory starts afresh before
    step j (an episode's first step, or the first step of an epoch); ``reset`` bool [B]: ``step_resets[:, 0]``
    (the memory is reset before the rollout); ``step_in_episode`` int64 [B, H]: each unit's position in its document
    / dialogue (-1 for padding rows of an evaluation stream); ``epoch`` / ``step`` / ``slot``: as ``MicroBatch``'s."""
    tokens: np.ndarray
    source_mask: np.ndarray
    targets: np.ndarray
    loss_mask: np.ndarray
    reset: np.ndarray
    step_resets: np.ndarray
    step_in_episode: np.ndarray
    epoch: int
    step: int
    slot: int

    @property
    def num_scored(self) -> int:
        return int(self.loss_mask.sum())

    @property
    def horizon(self) -> int:
        return int(self.step_resets.shape[1])

    @property
    def width(self) -> int:
        """Columns of one time step (``step_len + 2``)."""
        return int(self.tokens.shape[1]) // self.horizon


@dataclass(frozen=True)
class Specials:
    """The encoder-decoder's special tokens (from the model config)."""
    bos: int
    eos: int
    pad: int


class _Examples:
    """Builds the (source, target) of units: denoising or dialogue (module docstring)."""

    def __init__(self, task: str, src: _Source, table: UnitTable, step_len: int, specials: Specials,
                 noise: Optional[NoiseConfig], history_turns: int, ds: Optional[IndexedDataset]):
        self.task, self.src, self.table, self.N, self.sp = task, src, table, step_len, specials
        self.noise, self.history_turns = noise, history_turns
        if task == "dialogue":
            self.seq_starts = np.asarray(ds.sequence_pointers, np.int64) // ds.dtype.itemsize
            self.seq_lengths = np.asarray(ds.sequence_lengths, np.int64)

    def _read(self, start: int, length: int) -> np.ndarray:
        return np.asarray(self.src.tokens[start:start + length], dtype=np.int64)

    def source_target(self, u: int, rng: Optional[np.random.Generator]):
        t = self.table
        target = self._read(int(t.start[u]), min(int(t.length[u]), self.N))
        if self.task == "denoising":
            return add_noise(target, rng, self.noise), target
        seq = int(t.seq[u])
        first = seq - int(t.index[u]) - 1                   # the dialogue's first turn
        lo = max(first, seq - self.history_turns) if self.history_turns > 0 else first
        parts: List[np.ndarray] = []
        for s in range(lo, seq):
            parts += [self._read(int(self.seq_starts[s]), int(self.seq_lengths[s])),
                      np.array([self.sp.eos], np.int64)]
        history = np.concatenate(parts)[-self.N:] if parts else np.zeros(0, np.int64)
        return history, target

    def fill(self, units: np.ndarray, rngs: List[Optional[np.random.Generator]]):
        """(tokens, source_mask, targets, loss_mask) for units (-1: a padding row)."""
        B, W = units.size, self.N + 2
        sp = self.sp
        tokens = np.full((B, W), sp.pad, np.int64)
        targets = np.full((B, W), sp.pad, np.int64)
        for i, (u, rng) in enumerate(zip(units.tolist(), rngs)):
            if u < 0:
                continue
            s, t = self.source_target(u, rng)
            tokens[i, :s.size + 2] = np.concatenate([[sp.bos], s, [sp.eos]])
            targets[i, :t.size + 2] = np.concatenate([[sp.bos], t, [sp.eos]])
        lengths_t = np.array([0 if u < 0 else min(int(self.table.length[u]), self.N) + 2 for u in units.tolist()])
        lengths_s = np.array([0 if u < 0 else int((tokens[i] != sp.pad).sum()) for i, u in enumerate(units.tolist())])
        cols = np.arange(W)
        return (tokens, cols[None, :] < lengths_s[:, None], targets,
                (cols[None, :] < lengths_t[:, None]).astype(np.float32))


def _check_common(task: str, step_len: int, specials: Specials, noise: Optional[NoiseConfig], src: _Source,
                  vocab_size: Optional[int]) -> None:
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    _positive_int("step_len", step_len)
    if task == "denoising":
        if noise is None:
            raise ValueError("the denoising task needs a NoiseConfig (its mask_id)")
        noise.validate()
    meta_vocab = getattr(src, "vocab_size", None)
    if vocab_size is not None and meta_vocab is not None and meta_vocab > vocab_size:
        raise ValueError(f"{src.name}: the data's tokenizer has {meta_vocab} ids, more than the model's vocab_size "
                         f"{vocab_size}")


def _open(dataset) -> tuple:
    ds = dataset if isinstance(dataset, IndexedDataset) else IndexedDataset(os.fspath(dataset))
    src = _Source(ds, None, None)
    from data_tools.metadata import meta_path, read_metadata
    src.vocab_size = read_metadata(ds.prefix).get("vocab_size") if os.path.isfile(meta_path(ds.prefix)) else None
    return ds, src


class Seq2SeqStream(SteppedStream):
    """Ordered, resumable micro-batches of time steps for one data-parallel rank (module docstring).

    ``get(step, slot)`` returns micro-batch ``slot`` of stream step ``step`` (steps count across epochs); iterating
    yields the ``grad_accum`` micro-batches of each step from the current position; ``state_dict()`` /
    ``load_state_dict()`` save and restore the position.  Raises ValueError on bad arguments or a dataset with too
    few units for the layout."""

    def __init__(self, dataset, task: str, step_len: int, specials: Specials, noise: Optional[NoiseConfig] = None,
                 dp_rank: int = 0, dp_size: int = 1, micro_batch: int = 1, grad_accum: int = 1, seed: int = 0,
                 history_turns: int = 0, vocab_size: Optional[int] = None, horizon: int = 1):
        self.dp_size = _positive_int("dp_size", dp_size)
        self.horizon = H = _positive_int("horizon", horizon)
        if isinstance(dp_rank, bool) or not isinstance(dp_rank, (int, np.integer)) or not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank!r} is out of range for dp_size={dp_size}")
        self.dp_rank = int(dp_rank)
        self.micro_batch = _positive_int("micro_batch", micro_batch)
        self.grad_accum = _positive_int("grad_accum", grad_accum)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.seed, self.task, self.step_len = int(seed), task, int(step_len)
        ds, self.src = _open(dataset)
        _check_common(task, step_len, specials, noise, self.src, vocab_size)
        self.table = document_chunks(self.src, step_len) if task == "denoising" else dialogue_turns(ds)
        self.examples = _Examples(task, self.src, self.table, step_len, specials, noise, history_turns, ds)
        self.num_stripes = S = self.dp_size * self.grad_accum * self.micro_batch
        C = len(self.table)
        self.stripe_units = (C // S // H) * H
        self.steps_per_epoch = self.stripe_units // H
        if self.steps_per_epoch == 0:
            raise ValueError(f"{self.src.name}: {C} time steps ({task}, step_len {step_len}) do not fill the {S} "
                             f"stripes (dp_size {dp_size} x grad_accum {grad_accum} x micro_batch {micro_batch}) with "
                             f"a rollout of {H} steps each; reduce micro_batch, grad_accum, dp_size or the horizon")
        self.begin = np.arange(S, dtype=np.int64) * self.stripe_units
        self.dropped_units = C - S * self.stripe_units
        self._step = 0
        self._layout_fields = {"dp_size": self.dp_size, "grad_accum": self.grad_accum,
                               "micro_batch": self.micro_batch, "step_len": self.step_len, "task": task,
                               "horizon": H,
                               "history_turns": int(history_turns), "seed": self.seed,
                               "noise": None if noise is None else repr(noise)}

    def stripe(self, slot: int, row: int) -> int:
        return (self.dp_rank * self.grad_accum + slot) * self.micro_batch + row

    def get(self, step: int, slot: int = 0) -> Seq2SeqMicroBatch:
        """Micro-batch ``slot`` of stream step ``step``: a pure function of (seed, step, slot) and the layout."""
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"step must be a non-negative integer, got {step!r}")
        if isinstance(slot, bool) or not isinstance(slot, (int, np.integer)) or not 0 <= slot < self.grad_accum:
            raise ValueError(f"slot={slot!r} is out of range for grad_accum={self.grad_accum}")
        epoch, k = divmod(int(step), self.steps_per_epoch)
        H = self.horizon
        stripes = [self.stripe(slot, r) for r in range(self.micro_batch)]
        parts, resets, index = [], [], []
        for j in range(H):
            units = self.begin[stripes] + k * H + j
            rngs = [np.random.default_rng(np.random.SeedSequence([self.seed, int(step), s, j])) for s in stripes]
            parts.append(self.examples.fill(units, rngs))
            resets.append(self.table.first[units] | (k == 0 and j == 0))
            index.append(self.table.index[units])
        tokens, smask, targets, lmask = (np.concatenate([p[i] for p in parts], 1) for i in range(4))
        step_resets = np.stack(resets, 1)
        return Seq2SeqMicroBatch(tokens, smask, targets, lmask, step_resets[:, 0].copy(), step_resets,
                                 np.stack(index, 1), epoch, int(step), int(slot))

    def state_dict(self) -> Dict[str, Any]:
        """Plain JSON-able state: position, layout (noise settings included) and dataset identity."""
        return {"format": STATE_FORMAT, "version": STATE_VERSION, "step": self._step, "epoch": self.epoch,
                "steps_per_epoch": self.steps_per_epoch, "layout": dict(self._layout_fields),
                "dataset": {"fingerprint": self.src.fingerprint, "num_tokens": self.src.num_tokens}}

    def load_state_dict(self, state: Dict[str, Any], policy: str = "error") -> Dict[str, Any]:
        """Restore the position.  Same layout: the exact step.  Another layout: ``policy`` ``error`` raises
        StreamStateError naming what changed; ``restart_epoch`` / ``proportional`` map the position as
        ``OrderedStream`` does and ask for a memory reset (``reset_memory`` in the returned dict)."""
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(map(repr, POLICIES))}, got {policy!r}")
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise StreamStateError(f"stream state: not a {STATE_FORMAT} state (format "
                                   f"{state.get('format') if isinstance(state, dict) else type(state).__name__!r})")
        if state.get("version") != STATE_VERSION:
            raise StreamStateError(f"stream state: unsupported version {state.get('version')!r}")
        try:
            step, spe, layout, ds = int(state["step"]), int(state["steps_per_epoch"]), state["layout"], state["dataset"]
        except (KeyError, TypeError, ValueError) as e:
            raise StreamStateError(f"stream state: missing or malformed field ({e})") from None
        if ds.get("fingerprint") != self.src.fingerprint or ds.get("num_tokens") != self.src.num_tokens:
            raise StreamStateError(f"stream state was saved on another dataset (fingerprint {ds.get('fingerprint')}) "
                                   f"than {self.src.name} (fingerprint {self.src.fingerprint})")
        changed = {k: [layout.get(k), v] for k, v in self._layout_fields.items() if layout.get(k) != v}
        epoch = step // spe if spe else 0
        return self._resume("seq2seq stream", step, epoch, spe, changed, policy)


class Seq2SeqEvalStream:
    """Evaluation over a whole split, one time step per micro-batch (horizon 1): every unit scored exactly once.  The episodes are cut into ``num_streams *
    dp_size`` contiguous streams at episode starts (nearly equal unit counts); rank ``dp_rank`` reads its
    ``num_streams`` streams as the rows of its micro-batches; a row past its stream's end is padding (unit -1:
    pad tokens, loss mask 0, ``step_in_episode`` -1).  The noise of a denoising split is drawn from (seed, step,
    stream), as in training: every evaluation sees the same sources."""

    def __init__(self, dataset, task: str, step_len: int, specials: Specials, noise: Optional[NoiseConfig] = None,
                 num_streams: int = 1, dp_rank: int = 0, dp_size: int = 1, seed: int = 0, history_turns: int = 0,
                 vocab_size: Optional[int] = None):
        self.num_streams = _positive_int("num_streams", num_streams)
        self.dp_size = _positive_int("dp_size", dp_size)
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank!r} is out of range for dp_size={dp_size}")
        self.seed = int(seed)
        ds, self.src = _open(dataset)
        _check_common(task, step_len, specials, noise, self.src, vocab_size)
        self.table = document_chunks(self.src, step_len) if task == "denoising" else dialogue_turns(ds)
        self.examples = _Examples(task, self.src, self.table, step_len, specials, noise, history_turns, ds)
        C, K = len(self.table), self.num_streams * self.dp_size
        firsts = np.flatnonzero(self.table.first)
        if firsts.size < K:
            raise ValueError(f"{self.src.name}: {firsts.size} episodes ({task}) for {K} evaluation streams "
                             f"(num_streams x dp_size); use fewer streams")
        ideal = np.array([(s * C) // K for s in range(K)], dtype=np.int64)
        pick = np.searchsorted(firsts, ideal, side="left")
        k = np.arange(K)
        pick = np.minimum(np.maximum.accumulate(pick - k) + k, firsts.size - K + k)
        bounds = np.append(firsts[pick], C)
        r0 = dp_rank * self.num_streams
        self.begin = bounds[r0:r0 + self.num_streams]
        self.length = bounds[r0 + 1:r0 + self.num_streams + 1] - self.begin
        self.num_steps = int(self.length.max())
        self.num_units = C
        self.dp_rank = int(dp_rank)

    def __len__(self) -> int:
        return self.num_steps

    def get(self, step: int) -> Seq2SeqMicroBatch:
        if not 0 <= step < self.num_steps:
            raise ValueError(f"step={step!r} is out of range for {self.num_steps} evaluation steps")
        live = step < self.length
        units = np.where(live, self.begin + step, -1)
        streams = self.dp_rank * self.num_streams + np.arange(self.num_streams)
        rngs = [np.random.default_rng(np.random.SeedSequence([self.seed, int(step), int(s), 0])) for s in streams]
        tokens, smask, targets, lmask = self.examples.fill(units, rngs)
        safe = np.maximum(units, 0)
        reset = live & (self.table.first[safe] | (step == 0))
        index = np.where(live, self.table.index[safe], -1)
        return Seq2SeqMicroBatch(tokens, smask, targets, lmask, reset, reset[:, None].copy(), index[:, None], 0,
                                 int(step), 0)

    def __iter__(self) -> Iterator[Seq2SeqMicroBatch]:
        for step in range(self.num_steps):
            yield self.get(step)
