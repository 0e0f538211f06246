"""The language model: embeddings -> the layer stack (a token mixer with its memory per layer) -> softmax.

    model = build_model(cfg)                       # after parallel.initialize(tp_size)
    state = model.init_state(batch_size)
    out, state = model(tokens, state, targets)     # out.nll [B, N] fp32; state: the memory after the segment

The memory state is an explicit value (``state.py``); each layer's mixer (``mechanisms/<name>/``, chosen per
layer through ``registry.py``) decides what its part of it holds; the stack (``stack.py``) runs the layers.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, List, Optional, Tuple

import torch
from torch import nn

from pretrain.config_base import ConfigError
from pretrain.model import parallel, weights
from pretrain.model.modules.norm import layer_norm
from pretrain.model.dropout import Dropout
from pretrain.model.family_base import ModelFamilyMixin
from pretrain.model.embeddings import AdaptiveEmbedding, AdaptiveSoftmax, cluster_bounds, cluster_dims
from pretrain.model.model_config import ModelConfig
from pretrain.model.stack import Stack
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
    reset: Optional[torch.Tensor] = None   # bool [B, N]: documents starting inside the segment (None: none)


@dataclasses.dataclass
class LMOutput:
    nll: Optional[torch.Tensor]        # [B, N] fp32 per-token negative log-likelihood (None without targets)
    logits: Optional[torch.Tensor]     # [B, N, V] full-vocabulary log-probabilities (return_logits; no grad)
    aux_loss: Optional[torch.Tensor]   # the mixers' auxiliary loss to add to the LM loss (a scalar; None: none)


class MemoryLM(ModelFamilyMixin, nn.Module):
    """The decoder-only memory LM (a ``pretrain.model.family.ModelFamily``; module docstring)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        tp = parallel.tp_world_size()
        for name in ("n_head", "d_inner"):
            if getattr(cfg, name) % tp:
                raise ConfigError(name, f"{getattr(cfg, name)} is not divisible by the tensor-parallel size {tp}")
        self.cfg = cfg
        mp = parallel.model_parallel_config()
        self.embedding = AdaptiveEmbedding(cfg, mp)
        self.stack = Stack(cfg, mp)
        self.final_norm = layer_norm(cfg.d_model) if cfg.pre_lnorm else None
        self.drop = Dropout(cfg.dropout)
        self.softmax = AdaptiveSoftmax(cfg, mp, self.embedding)
        # Activation checkpointing hook, used per layer when cfg.checkpoint_activations:
        # checkpoint_fn(function, *args).  The function keeps its residual inside and replays the
        # tensor-parallel dropout streams itself (parallel.replay_rng), so any implementation that restores
        # the default generators fits (torch's by default; DeepSpeed's works as well).
        self.checkpoint_fn = parallel.checkpoint
        weights.init_weights(self, cfg)

    # -- sharding -------------------------------------------------------------------------------------------
    def sharding_units(self) -> List[Tuple[nn.Module, List[nn.Parameter]]]:
        """How the parameters are used, for sharded data parallelism (ZeRO-3, FSDP): a list of (module, extra)
        where the module is called during the forward and uses every parameter it holds (recursively) within
        that call, and ``extra`` are parameters of another unit it also uses (tied weights, shared biases).
        The layers read their weights directly (not through their sub-modules' forward), so a sharded engine
        must gather a unit's parameters as a whole; the parameters outside every unit (the final norm) belong
        to modules whose own forward uses them."""
        return [(self.embedding, [])] + self.stack.sharding_units() + \
            [(self.softmax, self.softmax.tied_parameters())]

    @property
    def decode_policy(self) -> str:
        """How generation feeds the model with its training memory length (``decode_policy_for(cfg.mem_len)``):
        ``"window"``, ``"token"`` or ``"segment"``."""
        return self.decode_policy_for(self.cfg.mem_len)

    def decode_policy_for(self, mem_len: int) -> str:
        """How generation feeds the model with a memory of ``mem_len`` positions, derived from what every layer's
        state carries into the next segment (``Stack.decode_policy``): ``"window"`` (no state carries anything:
        each new token ends a pass over the last segment-length tokens), ``"token"`` (every state carries all it
        read: one token at a time updates the state) or ``"segment"`` (segments aligned as in training, the
        partial one re-read).  ``ValueError`` for a negative ``mem_len`` or one a layer refuses (LaMemo without
        a memory)."""
        if mem_len < 0:
            raise ValueError(f"mem_len must be >= 0, got {mem_len}")
        return self.stack.decode_policy(mem_len)

    # -- state ----------------------------------------------------------------------------------------------
    @property
    def _param(self) -> torch.Tensor:
        return self.embedding.tables[0].weight

    def init_state(self, batch_size: int, mem_len: Optional[int] = None,
                   device: Optional[torch.device] = None) -> MemoryState:
        """A fresh state (no memory yet) for ``batch_size`` rows and ``mem_len`` positions (default
        cfg.mem_len), in the parameters' dtype (normalisers in fp32) on ``device`` (default: the model's)."""
        mem_len = self.cfg.mem_len if mem_len is None else mem_len
        if mem_len < 0:
            raise ValueError(f"mem_len must be >= 0, got {mem_len}")
        return self.stack.initial_state(batch_size, mem_len, device or self._param.device, self._param.dtype)

    @property
    def state_signature(self) -> str:
        """The layer layout's signature (``Stack.signature``): a state made for another layout is refused."""
        return self.stack.signature

    def _check_state_fits(self, state: MemoryState) -> None:
        world = parallel.tp_world_size()
        if (state.tp_world, state.tp_rank) != (world, parallel.tp_rank()):
            raise ValueError(f"state is shard {state.tp_rank} of {state.tp_world} heads; this rank needs shard "
                             f"{parallel.tp_rank()} of {world} (use tp_gather / tp_split)")

    # -- forward --------------------------------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, state: MemoryState, targets: Optional[torch.Tensor] = None,
                detach_state: bool = True, clamp_len: Optional[int] = None, same_length: Optional[bool] = None,
                return_logits: bool = False, reset: Optional[torch.Tensor] = None):
        """One segment.  ``tokens``, ``targets``: [B, N] (the same on every tensor-parallel rank).

        Returns (LMOutput, new_state).  ``detach_state=False`` keeps the new state in the autograd graph so a
        later segment's loss backpropagates into this one.  ``clamp_len`` / ``same_length`` override the
        config (evaluation protocols).  ``reset``: None or bool [B, N], True where a new document starts: from
        that position on, the row's tokens see neither the memory nor the earlier tokens of the segment (one
        rule for every mechanism: attention masks by document, recurrent states restart, the state carried on
        holds only the last document); a start at position 0 is a reset of the row's state before the
        segment (``reset_state``)."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [batch, length], got shape {tuple(tokens.shape)}")
        B, N = tokens.shape
        if targets is not None and targets.shape != tokens.shape:
            raise ValueError(f"targets shape {tuple(targets.shape)} != tokens shape {tuple(tokens.shape)}")
        self.check_state(state, B)
        if reset is not None:
            reset = torch.as_tensor(reset, device=tokens.device).bool()
            if reset.shape != tokens.shape:
                raise ValueError(f"reset shape {tuple(reset.shape)} != tokens shape {tuple(tokens.shape)}")
            if reset[:, 0].any():
                state = self.reset_state(state, reset[:, 0])
            reset = reset if reset[:, 1:].any() else None
        same = self.cfg.same_length if same_length is None else same_length
        if same and state.mem_len == 0:
            raise ValueError("same_length needs a memory (mem_len > 0)")
        seg = Segment(n=N, mem_len=state.mem_len, clamp_len=self.cfg.clamp_len if clamp_len is None else clamp_len,
                      same_length=same, detach=detach_state, run_layer=self._run_layer, reset=reset)
        h, new_state, aux = self.stack(self.embedding(tokens), state, seg)
        if self.final_norm is not None:
            h = self.final_norm(h)
        h = self.drop(h)
        nll, lp = self.softmax(h.reshape(B * N, -1), None if targets is None else targets.reshape(-1),
                               log_probs=return_logits)
        out = LMOutput(nll=None if nll is None else nll.view(B, N),
                       logits=None if lp is None else lp.view(B, N, -1), aux_loss=aux)
        return out, new_state

    # -- cost -----------------------------------------------------------------------------------------------
    def flops(self, batch_size: int, tgt_len: int, mem_len: Optional[int] = None,
              cluster_fractions: Optional[List[float]] = None) -> int:
        """Analytic forward FLOPs (2 per multiply-add) of one segment, counting what the code computes:
        memory-extended attention, LaMemo's look-ahead and memory rows, adaptive input / softmax by cluster.
        Adaptive clusters are weighted by the fraction of tokens in each (default: a Zipf estimate)."""
        cfg = self.cfg
        mem_len = cfg.mem_len if mem_len is None else mem_len
        T = batch_size * tgt_len
        total = self.stack.flops(batch_size, tgt_len, mem_len)
        bounds, dims = cluster_bounds(cfg), cluster_dims(cfg)
        frac = cluster_fractions or zipf_fractions(bounds)
        if len(frac) != len(bounds):
            raise ValueError(f"{len(bounds)} clusters, {len(frac)} fractions given")
        n_tail = len(bounds) - 1
        for i, ((lo, hi), d) in enumerate(zip(bounds, dims)):
            rows = T if i == 0 else frac[i] * T                      # the head scores every token
            if self.embedding.proj(i) is not None:
                total += 2 * frac[i] * T * d * cfg.d_model            # input projection
            if self.softmax.proj(i) is not None:
                total += 2 * rows * cfg.d_model * d                   # output projection
            total += 2 * rows * d * (hi - lo + (n_tail if i == 0 else 0))
        return int(total)


def zipf_fractions(bounds) -> List[float]:
    """Share of tokens in each cluster under Zipf's law (frequency of rank r ~ 1/r)."""
    def harmonic(n: int) -> float:
        return 0.0 if n == 0 else math.log(n) + 0.5772156649015329 + 1 / (2 * n) - 1 / (12 * n * n)
    total = harmonic(bounds[-1][1])
    return [(harmonic(hi) - harmonic(lo)) / total for lo, hi in bounds]


def build_model(cfg: ModelConfig, device: Optional[torch.device] = None) -> MemoryLM:
    """The model for this rank's tensor-parallel shard (``parallel.initialize`` first), on ``device``."""
    model = MemoryLM(cfg)
    return model.to(device) if device is not None else model
