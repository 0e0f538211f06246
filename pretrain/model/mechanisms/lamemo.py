"""LaMemo look-ahead memory (attn_type 3, 31, 32, 33).

State (``mem_len`` M, L layers, H_local heads of width dh, batch B):

* ``emb``   [B, M, d]             (param dtype): layer-0 inputs (embeddings after dropout) of the last M tokens;
* ``attn``  [L, H, B, M, dh]      (param dtype): per layer, the per-head attention vectors *before* the output
  projection of those positions (split by head under tensor parallelism);
* ``lse``   [L, H, B, M]          (fp32; fp64 for fp64 parameters): their log-normalisers (log-sum-exp
  of the scaled, masked scores);
* ``valid`` [B] int64: real positions at the end of each row's buffer (0 after a reset).

One segment, layer l, with memory hidden m (M rows; m = ``emb`` at layer 0, then the refreshed memory of
the layer below) and current hidden x (N rows), c = [m ; x], K = M + N, W = min(M, N):

1. q, k, v = QKV(c) (pre-LN: QKV(LN(c))).
2. Current tokens: XL relative attention over all K keys with (u, v) -> vectors a_x, normalisers Z_x.
3. Memory queries look ahead: query i sees the window keys j = M-W+1 .. M (the tail of the memory and the
   first current token, never further) with j > i:
   score (q_i + u')^T k_j + (q_i + v')^T W_R R(j - i)    -> a_new, Z_new (fp32)
   3:  u' = u,     v' = v_fut, R(|j-i|)      (disentangled: direction carried by the bias)
   31: u' = u,     v' = v,     R(-(j-i))     (XL's sinusoid extended to negative distances)
   32: u' = u_fut, v' = v_fut, R(|j-i|)
   33: as 3, but no order constraint inside the window (full look-ahead); R(|j-i|).
4. Interpolation with the cached vectors: alpha = sigmoid(Z_mem - Z_new), a' = alpha a_mem + (1-alpha) a_new
   (attention over the union of the old and the new keys, if the old keys were unchanged).
5. [m' ; x'] = FFN(LN([m ; x] + W_o [a' ; a_x])) (pre-LN: the pre-LN forms): the same W_o, norms and FFN
   for memory and tokens; m' is the memory input of layer l+1 (memory is recomputed bottom-up each
   segment).  The last layer's m' feeds nothing, so its W_o and FFN rows are skipped.
6. New state: attn <- last M of [a' ; a_x], lse <- last M of [logaddexp(Z_mem, Z_new) ; Z_x],
   emb <- last M of [emb ; layer-0 input] (detached unless asked otherwise).

The loss covers the N current positions only.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from pretrain.model import parallel
from pretrain.model.attention import (AttentionProjections, FeedForward, RelBiases, attend, biased,
                                      masked_scores, position_scores, score_dtype)
from pretrain.model.dropout import Dropout
from pretrain.model.mechanisms.base import Mechanism, Segment
from pretrain.model.positions import (causal_distances, causal_mask, lookahead_distances, lookahead_mask,
                                      lookahead_skew_offset, sinusoid)
from pretrain.model.state import MemoryState


def merge(a_old: torch.Tensor, z_old: torch.Tensor, a_new: torch.Tensor, z_new: torch.Tensor):
    """Combine two attention results over disjoint key sets (vectors a [..., dh], log-normalisers z [...])
    into the result over their union: alpha = sigmoid(z_old - z_new) = e^z_old / (e^z_old + e^z_new),
    a = alpha a_old + (1 - alpha) a_new, z = logaddexp(z_old, z_new).  Computed in z's dtype (fp32 or
    wider), returned in a_new's."""
    alpha = torch.sigmoid(z_old - z_new).unsqueeze(-1)
    a = torch.lerp(a_new.to(alpha.dtype), a_old.to(alpha.dtype), alpha).to(a_new.dtype)
    return a, torch.logaddexp(z_old, z_new)


