"""Fast-weight layers (attn_type 4/5/6, 34/35/36 sum rule; 24/25/26 delta rule; 44/45/46 delta rule with
attention normalisation), as in Schlag, Irie & Schmidhuber 2021, "Linear Transformers Are Secretly Fast Weight
Programmers" (§4 update rules, §5 feature maps) and their lmtool-fwms code.

State of one layer (H_local heads, feature size D = d_dot of the feature map, head width dh, batch B), always in
fp32 whatever the training precision:

* ``fw`` [B, H, D, dh]: the fast weight matrix W (key features x values), split by head under tensor parallelism;
* ``z``  [B, H, D]: the running sum of the key features, only with attention normalisation.

One segment of N tokens, per head, with phi the feature map (ELU+1, FAVOR+ or DPFP; ``pretrain/ops``):

1. q, k, v, beta = x W_qkvb (one fused column-parallel product; beta = sigmoid of one column per head);
2. k' = phi(k), q' = phi(q), each divided by its sum (``fast_weight.sum_norm``; "crucial for stable training");
3. sum rule:   W_t = W_{t-1} + k'_t v_t^T;
   delta rule: vbar_t = W_{t-1}^T k'_t,  W_t = W_{t-1} + beta_t k'_t (v_t - vbar_t)^T  (remove and insert);
   y_t = W_t^T q'_t (the query reads the *updated* W);
4. y_t is scaled by 1/sqrt(dh); with attention normalisation it is divided by (z_t . q'_t + eps),
   z_t = z_{t-1} + k'_t (the output only, not the retrieval vbar), where the scale applies either to the
   normalised output (``y_t / sqrt(dh) / (z_t . q'_t + eps)``: every code but 4/5/6, the toolkit's CUDA-path
   layers) or to the scores inside the normalisation (``(y_t / sqrt(dh)) / (z_t . q'_t / sqrt(dh) + eps)``, the
   factor cancelling but for eps: 4/5/6, the toolkit's pure-PyTorch linear attention ``LinearMultiHeadAttn`` and
   its FAVOR+ / DPFP twins); the two differ by sqrt(dh) in the scale of the layer's output;
5. out = LN(x + Dropout(W_o y)) (pre-LN: x + ...), then the layer's FFN.

Positions: none by default (order comes from the recurrence; the state is carried), or the absolute sinusoid
added to the embeddings (``fast_weight.positions: absolute``, lmtool's default without carry-over).
FAVOR+ redraws its random projection at every training forward (from the default generator, so resume and
activation recomputation replay the same draw) and uses a fixed projection at evaluation, drawn from the
model seed and the layer index (lmtool keeps its last training draw instead).

With ``fast_weight.carry_state: false`` every segment starts from zero fast weights (lmtool's default
limited-context training): the state carries nothing, and generation reads a sliding window of the segment
length (``pretrain/generate.py``); with it carried, the state carries everything (``carries``: "all") and
generation feeds one token at a time.
"""
from __future__ import annotations

import contextlib
import math
import zlib

import torch

from pretrain.model import parallel
from pretrain.model.mixer import StateEntry
from pretrain.model.modules.linear import column_linear, column_parallel
from pretrain.model.modules.recurrent import RecurrentMixer
from pretrain.model.parallel import ShardSpec
from pretrain.model.weights import describe
from pretrain.ops import fast_weight as fw_ops
from pretrain.ops import feature_maps


