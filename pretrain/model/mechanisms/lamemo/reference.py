"""The fp64 reference of the LaMemo layers (attn_type 3, 31, 32, 33), from the equations (``mixer.py``'s
docstring), run by ``pretrain.model.reference.ReferenceLM`` (the registration's ``reference``)."""
from __future__ import annotations

import math

import torch

ROWS = "lamemo"     # the refreshed memory rows handed up between LaMemo layers (seg.rows)


def layer(ref, l, x, mem, seg):
    """Layer ``l`` of ``ref`` (a ``ReferenceLM``) on ``x`` [B, N, d] with its memory ``mem`` (None: fresh):
    (output [B, N, d], new memory).  The refreshed memory rows travel between consecutive LaMemo layers in
    ``seg.rows["lamemo"]``; the first LaMemo layer of a run recomputes them from its cached inputs."""
    cfg = ref.cfg
    mem_len, clamp_len, same_length = seg.mem_len, seg.clamp_len, seg.same_length
    rows = seg.rows.get(ROWS)
    at = ref.specs[l].code
    B, N, _ = x.shape
    H, dh = cfg.n_head, cfg.d_head
    first = l == 0 or ref.specs[l - 1].mechanism != "lamemo"
    feeds = l + 1 < cfg.n_layer and ref.specs[l + 1].mechanism == "lamemo"
    if mem is None:
        mem = {"attn": x.new_zeros(B, 0, H, dh), "lse": x.new_zeros(B, H, 0), "mem": x.new_zeros(B, 0, cfg.d_model)}
    m_h = mem["mem"] if first else rows
    m = m_h.shape[1]
    c = torch.cat([m_h, x], 1)
    q, k, v = ref.heads(ref.ln(c, f"stack.layers.{l}.mixer.attn.norm") if cfg.pre_lnorm else c, l)
    a_x, z_x = ref.causal_attention(q[:, m:], k, v, l, m, clamp_len, same_length, mem_len)
    a_m = x.new_zeros(B, 0, H, dh)
    z_m = x.new_zeros(B, H, 0)
    if m:
        W = min(m, N)
        j = torch.arange(m - W + 1, m + 1)              # window: memory tail + first current token
        i = torch.arange(m)
        delta = (j[None, :] - i[:, None]).double()     # [m, W]
        allowed = torch.ones(m, W, dtype=torch.bool) if at == 33 else delta > 0
        u = ref.bias(l, "u_fut" if at == 32 else "u")
        vb = ref.bias(l, "v" if at == 31 else "v_fut")
        rdist = -delta if at == 31 else delta.abs()
        rk = ref.rel_keys(l, ref.clamp(rdist, clamp_len))                     # [m, W, H, dh]
        qm = q[:, :m]
        s = (torch.einsum("bihd,bjhd->bhij", qm + u, k[:, j]) +
             torch.einsum("bihd,ijhd->bhij", qm + vb, rk)) / math.sqrt(dh)
        a_new, z_new = ref.softmax_attend(s, allowed, v[:, j])
        z_old, a_old = mem["lse"], mem["attn"]
        alpha = torch.sigmoid(z_old - z_new).transpose(1, 2)[..., None]       # [B, m, H, 1]
        a_m = alpha * a_old + (1 - alpha) * a_new
        z_m = torch.logaddexp(z_old, z_new)
    out_rows = None
    if feeds:
        h = ref.ffn(ref.attn_out(c, torch.cat([a_m, a_x], 1), l), l)
        out_rows, x = h[:, :m], h[:, m:]
    else:
        x = ref.ffn(ref.attn_out(x, a_x, l), l)
    st = {"attn": torch.cat([a_m, a_x], 1)[:, -mem_len:], "lse": torch.cat([z_m, z_x], 2)[:, :, -mem_len:]}
    if first:
        st["mem"] = torch.cat([mem["mem"], c[:, m:]], 1)[:, -mem_len:]
    seg.rows[ROWS] = out_rows
    return x, st
