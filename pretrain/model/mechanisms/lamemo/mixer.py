"""LaMemo look-ahead memory (attn_type 3, 31, 32, 33) as a mixer (Ji et al. 2022, "LaMemo: Language Modeling
with Look-Ahead Memory", §3).

State of one layer (``mem_len`` M, H_local heads of width dh, batch B):

* ``attn`` [H, B, M, dh] (param dtype): the per-head attention vectors *before* the output projection of the
  last M positions (split by head under tensor parallelism);
* ``lse``  [H, B, M] (fp32; fp64 for fp64 parameters): their log-normalisers (log-sum-exp of the scaled,
  masked scores);
* ``mem``  [B, M, d] (param dtype), only in a layer whose layer below is not a LaMemo layer (layer 0: the
  embeddings after dropout): its inputs for the last M positions, from which the memory rows are
  recomputed every segment.  Above a LaMemo layer the memory rows arrive refreshed, as the row stream
  ``lamemo`` handed up by the layer below (memory is recomputed bottom-up each segment).

One segment, with memory rows m (M rows) and current hidden x (N rows), c = [m ; x], K = M + N, W = min(M, N):

1. q, k, v = QKV(c) (pre-LN: QKV(LN(c))).
2. Current tokens: XL relative attention over all K keys with (u, v) -> vectors a_x, normalisers Z_x.
3. Memory queries look ahead: query i sees the window keys j = M-W+1 .. M (the tail of the memory and the
   first current token, never further) with j > i:
   score (q_i + u')^T k_j + (q_i + v')^T W_R R(j - i)    -> a_new, Z_new (fp32)
   3:  u' = u,     v' = v_fut, R(|j-i|)      (disentangled: direction carried by the bias, paper eq. 12)
   31: u' = u,     v' = v,     R(-(j-i))     (XL's sinusoid extended to negative distances)
   32: u' = u_fut, v' = v_fut, R(|j-i|)
   33: as 3, but no order constraint inside the window (full look-ahead); R(|j-i|).
4. Interpolation with the cached vectors: alpha = sigmoid(Z_mem - Z_new), a' = alpha a_mem + (1-alpha) a_new
   (attention over the union of the old and the new keys, if the old keys were unchanged).
5. [m' ; x'] = LN([m ; x] + W_o [a' ; a_x]) (pre-LN: the pre-LN form), then the layer's FFN over both: the
   same W_o, norms and FFN for memory and tokens; m' goes up as the row stream.  When no LaMemo layer above
   reads m', its W_o and FFN rows are skipped.
6. New state: attn <- last M of [a' ; a_x], lse <- last M of [logaddexp(Z_mem, Z_new) ; Z_x],
   mem <- last M of [mem ; layer input] (detached unless asked otherwise).

On CUDA, steps 2 and 3 run the fused kernel of ``pretrain.ops.rel_attention`` (outputs and log-normalisers)
when ``modules.rel_attention.attention_path`` allows it; on CPU, and otherwise, the computation written here.
"""
from __future__ import annotations

import contextlib

import torch

from pretrain.model import parallel
from pretrain.model.mixer import Mixer, MixerOutput, StateEntry
from pretrain.model.modules.attention import (AttentionProjections, RelBiases, attend, biased, layer_biases,
                                              masked_scores, position_scores, score_dtype)
from pretrain.model.modules.memory import keep_last
from pretrain.model.modules.rel_attention import attention_path, xl_frame
from pretrain.model.positions import (causal_distances, causal_mask, lookahead_distances, lookahead_mask,
                                      lookahead_skew_offset, sinusoid)
from pretrain.ops import rel_attention as rel_ops

ROWS = "lamemo"


def merge(a_old: torch.Tensor, z_old: torch.Tensor, a_new: torch.Tensor, z_new: torch.Tensor):
    """Combine two attention results over disjoint key sets (vectors a [..., dh], log-normalisers z [...])
    into the result over their union: alpha = sigmoid(z_old - z_new) = e^z_old / (e^z_old + e^z_new),
    a = alpha a_old + (1 - alpha) a_new, z = logaddexp(z_old, z_new) (LaMemo eq. 8-9).  Computed in z's dtype
    (fp32 or wider), returned in a_new's."""
    alpha = torch.sigmoid(z_old - z_new).unsqueeze(-1)
    a = torch.lerp(a_new.to(alpha.dtype), a_old.to(alpha.dtype), alpha).to(a_new.dtype)
    return a, torch.logaddexp(z_old, z_new)