class FastWeightMixer(RecurrentMixer):
    mechanism = "fast_weight"

    def __init__(self, cfg, mp, spec, specs):
        super().__init__(cfg, mp, spec, specs)
        sec = self.sec
        self.rule = spec.settings["rule"]
        self.feature_map = spec.settings["feature_map"]
        self.attn_norm = spec.settings["attn_norm"] if sec.attn_norm is None else sec.attn_norm
        self.scale_scores = spec.settings.get("scale") == "scores"
        tp = parallel.tp_world_size()
        self.n_head, self.d_head = cfg.n_head // tp, cfg.d_head
        hd = cfg.n_head * cfg.d_head
        beta = cfg.n_head if self.rule == "delta" else 0
        sections = (hd, hd, hd) + ((cfg.n_head,) if beta else ())
        self.qkvb = column_parallel(cfg.d_model, 3 * hd + beta, mp, bias=False)
        describe(self.qkvb, "weight", "weight", ShardSpec(0, sections))
        self.output_block(hd, mp)
        if self.feature_map == "elu":
            self.d_key = cfg.d_head
        elif self.feature_map == "favor":
            self.d_key = 2 * sec.performer_proj_dim
        else:
            self.d_key = 2 * sec.dpfp_nu * cfg.d_head
        self._eval_proj = None

    # -- state ----------------------------------------------------------------------------------------------
    def initial_state(self, batch_size, mem_len, device, dtype):
        sdt = torch.promote_types(dtype, torch.float32)         # fp32 (fp64 for fp64 models)
        H, B = self.n_head, batch_size
        out = {"fw": StateEntry(torch.zeros(B, H, self.d_key, self.d_head, device=device, dtype=sdt), 0, 1)}
        if self.attn_norm:
            out["z"] = StateEntry(torch.zeros(B, H, self.d_key, device=device, dtype=sdt), 0, 1)
        return out

    # -- feature map ----------------------------------------------------------------------------------------
    def _favor_projection(self, device, dtype):
        m = self.sec.performer_proj_dim
        if self.training:                                       # redrawn at every training forward
            return feature_maps.draw_favor_projection(self.d_head, m, device=device, dtype=dtype)
        if self._eval_proj is None or self._eval_proj.device != device or self._eval_proj.dtype != dtype:
            gen = torch.Generator().manual_seed((self.cfg.seed * 1_000_003 + zlib.crc32(
                f"favor.{self.index}".encode())) % 2 ** 63)
            self._eval_proj = feature_maps.draw_favor_projection(self.d_head, m, generator=gen).to(device, dtype)
        return self._eval_proj

    def _phi(self, t: torch.Tensor, proj) -> torch.Tensor:
        if self.feature_map == "elu":
            f = feature_maps.elu_plus_one(t)
        elif self.feature_map == "favor":
            f = feature_maps.favor_plus(t, proj)
        else:
            f = feature_maps.dpfp(t, self.sec.dpfp_nu)
        return feature_maps.sum_normalise(f) if self.sec.sum_norm else f

    # -- one segment ----------------------------------------------------------------------------------------
    def forward(self, x, state, rows, ctx, biases):
        B, N, _ = x.shape
        H, dh = self.n_head, self.d_head
        xin = self.norm(x) if self.pre_lnorm else x
        y = column_linear(xin, self.qkvb)                        # [B, N, H*(3 dh) (+ H)]
        hd = H * dh
        q, k, v = (y[..., i * hd:(i + 1) * hd].reshape(B, N, H, dh).transpose(1, 2) for i in range(3))
        cdt = torch.promote_types(x.dtype, torch.float32)        # feature maps and the rule in fp32
        proj = self._favor_projection(x.device, cdt) if self.feature_map == "favor" else None
        qf, kf = self._phi(q.to(cdt), proj), self._phi(k.to(cdt), proj)
        carry = self.sec.carry_state
        s0 = state["fw"] if carry else None
        if self.rule == "delta":
            beta = torch.sigmoid(y[..., 3 * hd:].to(cdt)).transpose(1, 2)       # [B, H, N]
            o, s_new = fw_ops.delta_rule(qf, kf, v.to(cdt), beta, initial_state=s0, output_final_state=True,
                                         reset=ctx.reset, impl=self.sec.impl, chunk_size=self.sec.chunk_size)
        else:
            o, s_new = fw_ops.sum_rule(qf, kf, v.to(cdt), initial_state=s0, output_final_state=True,
                                       reset=ctx.reset, impl=self.sec.impl, chunk_size=self.sec.chunk_size)
        o = o / math.sqrt(dh)
        new = {"fw": s_new}
        if self.attn_norm:
            z, z_new = fw_ops.key_sum(kf, initial=state["z"] if carry else None, reset=ctx.reset)
            den = (z * qf).sum(-1, keepdim=True)
            if self.scale_scores:                               # 4/5/6: the scaled scores are normalised
                den = den / math.sqrt(dh)
            o = o / (den + self.sec.eps)
            new["z"] = z_new
        return self.residual_output(x, o.to(x.dtype).transpose(1, 2).reshape(B, N, hd), new, rows, ctx)

    def flops(self, batch_size, tgt_len, mem_len):
        cfg = self.cfg
        B, N, H, dh, D = batch_size, tgt_len, cfg.n_head, cfg.d_head, self.d_key
        hd = H * dh
        f = 2 * B * N * cfg.d_model * (3 * hd + (H if self.rule == "delta" else 0))   # fused projection
        C = min(self.sec.chunk_size, N)
        # chunkwise rule per head: q k^T and k k^T inside chunks, state reads/writes (q S, k S, k^T u)
        per_head = 2 * N * C * D * 2 + 2 * N * C * dh + 2 * N * D * dh * (3 if self.rule == "delta" else 2)
        f += B * H * per_head
        f += 2 * B * N * hd * cfg.d_model                       # output projection
        return f
