"""What the model families (``pretrain.model.family.ModelFamily``) implement alike: the state checks and resets, the
consolidated weights under tensor parallelism, the activation-checkpoint call of a layer.  ``MemoryLM`` and
``MemBart`` inherit it; each supplies ``init_state``, ``state_signature`` and ``_check_state_fits``."""
from __future__ import annotations

from typing import Dict

import torch

from pretrain.model import parallel, weights
from pretrain.model.state import MemoryState


class ModelFamilyMixin:
    """Shared members of the model families (an ``nn.Module`` with ``cfg`` and ``checkpoint_fn``)."""

    @property
    def state_signature(self) -> str:
        """The ``MemoryState.mechanism`` of the states this model makes and accepts."""
        raise NotImplementedError

    # -- state ----------------------------------------------------------------------------------------------
    def check_state(self, state: MemoryState, batch_size: int) -> None:
        """TypeError unless ``state`` is a MemoryState; ValueError unless it is of this model's layout
        (``state_signature``, ``_owns_state``), has ``batch_size`` rows and fits the model (``_check_state_fits``)."""
        if not isinstance(state, MemoryState):
            raise TypeError(f"state must be a MemoryState (model.init_state), got {type(state).__name__}")
        if state.mechanism != self.state_signature or not self._owns_state(state):
            raise ValueError(f"state is for the mechanism layout {state.mechanism!r}, the model's is "
                             f"{self.state_signature!r}")
        if state.batch_size != batch_size:
            raise ValueError(f"state has {state.batch_size} rows, the batch has {batch_size}")
        self._check_state_fits(state)

    def _owns_state(self, state: MemoryState) -> bool:
        """Whether a state of this model's ``state_signature`` holds the entries the model reads."""
        return True

    def _check_state_fits(self, state: MemoryState) -> None:
        """ValueError when a state of this model's layout does not fit it (shard, shapes)."""

    def reset_state(self, state: MemoryState, rows: torch.Tensor) -> MemoryState:
        """The state with rows ``rows`` (BoolTensor [B]) back to the initial state (``init_state``), the others
        unchanged."""
        self.check_state(state, state.batch_size)
        rows = torch.as_tensor(rows, device=state.device).bool()
        if rows.shape != (state.batch_size,):
            raise ValueError(f"rows has shape {tuple(rows.shape)}, expected ({state.batch_size},)")
        init = self.init_state(state.batch_size, state.mem_len, state.device)
        out = {}
        for k, t in state.tensors.items():
            shape = [1] * t.dim()
            shape[state.batch_dims[k]] = -1
            out[k] = torch.where(rows.view(shape), init[k].to(t.dtype), t)
        return state.replace(**out)

    # -- layers ---------------------------------------------------------------------------------------------
    def _run_layer(self, fn, *args):
        """``fn(*args)``, or its activation checkpoint (``checkpoint_fn``, dropout replayed) when
        ``cfg.checkpoint_activations`` and gradients are on."""
        if self.cfg.checkpoint_activations and torch.is_grad_enabled():
            return self.checkpoint_fn(parallel.replay_rng(fn), *args)
        return fn(*args)

    # -- weights --------------------------------------------------------------------------------------------
    def gather_full_state_dict(self) -> Dict[str, torch.Tensor]:
        """Consolidated weights (CPU), the same names and values under every tensor-parallel layout (collective)."""
        return weights.gather_full(self)

    def load_full_state_dict(self, state_dict: Dict[str, torch.Tensor], strict: bool = True) -> None:
        """Load consolidated weights (``gather_full_state_dict`` of any layout) into this rank's shards."""
        weights.load_full(self, state_dict, strict=strict)
