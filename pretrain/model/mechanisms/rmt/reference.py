"""The fp64 reference of the RMT memory tokens (Bulatov et al. 2022, LM-RMT), run by
``pretrain.model.reference.ReferenceLM`` (the registration's ``reference``): the segment is ``[memory ; tokens ;
memory]`` (or ``[memory ; tokens]``), attention masks are built from the definition (``allowed``), the last
layer's outputs at the write positions are the next memory and only the token positions reach the softmax."""
from __future__ import annotations

import torch


class RMTReference:
    """RMT around the layers of ``ref`` (a ``ReferenceLM``): ``begin`` adds the memory positions, ``end`` writes
    ``out["rmt.mem"]`` [B, K, d] and keeps the token positions, ``allowed`` is the attention pattern every
    attention layer uses."""

    def __init__(self, ref, cfg):
        self.ref, self.sec = ref, cfg.rmt
        self.k = cfg.rmt.num_mem_tokens
        self.n = 0

    def begin(self, x, memory):
        """[B, N, d] embeddings -> [B, N + 2K (or K), d] with the memory tokens (the learned memory at first)."""
        B, self.n = x.shape[0], x.shape[1]
        mem_tokens = memory.get("rmt.mem")
        if mem_tokens is None:                      # the first segment: the learned memory
            mem_tokens = self.ref.p("stack.memories.rmt.memory")[None].expand(B, -1, -1)
        return torch.cat([mem_tokens, x, mem_tokens] if self.sec.mem_at_end else [mem_tokens, x], 1)

    def end(self, x, out):
        """Writes the next memory ``out["rmt.mem"]``; returns the N token positions of ``x``."""
        K, L = self.k, x.shape[1]
        out["rmt.mem"] = x[:, L - K:] if self.sec.mem_at_end else x[:, :K]
        return x[:, K:K + self.n]

    def allowed(self, n: int, m: int) -> torch.Tensor:
        """RMT's attention pattern for the ``n`` positions of ``[read ; tokens (; write)]`` over ``[cache (m) ;
        those positions]``, from the definition (LM-RMT's mask): bool [n, m + n]."""
        K = self.k
        kind = ["read"] * K + ["token"] * (n - (2 if self.sec.mem_at_end else 1) * K) + \
            (["write"] * K if self.sec.mem_at_end else [])
        allowed = torch.zeros(n, m + n, dtype=torch.bool)
        for i in range(n):
            for j in range(m + n):
                if j < m:                               # the Transformer-XL cache
                    ok = kind[i] == "token" or self.sec.read_mem_from_cache
                else:
                    t = j - m
                    if kind[i] == "read":               # the read rows, both ways
                        ok = kind[t] == "read"
                    elif kind[i] == "token":            # causal; the write rows come after every token
                        ok = t <= i
                    else:                               # everything before, and the write rows both ways
                        ok = t <= i or kind[t] == "write"
                allowed[i, j] = ok
        return allowed
