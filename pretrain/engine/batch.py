"""The batch that travels through the training and evaluation loops.

A ``Batch`` is built from one micro-batch of an ordered or evaluation stream (``data_tools.streams.MicroBatch``,
numpy arrays) and holds it as tensors on the training device.  It is the one place that knows

* what the model's inputs are (``model_inputs()``: the keyword arguments of the model call besides the memory
  state), so a model with more inputs (an encoder-decoder's source sequence, per-position document-start flags)
  is a change here, not in the training loop, the evaluation loop or the memory slots;
* how to cut segment ``j`` of a ``k``-segment unroll (``segment(j, k)``; backpropagation through ``k`` segments,
  ``train.bptt_segments``);
* which targets are scored (``loss_mask``) and which rows start new text (``reset``).

This follows torchtitan's ``post_dataloading_process`` idea: the loop sees a batch object and hands
``model_inputs()`` to the model; only the batch class changes when the inputs do.

Shapes: ``B`` rows, ``T`` positions (``T = k * N`` in training, ``N`` the segment length).

``Seq2SeqBatch`` is the encoder-decoder's (MemBART): a rollout of time steps, one segment each, whose inputs are
the source, its mask, the targets and the per-step reset flags, with MemBART's per-step loss weights.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch


@dataclasses.dataclass
class Batch:
    """One micro-batch on the device.

    ``tokens``, ``targets``: int64 [B, T] (targets are the next tokens).  ``loss_mask``: float32 [B, T], 1 where
    the target is scored.  ``reset``: bool [B], True where the row starts new text somewhere in this batch (a
    document start, or the wrap point of a rolled stripe; see ``data_tools/streams.py``): with
    ``data.reset_memory`` the row's memory is reset before the batch's first segment.  ``doc_starts``: bool
    [B, T] or None, True at the positions where a document starts, when the stream provides them (the input
    that lets a model reset its memory inside a segment); set when the run resets memory at documents
    (``from_micro_batch(..., reset_memory=True)``).
    """

    tokens: torch.Tensor
    targets: torch.Tensor
    loss_mask: torch.Tensor
    reset: torch.Tensor
    doc_starts: Optional[torch.Tensor] = None

    def __post_init__(self):
        if self.tokens.dim() != 2:
            raise ValueError(f"tokens must be [batch, length], got shape {tuple(self.tokens.shape)}")
        for name in ("targets", "loss_mask") + (("doc_starts",) if self.doc_starts is not None else ()):
            t = getattr(self, name)
            if tuple(t.shape) != tuple(self.tokens.shape):
                raise ValueError(f"{name} has shape {tuple(t.shape)}, tokens {tuple(self.tokens.shape)}")
        if tuple(self.reset.shape) != (self.tokens.shape[0],):
            raise ValueError(f"reset has shape {tuple(self.reset.shape)}, expected ({self.tokens.shape[0]},)")

    # ------------------------------------------------------------------------------------------- building
    @classmethod
    def from_micro_batch(cls, mb: Any, device: torch.device, reset_memory: bool = False) -> "Batch":
        """From a stream's ``MicroBatch`` (numpy ``tokens``, ``targets``, ``loss_mask``, ``reset``, and optionally
        ``doc_starts`` [B, T] bool).  ``reset_memory`` (``data.reset_memory``): the model resets each row's memory
        where its documents start (``doc_starts``, passed as the model's ``reset`` input); a stream without
        ``doc_starts`` resets a flagged row before its first position.  Without it no memory is reset."""
        starts = getattr(mb, "doc_starts", None) if reset_memory else None
        if reset_memory and starts is None:
            starts = np.zeros(np.shape(mb.tokens), bool)
            starts[:, 0] = np.asarray(mb.reset, bool)
        return cls(tokens=_tensor(mb.tokens, torch.int64, device),
                   targets=_tensor(mb.targets, torch.int64, device),
                   loss_mask=_tensor(mb.loss_mask, torch.float32, device),
                   reset=_tensor(mb.reset, torch.bool, device),
                   doc_starts=None if starts is None else _tensor(starts, torch.bool, device))

    # ------------------------------------------------------------------------------------------- shape
    @property
    def rows(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def length(self) -> int:
        return int(self.tokens.shape[1])

    def num_scored(self) -> float:
        """Scored targets in the batch (the loss is averaged over these)."""
        return float(self.loss_mask.sum())

    def loss_counts(self) -> torch.Tensor:
        """float64 [G] on the batch's device: the scored targets of each of the batch's G loss groups, the counts
        its loss is normalised by.  A language model's batch has one group (every scored target alike, G = 1);
        a weighted rollout (``Seq2SeqBatch``) one per time step.  The training loop sums these over every
        micro-batch of a step and every data-parallel rank, before any forward, and hands the sum back through
        ``normalize_over``."""
        return self.loss_mask.sum().double().reshape(1)

    def normalize_over(self, counts: List[float]) -> "Batch":
        """This batch scored as a part of a larger batch whose loss groups hold ``counts`` scored targets
        (``loss_counts`` summed over the step's micro-batches and data-parallel ranks): afterwards, the sum of
        ``masked_nll_sum`` over every segment of every part, divided by ``sum(counts)``, is the loss of the
        whole, however it is cut into parts.  A language model's loss is a plain sum over scored targets, so
        its batch is returned as it is."""
        return self

    def segment(self, j: int, k: int) -> "Batch":
        """Segment ``j`` of ``k`` equal segments (positions ``[j T/k, (j+1) T/k)``).  ``reset`` belongs to the
        first segment: the memory is reset before the unroll, never in its middle.  Raises ValueError when ``T``
        is not a multiple of ``k`` or ``j`` is out of range."""
        if k < 1 or self.length % k:
            raise ValueError(f"a batch of {self.length} positions does not split into {k} equal segments")
        if not 0 <= j < k:
            raise ValueError(f"segment {j} is out of range for {k} segments")
        if k == 1:
            return self
        n = self.length // k
        sl = slice(j * n, (j + 1) * n)
        return Batch(tokens=self.tokens[:, sl], targets=self.targets[:, sl], loss_mask=self.loss_mask[:, sl],
                     reset=self.reset if j == 0 else torch.zeros_like(self.reset),
                     doc_starts=None if self.doc_starts is None else self.doc_starts[:, sl])

    def segments(self, k: int) -> List["Batch"]:
        return [self.segment(j, k) for j in range(k)]

    # ------------------------------------------------------------------------------------------- model
    def model_inputs(self) -> Dict[str, torch.Tensor]:
        """Keyword arguments of the model call, besides the memory state: ``tokens`` and ``targets`` (the model
        returns the per-token NLL), and ``reset`` (where documents start: the model resets the memory there) when
        the batch carries document starts.  A model input that comes with the data is added here (and nowhere
        else)."""
        inputs = {"tokens": self.tokens, "targets": self.targets}
        if self.doc_starts is not None and bool(self.doc_starts.any()):
            inputs["reset"] = self.doc_starts
        return inputs

    def masked_nll_sum(self, nll: torch.Tensor) -> torch.Tensor:
        """Sum of the per-token NLL [B, T] over the scored targets (fp32 scalar)."""
        return (nll.float() * self.loss_mask).sum()

    def row_groups(self) -> Optional[torch.Tensor]:
        """int64 [B] group of each row for a per-group breakdown of the evaluation loss (negative: no group), or
        None for none (the language models)."""
        return None


@dataclasses.dataclass
class Seq2SeqBatch(Batch):
    """A rollout of ``H`` time steps of an encoder-decoder with a memory (MemBART), from a
    ``data_tools.seq2seq.Seq2SeqMicroBatch``: ``tokens`` (the encoder inputs), ``targets`` and ``loss_mask`` are
    [B, H W], time step j at columns ``[j W, (j + 1) W)``; ``source_mask`` bool [B, H W] marks the real source
    tokens; ``step_resets`` bool [B, H] the rows whose memory is forgotten before step j (an input of the model: an
    episode may start inside a rollout); ``step_in_episode`` int64 [B, H] each unit's position in its episode (the
    evaluation's per-turn groups); ``step_weights`` the H loss weights of the rollout (None: every scored token
    alike).

    The unroll is one segment per time step (``train.bptt_segments`` = H).  With weights, the loss is MemBART's
    ``sum_j w_j * mean_j`` (``mean_j`` the mean NLL over step j's scored targets): segment j's ``masked_nll_sum``
    is its NLL sum times ``w_j * C / n_j`` (``C`` the scored targets of all steps, ``n_j`` step j's), so the
    training loop's ``sum / C`` is that loss with no special case.  ``C`` and ``n_j`` count the rollout itself,
    or, after ``normalize_over(counts)``, the step's whole global batch (``counts``: n_j summed over every
    micro-batch and data-parallel rank, ``C = sum(counts)``): ``mean_j`` is then step j's mean over the global
    batch, and the loss is the same however the rows are cut into micro-batches and ranks."""
    source_mask: Optional[torch.Tensor] = None
    step_resets: Optional[torch.Tensor] = None
    step_in_episode: Optional[torch.Tensor] = None
    step_weights: Optional[List[float]] = None
    rollout_scored: Optional[float] = None      # C, set on the segments of a weighted rollout
    step_scored: Optional[float] = None         # n_j, set on the segments of a weighted rollout
    norm_counts: Optional[List[float]] = None   # the n_j to normalise by (normalize_over); None: the rollout's own

    def __post_init__(self):
        super().__post_init__()
        B = self.rows
        if self.step_resets is None or self.step_resets.dim() != 2 or self.step_resets.shape[0] != B:
            raise ValueError(f"step_resets must be bool [rows, horizon], got "
                             f"{None if self.step_resets is None else tuple(self.step_resets.shape)}")
        if self.source_mask is None or tuple(self.source_mask.shape) != tuple(self.tokens.shape):
            raise ValueError(f"source_mask must have the tokens' shape {tuple(self.tokens.shape)}")
        if self.length % self.horizon:
            raise ValueError(f"{self.length} columns do not hold {self.horizon} time steps")
        if self.step_weights is not None and len(self.step_weights) != self.horizon:
            raise ValueError(f"{len(self.step_weights)} step weights for a rollout of {self.horizon} steps")
        if self.norm_counts is not None and len(self.norm_counts) != self.horizon:
            raise ValueError(f"{len(self.norm_counts)} step counts for a rollout of {self.horizon} steps")

    @property
    def horizon(self) -> int:
        return int(self.step_resets.shape[1])

    @classmethod
    def from_micro_batch(cls, mb: Any, device: torch.device, step_weights: Optional[List[float]] = None,
                         reset_every_step: bool = False) -> "Seq2SeqBatch":
        """From a ``Seq2SeqMicroBatch``; ``reset_every_step`` forgets the memory before every step (the no-memory
        baseline of a comparison)."""
        resets = _tensor(mb.step_resets, torch.bool, device)
        if reset_every_step:
            resets = torch.ones_like(resets)
        return cls(tokens=_tensor(mb.tokens, torch.int64, device), targets=_tensor(mb.targets, torch.int64, device),
                   loss_mask=_tensor(mb.loss_mask, torch.float32, device), reset=resets[:, 0].clone(),
                   source_mask=_tensor(mb.source_mask, torch.bool, device), step_resets=resets,
                   step_in_episode=_tensor(mb.step_in_episode, torch.int64, device),
                   step_weights=None if step_weights is None else list(step_weights))

    def segment(self, j: int, k: int) -> "Seq2SeqBatch":
        """Time step ``j`` of the rollout (``k`` must be its horizon H: one segment per step).  Raises ValueError
        naming ``train.bptt_segments`` otherwise."""
        if k != self.horizon:
            raise ValueError(f"a rollout of {self.horizon} time steps unrolls as {self.horizon} segments "
                             f"(train.bptt_segments), not {k}")
        if not 0 <= j < k:
            raise ValueError(f"segment {j} is out of range for {k} segments")
        if k == 1 and self.step_weights is None:
            return self
        W = self.length // k
        sl = slice(j * W, (j + 1) * W)
        weighted = self.step_weights is not None
        counts = None
        if weighted:
            counts = self.norm_counts if self.norm_counts is not None else self.loss_counts().tolist()
        return Seq2SeqBatch(tokens=self.tokens[:, sl], targets=self.targets[:, sl], loss_mask=self.loss_mask[:, sl],
                            reset=self.step_resets[:, j], source_mask=self.source_mask[:, sl],
                            step_resets=self.step_resets[:, j:j + 1], step_in_episode=self.step_in_episode[:, j:j + 1],
                            step_weights=[self.step_weights[j]] if weighted else None,
                            rollout_scored=float(sum(counts)) if weighted else None,
                            step_scored=float(counts[j]) if weighted else None)

    def loss_counts(self) -> torch.Tensor:
        """float64 [H]: the scored targets of each time step, with step weights (each step's mean is taken over
        its own targets); [1], the rollout's, without (every scored target alike)."""
        if self.step_weights is None:
            return super().loss_counts()
        return self.loss_mask.reshape(self.rows, self.horizon, -1).sum((0, 2)).double()

    def normalize_over(self, counts: List[float]) -> "Seq2SeqBatch":
        """With step weights: this rollout with each step's mean taken over ``counts[j]`` targets (step j's scored
        targets in the whole global batch) and ``C = sum(counts)``; without: itself (see ``Batch``)."""
        if self.step_weights is None:
            return self
        return dataclasses.replace(self, norm_counts=[float(c) for c in counts])

    def model_inputs(self) -> Dict[str, torch.Tensor]:
        """One time step's inputs: the source (``tokens``), ``targets``, the source's ``attention_mask`` and the
        rows to ``reset`` before the step.  Raises ValueError on a rollout of several steps (cut it with
        ``segment``)."""
        if self.horizon != 1:
            raise ValueError(f"a rollout of {self.horizon} time steps is run one step at a time (segment(j, k))")
        return {"tokens": self.tokens, "targets": self.targets, "attention_mask": self.source_mask,
                "reset": self.step_resets[:, 0]}

    def masked_nll_sum(self, nll: torch.Tensor) -> torch.Tensor:
        """On a segment of a weighted rollout: the NLL sum over the scored targets times ``w_j * C / n_j`` (a
        step no target of which is scored contributes 0); otherwise the plain sum (fp32 scalar)."""
        total = (nll.float() * self.loss_mask).sum()
        if self.step_weights is None or self.rollout_scored is None:
            return total
        n = max(self.step_scored if self.step_scored is not None else self.num_scored(), 1.0)
        return total * (self.step_weights[0] * self.rollout_scored / n)

    def row_groups(self) -> Optional[torch.Tensor]:
        """Each row's position in its episode (the turn of a dialogue, -1 for padding rows), for one time step."""
        return self.step_in_episode[:, 0]


def rollout_weights(horizon: int, kind: str = "exponential") -> Optional[List[float]]:
    """Loss weights of the H steps of a rollout: ``exponential``, MemBART's ``w_t = 2^t / sum_s 2^s`` (t = 1..H,
    later steps weigh more; memformers' "exponential discounted return"); ``uniform``, ``1 / H`` (every step's mean
    alike); ``tokens``: None (every scored token alike).  Raises ValueError for another kind."""
    if kind == "tokens":
        return None
    if kind == "uniform":
        return [1.0 / horizon] * horizon
    if kind == "exponential":
        w = [2.0 ** t for t in range(1, horizon + 1)]
        return [x / sum(w) for x in w]
    raise ValueError(f"unknown loss weighting {kind!r} (exponential, uniform, tokens)")


def call_model(forward: Callable, state, batch: Batch, **kwargs):
    """``forward(tokens, state, targets, **other_inputs, **kwargs)`` for the batch's inputs: ``tokens``, the memory
    state and ``targets`` positionally (the model's signature, ``MemoryLM.forward``), every other model input by
    name.  ``forward`` is the model, a DeepSpeed engine wrapping it, or any callable with that signature.
    Returns what ``forward`` returns, ``(LMOutput, new_state)`` for the model."""
    inputs = dict(batch.model_inputs())
    tokens = inputs.pop("tokens")
    targets = inputs.pop("targets", None)
    return forward(tokens, state, targets, **inputs, **kwargs)


def _tensor(a: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a.to(device=device, dtype=dtype)
    return torch.from_numpy(np.ascontiguousarray(a)).to(device=device, dtype=dtype)