# Position biases of each variant: XL's (u, v) for the causal part, plus the look-ahead ones.
LOOKAHEAD_BIASES = {3: ("u", "v", "v_fut"), 31: ("u", "v"), 32: ("u", "v", "u_fut", "v_fut"),
                    33: ("u", "v", "v_fut")}


class LaMemoLayer(nn.Module):
    def __init__(self, cfg, mp):
        super().__init__()
        self.full = cfg.attn_type == 33
        self.pre_lnorm = cfg.pre_lnorm
        self.attn = AttentionProjections(cfg, mp, r_net=True)
        self.ffn = FeedForward(cfg, mp)
        if cfg.untie_r:
            self.biases = RelBiases(cfg, LOOKAHEAD_BIASES[cfg.attn_type])

    def forward(self, x, m, a_mem, z_mem, pos, cmask, lmask, u, v, u_la, v_la, last: bool, z_grad: bool):
        attn = self.attn
        sc = attn.scale
        M, N = m.shape[1], x.shape[1]
        K, W = M + N, min(M, N)
        c = torch.cat([m, x], 1)
        q, k, val = attn.heads(attn.norm(c) if self.pre_lnorm else c)
        r = attn.position_keys(pos)                                  # [H, (K+1) + look-ahead, dh]
        # current tokens: XL relative attention over [memory ; segment]
        qx = q[:, :, M:]
        scores = masked_scores(position_scores(biased(qx, v, sc), r[:, :K + 1], K, N - 1),
                               biased(qx, u, sc), k, cmask)
        a_x, z_x = attend(scores, val, attn.dropatt, self.training, lse=True)
        if not z_grad:
            z_x = z_x.detach()
        # memory queries: look-ahead attention inside the window ending at the first current token
        qm = q[:, :, :M]
        lo = M - W + 1
        offset = lookahead_skew_offset(M, W, self.full)
        la_scores = masked_scores(position_scores(biased(qm, v_la, sc), r[:, K + 1:], W, offset),
                                  biased(qm, u_la, sc), k[:, :, lo:M + 1], lmask)
        a_new, z_new = attend(la_scores, val[:, :, lo:M + 1], attn.dropatt, self.training, lse=True)
        a_m, z_m = merge(a_mem, z_mem, a_new, z_new)
        # output projection, norms and FFN, shared by memory and tokens
        if last:
            h = attn.project_add(x, a_x)
            x_out = self.ffn(h if self.pre_lnorm else attn.norm(h))
            m_out = m.new_empty(0)                                   # nothing reads it
        else:
            h = attn.project_add(c, torch.cat([a_m, a_x], dim=2))
            h = self.ffn(h if self.pre_lnorm else attn.norm(h))
            m_out, x_out = h[:, :M], h[:, M:]
        return x_out, m_out, a_m, z_m, a_x, z_x


