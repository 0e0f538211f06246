"""Transformer-XL segment recurrence (attn_type 0 and 1) and the absolute-position baseline (2).

State (``mem_len`` M, L layers, batch B, width d):

* ``mem``   [L, B, M, d] (param dtype): the *inputs* of every layer for the last M positions (layer 0's input
  is the embedding after dropout; the last layer's output is never read, so it is not kept);
* ``valid`` [B] int64: how many of the last slots of each row are real positions (0 after a reset).

Layer l attends from its N current positions over the K = M + N keys of [mem_l ; h_l] (queries only from
h_l), with relative distances measured in that concatenated frame:

* attn_type 0 (XL):   A_ij = (q_i + u)^T k_j + (q_i + v)^T W_R R_{i+M-j}, R a fixed sinusoid; u, v shared by
  all layers or per layer (``untie_r``); distances clamped at ``clamp_len``;
* attn_type 1 (Shaw): A_ij = (q_i + u_l)^T k_j + q_i^T E_l[i+M-j] + b_l[i+M-j], learned per layer tables of
  tgt_len + mem_len distances (larger distances share the last row; ``clamp_len`` shortens the table);
* attn_type 2: absolute sinusoid of the position counted from the segment end, added to the embeddings,
  plain causal softmax attention, no memory (mem_len must be 0).

After the segment, each layer's memory becomes the last M of [mem_l ; h_l] (detached unless the caller asks
for backpropagation through the state).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.model import parallel
from pretrain.model.attention import (AttentionProjections, FeedForward, RelBiases, attend, biased, head_param,
                                      masked_scores, position_scores)
from pretrain.model.dropout import Dropout
from pretrain.model.mechanisms.base import Mechanism, Segment
from pretrain.model.positions import causal_distances, causal_mask, sinusoid
from pretrain.model.state import MemoryState


class XLLayer(nn.Module):
    def __init__(self, cfg, mp, own_uv: bool):
        super().__init__()
        self.attn_type = cfg.attn_type
        self.pre_lnorm = cfg.pre_lnorm
        self.attn = AttentionProjections(cfg, mp, r_net=cfg.attn_type == 0)
        self.ffn = FeedForward(cfg, mp)
        if own_uv:                                   # attn_type 0 with untie_r
            self.biases = RelBiases(cfg, ("u", "v"))
        if cfg.attn_type == 1:                       # Shaw: per-layer tables and content bias
            self.max_dist = cfg.tgt_len + cfg.mem_len
            head_param(self, "u", cfg.n_head, (cfg.d_head,), "weight")
            head_param(self, "r_emb", cfg.n_head, (self.max_dist, cfg.d_head), "weight")   # [H, dist, dh]
            head_param(self, "r_bias", cfg.n_head, (self.max_dist,), "zeros")              # [H, dist]

    def forward(self, x: torch.Tensor, mem: torch.Tensor, pos: Optional[torch.Tensor], mask: torch.Tensor,
                u: Optional[torch.Tensor], v: Optional[torch.Tensor]) -> torch.Tensor:
        attn = self.attn
        sc = attn.scale
        M, N = mem.shape[1], x.shape[1]
        K = M + N
        xq = attn.norm(x) if self.pre_lnorm else x                  # LN(cat) = cat of LNs (per row)
        c = torch.cat([attn.norm(mem) if self.pre_lnorm else mem, xq], 1) if M else xq
        q, k, val = attn.heads(c, xq if M else None)               # queries for the current rows only
        if self.attn_type == 2:
            with parallel.parallel_region_rng(q.device) if self.training and attn.dropatt else \
                    contextlib.nullcontext():
                a = F.scaled_dot_product_attention(q, k, val, is_causal=True, scale=1.0,
                                                   dropout_p=attn.dropatt if self.training else 0.0)
        else:
            if self.attn_type == 0:
                pos_scores = position_scores(biased(q, v, sc), attn.position_keys(pos), K, N - 1)
            else:                                    # Shaw: pos holds the table row of each distance
                pos_scores = position_scores(q, self.r_emb[:, pos], K, N - 1, self.r_bias[:, pos] * sc)
            scores = masked_scores(pos_scores, biased(q, u, sc), k, mask)
            a = attend(scores, val, attn.dropatt, self.training)
        h = attn.project_add(x, a)
        return self.ffn(h if self.pre_lnorm else attn.norm(h))


class XLMemory(Mechanism):
    name = "xl"

    def __init__(self, cfg, mp):
        super().__init__()
        self.cfg = cfg
        self.attn_type = cfg.attn_type
        shared_uv = cfg.attn_type == 0 and not cfg.untie_r
        self.layers = nn.ModuleList(XLLayer(cfg, mp, own_uv=cfg.attn_type == 0 and cfg.untie_r)
                                    for _ in range(cfg.n_layer))
        if shared_uv:
            self.biases = RelBiases(cfg, ("u", "v"))
        self.drop = Dropout(cfg.dropout)

    # -- state ----------------------------------------------------------------------------------------------
    def initial_state(self, batch_size, mem_len, device, dtype) -> MemoryState:
        if self.attn_type == 2 and mem_len:
            raise ValueError(f"attn_type 2 (absolute positions) has no memory; mem_len must be 0, got {mem_len}")
        cfg = self.cfg
        return MemoryState(
            self.name, mem_len,
            {"mem": torch.zeros(cfg.n_layer, batch_size, mem_len, cfg.d_model, device=device, dtype=dtype),
             "valid": torch.zeros(batch_size, dtype=torch.long, device=device)},
            batch_dims={"mem": 1, "valid": 0}, head_dims={"mem": None, "valid": None},
            tp_rank=parallel.tp_rank(), tp_world=parallel.tp_world_size())

    # -- one segment ----------------------------------------------------------------------------------------
    def forward(self, emb: torch.Tensor, state: MemoryState, seg: Segment):
        M, N = seg.mem_len, seg.n
        pos = None
        if self.attn_type == 2:
            d = torch.arange(N - 1, -1, -1.0, device=emb.device)
            if seg.clamp_len > 0:
                d = d.clamp(max=seg.clamp_len)
            emb = emb + sinusoid(d, emb.shape[-1]).to(emb.dtype)
        elif self.attn_type == 0:
            pos = self.drop(sinusoid(causal_distances(N, M, seg.clamp_len).to(emb.device), emb.shape[-1]))
        else:
            rows = self.cfg.tgt_len + self.cfg.mem_len
            if seg.clamp_len > 0:
                rows = min(rows, seg.clamp_len)
            pos = causal_distances(N, M, -1).long().clamp_(max=rows - 1).to(emb.device)
        x = self.drop(emb)
        mask = None if self.attn_type == 2 else causal_mask(N, M, state["valid"], seg.same_length, emb.device)
        mems = state["mem"]
        inputs = []
        for l, layer in enumerate(self.layers):
            inputs.append(x)
            if self.attn_type == 1:
                u, v = layer.u, None
            elif self.attn_type == 0:
                b = (layer.biases if self.cfg.untie_r else self.biases).as_dict()
                u, v = b["u"], b["v"]
            else:
                u = v = None
            x = seg.run_layer(layer, x, mems[l].to(x.dtype), pos, mask, u, v)
        return x, self._update(state, inputs, seg), None

    def _update(self, state: MemoryState, inputs, seg: Segment) -> MemoryState:
        M, N = seg.mem_len, seg.n
        if M == 0:
            return state
        with torch.no_grad() if seg.detach else contextlib.nullcontext():
            if N >= M:
                mem = torch.stack([h[:, N - M:] for h in inputs])
            else:
                mem = torch.cat([state["mem"][:, :, N:].to(inputs[0].dtype), torch.stack(inputs)], dim=2)
            valid = torch.clamp(state["valid"] + N, max=M)
        return state.replace(mem=mem, valid=valid)

    # -- cost -----------------------------------------------------------------------------------------------
    def flops(self, batch_size: int, tgt_len: int, mem_len: int) -> int:
        cfg = self.cfg
        B, N, M = batch_size, tgt_len, mem_len
        K, hd, d = M + N, cfg.n_head * cfg.d_head, cfg.d_model
        per_layer = 2 * B * (N + 2 * K) * d * hd               # queries for the segment, keys/values for all
        per_layer += 2 * 2 * B * N * K * hd                     # q k^T and p v
        if self.attn_type == 0:
            per_layer += 2 * (K + 1) * d * hd                   # W_R over the distances (shared by rows)
        if self.attn_type in (0, 1):
            per_layer += 2 * B * N * (K + 1) * hd               # position term
        per_layer += 2 * B * N * hd * d                         # output projection
        per_layer += 2 * 2 * B * N * d * cfg.d_inner            # FFN
        return cfg.n_layer * per_layer
