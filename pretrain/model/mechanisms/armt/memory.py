"""Associative Recurrent Memory Transformer (Rodkin, Kuratov, Bulatov & Burtsev 2024, arXiv 2407.04841, Sec. 3;
the authors' RodkinIvan/associative-recurrent-memory-transformer ``modeling_amt/language_modeling.py``) as a
stack-level memory: M learned memory tokens appended at the end of every segment, and per layer an associative
memory (A, z) that the layer's input reads before the layer and the layer's output at the memory tokens writes
after it, whatever mixers the layers hold.  The op (the read and the batched delta write with the gamma
correction) is ``pretrain.ops.associative``; README.md beside this file gives the equations and choices.

Parameters (replicated under tensor parallelism; L layers, H heads, d = d_model):

* ``memory``  [M, d]          the memory tokens (rule ``embedded``, like RMT's), the same every segment;
* ``W_mq``    [L, d_mem, d]   queries (authors' ``W_mq``, Linear(d, d_mem, bias=False));
* ``W_mk``    [L, d_mem, d]   keys (``W_mk``);
* ``W_mv``    [L, d, d]       values (``W_mv``, Linear(d, d, bias=False)), zero-initialised: the model starts as
  the plain transformer (``value_init``);
* ``W_mb``    [L, H, d], ``b_mb`` [L, H]   write strengths beta = sigmoid(W_mb m + b_mb) (``W_mb``,
  Linear(d, 1) per head).

State per layer l (fp32, fp64 in an fp64 model), carried across segments and steps:

* ``A<l>`` [B, H, 2 nu d_mem / H, d / H] and ``z<l>`` [B, H, 2 nu d_mem / H];
* ``fresh`` [B] bool: the row starts a stream (or a document, after ``reset_state``): its read returns 0 and its
  first write takes the authors' first-segment branch (``first_segment``), ignoring the incoming A, z.

One segment of N tokens with embeddings e:

1. ``begin``: the layers run over ``[e ; mem]`` (N + M positions, causal: the tokens never see the memory tokens
   of their own segment; with a Transformer-XL cache the memory positions enter the cache, as RMT's do);
2. before layer l (``layer_in``): x <- x + merge_heads(A_l^T phi(q) / (z_l . phi(q) + eps)), q = split(x W_mq^T),
   at every position (memory tokens included);
3. after layer l (``layer_out``): k, v, beta from the layer's output at the M memory positions; (A_l, z_l) <-
   the batched delta write;
4. ``end``: the N token positions go on to the softmax (the memory tokens' outputs are not scored).

Documents starting inside a segment run as passes of their own (``split_documents``, as RMT): each document
reads its own memory from a fresh state.  Gradients cross segments through A, z when the caller keeps the state
in the graph (``detach_state=False``; the engine's ``train.bptt_segments``)."""
from __future__ import annotations

import torch
from torch import nn

from pretrain.model.mixer import SegmentContext, StackMemory, StateEntry
from pretrain.model.weights import describe
from pretrain.ops.associative import associative_read, associative_update, feature_dim