class LaMemoMemory(Mechanism):
    name = "lamemo"

    def __init__(self, cfg, mp):
        super().__init__()
        self.cfg = cfg
        self.full = cfg.attn_type == 33
        self.negative = cfg.attn_type == 31
        self.layers = nn.ModuleList(LaMemoLayer(cfg, mp) for _ in range(cfg.n_layer))
        if not cfg.untie_r:
            self.biases = RelBiases(cfg, LOOKAHEAD_BIASES[cfg.attn_type])
        self.drop = Dropout(cfg.dropout)

    # -- state ----------------------------------------------------------------------------------------------
    def initial_state(self, batch_size, mem_len, device, dtype) -> MemoryState:
        if mem_len < 1:
            raise ValueError("LaMemo needs a memory (mem_len >= 1); use attn_type 0 with mem_len 0 for none")
        cfg = self.cfg
        H = cfg.n_head // parallel.tp_world_size()
        L, B, M = cfg.n_layer, batch_size, mem_len
        return MemoryState(
            self.name, M,
            {"emb": torch.zeros(B, M, cfg.d_model, device=device, dtype=dtype),
             "attn": torch.zeros(L, H, B, M, cfg.d_head, device=device, dtype=dtype),
             "lse": torch.zeros(L, H, B, M, device=device, dtype=score_dtype(dtype)),
             "valid": torch.zeros(B, dtype=torch.long, device=device)},
            batch_dims={"emb": 0, "attn": 2, "lse": 2, "valid": 0},
            head_dims={"emb": None, "attn": 1, "lse": 1, "valid": None},
            tp_rank=parallel.tp_rank(), tp_world=parallel.tp_world_size())

    # -- one segment ----------------------------------------------------------------------------------------
    def forward(self, emb: torch.Tensor, state: MemoryState, seg: Segment):
        M, N = seg.mem_len, seg.n
        W = min(M, N)
        dev = emb.device
        dist = torch.cat([causal_distances(N, M, seg.clamp_len),
                          lookahead_distances(M, W, self.full, self.negative, seg.clamp_len)])
        pos = self.drop(sinusoid(dist.to(dev), emb.shape[-1]))
        valid = state["valid"]
        cmask = causal_mask(N, M, valid, seg.same_length, dev)
        lmask = lookahead_mask(M, W, N, valid, self.full)
        x = self.drop(emb)
        m = state["emb"].to(x.dtype)
        a_mem, z_mem = state["attn"], state["lse"]
        outs = []
        last = len(self.layers) - 1
        for l, layer in enumerate(self.layers):
            b = (layer.biases if self.cfg.untie_r else self.biases).as_dict()
            u_la = b.get("u_fut", b["u"])
            v_la = b.get("v_fut", b["v"])
            x_next, m, a_m, z_m, a_x, z_x = seg.run_layer(
                layer, x, m, a_mem[l].to(x.dtype), z_mem[l].to(score_dtype(x.dtype)), pos, cmask, lmask,
                b["u"], b["v"], u_la, v_la, l == last, not seg.detach)
            if l == 0:
                x0 = x
            outs.append((a_m, a_x, z_m, z_x))
            x = x_next
        with torch.no_grad() if seg.detach else contextlib.nullcontext():
            def keep(old, cur):          # the last M of [old (M) ; cur (N)] along positions
                return cur[:, :, N - M:] if N >= M else torch.cat([old[:, :, N:], cur], dim=2)

            new = state.replace(
                emb=x0[:, N - M:] if N >= M else torch.cat([state["emb"][:, N:].to(x0.dtype), x0], dim=1),
                attn=torch.stack([keep(a_m, a_x) for a_m, a_x, _, _ in outs]),
                lse=torch.stack([keep(z_m, z_x) for _, _, z_m, z_x in outs]),
                valid=torch.clamp(valid + N, max=M))
        return x, new, None

    # -- cost -----------------------------------------------------------------------------------------------
    def flops(self, batch_size: int, tgt_len: int, mem_len: int) -> int:
        cfg = self.cfg
        B, N, M = batch_size, tgt_len, mem_len
        K, W, hd, d = M + N, min(M, N), cfg.n_head * cfg.d_head, cfg.d_model
        la_pos = M + W if self.full else M + 1
        total = 0
        for l in range(cfg.n_layer):
            rows = N if l == cfg.n_layer - 1 else K                 # the last layer skips memory rows
            f = 2 * B * K * d * 3 * hd                              # fused QKV over memory and segment
            f += 2 * (K + 1 + la_pos) * d * hd                      # W_R over the distances
            f += 2 * B * N * (K + 1) * hd + 2 * 2 * B * N * K * hd  # current tokens: positions, q k^T, p v
            f += 2 * B * M * la_pos * hd + 2 * 2 * B * M * W * hd   # memory look-ahead
            f += 2 * B * rows * hd * d                              # output projection
            f += 2 * 2 * B * rows * d * cfg.d_inner                 # FFN
            total += f
        return total
