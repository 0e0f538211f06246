"""The fp64 reference of the fast-weight layers, from the equations (``mixer.py``'s docstring), run by
``pretrain.model.reference.ReferenceLM`` (the registration's ``reference``).  FAVOR+ uses the projection the
model drew (``ReferenceLM.favor``)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def layer(ref, l, x, mem, seg):
    """Fast-weight layer ``l`` of ``ref`` (a ``ReferenceLM``) on ``x`` [B, N, d] with its state ``mem`` (None:
    fresh), with an explicit loop over time (the equations of ``mixer.py``'s docstring): (output, new state)."""
    cfg = ref.cfg
    spec = ref.specs[l]
    sec = cfg.fast_weight
    rule, fmap = spec.settings["rule"], spec.settings["feature_map"]
    attn_norm = spec.settings["attn_norm"] if sec.attn_norm is None else sec.attn_norm
    B, N, _ = x.shape
    H, dh = cfg.n_head, cfg.d_head
    xin = ref.ln(x, f"stack.layers.{l}.mixer.norm") if cfg.pre_lnorm else x
    y = xin @ ref.lp(l, "qkvb.weight").T
    hd = H * dh
    q, k, v = (y[..., i * hd:(i + 1) * hd].reshape(B, N, H, dh) for i in range(3))
    beta = torch.sigmoid(y[..., 3 * hd:]) if rule == "delta" else None               # [B, N, H]

    def phi(t):
        if fmap == "elu":
            f = F.elu(t) + 1
        elif fmap == "favor":
            wx = t @ ref.favor[l]                                                 # [B, N, H, m]
            sq = (t * t).sum(-1, keepdim=True) / 2
            f = (torch.cat([torch.exp(wx - sq), torch.exp(-wx - sq)], -1) + 1e-4) / math.sqrt(2 * wx.shape[-1])
        else:
            xt = torch.cat([F.relu(t), F.relu(-t)], -1)
            f = torch.cat([xt * xt.roll(r, -1) for r in range(1, sec.dpfp_nu + 1)], -1)
        return f / f.sum(-1, keepdim=True) if sec.sum_norm else f

    qf, kf = phi(q), phi(k)
    D = qf.shape[-1]
    carry = sec.carry_state and mem is not None
    W = mem["fw"].double().clone() if carry else x.new_zeros(B, H, D, dh)
    z = (mem["z"].double().clone() if carry else x.new_zeros(B, H, D)) if attn_norm else None
    outs = []
    for t in range(N):
        kt, qt, vt = kf[:, t], qf[:, t], v[:, t]                                  # [B, H, D/dh]
        if rule == "delta":
            vbar = torch.einsum("bhde,bhd->bhe", W, kt)
            W = W + torch.einsum("bhd,bhe->bhde", kt, beta[:, t, :, None] * (vt - vbar))
        else:
            W = W + torch.einsum("bhd,bhe->bhde", kt, vt)
        o = torch.einsum("bhde,bhd->bhe", W, qt) / math.sqrt(dh)
        if attn_norm:
            z = z + kt
            den = (z * qt).sum(-1, keepdim=True)
            if spec.settings["scale"] == "scores":      # 4/5/6: 1/sqrt(dh) on the scores, inside the norm
                den = den / math.sqrt(dh)
            o = o / (den + sec.eps)
        outs.append(o)
    a = torch.stack(outs, 1)                                                      # [B, N, H, dh]
    out = ref.ffn(ref.attn_out(x, a, l, norm="norm", out="out.weight"), l)
    st = {"fw": W}
    if attn_norm:
        st["z"] = z
    return out, st
