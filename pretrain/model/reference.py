"""A plain reference of the whole model, written straight from the equations, for tests.

It works on the consolidated weights (``model.gather_full_state_dict()``), without dropout, in batch-first
layout with explicit distance matrices and explicit masks; the memory grows from empty to ``mem_len``
positions as in the original Transformer-XL / LaMemo code (no fixed buffer, no valid counts, no strided
realignment, no tensor parallelism).  Slow and simple on purpose: ``lm.py`` and the mechanisms must agree
with it.
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from pretrain.model.embeddings import cluster_bounds
from pretrain.model.positions import sinusoid


class ReferenceLM:
    def __init__(self, cfg, weights: Dict[str, torch.Tensor]):
        self.cfg = cfg
        self.w = {k: v.double() for k, v in weights.items()}
        self.lamemo = cfg.attn_type in (3, 31, 32, 33)

    # -- helpers --------------------------------------------------------------------------------------------
    def p(self, name: str) -> torch.Tensor:
        return self.w[name]

    def bias(self, layer: int, name: str) -> torch.Tensor:
        cfg = self.cfg
        if cfg.attn_type == 1:
            return self.w[f"mechanism.layers.{layer}.{name}"]
        owner = f"mechanism.layers.{layer}." if cfg.untie_r else "mechanism."
        return self.w[owner + "biases." + name]

    def ln(self, x, prefix):
        return F.layer_norm(x, x.shape[-1:], self.w[prefix + ".weight"], self.w[prefix + ".bias"], 1e-5)

    def heads(self, x, l):
        """[B, L, d] -> q, k, v [B, L, H, dh] (full layout: q, k, v blocks of all heads)."""
        cfg = self.cfg
        qkv = x @ self.p(f"mechanism.layers.{l}.attn.qkv.weight").T
        return [t.reshape(*x.shape[:2], cfg.n_head, cfg.d_head) for t in qkv.chunk(3, dim=-1)]

    def rel_keys(self, l, dist):
        """W_R R(dist): [..., H, dh] for a tensor of (float) distances."""
        cfg = self.cfg
        r = sinusoid(dist.reshape(-1), cfg.d_model).double() @ self.p(f"mechanism.layers.{l}.attn.r_net.weight").T
        return r.reshape(*dist.shape, cfg.n_head, cfg.d_head)

    def clamp(self, dist, clamp_len):
        return dist.clamp(max=clamp_len) if clamp_len > 0 else dist

    def softmax_attend(self, scores, allowed, v):
        """scores [B, H, I, J] (scaled), allowed [(B,) I, J] -> vectors [B, I, H, dh], log-normalisers [B, H, I]."""
        s = scores.masked_fill(~allowed, float("-inf"))
        p = torch.softmax(s, -1)
        return torch.einsum("bhij,bjhd->bihd", p, v), torch.logsumexp(s, -1)

    def ffn(self, x, l):
        pre = f"mechanism.layers.{l}.ffn."
        h = self.ln(x, pre + "norm") if self.cfg.pre_lnorm else x
        h = torch.relu(h @ self.p(pre + "fc1.weight").T + self.p(pre + "fc1.bias"))
        h = h @ self.p(pre + "fc2.weight").T + self.p(pre + "fc2.bias")
        return x + h if self.cfg.pre_lnorm else self.ln(x + h, pre + "norm")

    def attn_out(self, x, a, l):
        """Residual + output projection (+ post-LN) of per-head vectors a [B, L, H, dh]."""
        h = x + a.reshape(*a.shape[:2], -1) @ self.p(f"mechanism.layers.{l}.attn.out.weight").T
        return h if self.cfg.pre_lnorm else self.ln(h, f"mechanism.layers.{l}.attn.norm")

    # -- embeddings and softmax -----------------------------------------------------------------------------
    def embed(self, tokens):
        cfg = self.cfg
        out = torch.zeros(*tokens.shape, cfg.d_model, dtype=torch.float64)
        for i, (lo, hi) in enumerate(cluster_bounds(cfg)):
            sel = (tokens >= lo) & (tokens < hi)
            e = self.w[f"embedding.tables.{i}.weight"][(tokens - lo).clamp(0, hi - lo - 1)]
            proj = self.w.get("embedding.projs.0" if cfg.div_val == 1 else f"embedding.projs.{i}")
            if proj is not None:
                e = e @ proj.T
            out = torch.where(sel[..., None], e, out)
        return out * cfg.d_model ** 0.5

    def log_probs(self, h):
        """[B, N, d] -> [B, N, V] full log-probabilities (adaptive: head + tail)."""
        cfg = self.cfg
        bounds = cluster_bounds(cfg)
        n_tail = len(bounds) - 1

        def cluster_logits(i, x):
            w = self.w[f"embedding.tables.{i}.weight"] if cfg.tie_weight else self.w[f"softmax.out_weights.{i}"]
            b = self.w[f"softmax.layers.{i}.bias"]
            if i == 0 and n_tail:
                w = torch.cat([w, self.w["softmax.cluster_weight"]])
            proj = self.out_proj(i)
            x = x if proj is None else x @ proj
            return x @ w.T + b

        head = torch.log_softmax(cluster_logits(0, h), -1)
        if not n_tail:
            return head
        S = bounds[0][1]
        parts = [head[..., :S]]
        for i in range(1, n_tail + 1):
            parts.append(head[..., S + i - 1:S + i] + torch.log_softmax(cluster_logits(i, h), -1))
        return torch.cat(parts, -1)

    def out_proj(self, i) -> Optional[torch.Tensor]:
        cfg = self.cfg
        in_name = "embedding.projs.0" if cfg.div_val == 1 else f"embedding.projs.{i}"
        if in_name not in self.w:
            return None
        if cfg.tie_projs and i > 0:
            return self.w[in_name]
        own = sum(1 for j in range(i) if not (cfg.tie_projs and j > 0))
        return self.w[f"softmax.out_projs.{own}"]

    # -- segments -------------------------------------------------------------------------------------------
    def init_memory(self):
        return None

    def segment(self, tokens, targets, memory, mem_len, clamp_len=-1, same_length=False):
        """One segment: (nll [B, N], log-probs [B, N, V], new memory)."""
        x = self.embed(tokens)
        if self.lamemo:
            h, memory = self._lamemo(x, memory, mem_len, clamp_len, same_length)
        else:
            h, memory = self._xl(x, memory, mem_len, clamp_len, same_length)
        if self.cfg.pre_lnorm:
            h = self.ln(h, "final_norm")
        lp = self.log_probs(h)
        nll = -lp.gather(-1, targets[..., None]).squeeze(-1)
        return nll, lp, memory

    def _causal(self, q, k, v, l, m, clamp_len, same_length, mem_len):
        """Current queries q [B, N, H, dh] over keys [memory (m) ; segment]: XL relative attention."""
        cfg = self.cfg
        N, K = q.shape[1], k.shape[1]
        i = torch.arange(N)[:, None]
        j = torch.arange(K)[None, :]
        dist = (m + i - j).double()
        allowed = dist >= 0
        if same_length:
            allowed &= dist < mem_len
        u, vb = self.bias(l, "u"), (self.bias(l, "v") if cfg.attn_type != 1 else None)
        ac = torch.einsum("bihd,bjhd->bhij", q + u, k)
        if cfg.attn_type == 1:
            rows = cfg.tgt_len + cfg.mem_len
            if clamp_len > 0:
                rows = min(rows, clamp_len)
            idx = (m + i - j).clamp(0, rows - 1)
            pre = f"mechanism.layers.{l}."
            e, rb = self.w[pre + "r_emb"][:, idx], self.w[pre + "r_bias"][:, idx]     # [H, N, K, dh], [H, N, K]
            bd = torch.einsum("bihd,hijd->bhij", q, e) + rb[None]
        else:
            bd = torch.einsum("bihd,ijhd->bhij", q + vb, self.rel_keys(l, self.clamp(dist, clamp_len)))
        return self.softmax_attend((ac + bd) / math.sqrt(cfg.d_head), allowed, v)

    def _xl(self, x, memory, mem_len, clamp_len, same_length):
        cfg = self.cfg
        B, N, _ = x.shape
        if cfg.attn_type == 2:
            x = x + sinusoid(self.clamp(torch.arange(N - 1, -1, -1.0), clamp_len), cfg.d_model).double()
        memory = memory or [x.new_zeros(B, 0, cfg.d_model) for _ in range(cfg.n_layer)]
        inputs = []
        for l in range(cfg.n_layer):
            inputs.append(x)
            m = memory[l].shape[1]
            c = torch.cat([memory[l], x], 1)
            q, k, v = self.heads(self.ln(c, f"mechanism.layers.{l}.attn.norm") if cfg.pre_lnorm else c, l)
            q = q[:, m:]
            if cfg.attn_type == 2:
                allowed = torch.ones(N, N, dtype=torch.bool).tril()
                a, _ = self.softmax_attend(torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(cfg.d_head),
                                           allowed, v)
            else:
                a, _ = self._causal(q, k, v, l, m, clamp_len, same_length, mem_len)
            x = self.ffn(self.attn_out(x, a, l), l)
        new = [torch.cat([memory[l], inputs[l]], 1)[:, -mem_len:] if mem_len else memory[l][:, :0]
               for l in range(cfg.n_layer)]
        return x, new

    def _lamemo(self, x, memory, mem_len, clamp_len, same_length):
        cfg = self.cfg
        at = cfg.attn_type
        B, N, _ = x.shape
        H, dh = cfg.n_head, cfg.d_head
        if memory is None:
            memory = {"emb": x.new_zeros(B, 0, cfg.d_model),
                      "attn": [x.new_zeros(B, 0, H, dh) for _ in range(cfg.n_layer)],
                      "lse": [x.new_zeros(B, H, 0) for _ in range(cfg.n_layer)]}
        m_h = memory["emb"]
        m = m_h.shape[1]
        x0 = x
        new_a, new_z = [], []
        for l in range(cfg.n_layer):
            c = torch.cat([m_h, x], 1)
            q, k, v = self.heads(self.ln(c, f"mechanism.layers.{l}.attn.norm") if cfg.pre_lnorm else c, l)
            a_x, z_x = self._causal(q[:, m:], k, v, l, m, clamp_len, same_length, mem_len)
            a_m = x.new_zeros(B, 0, H, dh)
            z_m = x.new_zeros(B, H, 0)
            if m:
                W = min(m, N)
                j = torch.arange(m - W + 1, m + 1)              # window: memory tail + first current token
                i = torch.arange(m)
                delta = (j[None, :] - i[:, None]).double()     # [m, W]
                allowed = torch.ones(m, W, dtype=torch.bool) if at == 33 else delta > 0
                u = self.bias(l, "u_fut" if at == 32 else "u")
                vb = self.bias(l, "v" if at == 31 else "v_fut")
                rdist = -delta if at == 31 else delta.abs()
                rk = self.rel_keys(l, self.clamp(rdist, clamp_len))                     # [m, W, H, dh]
                qm = q[:, :m]
                s = (torch.einsum("bihd,bjhd->bhij", qm + u, k[:, j]) +
                     torch.einsum("bihd,ijhd->bhij", qm + vb, rk)) / math.sqrt(dh)
                a_new, z_new = self.softmax_attend(s, allowed, v[:, j])
                z_old, a_old = memory["lse"][l], memory["attn"][l]
                alpha = torch.sigmoid(z_old - z_new).transpose(1, 2)[..., None]       # [B, m, H, 1]
                a_m = alpha * a_old + (1 - alpha) * a_new
                z_m = torch.logaddexp(z_old, z_new)
            if l < cfg.n_layer - 1:
                h = self.ffn(self.attn_out(c, torch.cat([a_m, a_x], 1), l), l)
                m_h, x = h[:, :m], h[:, m:]
            else:
                x = self.ffn(self.attn_out(x, a_x, l), l)
            new_a.append(torch.cat([a_m, a_x], 1)[:, -mem_len:])
            new_z.append(torch.cat([z_m, z_x], 2)[:, :, -mem_len:])
        new = {"emb": torch.cat([memory["emb"], x0], 1)[:, -mem_len:], "attn": new_a, "lse": new_z}
        return x, new
