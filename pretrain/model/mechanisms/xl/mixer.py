"""Transformer-XL segment recurrence (attn_type 0 and 1) and the absolute-position baseline (2), as a mixer.

State of one layer (``mem_len`` M, batch B, width d):

* ``mem`` [B, M, d] (param dtype): the layer's *inputs* for the last M positions (layer 0's input is the
  embedding after dropout); the stack's ``valid`` [B] says how many of the last slots are real positions.

The layer attends from its N current positions over the K = M + N keys of [mem ; h] (queries only from h),
with relative distances measured in that concatenated frame:

* attn_type 0 (XL):   A_ij = (q_i + u)^T k_j + (q_i + v)^T W_R R_{i+M-j}, R a fixed sinusoid; u, v shared by
  all layers or per layer (``untie_r``); distances clamped at ``clamp_len`` (Dai et al. 2019, eq. in §3.3);
* attn_type 1 (Shaw): A_ij = (q_i + u_l)^T k_j + q_i^T E_l[i+M-j] + b_l[i+M-j], learned per layer tables of
  tgt_len + mem_len distances (larger distances share the last row; ``clamp_len`` shortens the table);
* attn_type 2: plain causal softmax attention within the segment, no memory (the stack adds the absolute
  sinusoid of the position counted from the segment end to the embeddings).

After the segment the layer's memory becomes the last M of [mem ; h] (detached unless the caller asks for
backpropagation through the state).

On CUDA, the relative attention of attn_type 0 (and LaMemo's) runs the fused kernel of
``pretrain.ops.rel_attention`` when it is built and the layer allows it (``attention_path``: no attention
dropout in training, no stack-level mask edits); otherwise, and always on CPU, the computation below.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from pretrain.model import parallel
from pretrain.model.mixer import Mixer, MixerOutput, StateEntry
from pretrain.model.modules.attention import (AttentionProjections, RelBiases, attend, biased, layer_biases,
                                              masked_scores, position_scores)
from pretrain.model.modules.linear import head_param
from pretrain.model.modules.memory import keep_last
from pretrain.model.modules.rel_attention import attention_path, xl_frame
from pretrain.model.positions import causal_distances, causal_mask, sinusoid
from pretrain.ops import rel_attention as rel_ops

class XLMixer(Mixer):
    mechanism = "xl"

    def __init__(self, cfg, mp, spec, specs):
        super().__init__(cfg, mp, spec, specs)
        self.memory = spec.uses_memory
        self.attn = AttentionProjections(cfg, mp, r_net=self.variant == "rel")
        if self.variant == "rel" and cfg.untie_r:
            self.biases = RelBiases(cfg, ("u", "v"))
        if self.variant == "shaw":                    # per-layer tables and content bias
            self.max_dist = cfg.tgt_len + cfg.mem_len
            head_param(self, "u", cfg.n_head, (cfg.d_head,), "weight")
            head_param(self, "r_emb", cfg.n_head, (self.max_dist, cfg.d_head), "weight")   # [H, dist, dh]
            head_param(self, "r_bias", cfg.n_head, (self.max_dist,), "zeros")              # [H, dist]

    def shared_biases(self):
        return ("u", "v") if self.variant == "rel" else ()

    def initial_state(self, batch_size, mem_len, device, dtype):
        if not self.memory:
            return {}
        return {"mem": StateEntry(torch.zeros(batch_size, mem_len, self.cfg.d_model, device=device, dtype=dtype),
                                  batch_dim=0)}

    @classmethod
    def prepare(cls, ctx, layers, drop):
        N, M, dev = ctx.n, ctx.mem_len, ctx.device
        part = ctx.parts.setdefault(cls.mechanism, {})
        variants = {m.variant for m in layers}
        ahead = layers[0].lookahead
        if "rel" in variants:
            part["pos"] = drop(sinusoid(causal_distances(N, M, ctx.clamp_len, ahead).to(dev),
                                        layers[0].cfg.d_model))
        if "shaw" in variants:            # (distances after the query share the row of distance 0)
            cfg = layers[0].cfg
            rows = cfg.tgt_len + cfg.mem_len
            if ctx.clamp_len > 0:
                rows = min(rows, ctx.clamp_len)
            part["shaw"] = causal_distances(N, M, -1, ahead).long().clamp_(min=0, max=rows - 1).to(dev)
        if variants & {"rel", "shaw"}:
            part["mask"] = ctx.attention_mask(causal_mask(N, M, ctx.valid, ctx.same_length, dev))
        if "absolute" in variants and (ctx.doc_mask is not None or ctx.mask_edits):
            # no memory: the segment's own keys; [1, B, N, N] as attention runs head-major ([H, B, N, dh])
            full = ctx.attention_mask(causal_mask(N, M, None, False, dev))
            part["abs_mask"] = full[:, :, M:].expand(ctx.batch_size, N, N)[None]

    def forward(self, x, state, rows, ctx, biases):
        attn = self.attn
        sc = attn.scale
        part = ctx.parts[self.mechanism]
        mem = state["mem"].to(x.dtype) if self.memory else x[:, :0]
        M, N = mem.shape[1], x.shape[1]
        K = M + N
        xq = attn.norm(x) if self.pre_lnorm else x                  # LN(cat) = cat of LNs (per row)
        c = torch.cat([attn.norm(mem) if self.pre_lnorm else mem, xq], 1) if M else xq
        q, k, val = attn.heads(c, xq if M else None)               # queries for the current rows only
        if self.variant == "absolute":
            mask = part.get("abs_mask")                # documents inside the segment
            with parallel.parallel_region_rng(q.device) if self.training and attn.dropatt else \
                    contextlib.nullcontext():
                a = F.scaled_dot_product_attention(q, k, val, attn_mask=None if mask is None else mask.to(q.dtype),
                                                   is_causal=mask is None, scale=1.0,
                                                   dropout_p=attn.dropatt if self.training else 0.0)
        elif self.variant == "rel" and attention_path(self, q, ctx) == "fused":
            b = layer_biases(self, biases)
            a = rel_ops.rel_attention(q, k, val, attn.position_keys(part["pos"]), b["u"] * sc, b["v"] * sc,
                                      impl="fused", **xl_frame(ctx, M, N))[0]
        else:
            if self.variant == "rel":
                b = layer_biases(self, biases)
                u = b["u"]
                pos_scores = position_scores(biased(q, b["v"], sc), attn.position_keys(part["pos"]), K, N - 1)
            else:                                    # Shaw: the table row of each distance
                u, idx = self.u, part["shaw"]
                pos_scores = position_scores(q, self.r_emb[:, idx], K, N - 1, self.r_bias[:, idx] * sc)
            scores = masked_scores(pos_scores, biased(q, u, sc), k, part["mask"])
            if ctx.recorder is not None:
                ctx.recorder(self.index, torch.softmax(scores.detach(), -1), M)
            a = attend(scores, val, attn.dropatt, self.training)
        h = attn.project_add(x, a)
        new = {}
        if self.memory and ctx.mem_len:
            with torch.no_grad() if ctx.detach else contextlib.nullcontext():
                new["mem"] = keep_last(state["mem"], x, ctx.mem_len)
        elif self.memory:
            new["mem"] = state["mem"]
        return MixerOutput(h if self.pre_lnorm else attn.norm(h), new, dict(rows))

    def flops(self, batch_size, tgt_len, mem_len):
        cfg = self.cfg
        B, N, M = batch_size, tgt_len, (mem_len if self.memory else 0)
        K, hd, d = M + N, cfg.n_head * cfg.d_head, cfg.d_model
        f = 2 * B * (N + 2 * K) * d * hd               # queries for the segment, keys/values for all
        f += 2 * 2 * B * N * K * hd                     # q k^T and p v
        P = K + 1 + self.lookahead                      # distances K-1 .. -lookahead and a pad
        if self.variant == "rel":
            f += 2 * P * d * hd                         # W_R over the distances (shared by rows)
        if self.variant in ("rel", "shaw"):
            f += 2 * B * N * P * hd                     # position term
        f += 2 * B * N * hd * d                         # output projection
        return f
