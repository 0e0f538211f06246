"""The fp64 reference of the Gated DeltaNet layer, from the equations (``mixer.py``'s docstring; Yang, Kautz &
Hatamizadeh 2025, Eq. 10), run by ``pretrain.model.reference.ReferenceLM`` (the registration's ``reference``):
the convolutions as explicit sums over the last W inputs, the rule as an explicit loop over time, the state
read and written in full (no tensor parallelism, no chunks)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def layer(ref, l, x, mem, seg):
    """Gated DeltaNet layer ``l`` of ``ref`` (a ``ReferenceLM``) on ``x`` [B, N, d] with its state ``mem`` (None:
    fresh): (output, new state ``{"S": [B, H, K, V], "conv": [B, H, 2K + V, W - 1]}``)."""
    cfg = ref.cfg
    sec = cfg.gated_deltanet
    B, N, _ = x.shape
    H = cfg.n_head
    K, V = sec.widths(cfg.d_head)
    W = sec.conv_size
    carry = sec.carry_state and mem is not None
    xin = ref.ln(x, f"stack.layers.{l}.mixer.norm") if cfg.pre_lnorm else x
    y = xin @ ref.lp(l, "proj.weight").T
    q, k, v, r, a, b = y.split((H * K, H * K, H * V, H * V, H, H), -1)
    q, k, v, r = q.reshape(B, N, H, K), k.reshape(B, N, H, K), v.reshape(B, N, H, V), r.reshape(B, N, H, V)
    st = {}
    if sec.use_short_conv:
        # per head, channels [q (K) ; k (K) ; v (V)]; the window of token t: inputs t - W + 1 .. t, carried
        # inputs of the previous segments before the first token
        u = torch.cat([q, k, v], -1)                                              # [B, N, H, C]
        C = u.shape[-1]
        past = mem["conv"].double().permute(0, 3, 1, 2) if carry and "conv" in mem \
            else x.new_zeros(B, W - 1, H, C)                                      # [B, W - 1, H, C]
        ext = torch.cat([past, u], 1)                                             # [B, W - 1 + N, H, C]
        w = torch.cat([ref.lp(l, "q_conv"), ref.lp(l, "k_conv"), ref.lp(l, "v_conv")], 1)    # [H, C, W]
        out = []
        for t in range(N):
            acc = x.new_zeros(B, H, C)
            for i in range(W):                                                    # tap i reads input t - (W-1) + i
                acc = acc + w[:, :, i] * ext[:, t + i]
            out.append(F.silu(acc))
        u = torch.stack(out, 1)
        q, k, v = u.split((K, K, V), -1)
        st["conv"] = ext[:, N:].permute(0, 2, 3, 1)                               # the last W - 1 inputs
    else:
        q, k, v = F.silu(q), F.silu(k), F.silu(v)
    q = q / torch.sqrt((q * q).sum(-1, keepdim=True) + 1e-6)
    k = k / torch.sqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    beta = torch.sigmoid(b) * (2 if sec.allow_neg_eigval else 1)                  # [B, N, H]
    alpha = torch.exp(-torch.exp(ref.lp(l, "A_log")) * F.softplus(a + ref.lp(l, "dt_bias")))
    S = mem["S"].double().clone() if carry else x.new_zeros(B, H, K, V)
    eye = torch.eye(K, dtype=x.dtype)
    outs = []
    for t in range(N):
        kt, bt = k[:, t], beta[:, t, :, None, None]                               # [B, H, K], [B, H, 1, 1]
        kk = torch.einsum("bhi,bhj->bhij", kt, kt)
        S = alpha[:, t, :, None, None] * ((eye - bt * kk) @ S) + bt * torch.einsum("bhk,bhv->bhkv", kt, v[:, t])
        outs.append(torch.einsum("bhkv,bhk->bhv", S, q[:, t]) / math.sqrt(K))
    o = torch.stack(outs, 1)                                                      # [B, N, H, V]
    o = o / torch.sqrt(o.pow(2).mean(-1, keepdim=True) + sec.norm_eps) * ref.lp(l, "o_norm") * F.silu(r)
    out = ref.ffn(ref.attn_out(x, o, l, norm="norm", out="out.weight"), l)
    st["S"] = S
    return out, st
