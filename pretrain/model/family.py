"""The model-family protocol: what the engine (``pretrain/engine/``), evaluation and generation call on a model,
whatever its family.  Two families implement it: the decoder-only memory LMs (``pretrain.model.lm.MemoryLM``) and
MemBART's encoder-decoder (``pretrain.model.membart.MemBart``); what they share to the letter lives once in
``pretrain.model.family_base.ModelFamilyMixin``.  What differs between the families outside the model (streams,
batches, initial weights, export) is ``pretrain.engine.family``'s.

No torch here (annotations are not evaluated): config code and ``--help`` may import it.

Shapes: B rows (streams), N positions of a segment (MemBART: S source and T target positions of a time step), d the
model width, V the vocabulary.  A memory state is a ``pretrain.model.state.MemoryState``: named tensors in the
parameters' dtype (normalisers fp32), each with its batch dimension, on the model's device, for this rank's
tensor-parallel shard.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Protocol, Tuple, runtime_checkable

if TYPE_CHECKING:                                       # pragma: no cover
    import torch
    from torch import nn
    from pretrain.model.state import MemoryState

__all__ = ["ModelFamily"]


@runtime_checkable
class ModelFamily(Protocol):
    """A model of one family, for this rank's tensor-parallel shard (built after ``parallel.initialize``).

    ``isinstance(model, ModelFamily)`` checks that every member is present; tests/test_model_family.py checks the
    signatures of both implementations against this one."""

    cfg: Any
    """The model's configuration (a ``ModelConfig`` or a ``MemBartConfig``; validated at construction)."""

    checkpoint_fn: Callable[..., Any]
    """The activation-checkpoint hook used per layer with ``cfg.checkpoint_activations``:
    ``checkpoint_fn(function, *tensors)`` returns ``function(*tensors)``'s result (the model wraps ``function``
    with ``parallel.replay_rng``).  ``parallel.checkpoint`` (torch's) by default; the trainer sets DeepSpeed's."""

    @property
    def decode_policy(self) -> str:
        """How generation feeds the model: ``"window"``, ``"token"`` or ``"segment"`` for a decoder LM (from what
        its state carries; ``MemoryLM.decode_policy_for``), ``"encoder-decoder"`` for MemBART (encode a time step,
        then decode from its output)."""
        ...

    # -- state ----------------------------------------------------------------------------------------------
    def init_state(self, batch_size: int, mem_len: Optional[int] = None,
                   device: Optional[torch.device] = None) -> MemoryState:
        """A fresh memory (nothing remembered yet) for ``batch_size`` rows on ``device`` (default: the model's),
        in the parameters' dtype.  ``mem_len``: positions of a decoder LM's memory (default ``cfg.mem_len``,
        ValueError if negative); MemBART has none (None or 0, ValueError otherwise) and holds ``slots.mem``
        [B, K, d] zeros."""
        ...

    def reset_state(self, state: MemoryState, rows: torch.Tensor) -> MemoryState:
        """``state`` with the rows ``rows`` (bool [B]) back to ``init_state``'s values and the others unchanged
        (a new document or dialogue starts there); differentiable in the kept rows.  TypeError / ValueError as
        ``check_state``; ValueError when ``rows`` is not [B]."""
        ...

    def check_state(self, state: MemoryState, batch_size: int) -> None:
        """Raise TypeError unless ``state`` is a MemoryState; ValueError unless it was made for this model's
        state layout (``MemoryState.mechanism``: a decoder LM's layer signature, ``"membart"``), has
        ``batch_size`` rows and fits this model (a decoder LM: this rank's tensor-parallel shard of the heads;
        MemBART: K slots of width d)."""
        ...

    # -- forward --------------------------------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, state: MemoryState, targets: Optional[torch.Tensor] = None, *,
                detach_state: bool = True, return_logits: bool = False, reset: Optional[torch.Tensor] = None,
                **inputs: Any) -> Tuple[Any, MemoryState]:
        """One segment (a decoder LM) or time step (MemBART).  ``tokens`` int64 [B, N] (MemBART: the source
        [B, S]), the same on every tensor-parallel rank; ``targets`` int64 [B, N] (MemBART [B, T]; negative:
        ignored).  Returns ``(output, new_state)``: ``output.nll`` fp32 [B, N] per-target negative
        log-likelihood (None without targets), ``output.logits`` [B, N, V] full-vocabulary log-probabilities
        with ``return_logits`` (no gradient), ``output.aux_loss`` a scalar or None.  ``detach_state=False`` keeps
        the new state in the autograd graph.  ``reset``: bool, True where a document starts (a decoder LM
        [B, N], per position; MemBART [B], per row, before the step).  ``inputs``: the family's other inputs by
        name (the batch's ``model_inputs``: MemBART's ``attention_mask``, ``decoder_input``; a decoder LM's
        ``clamp_len``, ``same_length``)."""
        ...

    # -- weights --------------------------------------------------------------------------------------------
    def gather_full_state_dict(self) -> Dict[str, torch.Tensor]:
        """Consolidated weights by layout-independent names: the same names, shapes and values under every
        tensor-parallel layout (a collective under TP: every rank calls it)."""
        ...

    def load_full_state_dict(self, state_dict: Dict[str, torch.Tensor], strict: bool = True) -> None:
        """Load consolidated weights (``gather_full_state_dict`` of any layout) into this rank's shards; with
        ``strict``, a missing or unexpected name raises."""
        ...

    def sharding_units(self) -> List[Tuple[nn.Module, List[nn.Parameter]]]:
        """``(module, extra)`` pairs for sharded data parallelism (ZeRO-3): each module uses every parameter it
        holds within its forward call, ``extra`` are parameters of other units it also uses (tied weights); a
        sharded engine gathers a unit's parameters as a whole."""
        ...

    # -- cost -----------------------------------------------------------------------------------------------
    def flops(self, batch_size: int, tgt_len: int, mem_len: Optional[int] = None) -> int:
        """Analytic forward FLOPs (2 per multiply-add) of one segment of ``tgt_len`` positions for
        ``batch_size`` rows with a memory of ``mem_len`` positions (default ``cfg.mem_len``; MemBART ignores it
        and counts a time step: ``tgt_len`` decoder positions, the source and its K slots)."""
        ...