class ARMTMemory(StackMemory):
    name = "armt"
    split_documents = True      # every document writes and reads its own associative memory
    wraps_layers = True         # reads before every layer and writes after it (layer_in / layer_out)

    def __init__(self, cfg, mp, specs):
        super().__init__(cfg, mp, specs)
        sec = cfg.armt
        d, L, H = cfg.d_model, len(specs), sec.heads
        if d % H or sec.d_mem % H:
            raise ValueError(f"ARMT: heads={H} must divide d_model={d} and d_mem={sec.d_mem}")
        self.m, self.heads, self.n_layer = sec.num_mem_tokens, H, L
        self.dk, self.dv = sec.d_mem // H, d // H
        self.nu, self.eps, self.correction, self.normalize = sec.nu, sec.eps, sec.correction, sec.normalize
        self.dphi = feature_dim(self.dk, self.nu)
        self.memory = nn.Parameter(torch.empty(self.m, d))
        self.W_mq = nn.Parameter(torch.empty(L, sec.d_mem, d))
        self.W_mk = nn.Parameter(torch.empty(L, sec.d_mem, d))
        self.W_mv = nn.Parameter(torch.empty(L, d, d))
        self.W_mb = nn.Parameter(torch.empty(L, H, d))
        self.b_mb = nn.Parameter(torch.empty(L, H))
        describe(self, "memory", "embedded")
        for name in ("W_mq", "W_mk", "W_mb"):
            describe(self, name, "weight")
        describe(self, "W_mv", sec.value_init)
        describe(self, "b_mb", "zeros")

    # -- state ----------------------------------------------------------------------------------------------
    def initial_state(self, batch_size, mem_len, device, dtype):
        sd = torch.float64 if dtype == torch.float64 else torch.float32
        out = {}
        for l in range(self.n_layer):
            out[f"A{l}"] = StateEntry(torch.zeros(batch_size, self.heads, self.dphi, self.dv, device=device,
                                                  dtype=sd), batch_dim=0)
            out[f"z{l}"] = StateEntry(torch.zeros(batch_size, self.heads, self.dphi, device=device, dtype=sd),
                                      batch_dim=0)
        out["fresh"] = StateEntry(torch.ones(batch_size, device=device, dtype=torch.bool), batch_dim=0)
        return out

    def extra_positions(self) -> int:
        return self.m

    # -- one segment ----------------------------------------------------------------------------------------
    def begin(self, emb, state, ctx: SegmentContext):
        if ctx.reset is not None:       # the stack splits documents for this memory (split_documents)
            raise RuntimeError("ARMT: documents inside a segment reach begin(); the stack should have split them")
        mem = self.memory.to(emb.dtype)[None].expand(emb.shape[0], -1, -1)
        x = torch.cat([emb, mem], 1)
        ctx.n = x.shape[1]
        return x, {}

    def _split(self, t, width):
        """[B, L, H * width] -> [B, H, L, width]."""
        return t.reshape(t.shape[0], t.shape[1], self.heads, width).transpose(1, 2)

    def _state(self, l, state):
        """Layer l's (A, z), zero in fresh rows."""
        keep = (~state["fresh"]).to(state[f"A{l}"].dtype)
        return state[f"A{l}"] * keep[:, None, None, None], state[f"z{l}"] * keep[:, None, None]

    def layer_in(self, l: int, x, state, ctx: SegmentContext):
        """x [B, L, d] (layer l's input) + the read of layer l's memory at every position."""
        A, z = self._state(l, state)
        q = self._split(x @ self.W_mq[l].to(x.dtype).T, self.dk)                     # [B, H, L, dk]
        o = associative_read(A, z, q, nu=self.nu, eps=self.eps, normalize=self.normalize)   # [B, H, L, dv]
        return x + o.transpose(1, 2).reshape(x.shape)

    def layer_out(self, l: int, x, state, ctx: SegmentContext):
        """Writes layer l's memory from its outputs x [B, L, d] at the M memory positions; returns (x, entries)."""
        m = x[:, -self.m:]
        k = self._split(m @ self.W_mk[l].to(x.dtype).T, self.dk)                     # [B, H, M, dk]
        v = self._split(m @ self.W_mv[l].to(x.dtype).T, self.dv)                     # [B, H, M, dv]
        beta = torch.sigmoid(m @ self.W_mb[l].to(x.dtype).T + self.b_mb[l].to(x.dtype)).transpose(1, 2)
        A, z = associative_update(state[f"A{l}"], state[f"z{l}"], k, v, beta, nu=self.nu, eps=self.eps,
                                  correction=self.correction, normalize=self.normalize,
                                  first_segment=state["fresh"])
        sd = state[f"A{l}"].dtype
        return x, {f"A{l}": A.to(sd), f"z{l}": z.to(sd)}

    def end(self, x, rows, state, ctx: SegmentContext):
        return x[:, :-self.m], {"fresh": torch.zeros_like(state["fresh"])}, None

    def flops(self, batch_size: int, tgt_len: int, mem_len: int) -> int:
        d, L, M, H = self.cfg.d_model, self.n_layer, self.m, self.heads
        n = tgt_len + M
        dq = self.dk * H
        phi = self.dphi * H                                      # phi features over all heads
        read = 2 * n * d * dq + 2 * n * phi * self.dv + 2 * n * phi
        write = 2 * M * d * (dq + d + H) + 4 * M * phi * self.dv + 4 * M * phi      # k, v, beta; vbar, A; d, z
        return int(batch_size * L * (read + write))
