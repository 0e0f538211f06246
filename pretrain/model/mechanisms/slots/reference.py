"""The fp64 reference of Memformer's slots, from the equations (``mixer.py``'s docstring), run by
``pretrain.model.reference.ReferenceLM`` (the registrations' ``reference``): the slot layers (``layer``) and the
stack-level memory around them (``SlotsReference``)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class SlotsReference:
    """The slots of one segment: ``begin`` makes m_0 (the write stream starts there, every slot layer's tokens
    read it; ``state``: ``{"m0", "m"}`` [B, K, d]), the slot layers advance ``state["m"]``, ``end`` gates it into
    the next memory ``out["slots.mem"]``."""

    def __init__(self, ref, cfg):
        self.ref, self.cfg = ref, cfg
        self.state = None

    def begin(self, x, stack):
        """m_0 = LN(M_t + b_mem) (M_t = 0 for a fresh stream): the write stream starts there, every slot layer's
        tokens read it."""
        cfg, ref = self.cfg, self.ref
        B = x.shape[0]
        mem = stack.get("slots.mem")
        if mem is None:
            mem = torch.zeros(B, cfg.slots.num_slots, cfg.d_model, dtype=torch.float64)
        m0 = ref.ln(mem + ref.w["stack.memories.slots.memory_bias"], "stack.memories.slots.norm")
        self.state = {"m0": m0, "m": m0}
        return x

    def end(self, x, out):
        """M_{t+1} = a m_L + (1 - a) m_0, a = sigmoid(w_2^T GELU(W_1 m_L + b_1) + b_2) per slot."""
        ref, pre = self.ref, "stack.memories.slots."
        m, m0 = self.state["m"], self.state["m0"]
        h = F.gelu(m @ ref.w[pre + "gate_fc1.weight"].T + ref.w[pre + "gate_fc1.bias"])
        a = torch.sigmoid(h @ ref.w[pre + "gate_fc2.weight"].T + ref.w[pre + "gate_fc2.bias"])    # [B, K, 1]
        out["slots.mem"] = a * m + (1 - a) * m0
        return x


def layer(ref, l, x, mem, seg):
    """A slot layer: tokens attend over [m_0 (no positions) ; causal tokens (XL relative positions)]; in a
    writing layer (50) the write stream m -> m' by slot attention, one slot at a time over [itself ; the
    layer's tokens]."""
    cfg, clamp_len = ref.cfg, seg.clamp_len
    slots = ref.memories["slots"].state
    B, N, _ = x.shape
    H, dh = cfg.n_head, cfg.d_head
    K = slots["m0"].shape[1]
    pre = f"stack.layers.{l}.mixer."
    xin = ref.ln(x, pre + "attn.norm") if cfg.pre_lnorm else x
    q, k, v = ref.heads(xin, l)                                                 # [B, N, H, dh]

    writes = ref.specs[l].variant == "slots"

    def mem_qkv(t):
        """[q, k, v] (writing layer) or [k, v] (reading layer) of slot rows t, [B, K, H, dh] each."""
        t = ref.ln(t, pre + ("mem_attn.norm" if writes else "mem_norm")) if cfg.pre_lnorm else t
        y = t @ ref.lp(l, "mem_attn.qkv.weight" if writes else "mem_kv.weight").T
        return [z.reshape(B, K, H, dh) for z in y.chunk(3 if writes else 2, dim=-1)]

    ks, vs = mem_qkv(slots["m0"])[-2:]
    u, vb = ref.bias(l, "u"), ref.bias(l, "v")
    i = torch.arange(N)[:, None]
    j = torch.arange(N)[None, :]
    dist = (i - j).double()
    tok = (torch.einsum("bihd,bjhd->bhij", q + u, k) +
           torch.einsum("bihd,ijhd->bhij", q + vb, ref.rel_keys(l, ref.clamp(dist, clamp_len))))
    slot = torch.einsum("bihd,bjhd->bhij", q + u, ks)                           # [B, H, N, K]
    allowed = torch.cat([torch.ones(N, K, dtype=torch.bool), dist >= 0], 1)
    a, _ = ref.softmax_attend(torch.cat([slot, tok], -1) / math.sqrt(dh), allowed, torch.cat([vs, v], 1))
    out = ref.ffn(ref.attn_out(x, a, l), l)
    if not writes:
        return out, {}
    # write stream: slot s attends to its own key and the N token keys, never to another slot
    m = slots["m"]
    qm, km, vm = mem_qkv(m)
    aw = torch.zeros(B, K, H, dh, dtype=x.dtype)
    for s in range(K):
        keys = torch.cat([km[:, s:s + 1], k], 1)                                 # [B, 1 + N, H, dh]
        vals = torch.cat([vm[:, s:s + 1], v], 1)
        p = torch.softmax(torch.einsum("bhd,bjhd->bhj", qm[:, s], keys) / math.sqrt(dh), -1)
        aw[:, s] = torch.einsum("bhj,bjhd->bhd", p, vals)
    h = m + aw.reshape(B, K, -1) @ ref.lp(l, "mem_attn.out.weight").T
    h = h if cfg.pre_lnorm else ref.ln(h, pre + "mem_attn.norm")
    f = ref.ln(h, pre + "mem_ffn.norm") if cfg.pre_lnorm else h
    f = torch.relu(f @ ref.lp(l, "mem_ffn.fc1.weight").T + ref.lp(l, "mem_ffn.fc1.bias"))
    f = h + f @ ref.lp(l, "mem_ffn.fc2.weight").T + ref.lp(l, "mem_ffn.fc2.bias")
    slots["m"] = f if cfg.pre_lnorm else ref.ln(f, pre + "mem_ffn.norm")
    return out, {}
