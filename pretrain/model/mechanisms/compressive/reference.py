"""The fp64 reference of the Compressive Transformer layers (attn_type 60, 61, 62), from the equations
(``mixer.py``'s docstring), run by ``pretrain.model.reference.ReferenceLM`` (the registration's ``reference``).
The compressing layers' reconstruction losses go to ``ReferenceLM.aux_losses`` (``ReferenceLM.aux_loss``)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def gru_gate(ref, l, name, x, y):
    """GTrXL gating g(x, y) = z x + (1 - z) tanh(W_n y + U_n (r x)) with the layer's gate ``name``."""
    p = f"stack.layers.{l}.mixer.{name}."
    d = x.shape[-1]
    wy, wx, un, bz = (ref.w[p + k] for k in ("w_y", "w_x", "u_n", "b_z"))
    r = torch.sigmoid(y @ wy[:d].T + x @ wx[:d].T)
    z = torch.sigmoid(y @ wy[d:2 * d].T + x @ wx[d:].T + bz)
    n = torch.tanh(y @ wy[2 * d:].T + (r * x) @ un.T)
    return z * x + (1 - z) * n


def compress(ref, l, blocks, frozen):
    """f_c over whole blocks: [B, k c, d] -> [B, k, d]; conv: slot j = b + sum_t W[:, :, t] h_{jc+t}."""
    sec = ref.cfg.compressive
    B, L, d = blocks.shape
    blk = blocks.reshape(B, L // sec.cmem_ratio, sec.cmem_ratio, d)
    if sec.compression == "max":
        return blk.amax(2)
    if sec.compression == "mean":
        return blk.mean(2)
    w, b = ref.lp(l, "compressor.weight"), ref.lp(l, "compressor.bias")
    if frozen:
        w, b = w.detach(), b.detach()
    return torch.einsum("bjti,oit->bjo", blk, w) + b


def layer(ref, l, x, mem, seg):
    """A Compressive Transformer layer (``mixer.py``) from the equations, with growing memories:
    attention over [cmem ; mem ; x] with distances over that frame; the FIFO as a queue of positions cut
    into whole blocks; the reconstruction loss of the blocks compressed in this segment."""
    cfg, sec = ref.cfg, ref.cfg.compressive
    mem_len, clamp_len, same_length = seg.mem_len, seg.clamp_len, seg.same_length
    spec = ref.specs[l]
    B, N, d = x.shape
    compressed, memory = bool(spec.settings.get("compressed")), spec.uses_memory
    c, C = sec.cmem_ratio, (sec.slots(cfg.mem_len) if compressed else 0)
    pre = f"stack.layers.{l}.mixer."
    mem = mem or {}
    empty = x.new_zeros(B, 0, d)
    m_h, cm, pend = mem.get("mem", empty), mem.get("cmem", empty), mem.get("pending", empty)
    frame = torch.cat([cm, m_h, x], 1)
    q, k, v = ref.heads(ref.ln(frame, pre + "attn.norm") if cfg.pre_lnorm else frame, l)
    off = cm.shape[1] + m_h.shape[1]
    q = q[:, off:]
    a, _ = ref.causal_attention(q, k, v, l, off, clamp_len, same_length and memory, C + (mem_len if memory else 0))
    y = a.reshape(B, N, -1) @ ref.lp(l, "attn.out.weight").T
    h = gru_gate(ref, l, "attn_gate", x, y) if sec.gru_gating else x + y
    h = h if cfg.pre_lnorm else ref.ln(h, pre + "attn.norm")
    f = f"stack.layers.{l}.ffn."
    t = ref.ln(h, f + "norm") if cfg.pre_lnorm else h
    t = torch.relu(t @ ref.p(f + "fc1.weight").T + ref.p(f + "fc1.bias")) @ ref.p(f + "fc2.weight").T
    t = t + ref.p(f + "fc2.bias")
    out = gru_gate(ref, l, "ffn_gate", h, t) if sec.gru_gating else h + t
    out = out if cfg.pre_lnorm else ref.ln(out, f + "norm")
    st = {}
    if memory:
        seq = torch.cat([m_h, x], 1)
        st["mem"] = seq[:, seq.shape[1] - min(mem_len, seq.shape[1]):]
    if compressed:
        left = seq[:, :seq.shape[1] - st["mem"].shape[1]]      # what leaves the memory, oldest first
        queue = torch.cat([pend, left], 1)
        nb = queue.shape[1] // c
        blocks = queue[:, :nb * c]
        new_cm = torch.cat([cm, compress(ref, l, blocks, frozen=True)], 1)
        new_cm = new_cm[:, new_cm.shape[1] - min(C, new_cm.shape[1]):]
        st.update(cmem=new_cm, pending=queue[:, nb * c:],
                  cmem_valid=torch.full((B,), new_cm.shape[1], dtype=torch.long),
                  pending_valid=torch.full((B,), queue.shape[1] - nb * c, dtype=torch.long))
        if sec.compression == "conv" and sec.reconstruction_loss_weight > 0:
            ref.aux_losses[l] = reconstruction(ref, l, q.detach(), blocks.detach()) if nb else x.new_zeros(())
    return out, st


def reconstruction(ref, l, q, old):
    """weight * mean ||attn(q, old) - attn(q, f_c(old))||^2 / n_compressing, content-only attention with
    the layer's detached k/v projection (and norm); the gradient reaches f_c's parameters only."""
    cfg, sec = ref.cfg, ref.cfg.compressive
    hd = cfg.n_head * cfg.d_head
    w_kv = ref.lp(l, "attn.qkv.weight")[hd:].detach()
    nw, nb = (ref.w[f"stack.layers.{l}.mixer.attn.norm.{k}"].detach() for k in ("weight", "bias"))

    def attend(t):
        if cfg.pre_lnorm:
            t = F.layer_norm(t, t.shape[-1:], nw, nb, 1e-5)
        kk, vv = (z.reshape(*t.shape[:2], cfg.n_head, cfg.d_head) for z in (t @ w_kv.T).chunk(2, -1))
        p = torch.softmax(torch.einsum("bihd,bjhd->bhij", q, kk) / math.sqrt(cfg.d_head), -1)
        return torch.einsum("bhij,bjhd->bihd", p, vv)

    mse = ((attend(compress(ref, l, old, frozen=False)) - attend(old)) ** 2).mean()
    n = sum(1 for s in ref.specs if s.mechanism == "compressive" and s.settings.get("compressed"))
    return mse * sec.reconstruction_loss_weight / n
