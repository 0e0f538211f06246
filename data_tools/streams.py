"""Ordered token streams: the data order memory-augmented language models need.

A memory model (Transformer-XL, LaMemo, RMT, fast weights ...) carries state from one segment to the next,
so batch row ``b`` at step ``t + 1`` must continue the text that row ``b`` read at step ``t``
(Transformer-XL's ``LMOrderedIterator``).  Shuffled samplers (Megatron, GPT-NeoX, torchtitan) cannot do this.

Layout.  The dataset's token stream is cut into ``S = dp_size * grad_accum * micro_batch`` contiguous
*stripes*, one per (data-parallel rank, accumulation slot, batch row), in that order::

    stripe index  s = (dp_rank * grad_accum + slot) * micro_batch + row

Stripe ``s`` owns ``L`` consecutive (input, target) pairs starting at token ``begin[s]``: inputs
``begin[s] + j`` and targets ``begin[s] + j + 1`` for ``j < L``, with ``L`` a multiple of the segment length
``N``.  Step ``k`` of an epoch reads pairs ``[k N, (k+1) N)`` of every stripe, so an epoch has ``L / N`` steps
and every target of the dataset that lies in a stripe is scored exactly once per epoch.  Tokens that are never
a target (token 0, and the tail that does not fill a whole stripe of whole segments) are counted in
``dropped_tokens``.

A micro-batch is a pure function of (stream step, accumulation slot) given the layout: ``get(step, slot)``
needs no history, so a resume is exact and the state is a handful of integers (``state_dict()``).

Options:

* ``roll``: each epoch rotates every stripe's pairs by a random offset (LaMemo's ``--roll``), drawn from
  ``(seed, epoch)`` with one draw per stripe.  The rotation wraps inside the stripe, so every target is still
  scored exactly once per epoch; the wrap point is a discontinuity and is flagged like a document start.
* ``align="document"``: stripes begin at document starts and rotate only by whole documents.  With
  fixed-length examples whose length is a multiple of ``N`` (the synthetic tasks, written with
  ``--segment-multiple N``) every segment lies inside one example, every row is at the same segment of its
  example at every step, and ``reset`` marks exactly the first segment of each example.
* ``loss_mask``: a companion uint8 dataset (same tokens, 1 = scored) restricts the loss to, e.g., the answer
  tokens of a synthetic task; ``"auto"`` reads it from ``prefix.json``'s ``loss_mask`` field.

Reset flags.  Per row, ``doc_start`` is the offset ``j`` in ``[0, N)`` of the *last* input position of the
segment where a new piece of text starts, or -1:  position ``j`` starts a document, or it does not follow
position ``j - 1`` in the dataset (the roll wrap point; for ``j = 0``, the previous segment of the row, so the
first segment of every epoch has ``doc_start >= 0``).  ``reset = doc_start >= 0``.  ``doc_start == 0`` means
the whole segment belongs to the new text, so a memory reset before this segment is exact.

``EvalStream`` covers a whole split with one or a few streams and no dropped targets: the last segment of a
stream may be short and is padded (pad token, loss mask 0).
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Union

import numpy as np

from data_tools.indexed import IndexedDataset
from data_tools.metadata import meta_path, read_metadata

ALIGNS = ("token", "document")
POLICIES = ("error", "restart_epoch", "proportional")
STATE_FORMAT = "memtrain.ordered_stream"
STATE_VERSION = 1

DatasetLike = Union[str, os.PathLike, IndexedDataset]


class StreamStateError(ValueError):
    """A stream state that cannot be loaded as it is (other dataset, other layout, malformed)."""


@dataclass
class MicroBatch:
    """One micro-batch of an ordered stream (B rows of N positions).

    ``tokens``/``targets``: int64 [B, N], targets are the next tokens.  ``loss_mask``: float32 [B, N], 1 where
    the target is scored (all ones unless a companion mask or padding says otherwise).  ``reset``: bool [B],
    ``doc_start``: int64 [B] (see the module docstring).  ``epoch``/``step``: the stream's epoch and step
    (``step`` counts from the start of training across epochs); ``slot``: the accumulation slot.
    ``doc_starts``: bool [B, N], True at every position where new text starts (a document start, the roll
    wrap point, position 0 of a row that does not continue its previous segment): the model's per-position
    memory reset (``model(..., reset=doc_starts)``).
    """

    tokens: np.ndarray
    targets: np.ndarray
    loss_mask: np.ndarray
    reset: np.ndarray
    doc_start: np.ndarray
    epoch: int
    step: int
    slot: int
    doc_starts: Optional[np.ndarray] = None

    @property
    def num_scored(self) -> int:
        return int(self.loss_mask.sum())


# ---------------------------------------------------------------------------------------------------- source
def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _metadata_or_none(prefix: Optional[str]) -> Optional[Dict[str, Any]]:
    if prefix is None or not os.path.isfile(meta_path(prefix)):
        return None
    return read_metadata(prefix)


def dataset_fingerprint(ds: IndexedDataset) -> str:
    """A cheap identity of a dataset: sizes, dtype, document structure and a sample of tokens.

    It reads about 200 KiB in 66 contiguous pieces whatever the corpus size (cheap at every start, even on
    a cold network filesystem); it detects a different or regenerated corpus, not a single flipped token in
    the middle of a large one.
    """
    h = hashlib.sha256()
    h.update(f"{ds.dtype.str}|{ds.num_tokens}|{ds.num_documents}|{ds.sequence_count}".encode())
    di = np.asarray(ds.document_indices)
    h.update(np.ascontiguousarray(di[:: max(1, di.size // 4096)]).tobytes())
    h.update(np.ascontiguousarray(np.asarray(ds.sequence_lengths)[: 1 << 12]).tobytes())
    tok = np.asarray(ds.tokens)
    for a in np.linspace(0, max(tok.size - 1024, 0), 64).astype(np.int64).tolist():
        h.update(np.ascontiguousarray(tok[a:a + 1024]).tobytes())
    h.update(np.ascontiguousarray(tok[-(1 << 14):]).tobytes())
    return h.hexdigest()[:20]


class _Source:
    """The token memmap, its document starts and the optional loss-mask memmap behind a stream."""

    def __init__(self, dataset: DatasetLike, loss_mask: Any, pad_id: Optional[int]):
        ds = dataset if isinstance(dataset, IndexedDataset) else IndexedDataset(os.fspath(dataset))
        self.ds = ds
        self.name = ds.prefix
        self.num_tokens = int(ds.num_tokens)
        self.tokens = np.asarray(ds.tokens)  # plain ndarray view of the memmap: fast slicing, no copy
        offsets = ds.document_token_offsets()
        starts = offsets[:-1][offsets[:-1] < self.num_tokens]  # empty documents repeat an offset
        keep = np.ones(starts.size, bool)
        keep[1:] = starts[1:] != starts[:-1]
        self.doc_starts = np.ascontiguousarray(starts[keep], dtype=np.int64)
        self.doc_lengths = np.diff(np.append(self.doc_starts, self.num_tokens))
        meta = _metadata_or_none(ds.prefix)
        self.mask_ds = self._resolve_mask(loss_mask, meta, offsets)
        self.mask = None if self.mask_ds is None else np.asarray(self.mask_ds.tokens)
        if pad_id is None:
            pad_id = next((meta[k] for k in ("pad_id", "eod_id") if meta and meta.get(k) is not None), 0)
        self.pad_id = int(pad_id)
        self.fingerprint = dataset_fingerprint(ds)
        self.mask_fingerprint = None if self.mask_ds is None else dataset_fingerprint(self.mask_ds)

    def _resolve_mask(self, loss_mask, meta, offsets) -> Optional[IndexedDataset]:
        if loss_mask is None:
            return None
        if isinstance(loss_mask, str) and loss_mask == "auto":
            if not meta or not meta.get("loss_mask"):
                return None
            path = os.path.join(os.path.dirname(os.path.abspath(self.name)), meta["loss_mask"])
            try:
                mds = IndexedDataset(path)
            except ValueError as e:
                raise ValueError(
                    f"{meta_path(self.name)}: field 'loss_mask' names {meta['loss_mask']!r}: {e}") from None
        elif isinstance(loss_mask, IndexedDataset):
            mds = loss_mask
        else:
            mds = IndexedDataset(os.fspath(loss_mask))
        if mds.num_tokens != self.num_tokens:
            raise ValueError(f"loss mask {mds.prefix}: {mds.num_tokens} tokens, but {self.name} has "
                             f"{self.num_tokens}; the mask must mark every token of the dataset")
        if not np.array_equal(mds.document_token_offsets(), offsets):
            raise ValueError(f"loss mask {mds.prefix}: its document boundaries differ from {self.name}'s")
        if mds.dtype.kind not in "iub":
            raise ValueError(f"loss mask {mds.prefix}: dtype {mds.dtype} is not an integer type")
        return mds

    # ------------------------------------------------------------------------------------------- reads
    def rows(self, starts: np.ndarray, length: int) -> np.ndarray:
        """int64 [len(starts), length]: ``length`` tokens from each start (row slices of the memmap);
        positions past the end of the data read as the pad token."""
        out = np.empty((starts.size, length), np.int64)
        T = self.num_tokens
        for i, a in enumerate(starts.tolist()):
            if a + length <= T:
                out[i] = self.tokens[a:a + length]
            else:
                n = max(0, T - a)
                out[i, :n] = self.tokens[a:a + n]
                out[i, n:] = self.pad_id
        return out

    def mask_rows(self, starts: np.ndarray, length: int) -> np.ndarray:
        """float32 loss mask of the targets at ``[start, start + length)`` per row: the companion's values,
        or ones; 0 past the end of the data."""
        if self.mask is None:
            out = np.ones((starts.size, length), np.float32)
        else:
            out = np.empty((starts.size, length), np.float32)
            for i, a in enumerate(starts.tolist()):
                n = min(length, max(0, self.num_tokens - a))
                out[i, :n] = self.mask[a:a + n]
        if starts.size and int(starts.max()) + length > self.num_tokens:
            for i in np.flatnonzero(starts + length > self.num_tokens):
                out[i, max(0, self.num_tokens - int(starts[i])):] = 0.0
        return out

    def tokens_at(self, idx: np.ndarray) -> np.ndarray:
        """int64 tokens at arbitrary positions ``idx`` (pad past the end of the data)."""
        out = self.tokens[np.minimum(idx, self.num_tokens - 1)].astype(np.int64)
        out[idx >= self.num_tokens] = self.pad_id
        return out

    def mask_at(self, idx: np.ndarray) -> np.ndarray:
        """float32 loss mask of the targets at arbitrary positions ``idx`` (0 past the end of the data)."""
        if self.mask is None:
            out = np.ones(idx.shape, np.float32)
        else:
            out = self.mask[np.minimum(idx, self.num_tokens - 1)].astype(np.float32)
        out[idx >= self.num_tokens] = 0.0
        return out

    def last_start_in(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """Per row, offset from ``lo`` of the last document start in ``[lo, hi)``, or -1."""
        off = self.doc_starts[np.searchsorted(self.doc_starts, hi, side="left") - 1] - lo  # doc_starts[0] == 0
        off[(off < 0) | (hi <= lo)] = -1
        return off

    def starts_at(self, lo: np.ndarray, n: np.ndarray, width: int, offset: Optional[np.ndarray] = None,
                  out: Optional[np.ndarray] = None) -> np.ndarray:
        """Bool ``[rows, width]``: True at ``offset + (s - lo)`` for every document start ``s`` in ``[lo, lo + n)``
        of each row (``offset`` 0 by default), written into ``out`` if given."""
        rows = lo.shape[0]
        out = np.zeros((rows, width), bool) if out is None else out
        a = np.searchsorted(self.doc_starts, lo, side="left")
        b = np.searchsorted(self.doc_starts, lo + n, side="left")
        for r in np.nonzero(b > a)[0]:
            out[r, self.doc_starts[a[r]:b[r]] - lo[r] + (0 if offset is None else offset[r])] = True
        return out

    def scored_in(self, lo: int, hi: int) -> int:
        """Number of scored target positions in ``[lo, hi)`` (chunked; never loads the whole mask)."""
        if self.mask is None:
            return max(0, hi - lo)
        total, step = 0, 1 << 24
        for a in range(lo, hi, step):
            total += int(np.count_nonzero(self.mask[a:min(hi, a + step)]))
        return total


def _spread(first: np.ndarray, count: int) -> np.ndarray:
    """Make non-decreasing document indices strictly increasing and within ``[0, count)``, so that no two
    stripes start at the same document (``count >= len(first)``)."""
    k = np.arange(first.size)
    first = np.maximum.accumulate(first - k) + k
    return np.minimum(first, count - first.size + k)


def _segment_flags(src: _Source, first: np.ndarray, n_first: np.ndarray, fresh: np.ndarray,
                   second: Optional[np.ndarray] = None, n_second: Optional[np.ndarray] = None,
                   width: Optional[int] = None) -> tuple:
    """``reset``/``doc_start``/``doc_starts`` for segments made of up to two contiguous pieces of inputs.

    Piece one is ``[first, first + n_first)`` at offsets ``[0, n_first)``; piece two (a roll wrap, rows
    with ``n_second > 0``) is ``[second, second + n_second)`` at offsets ``[n_first, n_first + n_second)``.
    ``fresh`` marks rows whose offset 0 does not continue the row's previous segment.  ``doc_starts`` (bool
    ``[rows, width]``) marks every offset where new text starts: document starts, the wrap point, offset 0 of
    a fresh row.
    """
    doc_start = src.last_start_in(first, first + n_first)
    if fresh.any():
        doc_start = np.where(fresh, np.maximum(doc_start, 0), doc_start)
    width = int(width if width is not None else (n_first + (0 if n_second is None else n_second)).max(initial=0))
    starts = src.starts_at(first, n_first, width)
    starts[:, 0] |= fresh & (n_first > 0)
    if second is not None:
        wrapped = n_second > 0
        in_second = src.last_start_in(second, second + n_second)
        doc_start = np.where(wrapped, np.maximum(n_first, np.where(in_second >= 0, n_first + in_second, -1)),
                             doc_start)
        src.starts_at(second, n_second, width, offset=n_first, out=starts)
        rows = np.nonzero(wrapped)[0]
        starts[rows, n_first[rows]] = True
    return doc_start >= 0, doc_start, starts


# ---------------------------------------------------------------------------------------------- training
class SteppedStream:
    """The stepping every training stream shares (``OrderedStream``, ``data_tools.seq2seq.Seq2SeqStream``): the
    ``grad_accum`` micro-batches of a stream step, iteration from the current position ``_step``, and its epoch.
    A subclass sets ``grad_accum``, ``steps_per_epoch`` and ``_step`` and defines ``get(step, slot)``."""

    def get_step(self, step: int) -> List[Any]:
        """The micro-batches ``get(step, 0)`` .. ``get(step, grad_accum - 1)`` of stream step ``step``."""
        return [self.get(step, g) for g in range(self.grad_accum)]

    def __iter__(self) -> Iterator[List[Any]]:
        """Endless: the ``grad_accum`` micro-batches of each step from the current position on.  The
        position advances before a step is handed out, so ``state_dict()`` taken after consuming it
        resumes at the next one."""
        while True:
            step = self._step
            batches = self.get_step(step)
            self._step = step + 1
            yield batches

    @property
    def position(self) -> int:
        """The next stream step iteration will yield."""
        return self._step

    @property
    def epoch(self) -> int:
        """The epoch of the current position (steps count across epochs)."""
        return self._step // self.steps_per_epoch

    def _resume(self, name: str, step: int, epoch: int, old_spe: int, changed: Dict[str, list],
                policy: str) -> Dict[str, Any]:
        """Move the position to the saved stream step ``step`` (in ``epoch``, of a layout with ``old_spe`` steps
        per epoch) under ``policy``; ``changed`` maps each layout field that differs to [saved, now].  Same
        layout: the exact step.  Changed layout: ``"restart_epoch"`` starts the epoch over, ``"proportional"``
        continues it at the same fraction, ``"error"`` raises ``StreamStateError`` naming what changed.  What
        was done is logged (by the subclass's module, as ``name``) and returned as ``{"policy", "changed",
        "step", "epoch", "reset_memory", "message"}``; ``reset_memory`` is True when the layout changed."""
        log = logging.getLogger(type(self).__module__)
        if not changed:
            self._step = step
            message = f"{name}: resuming at step {step} (epoch {epoch}), same layout"
            log.info(message)
            return {"policy": policy, "changed": {}, "step": step, "epoch": epoch, "reset_memory": False,
                    "message": message}
        what = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items())
        if policy == "error":
            raise StreamStateError(
                f"stream layout changed since the state was saved ({what}); pass policy='restart_epoch' "
                f"(start epoch {epoch} over in the new layout) or policy='proportional' (continue epoch "
                f"{epoch} at the same fraction); either way every row's memory must be reset")
        k_old = step - epoch * old_spe
        k_new = 0 if policy == "restart_epoch" else (k_old * self.steps_per_epoch) // max(old_spe, 1)
        self._step = epoch * self.steps_per_epoch + k_new
        message = (f"{name}: layout changed ({what}); policy {policy!r}: epoch {epoch} resumes at "
                   f"step {k_new}/{self.steps_per_epoch} of the new layout (was {k_old}/{old_spe}), stream "
                   f"step {self._step}; reset the memory state of every row")
        log.info(message)   # returned too: the caller shows it once (the trainer on its first rank)
        return {"policy": policy, "changed": changed, "step": self._step, "epoch": epoch, "reset_memory": True,
                "message": message}


class OrderedStream(SteppedStream):
    """Ordered, resumable micro-batches for one data-parallel rank (see the module docstring).

    ``get(step, slot)`` returns micro-batch ``slot`` of stream step ``step`` (steps count across epochs);
    iterating yields, from the current position, the list of ``grad_accum`` micro-batches of each step and
    advances the position; ``state_dict()`` / ``load_state_dict()`` save and restore it.
    """

    def __init__(self, dataset: DatasetLike, dp_rank: int = 0, dp_size: int = 1, micro_batch: int = 1,
                 grad_accum: int = 1, seq_len: int = 512, seed: int = 0, roll: bool = False,
                 loss_mask: Any = "auto", align: str = "token", pad_id: Optional[int] = None):
        self.dp_size = _positive_int("dp_size", dp_size)
        if isinstance(dp_rank, bool) or not isinstance(dp_rank, (int, np.integer)) or not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank!r} is out of range for dp_size={dp_size}")
        self.dp_rank = int(dp_rank)
        self.micro_batch = _positive_int("micro_batch", micro_batch)
        self.grad_accum = _positive_int("grad_accum", grad_accum)
        self.seq_len = _positive_int("seq_len", seq_len)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.seed, self.roll = int(seed), bool(roll)
        if align not in ALIGNS:
            raise ValueError(f"align must be one of {', '.join(map(repr, ALIGNS))}, got {align!r}")
        self.align = align
        self.src = _Source(dataset, loss_mask, pad_id)
        self.num_stripes = self.dp_size * self.grad_accum * self.micro_batch
        self._build_layout()
        self._step = 0
        self._roll_cache: tuple = (None, None)

    # ------------------------------------------------------------------------------------------ layout
    def _layout_desc(self) -> str:
        return (f"{self.num_stripes} stripes (dp_size {self.dp_size} x grad_accum {self.grad_accum} x "
                f"micro_batch {self.micro_batch})")

    def _build_layout(self) -> None:
        src, S, N, T = self.src, self.num_stripes, self.seq_len, self.src.num_tokens
        if T < 2:
            raise ValueError(f"{src.name}: the dataset has {T} tokens; an ordered stream needs at least 2")
        if self.align == "token":
            # Stripe s: inputs [s*L, (s+1)*L), targets one further; the last target is token S*L <= T-1.
            cap = (T - 1) // S
            self.stripe_len = (cap // N) * N
            self.begin = np.arange(S, dtype=np.int64) * self.stripe_len
            shortest = cap
        else:
            starts = src.doc_starts
            if starts.size < S:
                raise ValueError(
                    f"align='document' needs at least one document per stripe: {src.name} has {starts.size} "
                    f"non-empty documents for {self._layout_desc()}")
            ideal = np.array([(s * T) // S for s in range(S)], dtype=np.int64)
            first = _spread(np.searchsorted(starts, ideal, side="left"), starts.size)
            self.begin = starts[first]
            # Whole documents per stripe; the dataset's last input has a virtual target (pad, never scored).
            caps = np.diff(np.append(self.begin, T))
            shortest = int(caps.min())
            self.stripe_len = (shortest // N) * N
            self._first_doc = first
            self._docs_in_use = np.searchsorted(starts, self.begin + self.stripe_len, side="left") - first
        if self.stripe_len == 0:
            raise ValueError(
                f"seq_len={N} is too large for {src.name}: {T} tokens cut into {self._layout_desc()} leave "
                f"{shortest} tokens in the shortest stripe; reduce seq_len, micro_batch, grad_accum or dp_size")
        self.steps_per_epoch = self.stripe_len // N
        end = self.begin + self.stripe_len  # one past the last target of each stripe
        self.tokens_per_epoch = int((np.minimum(end, T - 1) - self.begin).sum())  # real targets only
        self.dropped_tokens = T - self.tokens_per_epoch
        lengths = src.doc_lengths
        self.segments_per_document = None
        if self.align == "document" and lengths.size and (lengths == lengths[0]).all() and lengths[0] % N == 0:
            self.segments_per_document = int(lengths[0] // N)

    def stripe(self, slot: int, row: int) -> int:
        """Global index of the stripe read by (this rank, ``slot``, ``row``)."""
        return (self.dp_rank * self.grad_accum + slot) * self.micro_batch + row

    def roll_offsets(self, epoch: int) -> np.ndarray:
        """Rotation (in pairs) of every stripe for ``epoch``: zeros without ``roll``; a pure function of
        (seed, epoch, stripe) with it.  With ``align="document"`` offsets fall on document starts."""
        S = self.num_stripes
        if not self.roll:
            return np.zeros(S, np.int64)
        if self._roll_cache[0] == epoch:
            return self._roll_cache[1]
        u = np.random.default_rng(np.random.SeedSequence([self.seed, epoch])).random(S)
        if self.align == "token":
            off = np.minimum((u * self.stripe_len).astype(np.int64), self.stripe_len - 1)
        else:
            pick = np.minimum((u * self._docs_in_use).astype(np.int64), self._docs_in_use - 1)
            off = self.src.doc_starts[self._first_doc + pick] - self.begin
        self._roll_cache = (epoch, off)
        return off

    # ------------------------------------------------------------------------------------------- reads
    def get(self, step: int, slot: int = 0) -> MicroBatch:
        """Micro-batch ``slot`` of stream step ``step``: a pure function of (step, slot) and the layout."""
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"step must be a non-negative integer, got {step!r}")
        if isinstance(slot, bool) or not isinstance(slot, (int, np.integer)) or not 0 <= slot < self.grad_accum:
            raise ValueError(f"slot={slot!r} is out of range for grad_accum={self.grad_accum}")
        N, L = self.seq_len, self.stripe_len
        epoch, k = divmod(int(step), self.steps_per_epoch)
        s0 = self.stripe(slot, 0)
        rows = slice(s0, s0 + self.micro_batch)
        begin = self.begin[rows]
        if self.roll:  # pair index where the segment starts
            q = (self.roll_offsets(epoch)[rows] + k * N) % L
        else:
            q = np.full(self.micro_batch, k * N, np.int64)
        n_first = np.minimum(N, L - q)  # pairs before the segment wraps to the stripe's start
        wrapped = n_first < N
        fresh = (q == 0) | (k == 0)
        if wrapped.any():
            pos = begin[:, None] + (q[:, None] + np.arange(N, dtype=np.int64)) % L
            tokens, targets, mask = self.src.tokens_at(pos), self.src.tokens_at(pos + 1), self.src.mask_at(pos + 1)
            reset, doc_start, starts = _segment_flags(self.src, begin + q, n_first, fresh, begin, N - n_first,
                                                      width=N)
        else:  # one slice of N + 1 tokens per row
            both = self.src.rows(begin + q, N + 1)
            tokens, targets = both[:, :-1].copy(), both[:, 1:].copy()
            mask = self.src.mask_rows(begin + q + 1, N)
            reset, doc_start, starts = _segment_flags(self.src, begin + q, np.full_like(begin, N), fresh, width=N)
        return MicroBatch(tokens, targets, mask, reset, doc_start, epoch, int(step), int(slot), starts)

    # ------------------------------------------------------------------------------------------- state
    def _layout(self) -> Dict[str, Any]:
        return {"dp_size": self.dp_size, "grad_accum": self.grad_accum, "micro_batch": self.micro_batch,
                "seq_len": self.seq_len, "align": self.align, "roll": self.roll, "seed": self.seed}

    def state_dict(self) -> Dict[str, Any]:
        """Plain JSON-able state: position, epoch, layout and dataset identity (the same on every rank).

        Roll offsets are not stored: they are a pure function of (seed, epoch, stripe)."""
        return {"format": STATE_FORMAT, "version": STATE_VERSION, "step": self._step, "epoch": self.epoch,
                "steps_per_epoch": self.steps_per_epoch, "layout": self._layout(),
                "dataset": {"fingerprint": self.src.fingerprint, "num_tokens": self.src.num_tokens,
                            "loss_mask": self.src.mask_fingerprint}}

    def load_state_dict(self, state: Dict[str, Any], policy: str = "error") -> Dict[str, Any]:
        """Restore the position from ``state``.

        Same layout: continue at the exact step.  Changed layout (dp_size, grad_accum, micro_batch, seq_len,
        align, roll, or seed with roll): ``policy`` decides, and the change is logged:

        * ``"error"`` (default): raise, naming what changed and the policies;
        * ``"restart_epoch"``: the saved epoch starts over in the new layout;
        * ``"proportional"``: continue the saved epoch at the same fraction of its steps.

        Returns ``{"policy", "changed", "step", "epoch", "reset_memory", "message"}``; with a changed layout
        ``reset_memory`` is True: the caller must start every row's memory afresh.
        """
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(map(repr, POLICIES))}, got {policy!r}")
        step, epoch, old_spe, layout = self._check_state(state)
        ds = state["dataset"]
        if ds["fingerprint"] != self.src.fingerprint or ds["num_tokens"] != self.src.num_tokens:
            raise StreamStateError(
                f"stream state was saved on another dataset (fingerprint {ds['fingerprint']}, "
                f"{ds['num_tokens']} tokens) than {self.src.name} (fingerprint {self.src.fingerprint}, "
                f"{self.src.num_tokens} tokens); no policy can map positions between datasets")
        if ds.get("loss_mask") != self.src.mask_fingerprint:
            raise StreamStateError(
                f"stream state was saved with loss mask {ds.get('loss_mask')}, the stream now uses "
                f"{self.src.mask_fingerprint} ({self.src.mask_ds.prefix if self.src.mask_ds else 'none'})")
        new = self._layout()
        changed = {k: [layout.get(k), new[k]] for k in new if layout.get(k) != new[k]}
        if not (layout.get("roll") or new["roll"]):
            changed.pop("seed", None)  # the seed only draws roll offsets
        if not changed and old_spe != self.steps_per_epoch:
            raise StreamStateError(f"stream state: steps_per_epoch {old_spe} does not match this layout's "
                                   f"{self.steps_per_epoch} (state edited or produced by another version?)")
        return self._resume("ordered stream", step, epoch, old_spe, changed, policy)

    @staticmethod
    def _check_state(state: Any) -> tuple:
        if not isinstance(state, dict):
            raise StreamStateError(f"stream state must be a dict, got {type(state).__name__}")
        if state.get("format") != STATE_FORMAT:
            raise StreamStateError(f"stream state: field 'format' is {state.get('format')!r}, expected "
                                   f"{STATE_FORMAT!r}")
        if state.get("version") != STATE_VERSION:
            raise StreamStateError(f"stream state: unsupported version {state.get('version')!r} "
                                   f"(this code reads {STATE_VERSION})")
        for key in ("step", "epoch", "steps_per_epoch", "layout", "dataset"):
            if key not in state:
                raise StreamStateError(f"stream state: missing field {key!r}")
        step, epoch, spe = state["step"], state["epoch"], state["steps_per_epoch"]
        for name, v in (("step", step), ("epoch", epoch), ("steps_per_epoch", spe)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise StreamStateError(f"stream state: field {name!r} must be a non-negative integer, got {v!r}")
        if spe == 0 or step // spe != epoch:
            raise StreamStateError(f"stream state: step {step} is not in epoch {epoch} with {spe} steps per "
                                   f"epoch")
        if not isinstance(state["layout"], dict) or not isinstance(state["dataset"], dict):
            raise StreamStateError("stream state: fields 'layout' and 'dataset' must be dicts")
        for key in ("fingerprint", "num_tokens"):
            if key not in state["dataset"]:
                raise StreamStateError(f"stream state: missing field 'dataset.{key}'")
        return step, epoch, spe, state["layout"]


# ---------------------------------------------------------------------------------------------- evaluation
class EvalStream:
    """Evaluation over a whole split: every target (tokens 1 .. T-1) is scored exactly once.

    The inputs ``[0, T-1)`` are cut into ``num_streams * dp_size`` contiguous streams (with
    ``align="document"``, at document starts); rank ``dp_rank`` reads streams
    ``[dp_rank * num_streams, (dp_rank + 1) * num_streams)`` as the rows of its micro-batches.  Streams have
    nearly equal lengths; a stream's last segment may be short and rows past their end are padding (pad
    token, loss mask 0, ``reset`` False).  ``scored_tokens`` is the number of scored targets of the whole
    split (all ranks), ``local_scored_tokens`` this rank's share.
    """

    def __init__(self, dataset: DatasetLike, seq_len: int, num_streams: int = 1, dp_rank: int = 0,
                 dp_size: int = 1, loss_mask: Any = "auto", align: str = "token", pad_id: Optional[int] = None):
        self.seq_len = _positive_int("seq_len", seq_len)
        self.num_streams = _positive_int("num_streams", num_streams)
        self.dp_size = _positive_int("dp_size", dp_size)
        if isinstance(dp_rank, bool) or not isinstance(dp_rank, (int, np.integer)) or not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank!r} is out of range for dp_size={dp_size}")
        self.dp_rank = int(dp_rank)
        if align not in ALIGNS:
            raise ValueError(f"align must be one of {', '.join(map(repr, ALIGNS))}, got {align!r}")
        self.align = align
        self.src = src = _Source(dataset, loss_mask, pad_id)
        T, K = src.num_tokens, self.num_streams * self.dp_size
        self.num_targets = max(T - 1, 0)
        if self.num_targets < K:
            raise ValueError(f"{src.name}: {T} tokens give {self.num_targets} targets, fewer than the "
                             f"{K} streams (num_streams {self.num_streams} x dp_size {self.dp_size})")
        if align == "token":
            bounds = np.array([(s * self.num_targets) // K for s in range(K + 1)], dtype=np.int64)
        else:
            starts = src.doc_starts[src.doc_starts < self.num_targets]
            if starts.size < K:
                raise ValueError(f"align='document' needs at least one document per stream: {src.name} has "
                                 f"{starts.size} non-empty documents for {K} streams")
            ideal = np.array([(s * self.num_targets) // K for s in range(K)], dtype=np.int64)
            first = _spread(np.searchsorted(starts, ideal, side="left"), starts.size)
            bounds = np.append(starts[first], self.num_targets)
        r0 = self.dp_rank * self.num_streams
        self.begin = bounds[r0:r0 + self.num_streams]
        self.length = bounds[r0 + 1:r0 + self.num_streams + 1] - self.begin
        self.num_steps = int(-(-int(self.length.max()) // self.seq_len))
        self.scored_tokens = src.scored_in(1, T)
        self.local_scored_tokens = sum(src.scored_in(int(b) + 1, int(b + n) + 1)
                                       for b, n in zip(self.begin, self.length))

    def __len__(self) -> int:
        return self.num_steps

    def get(self, step: int) -> MicroBatch:
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or not 0 <= step < self.num_steps:
            raise ValueError(f"step={step!r} is out of range for {self.num_steps} evaluation steps")
        N = self.seq_len
        off = int(step) * N
        valid = np.clip(self.length - off, 0, N)
        both = self.src.rows(self.begin + off, N + 1)
        tokens, targets = both[:, :-1].copy(), both[:, 1:].copy()
        mask = self.src.mask_rows(self.begin + off + 1, N)
        pad = np.arange(N) >= valid[:, None]  # past the stream's end
        tokens[pad] = self.src.pad_id
        targets[pad] = self.src.pad_id
        mask[pad] = 0.0
        first = self.begin + off
        fresh = (valid > 0) & (step == 0)
        reset, doc_start, starts = _segment_flags(self.src, first, valid, fresh, width=N)
        return MicroBatch(tokens, targets, mask, reset, doc_start, 0, int(step), 0, starts)

    def __iter__(self) -> Iterator[MicroBatch]:
        for step in range(self.num_steps):
            yield self.get(step)
