"""The fp64 reference of the Transformer-XL layers (attn_type 0, 1, 2), from the equations (``mixer.py``'s
docstring), run by ``pretrain.model.reference.ReferenceLM`` (the registration's ``reference``)."""
from __future__ import annotations

import math

import torch


def _shaw_position(ref, l, clamp_len):
    """Shaw's position term of layer ``l``: ``q_i^T E[dist] + b[dist]`` from the learned tables (tgt_len +
    mem_len rows, ``clamp_len`` shortens them; larger distances share the last row)."""
    cfg = ref.cfg
    rows = cfg.tgt_len + cfg.mem_len
    if clamp_len > 0:
        rows = min(rows, clamp_len)

    def position(q, dist):
        idx = dist.long().clamp(0, rows - 1)
        e, rb = ref.lp(l, "r_emb")[:, idx], ref.lp(l, "r_bias")[:, idx]     # [H, N, K, dh], [H, N, K]
        return torch.einsum("bihd,hijd->bhij", q, e) + rb[None]
    return position


def layer(ref, l, x, mem, seg):
    """Layer ``l`` of ``ref`` (a ``ReferenceLM``) on its input ``x`` [B, N, d] with its memory ``mem`` (None for
    a fresh stream): (output [B, N, d], new memory).  XL: attention over [cached inputs ; segment] with the
    growing memory of the layer's inputs; Shaw: the learned tables of each distance; absolute: the segment
    only, causal (or the stack-level memories' pattern)."""
    cfg = ref.cfg
    mem_len, clamp_len, same_length = seg.mem_len, seg.clamp_len, seg.same_length
    B, N, _ = x.shape
    absolute = ref.specs[l].variant == "absolute"
    memory = x.new_zeros(B, 0, cfg.d_model) if mem is None or absolute else mem["mem"]
    m = memory.shape[1]
    c = torch.cat([memory, x], 1)
    q, k, v = ref.heads(ref.ln(c, f"stack.layers.{l}.mixer.attn.norm") if cfg.pre_lnorm else c, l)
    q = q[:, m:]
    if absolute:
        pattern = ref.stack_allowed(N, 0)
        allowed = torch.ones(N, N, dtype=torch.bool).tril() if pattern is None else pattern
        a, _ = ref.softmax_attend(torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(cfg.d_head), allowed, v)
    elif ref.specs[l].variant == "shaw":
        a, _ = ref.causal_attention(q, k, v, l, m, clamp_len, same_length, mem_len, u=ref.lp(l, "u"),
                                    position=_shaw_position(ref, l, clamp_len))
    else:
        a, _ = ref.causal_attention(q, k, v, l, m, clamp_len, same_length, mem_len)
    out = ref.ffn(ref.attn_out(x, a, l), l)
    st = {} if absolute else {"mem": torch.cat([memory, x], 1)[:, max(0, m + N - mem_len):][:, :mem_len]}
    return out, st
