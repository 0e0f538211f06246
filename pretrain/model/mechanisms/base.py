"""The interface every memory mechanism implements (one mechanism, one file).

A mechanism owns the layer stack and its memory: it says what its state holds (``initial_state``), runs one
segment (``forward``: per-layer computation and the state update) and counts its FLOPs.  The language
model around it (``lm.py``) owns the embeddings and the output softmax; the engine sees only
``MemoryState`` values.  So adding a mechanism (RMT, Compressive memory, fast weights, Memformer) means a new
file here and a line in ``registry.py``, and nothing in the engine or the data code.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, List, Optional, Tuple

import torch
from torch import nn

from pretrain.model.state import MemoryState


@dataclasses.dataclass
class Segment:
    """Per-call settings of one forward pass."""
    n: int                      # tokens in this segment (may differ from cfg.tgt_len)
    mem_len: int                # the state's memory length M
    clamp_len: int
    same_length: bool
    detach: bool                # cut the new state from the graph (truncated backprop)
    run_layer: Callable         # run_layer(fn, *tensors): fn(*tensors) or its activation checkpoint


class Mechanism(nn.Module):
    """Base class: subclasses set ``name`` and implement the three methods below."""
    name = ""

    def initial_state(self, batch_size: int, mem_len: int, device: torch.device,
                      dtype: torch.dtype) -> MemoryState:
        """The state of a fresh stream (also what ``reset_state`` puts back, row by row)."""
        raise NotImplementedError

    def forward(self, emb: torch.Tensor, state: MemoryState,
                seg: Segment) -> Tuple[torch.Tensor, MemoryState, Optional[torch.Tensor]]:
        """``emb`` [B, N, d]: scaled token embeddings (no dropout yet).  Returns the last layer's hidden
        states [B, N, d], the state after this segment, and an auxiliary loss (or None)."""
        raise NotImplementedError

    def flops(self, batch_size: int, tgt_len: int, mem_len: int) -> int:
        """Forward FLOPs of the layer stack for one segment (matrix products, as computed)."""
        raise NotImplementedError

    def sharding_units(self) -> List[Tuple[nn.Module, List[nn.Parameter]]]:
        """(module, extra parameters) per layer: each layer is called as a module and uses all of its own
        parameters in that call, plus the position biases shared by every layer (``self.biases``) when the
        mechanism has them.  Mechanisms with other parameter sharing override this."""
        shared = list(self.biases.parameters()) if hasattr(self, "biases") else []
        return [(layer, shared) for layer in self.layers]
