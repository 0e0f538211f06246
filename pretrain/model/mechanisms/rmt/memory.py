"""Recurrent Memory Transformer (Bulatov, Kuratov & Burtsev 2022, "Recurrent Memory Transformer", NeurIPS, §3;
their decoder-only LM-RMT code) as a stack-level memory: K memory tokens enter below the first layer and leave
above the last one, whatever mixers the layers hold.

Parameters: ``memory`` [K, d_model], the learned initial memory (replicated under tensor parallelism), each row
drawn independently like a token embedding as the layers see it (``weights`` rule ``embedded``: normal(0,
init_std) * sqrt(d_model)); LM-RMT repeats one N(0, 1) vector K times, which leaves the slots identical but for
their positions.

State (K memory tokens, width d, batch B):

* ``mem``   [B, K, d] (param dtype): the memory the next segment reads, the last layer's outputs at the write
  positions of the previous segment (before the final LayerNorm of a pre-LN model: the residual stream, the
  scale layer 0 reads);
* ``fresh`` [B] bool: the row starts from the learned initial memory (a new stream, or a row reset at a
  document start).  ``reset_state`` sets it, ``begin`` puts the learned vectors in (with their gradient) and
  every segment clears it.  Keeping a flag rather than a copy of the parameter leaves the state plain data: it
  holds no graph across optimizer steps, saves as numbers, and needs no access to parameters outside the
  forward pass (ZeRO-3 partitions them).

One segment of N tokens with memory m (K rows) and token embeddings e:

1. the layers run over ``[m ; e ; m]`` (``mem_at_end``, the default and the paper's setting: read positions,
   the tokens, write positions; the same vectors at both ends) or ``[m ; e]``; the memory goes through the
   embedding dropout with the tokens and counts as positions for relative attention (distances include it);
2. every attention mixer adds the memory's mask edits to its mask over [cache (M) ; sequence] (LM-RMT's mask):
   read rows see every read row (bidirectional among themselves) and nothing later; write rows see every
   write row (bidirectional) and, causally, the tokens and the read rows; tokens see the cache, the read rows
   and earlier tokens, never the write rows; memory rows see the Transformer-XL cache only with
   ``read_mem_from_cache`` (tokens always do).  Recurrent mixers (fast weights) just see the longer sequence.
3. the N token positions go on to the softmax (memory positions cost no softmax); the last layer's outputs at
   the write positions (``[m ; e]``: the leading positions) are the next segment's ``m``.

With Transformer-XL layers (mem_len > 0) each layer's cache is built from the whole sequence, so its most
recent entries include the memory positions (as in LM-RMT).  Gradients flow from segment to segment through
``m`` when the caller keeps the state in the graph (``detach_state=False``; the engine's ``train.bptt_segments``
unroll): backpropagation through k segments, k = 1 truncating at every segment boundary.
"""
from __future__ import annotations

import torch
from torch import nn

from pretrain.model.mixer import SegmentContext, StackMemory, StateEntry
from pretrain.model.positions import NEG_INF
from pretrain.model.weights import describe


class RMTMemory(StackMemory):
    name = "rmt"
    split_documents = True      # every document reads its own memory tokens (see StackMemory)

    def __init__(self, cfg, mp, specs):
        super().__init__(cfg, mp, specs)
        sec = cfg.rmt
        self.k = sec.num_mem_tokens
        self.mem_at_end = sec.mem_at_end
        self.read_mem_from_cache = sec.read_mem_from_cache
        self.memory = nn.Parameter(torch.empty(self.k, cfg.d_model))
        describe(self, "memory", "embedded")

    def initial_state(self, batch_size, mem_len, device, dtype):
        K, d = self.k, self.cfg.d_model
        return {"mem": StateEntry(torch.zeros(batch_size, K, d, device=device, dtype=dtype), batch_dim=0),
                "fresh": StateEntry(torch.ones(batch_size, device=device, dtype=torch.bool), batch_dim=0)}

    def extra_positions(self) -> int:
        return 2 * self.k if self.mem_at_end else self.k

    def lookahead(self) -> int:
        return self.k - 1           # memory row i sees the memory rows after it, up to K - 1 positions on

    def read_memory(self, state) -> torch.Tensor:
        """[B, K, d]: the memory this segment reads, the learned initial memory for fresh rows (differentiable
        in both the carried state and the parameter)."""
        mem = state["mem"].to(self.memory.dtype)
        init = self.memory[None].expand_as(mem)
        return torch.where(state["fresh"][:, None, None], init, mem)

    def begin(self, emb, state, ctx: SegmentContext):
        if ctx.reset is not None:       # the stack splits documents for this memory (split_documents)
            raise RuntimeError("RMT: documents inside a segment reach begin(); the stack should have split them")
        m = self.read_memory(state).to(emb.dtype)
        x = torch.cat([m, emb, m] if self.mem_at_end else [m, emb], 1)
        ctx.n = x.shape[1]
        ctx.mask_edits.append(self.mask_edit(ctx.mem_len, ctx.n))
        return x, {}

    def mask_edit(self, mem_len: int, n: int):
        """The edit of an additive mask [B or 1, n, mem_len + n] over [cache ; sequence] (see the module
        docstring, step 2): returns a function mask -> edited mask (a new tensor)."""
        K, M = self.k, mem_len
        write = n - K if self.mem_at_end else None

        def edit(mask: torch.Tensor) -> torch.Tensor:
            mask = mask.clone()
            mask[:, :K, M:M + K] = 0.0                      # read rows: every read row
            if write is not None:
                mask[:, write:, M + write:] = 0.0           # write rows: every write row
            if M and not self.read_mem_from_cache:
                mask[:, :K, :M] = NEG_INF
                if write is not None:
                    mask[:, write:, :M] = NEG_INF
            return mask
        return edit

    def end(self, x, rows, state, ctx: SegmentContext):
        K = self.k
        if self.mem_at_end:
            tokens, new = x[:, K:-K], x[:, -K:]
        else:
            tokens, new = x[:, K:], x[:, :K]
        return tokens, {"mem": new.contiguous(), "fresh": torch.zeros_like(state["fresh"])}, None
