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