def lookahead_frame(m: int, n: int, full: bool, valid: torch.Tensor) -> dict:
    """The frame and mask of the m memory queries over the window keys m-w+1 .. m (w = min(m, n)) as
    arguments of ``pretrain.ops.rel_attention``: memory query i sits at window key i - (m-w+1); the position
    keys are listed as ``positions.lookahead_distances`` (realigned at ``lookahead_skew_offset``); the mask is
    ``positions.lookahead_mask`` (causal look-ahead: keys strictly after the query; full look-ahead: a row
    with ``valid`` < n positions sees the last min(valid, n) window keys, at least one)."""
    w = min(m, n)
    lo = m - w + 1
    kw = dict(r_offset=lookahead_skew_offset(m, w, full), q_start=-lo, order="none" if full else "future")
    if full:
        kw["key_start"] = w - torch.clamp(valid, min=1, max=n)
    return kw


# Position biases of each variant: XL's (u, v) for the causal part, plus the look-ahead ones.
LOOKAHEAD_BIASES = {"disentangled": ("u", "v", "v_fut"), "negative": ("u", "v"),
                    "disentangled_v2": ("u", "v", "u_fut", "v_fut"), "full": ("u", "v", "v_fut")}


class LaMemoMixer(Mixer):
    mechanism = "lamemo"
    ffn_stream = ROWS

    def __init__(self, cfg, mp, spec, specs):
        super().__init__(cfg, mp, spec, specs)
        self.full = self.variant == "full"
        i = spec.index
        self.reads_rows = i > 0 and specs[i - 1].mechanism == self.mechanism     # else: own input cache
        self.feeds_rows = i + 1 < len(specs) and specs[i + 1].mechanism == self.mechanism
        self.attn = AttentionProjections(cfg, mp, r_net=True)
        if cfg.untie_r:
            self.biases = RelBiases(cfg, LOOKAHEAD_BIASES[self.variant])

    def shared_biases(self):
        return LOOKAHEAD_BIASES[self.variant]

    def initial_state(self, batch_size, mem_len, device, dtype):
        if mem_len < 1:
            raise ValueError("LaMemo needs a memory (mem_len >= 1); use attn_type 0 with mem_len 0 for none")
        cfg = self.cfg
        H = cfg.n_head // parallel.tp_world_size()
        B, M = batch_size, mem_len
        out = {"attn": StateEntry(torch.zeros(H, B, M, cfg.d_head, device=device, dtype=dtype), 1, 0),
               "lse": StateEntry(torch.zeros(H, B, M, device=device, dtype=score_dtype(dtype)), 1, 0)}
        if not self.reads_rows:
            out["mem"] = StateEntry(torch.zeros(B, M, cfg.d_model, device=device, dtype=dtype), 0)
        return out

    @classmethod
    def prepare(cls, ctx, layers, drop):
        N, M, dev = ctx.n, ctx.mem_len, ctx.device
        W = min(M, N)
        part = ctx.parts.setdefault(cls.mechanism, {})
        # one position sequence per lookahead flavour present (a hybrid may mix 3/31/32/33)
        for full, negative in sorted({(m.full, m.variant == "negative") for m in layers}):
            dist = torch.cat([causal_distances(N, M, ctx.clamp_len, layers[0].lookahead),
                              lookahead_distances(M, W, full, negative, ctx.clamp_len)])
            part[("pos", full, negative)] = drop(sinusoid(dist.to(dev), layers[0].cfg.d_model))
        # (memory rows only look ahead to position 0: the document mask concerns the current queries only)
        part["cmask"] = ctx.attention_mask(causal_mask(N, M, ctx.valid, ctx.same_length, dev))
        for full in sorted({m.full for m in layers}):
            part[("lmask", full)] = lookahead_mask(M, W, N, ctx.valid, full)

    def forward(self, x, state, rows, ctx, biases):
        attn = self.attn
        sc = attn.scale
        part = ctx.parts[self.mechanism]
        b = layer_biases(self, biases)
        u, v = b["u"], b["v"]
        u_la, v_la = b.get("u_fut", u), b.get("v_fut", v)
        m = rows[ROWS] if self.reads_rows else state["mem"].to(x.dtype)
        a_mem, z_mem = state["attn"].to(x.dtype), state["lse"].to(score_dtype(x.dtype))
        pos = part[("pos", self.full, self.variant == "negative")]
        M, N = m.shape[1], x.shape[1]
        K, W = M + N, min(M, N)
        c = torch.cat([m, x], 1)
        q, k, val = attn.heads(attn.norm(c) if self.pre_lnorm else c)
        r = attn.position_keys(pos)                                  # [H, (K+1+ahead) + look-ahead, dh]
        P = K + 1 + self.lookahead                                   # the causal part's distances
        fused = attention_path(self, q, ctx) == "fused"              # the fused CUDA kernel (attention_path)
        # current tokens: XL relative attention over [memory ; segment]
        qx = q[:, :, M:]
        if fused:                                                    # (never with RMT's mask edits: P = K + 1)
            a_x, z_x = rel_ops.rel_attention(qx, k, val, r[:, :P], u * sc, v * sc, impl="fused",
                                             **xl_frame(ctx, M, N))
        else:
            scores = masked_scores(position_scores(biased(qx, v, sc), r[:, :P], K, N - 1),
                                   biased(qx, u, sc), k, part["cmask"])
            if ctx.recorder is not None:
                ctx.recorder(self.index, torch.softmax(scores.detach(), -1), M)
            a_x, z_x = attend(scores, val, attn.dropatt, self.training, lse=True)
        if ctx.detach:
            z_x = z_x.detach()
        # memory queries: look-ahead attention inside the window ending at the first current token
        qm = q[:, :, :M]
        lo = M - W + 1
        offset = lookahead_skew_offset(M, W, self.full)
        if fused:
            a_new, z_new = rel_ops.rel_attention(qm, k[:, :, lo:M + 1], val[:, :, lo:M + 1], r[:, P:],
                                                 u_la * sc, v_la * sc, impl="fused",
                                                 **lookahead_frame(M, N, self.full, ctx.valid))
        else:
            la_scores = masked_scores(position_scores(biased(qm, v_la, sc), r[:, P:], W, offset),
                                      biased(qm, u_la, sc), k[:, :, lo:M + 1], part[("lmask", self.full)])
            a_new, z_new = attend(la_scores, val[:, :, lo:M + 1], attn.dropatt, self.training, lse=True)
        a_m, z_m = merge(a_mem, z_mem, a_new, z_new)
        # output projection and norm, shared by memory and tokens (the FFN follows in the layer)
        out_rows = {k_: t for k_, t in rows.items() if k_ != ROWS}
        if self.feeds_rows:
            h = attn.project_add(c, torch.cat([a_m, a_x], dim=2))
            h = h if self.pre_lnorm else attn.norm(h)
            out_rows[ROWS], x_out = h[:, :M], h[:, M:]
        else:
            h = attn.project_add(x, a_x)
            x_out = h if self.pre_lnorm else attn.norm(h)
        with torch.no_grad() if ctx.detach else contextlib.nullcontext():
            new = {"attn": keep_last(a_m, a_x, M, dim=2), "lse": keep_last(z_m, z_x, M, dim=2)}
            if not self.reads_rows:
                new["mem"] = keep_last(state["mem"], x, M)
        return MixerOutput(x_out, new, out_rows)

    def flops(self, batch_size, tgt_len, mem_len):
        cfg = self.cfg
        B, N, M = batch_size, tgt_len, mem_len
        K, W, hd, d = M + N, min(M, N), cfg.n_head * cfg.d_head, cfg.d_model
        la_pos = M + W if self.full else M + 1
        rows = K if self.feeds_rows else N
        f = 2 * B * K * d * 3 * hd                              # fused QKV over memory and segment
        P = K + 1 + self.lookahead                              # causal distances (see xl.py)
        f += 2 * (P + la_pos) * d * hd                          # W_R over the distances
        f += 2 * B * N * P * hd + 2 * 2 * B * N * K * hd        # current tokens: positions, q k^T, p v
        f += 2 * B * M * la_pos * hd + 2 * 2 * B * M * W * hd   # memory look-ahead
        f += 2 * B * rows * hd * d                              # output projection
        return f

    def ffn_rows(self, tgt_len, mem_len):
        return tgt_len + mem_len if self.feeds_rows else tgt_len
