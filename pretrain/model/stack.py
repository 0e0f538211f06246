"""The layer stack: a token mixer per layer (chosen by config, see ``registry.py``) plus the feed-forward
block, one loop over the layers, and the memory state of all of them as one value.

    stack = Stack(cfg, mp)
    state = stack.initial_state(batch, mem_len, device, dtype)        # MemoryState
    h, state, aux = stack(emb, state, seg)                            # emb [B, N, d] -> h [B, N, d]

One segment:

1. the stack-level memories (``StackMemory``, registered with kind "stack": RMT's memory tokens, Memformer's
   slots) begin: they may add positions to the sequence, row streams, and mask edits;
2. the per-segment context is built once: the document mask of documents starting inside the segment,
   absolute positions (when a layer asks for them) added to the embeddings, each present mechanism's
   ``prepare`` (relative position embeddings with their dropout, masks), the embedding dropout;
3. every layer runs ``mixer`` then ``ffn`` (``Layer``), reading its own named state entries and the *row
   streams* handed up by the layer below (memory that travels up the stack rather than living in one layer:
   LaMemo's refreshed memory rows, slots), through ``run_layer`` (activation checkpointing when enabled);
   a stack-level memory with ``wraps_layers`` (ARMT) also reads into every layer's input and writes from its
   output (``layer_in`` / ``layer_out``);
4. the stack-level memories end: they strip their positions and write their state from the top layer;
5. the new state is assembled from every layer's and memory's entries, plus the stack-level ``valid`` count
   of the positional memory (how many of the last ``mem_len`` slots hold real positions, per row).

Documents starting inside the segment go through the document mask of step 2, unless a stack-level memory
cannot share its positions between documents (``split_documents``: RMT): then later documents run as passes of
their own (``_split_documents``).

State entry names: ``layers.<i>.<name>`` for layer i's own entries (``layers.0.mem``, ``layers.3.fw`` ...),
``<memory>.<name>`` for a stack-level memory's (``rmt.mem``), and ``valid`` for the positional memory count.
The ``MemoryState``'s mechanism field is the layout's signature (``xl``, ``lamemo``, ``fast_weight*3,xl``,
``xl+rmt``): a state is refused by a model of another layout.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from pretrain.model import parallel
from pretrain.model.dropout import Dropout
from pretrain.model.mixer import CARRIES, Mixer, MixerOutput, SegmentContext, StackMemory, StateEntry
from pretrain.model.modules.attention import RelBiases
from pretrain.model.modules.ffn import FeedForward
from pretrain.model.positions import document_mask, sinusoid
from pretrain.model.registry import LayerSpec, mixer_class, signature, stack_memories
from pretrain.model.state import MemoryState


class Layer(nn.Module):
    """One layer: the token mixer, then the FFN (with its residual and norm), applied to the tokens and to the
    row stream the mixer shares its FFN with (LaMemo's memory rows), in one product."""

    def __init__(self, mixer: Mixer, ffn: FeedForward):
        super().__init__()
        self.mixer = mixer
        self.ffn = ffn

    def forward(self, x, state, rows, ctx: SegmentContext, biases):
        """Returns (hidden states [B, N, d], new state entries, row streams, auxiliary loss or None)."""
        out: MixerOutput = self.mixer(x, state, rows, ctx, biases)
        if ctx.detach:      # also when an entry is an input passed through (a recomputation needs no-grad outputs)
            out.state = {k: v.detach() for k, v in out.state.items()}
        name = self.mixer.ffn_stream
        residual = self.mixer.ffn_residual()           # None: x + FFN(x); else the mixer's gated residual
        r = out.rows.get(name) if name else None
        if r is not None and r.shape[1]:
            R = r.shape[1]
            h = self.ffn(torch.cat([r, out.x], 1), residual)
            return h[:, R:], out.state, {**out.rows, name: h[:, :R]}, out.aux_loss
        return self.ffn(out.x, residual), out.state, out.rows, out.aux_loss


class Stack(nn.Module):
    def __init__(self, cfg, mp):
        super().__init__()
        self.cfg = cfg
        self.specs: List[LayerSpec] = cfg.layer_specs()
        self.signature = signature(self.specs)
        self.layers = nn.ModuleList(
            Layer(mixer_class(s.mechanism)(cfg, mp, s, self.specs), FeedForward(cfg, mp)) for s in self.specs)
        shared = []
        if not cfg.untie_r:
            for layer in self.layers:
                shared += [n for n in layer.mixer.shared_biases() if n not in shared]
        if shared:
            self.biases = RelBiases(cfg, tuple(shared))
        # memories that travel through the whole stack (RMT tokens, slots), from the registry
        self.memories = nn.ModuleDict({m.name: mixer_class(m.name)(cfg, mp, self.specs)
                                       for m in stack_memories(cfg)})
        if self.memories:
            self.signature = "+".join([self.signature, *self.memories])
            ahead = max(m.lookahead() for m in self.memories.values())
            for layer in self.layers:
                layer.mixer.lookahead = ahead
        self.uses_memory = any(s.uses_memory for s in self.specs)
        self.absolute_positions = cfg.absolute_positions()
        self.drop = Dropout(cfg.dropout)
        # analysis hook: recorder(layer, probs [H, B, n, M + n], M) from the attention mixers (None: off)
        self.recorder = None
        # mechanisms in order of first appearance: their prepare() runs in this order every segment
        self._kinds: Dict[str, List[Mixer]] = {}
        for layer in self.layers:
            self._kinds.setdefault(layer.mixer.mechanism, []).append(layer.mixer)

    @property
    def mixers(self) -> List[Mixer]:
        return [layer.mixer for layer in self.layers]

    def carries(self, mem_len: int) -> Dict[str, str]:
        """What each part's state carries into the next segment with a memory of ``mem_len`` positions
        (``Mixer.carries``): ``{"layers.<i>": ..., "<memory name>": ...}``.  ``ValueError`` for a value outside
        ``CARRIES``, or what a part raises for a ``mem_len`` it refuses."""
        out = {f"layers.{i}": layer.mixer.carries(mem_len) for i, layer in enumerate(self.layers)}
        out.update({name: mem.carries(mem_len) for name, mem in self.memories.items()})
        for where, what in out.items():
            if what not in CARRIES:
                raise ValueError(f"{where}: carries() returned {what!r}, expected one of {CARRIES}")
        return out

    def decode_policy(self, mem_len: int) -> str:
        """How generation feeds this stack with a memory of ``mem_len`` positions, derived from what the state
        carries (``carries``) so that every new token is predicted with the context training gave it:

        * ``"window"``: no part carries anything (no memory, fast weights restarted every segment, absolute
          positions...): every new token is the last position of a pass over the last ``segment_len`` tokens
          from a fresh state (a sliding window: the longest context of training, in the place training had it);
        * ``"token"``: every part carries all it has read, and no position is counted within the segment
          (``absolute_positions``): feeding one token at a time equals reading whole segments, so each new token
          is a segment of one that updates the state (carried fast weights);
        * ``"segment"``: anything else (a memory of the last ``mem_len`` positions, a summary written at segment
          ends, hybrids of carried and non-carried layers): the stream is read in segments aligned as in
          training, the current partial segment re-read from the state at its start for every new token; the
          prediction is the one of a teacher-forced pass over the text in training segments."""
        kinds = set(self.carries(mem_len).values())
        if kinds == {"nothing"}:
            return "window"
        if kinds == {"all"} and not self.absolute_positions:
            return "token"
        return "segment"

    # -- state ----------------------------------------------------------------------------------------------
    def initial_state(self, batch_size: int, mem_len: int, device, dtype) -> MemoryState:
        if mem_len and not self.uses_memory:
            raise ValueError(f"no layer of this model ({self.signature}) reads a memory of past positions; "
                             f"mem_len must be 0, got {mem_len}")
        if self.uses_memory and mem_len < 1 and any(s.mechanism == "lamemo" for s in self.specs):
            raise ValueError("LaMemo needs a memory (mem_len >= 1); use attn_type 0 with mem_len 0 for none")
        tensors, batch_dims, head_dims = {}, {}, {}
        for i, layer in enumerate(self.layers):
            for name, e in layer.mixer.initial_state(batch_size, mem_len, device, dtype).items():
                key = f"layers.{i}.{name}"
                tensors[key], batch_dims[key], head_dims[key] = e.init, e.batch_dim, e.head_dim
        for name, mem in self.memories.items():
            for entry, e in mem.initial_state(batch_size, mem_len, device, dtype).items():
                key = f"{name}.{entry}"
                tensors[key], batch_dims[key], head_dims[key] = e.init, e.batch_dim, e.head_dim
        # the positional memory's fill count (stays 0 in a model without one; it also gives every state its
        # batch size)
        tensors["valid"] = torch.zeros(batch_size, dtype=torch.long, device=device)
        batch_dims["valid"], head_dims["valid"] = 0, None
        return MemoryState(self.signature, mem_len, tensors, batch_dims, head_dims,
                           tp_rank=parallel.tp_rank(), tp_world=parallel.tp_world_size())

    # -- one segment ----------------------------------------------------------------------------------------
    def forward(self, emb: torch.Tensor, state: MemoryState, seg) -> Tuple[torch.Tensor, MemoryState,
                                                                             Optional[torch.Tensor]]:
        """``emb`` [B, N, d] scaled token embeddings (no dropout yet); ``seg`` the call's settings
        (``lm.Segment``).  Returns the last layer's hidden states [B, N, d], the state after this segment and
        an auxiliary loss (a scalar, or None)."""
        if seg.reset is not None and any(m.split_documents for m in self.memories.values()):
            return self._split_documents(emb, state, seg)
        return self._segment(emb, state, seg)

    def _split_documents(self, emb, state, seg):
        """Documents starting inside the segment, for a stack-level memory whose positions two documents cannot
        share (RMT): the segment runs once as if no document started (which gives every row's first document:
        its tokens never see later ones), then every later document runs as a pass of its own from the initial
        state, documents of equal length batched together.  The outputs from a row's first start on, and the
        state after the segment, come from those passes (a row's state: its last document's).  So each document
        reads its own memory (the first one the carried memory, later ones the initial memory) and the memory
        carried on summarises only the last document.  Costs one pass more per distinct document length; an
        auxiliary loss is the sum over the passes."""
        B, N = emb.shape[0], seg.n
        x, new_state, aux = self._segment(emb, state, dataclasses.replace(seg, reset=None))
        starts = seg.reset.clone()
        starts[:, 0] = False                    # a start at position 0 was applied before (reset_state)
        pieces: Dict[int, List[Tuple[int, int]]] = {}       # length -> [(row, first position)]
        bounds = []
        for b in range(B):
            pos = starts[b].nonzero().flatten().tolist()
            bounds.append(pos)
            for a, e in zip(pos, pos[1:] + [N]):
                pieces.setdefault(e - a, []).append((b, a))
        out: Dict[Tuple[int, int], torch.Tensor] = {}       # (row, first position) -> hidden states [L, d]
        states = [new_state]
        picks = [(0, b) for b in range(B)]                  # row b's new state: (index in states, row)
        for length, items in sorted(pieces.items()):
            rows = torch.tensor([b for b, _ in items], device=emb.device)
            first = torch.tensor([a for _, a in items], device=emb.device)
            idx = first[:, None] + torch.arange(length, device=emb.device)
            part = emb[rows[:, None], idx]                                     # [G, L, d]
            fresh = self.initial_state(len(items), state.mem_len, emb.device, emb.dtype)
            xp, st, a = self._segment(part, fresh, dataclasses.replace(seg, n=length, reset=None))
            if a is not None:
                aux = a if aux is None else aux + a
            states.append(st)
            for g, (b, a0) in enumerate(items):
                out[(b, a0)] = xp[g]
                if a0 == bounds[b][-1]:
                    picks[b] = (len(states) - 1, g)
        rows_out = []
        for b in range(B):
            if not bounds[b]:
                rows_out.append(x[b])
                continue
            parts = [x[b, :bounds[b][0]]] + [out[(b, a)] for a in bounds[b]]
            rows_out.append(torch.cat(parts, 0))
        return torch.stack(rows_out), _pick_rows(states, picks), aux

    def _segment(self, emb: torch.Tensor, state: MemoryState, seg):
        """One pass of the layers over a segment (``forward`` without the document split)."""
        B, N = emb.shape[0], seg.n
        M = seg.mem_len
        valid = state["valid"] if self.uses_memory else None
        ctx = SegmentContext(n=N, mem_len=M, clamp_len=seg.clamp_len, same_length=seg.same_length,
                             detach=seg.detach, training=self.training, batch_size=B, valid=valid,
                             device=emb.device, dtype=emb.dtype, reset=seg.reset)
        rows: Dict[str, torch.Tensor] = {}
        for name, mem in self.memories.items():  # stack-level memories may add positions and row streams
            emb, r = mem("begin", emb, self._entries(state, name + "."), ctx)
            rows.update(r)
        if ctx.reset is not None:               # documents starting inside the segment
            ctx.doc = torch.cumsum(ctx.reset.long(), 1)
            ctx.doc_mask = document_mask(ctx.doc, M)
        if self.absolute_positions:             # the position counted from the segment end (lmtool, XL type 2)
            n = emb.shape[1]
            d = torch.arange(n - 1, -1, -1.0, device=emb.device)
            if seg.clamp_len > 0:
                d = d.clamp(max=seg.clamp_len)
            emb = emb + sinusoid(d, emb.shape[-1]).to(emb.dtype)
        ctx.recorder = self.recorder
        for kind, mixers in self._kinds.items():
            type(mixers[0]).prepare(ctx, mixers, self.drop)
        x = self.drop(emb)
        shared = self.biases.as_dict() if hasattr(self, "biases") else {}
        new: Dict[str, torch.Tensor] = {}
        aux = None
        # stack-level memories that read before and write after every layer (ARMT), with their state
        wrapping = {name: self._entries(state, name + ".") for name, mem in self.memories.items()
                    if mem.wraps_layers}
        for i, layer in enumerate(self.layers):
            prefix = f"layers.{i}."
            biases = {} if self.cfg.untie_r else {n: shared[n] for n in layer.mixer.shared_biases()}
            for name, entries in wrapping.items():
                x = self.memories[name]("layer_in", i, x, entries, ctx)
            x, st_new, rows, a = self._run(layer, x, self._entries(state, prefix), rows, ctx, biases,
                                           seg.run_layer)
            new.update({prefix + k: v for k, v in st_new.items()})
            for name, entries in wrapping.items():
                x, st_mem = self.memories[name]("layer_out", i, x, entries, ctx)
                new.update({f"{name}.{k}": v.detach() if seg.detach else v for k, v in st_mem.items()})
            if a is not None:
                aux = a if aux is None else aux + a
        for name, mem in self.memories.items():
            x, st_new, a = mem("end", x, rows, self._entries(state, name + "."), ctx)
            if seg.detach:
                st_new = {k: v.detach() for k, v in st_new.items()}
            new.update({f"{name}.{k}": v for k, v in st_new.items()})
            if a is not None:
                aux = a if aux is None else aux + a
        if self.uses_memory:
            n = ctx.n                           # positions this segment added to the memory
            filled = valid + n
            if ctx.reset is not None:           # only the positions since the row's last document start count
                pos = torch.arange(n, device=emb.device)
                last = torch.where(ctx.reset, pos, -1).amax(1)
                filled = torch.where(last >= 0, n - last, filled)
            new["valid"] = torch.clamp(filled, max=M) if M else valid
        return x, state.replace(**new), aux

    @staticmethod
    def _entries(state: MemoryState, prefix: str) -> Dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in state.tensors.items() if k.startswith(prefix)}

    @staticmethod
    def _run(layer: Layer, x, st, rows, ctx, biases, run_layer):
        """``layer(x, st, rows, ctx, biases)`` through ``run_layer`` (which may checkpoint it: its arguments and
        results are flattened to tensors, the only thing every checkpoint implementation accepts)."""
        skeys, rkeys, bkeys = list(st), list(rows), list(biases)
        out_keys: List = [[], [], False]

        def fn(x, *flat):
            a, b = len(skeys), len(skeys) + len(rkeys)
            y, s, r, aux = layer(x, dict(zip(skeys, flat[:a])), dict(zip(rkeys, flat[a:b])), ctx,
                                 dict(zip(bkeys, flat[b:])))
            out_keys[:] = [list(s), list(r), aux is not None]
            return (y, *s.values(), *r.values()) + ((aux,) if aux is not None else ())

        res = run_layer(fn, x, *st.values(), *rows.values(), *biases.values())
        ns, nr = len(out_keys[0]), len(out_keys[1])
        aux = res[1 + ns + nr] if out_keys[2] else None
        return (res[0], dict(zip(out_keys[0], res[1:1 + ns])), dict(zip(out_keys[1], res[1 + ns:1 + ns + nr])),
                aux)

    # -- cost and sharding ----------------------------------------------------------------------------------
    def flops(self, batch_size: int, tgt_len: int, mem_len: int) -> int:
        n = tgt_len + sum(m.extra_positions() for m in self.memories.values())
        total = sum(m.flops(batch_size, tgt_len, mem_len) for m in self.memories.values())
        for layer in self.layers:
            total += layer.mixer.flops(batch_size, n, mem_len)
            total += 2 * 2 * batch_size * layer.mixer.ffn_rows(n, mem_len) * self.cfg.d_model * self.cfg.d_inner
        return int(total)

    def sharding_units(self) -> List[Tuple[nn.Module, List[nn.Parameter]]]:
        """(module, extra parameters) per layer: each layer is called as a module and uses all of its own
        parameters in that call, plus the position biases shared by every layer (``self.biases``)."""
        shared = list(self.biases.parameters()) if hasattr(self, "biases") else []
        return [(layer, shared) for layer in self.layers] + [(m, []) for m in self.memories.values()]


def _pick_rows(states: List[MemoryState], picks: List[Tuple[int, int]]) -> MemoryState:
    """A state whose row b is row ``picks[b][1]`` of ``states[picks[b][0]]`` (states of one layout)."""
    first = states[0]
    offsets, total = [], 0
    for st in states:
        offsets.append(total)
        total += st.batch_size
    index = torch.tensor([offsets[i] + r for i, r in picks], device=first.device)
    tensors = {}
    for k in first.keys():
        dim = first.batch_dims[k]
        tensors[k] = torch.cat([st[k].to(first[k].dtype) for st in states], dim).index_select(dim, index)
    return first.replace(**tensors)
