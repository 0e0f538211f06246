"""The interface of a token mixer (one mechanism, one folder in ``mechanisms/``): what a layer's memory holds,
how one segment runs through it, what it costs.

A layer of the stack (``stack.py``) is a mixer followed by the feed-forward block.  A mixer

* declares its state entries (``initial_state``): named tensors with their batch and head dimensions, which the
  stack prefixes with ``layers.<i>.`` so that a hybrid's state, its checkpoint, its tensor-parallel split and its
  per-row resets stay generic;
* builds, once per segment and per mechanism, what all its layers share (``prepare``: position embeddings with
  their dropout, masks), into the ``SegmentContext``;
* runs one segment (``forward``): the attention (or recurrence) sub-block with its residual and norm, returning
  the new hidden states, its new state entries and the *rows*: memory that travels up the stack alongside the
  tokens (LaMemo's refreshed memory rows; a mixer that does not know a row stream passes it through);
* counts its forward FLOPs (``flops``) and says how many rows its layer's FFN processes (``ffn_rows``).

Positions and frames: see ``positions.py``; layouts and precision: see ``modules/attention.py``; the shared
building blocks a mixer is made of: ``modules/``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from pretrain.model.spec import LayerSpec


@dataclasses.dataclass
class StateEntry:
    """One named tensor of a layer's memory: its initial value (for ``batch`` rows) and which dimension is the
    batch (for resets and row selection) and which, if any, the attention heads (split under tensor
    parallelism)."""
    init: torch.Tensor
    batch_dim: int
    head_dim: Optional[int] = None


# What a layer's (or stack-level memory's) state carries from one segment into the next (``Mixer.carries``).
CARRIES = ("nothing", "part", "all")


def carries_of(part, mem_len: int) -> str:
    """The default of ``Mixer.carries`` / ``StackMemory.carries``, derived from what ``part`` declares as its
    state: ``"nothing"`` when no entry of ``part.initial_state(1, mem_len)`` holds a value (no entries, or only
    empty ones such as a memory of 0 positions), else ``"part"``.  The entries are built on the meta device
    (no memory, no computation)."""
    entries = part.initial_state(1, mem_len, torch.device("meta"), torch.float32)
    return "part" if any(e.init.numel() for e in entries.values()) else "nothing"


@dataclasses.dataclass
class SegmentContext:
    """What every layer of one segment shares, built once before the layer loop.

    ``n`` tokens in this segment (may differ from the training length), ``mem_len`` the state's memory length M,
    ``valid`` [B] int64: how many of the last memory slots of each row hold real positions (None without a
    positional memory), ``detach``: cut the new state from the graph, ``parts``: per-mechanism prepared tensors
    (``ctx.parts["xl"]["pos"]``...), filled by the mixers' ``prepare``.

    Documents inside the segment (one rule for every mixer): ``reset`` bool [B, N] is True where a document
    starts after position 0 (None when none does), ``doc`` int64 [B, N] the document index of each position
    (0 for the document the memory belongs to, +1 at every start), ``doc_mask`` the additive mask [B, N, M + N]
    that keeps every query to the keys of its own document (memory slots are document 0), or None.  Attention
    mixers add ``doc_mask`` to their masks; recurrent mixers restart their state at ``reset``."""
    n: int
    mem_len: int
    clamp_len: int
    same_length: bool
    detach: bool
    training: bool
    batch_size: int
    valid: Optional[torch.Tensor]
    device: torch.device
    dtype: torch.dtype
    parts: Dict[str, Dict[str, Any]] = dataclasses.field(default_factory=dict)
    reset: Optional[torch.Tensor] = None
    doc: Optional[torch.Tensor] = None
    doc_mask: Optional[torch.Tensor] = None
    mask_edits: List[Callable[[torch.Tensor], torch.Tensor]] = dataclasses.field(default_factory=list)
    # analysis hook (pretrain/analyze_attention.py): attention mixers call recorder(layer, probs, mem_len) with
    # the current queries' attention probabilities [H, B, n, M + n] over [memory ; segment]
    recorder: Optional[Callable[[int, torch.Tensor, int], None]] = None

    def attention_mask(self, causal: torch.Tensor) -> torch.Tensor:
        """The mask every attention mixer uses for its queries over [memory (M) ; segment (n)]: its causal
        mask [B or 1, n, M + n] plus the document mask, then the edits of the stack-level memories (RMT's
        memory tokens see each other both ways ...)."""
        mask = causal if self.doc_mask is None else causal + self.doc_mask
        for edit in self.mask_edits:
            mask = edit(mask)
        return mask


@dataclasses.dataclass
class MixerOutput:
    x: torch.Tensor                       # [B, N, d] after the mixer sub-block (residual and norm included)
    state: Dict[str, torch.Tensor]        # this layer's new state entries (unprefixed names)
    rows: Dict[str, torch.Tensor]         # row streams handed to the next layer
    aux_loss: Optional[torch.Tensor] = None   # a scalar auxiliary loss (e.g. Compressive's reconstruction)


class Mixer(nn.Module):
    """Base class of the token mixers; each subclass lives in a mechanism folder (``mechanisms/<name>/``) whose
    registration names it (``registry.py``).

    ``shared_biases``: names of per-head bias vectors [H, d_head] this mixer reads from the stack's shared set
    (one set for all layers unless ``untie_r``: then each layer has its own, ``self.biases``).
    ``ffn_stream``: the name of a row stream that goes through this layer's FFN together with the tokens
    (LaMemo's memory rows), or None.  ``carries(mem_len)``: what the layer's state carries from one segment into
    the next, from which generation's decode policy follows (``Stack.decode_policy``)."""
    mechanism: ClassVar[str] = ""
    ffn_stream: ClassVar[Optional[str]] = None
    # Keys after a query that the stack-level memories' mask edits let it see (RMT's memory rows see the memory
    # tokens after them): relative-position mixers cover distances down to -lookahead.  Set by the stack.
    lookahead: int = 0

    def __init__(self, cfg, mp, spec: LayerSpec, specs: Sequence[LayerSpec]):
        """``mp``: megatron-core's layer config (parallel.model_parallel_config); ``spec``: this layer's
        LayerSpec; ``specs``: every layer's (a mixer may depend on its neighbours, e.g. LaMemo's rows)."""
        super().__init__()
        self.cfg = cfg
        self.spec = spec
        self.index = spec.index
        self.code = spec.code
        self.variant = spec.variant
        self.pre_lnorm = cfg.pre_lnorm      # normalise the sub-block's input (pre-LN), else its output (post-LN)

    def shared_biases(self) -> Tuple[str, ...]:
        return ()

    def ffn_residual(self) -> Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
        """How this layer's FFN output y (after dropout) joins the stream x: None for x + y, else a function
        ``(x, y) -> stream`` (the Compressive layers' GRU gate); the FFN's norm stays where it is."""
        return None

    # -- state ----------------------------------------------------------------------------------------------
    def initial_state(self, batch_size: int, mem_len: int, device: torch.device,
                      dtype: torch.dtype) -> Dict[str, StateEntry]:
        """This layer's state entries for a fresh stream (also what a per-row reset puts back)."""
        return {}

    def carries(self, mem_len: int) -> str:
        """What this layer's state carries from one segment into the next, with a memory of ``mem_len`` positions
        (``CARRIES``; generation's decode policy follows from it, ``Stack.decode_policy``):

        * ``"nothing"``: no state reaches the next segment; the layer reads the current segment only;
        * ``"part"``: part of what the layer has read (a FIFO of the last ``mem_len`` positions, a summary written
          at segment ends): its outputs depend on where the segments start;
        * ``"all"``: all of it, exactly: a stream read in segments cut anywhere (one token at a time included)
          gives the same outputs (a recurrent state carried on).

        The default is derived from the declared state (``carries_of``): ``"nothing"`` when no entry of
        ``initial_state(1, mem_len)`` holds a value, else ``"part"`` (the safe answer: generation then reads
        segments aligned as in training, exact for any causal model); a mechanism whose state carries all it
        has read says so by overriding this.  Raises what ``initial_state`` raises for a ``mem_len`` the
        mechanism refuses (``ValueError``)."""
        return carries_of(self, mem_len)

    # -- one segment ----------------------------------------------------------------------------------------
    @classmethod
    def prepare(cls, ctx: SegmentContext, layers: List["Mixer"], drop: nn.Module) -> None:
        """Build ``ctx.parts[cls.mechanism]`` once per segment for all ``layers`` of this mechanism (``drop``:
        the model's dropout, applied to position embeddings as in Transformer-XL)."""

    def forward(self, x: torch.Tensor, state: Mapping[str, torch.Tensor], rows: Mapping[str, torch.Tensor],
                ctx: SegmentContext, biases: Mapping[str, torch.Tensor]) -> MixerOutput:
        """``x`` [B, N, d] the layer input; ``state`` this layer's entries; ``rows`` the row streams from the
        layer below; ``biases`` the shared position biases this mixer asked for."""
        raise NotImplementedError

    # -- cost -----------------------------------------------------------------------------------------------
    def flops(self, batch_size: int, tgt_len: int, mem_len: int) -> int:
        """Forward FLOPs of the mixer sub-block for one segment (matrix products, as computed; 2 per
        multiply-add); the FFN is counted by the stack with ``ffn_rows``."""
        raise NotImplementedError

    def ffn_rows(self, tgt_len: int, mem_len: int) -> int:
        """Rows per batch row that go through this layer's FFN (the tokens, plus any shared row stream)."""
        return tgt_len


class StackMemory(nn.Module):
    """Memory that travels through the whole stack rather than living in one layer (RMT's memory tokens, which
    go in at the bottom and come out of the top layer; Memformer's slots, a row stream updated layer by layer
    and gated at the top).  Registered with ``kind="stack"``; the stack calls, for one segment:

    * ``begin(emb, state, ctx) -> (emb, rows)`` before the first layer, on the embeddings (before dropout): it
      may add positions to the sequence (update ``ctx.n``, extend ``ctx.reset`` to the new length), add row
      streams, and register mask edits (``ctx.mask_edits``) that every attention mixer applies;
    * ``end(x, rows, state, ctx) -> (x, new_entries, aux_loss)`` after the last layer: it strips its positions
      (returning the hidden states of the segment's N tokens) and writes its new state entries;
    * only for a memory with ``wraps_layers`` (ARMT's per-layer associative memory): ``layer_in(i, x, state,
      ctx) -> x`` before layer i (on its input hidden states, memory positions included) and ``layer_out(i, x,
      state, ctx) -> (x, new_entries)`` after it (on its output); ``state`` is the memory's state before the
      segment, and new entries written here join those of ``end``.

    All go through the module call (``memory("begin", ...)``, ``memory("end", ...)``), so that module hooks see
    them (ZeRO-3 gathers the memory's parameters there).

    Its state entries are prefixed ``<name>.``; ``carries(mem_len)`` says what it carries from a segment into the
    next (as ``Mixer.carries``: by default derived from its state entries, so a memory with state is ``"part"``).
    ``split_documents``: documents starting inside a segment cannot share the memory's positions (RMT: every
    document must read its own memory tokens, placed before its first token); the stack then runs each later
    document as a pass of its own from the initial state, which is exactly the rule "a document starting inside
    a segment behaves as if run on its own" (see ``Stack.forward``)."""
    name: ClassVar[str] = ""
    split_documents: ClassVar[bool] = False
    wraps_layers: ClassVar[bool] = False

    def __init__(self, cfg, mp, specs: Sequence[LayerSpec]):
        super().__init__()
        self.cfg = cfg

    def forward(self, stage: str, *args):
        """``stage`` "begin", "end", "layer_in" or "layer_out": the call of that name (the stack calls the
        module, see above)."""
        if stage == "begin":
            return self.begin(*args)
        if stage == "end":
            return self.end(*args)
        if stage == "layer_in":
            return self.layer_in(*args)
        if stage == "layer_out":
            return self.layer_out(*args)
        raise ValueError(f"StackMemory stage must be 'begin', 'end', 'layer_in' or 'layer_out', got {stage!r}")

    def initial_state(self, batch_size: int, mem_len: int, device: torch.device,
                      dtype: torch.dtype) -> Dict[str, StateEntry]:
        """This memory's state entries for a fresh stream (also what a per-row reset puts back)."""
        return {}

    def carries(self, mem_len: int) -> str:
        """What this memory's state carries from one segment into the next (``Mixer.carries``)."""
        return carries_of(self, mem_len)

    def begin(self, emb: torch.Tensor, state: Mapping[str, torch.Tensor], ctx: SegmentContext):
        return emb, {}

    def end(self, x: torch.Tensor, rows: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor],
            ctx: SegmentContext):
        return x, {}, None

    def layer_in(self, index: int, x: torch.Tensor, state: Mapping[str, torch.Tensor], ctx: SegmentContext):
        return x

    def layer_out(self, index: int, x: torch.Tensor, state: Mapping[str, torch.Tensor], ctx: SegmentContext):
        return x, {}

    def extra_positions(self) -> int:
        """Positions ``begin`` adds to every segment (for the FLOP count)."""
        return 0

    def lookahead(self) -> int:
        """The most keys after a query that this memory's mask edits let the query see (relative distances down
        to -lookahead must have position terms)."""
        return 0

    def flops(self, batch_size: int, tgt_len: int, mem_len: int) -> int:
        return 0
