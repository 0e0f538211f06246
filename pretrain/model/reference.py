"""A plain reference of the whole model, written straight from the equations, for tests.

It works on the consolidated weights (``model.gather_full_state_dict()``), without dropout, in batch-first
layout with explicit distance matrices, explicit masks and explicit time loops; the positional memory grows
from empty to ``mem_len`` positions as in the original Transformer-XL / LaMemo code (no fixed buffer, no valid
counts, no strided realignment, no chunked recurrence, no tensor parallelism).  Every layer is run by the
reference of its own mixer (``cfg.layer_specs()``), so hybrids are covered too.  Slow and simple on purpose:
``lm.py``, the stack and the mixers must agree with it.

Memory: ``{"layers": [...], <stack-level entries>}`` with one dict per layer: XL ``{"mem": [B, m, d]}``; LaMemo
``{"attn": [B, m, H, dh], "lse": [B, H, m]}`` plus ``"mem"`` (inputs cache) in a layer without a LaMemo layer
below; fast weights ``{"fw": [B, H, D, dh]}`` plus ``"z"`` [B, H, D] with attention normalisation; Compressive
(60) ``{"mem", "cmem": [B, n, d], "pending": [B, p, d], "cmem_valid", "pending_valid": [B] (n, p)}``, 61
``{"mem"}``; slot layers ``{}``; the stack-level entries by their state names: RMT ``"rmt.mem"`` [B, K, d], the
memory tokens the next segment reads; slots ``"slots.mem"`` [B, K, d].  Auxiliary losses:
``ReferenceLM.aux_loss`` after a segment.

RMT (Bulatov et al. 2022, LM-RMT): the segment is ``[memory ; tokens ; memory]`` (or ``[memory ; tokens]``),
attention masks are built from the definition (``rmt_allowed``), the last layer's outputs at the write
positions are the next memory and only the token positions reach the softmax.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from pretrain.model.embeddings import cluster_bounds
from pretrain.model.positions import sinusoid


class ReferenceLM:
    def __init__(self, cfg, weights: Dict[str, torch.Tensor], favor_projections: Optional[Dict[int, torch.Tensor]]
                 = None):
        """``favor_projections``: layer index -> the FAVOR+ projection [dh, m] the model used (random draws)."""
        self.cfg = cfg
        self.w = {k: v.double() for k, v in weights.items()}
        self.specs = cfg.layer_specs()
        self.favor = {k: v.double() for k, v in (favor_projections or {}).items()}
        self.rmt = cfg.rmt if cfg.rmt.num_mem_tokens > 0 else None

    # -- helpers --------------------------------------------------------------------------------------------
    def p(self, name: str) -> torch.Tensor:
        return self.w[name]

    def lp(self, l: int, name: str) -> torch.Tensor:
        """Parameter ``name`` of layer l's mixer."""
        return self.w[f"stack.layers.{l}.mixer.{name}"]

    def bias(self, layer: int, name: str) -> torch.Tensor:
        cfg = self.cfg
        if self.specs[layer].variant == "shaw":
            return self.lp(layer, name)
        return self.lp(layer, "biases." + name) if cfg.untie_r else self.w["stack.biases." + name]

    def ln(self, x, prefix):
        return F.layer_norm(x, x.shape[-1:], self.w[prefix + ".weight"], self.w[prefix + ".bias"], 1e-5)

    def heads(self, x, l):
        """[B, L, d] -> q, k, v [B, L, H, dh] (full layout: q, k, v blocks of all heads)."""
        cfg = self.cfg
        qkv = x @ self.lp(l, "attn.qkv.weight").T
        return [t.reshape(*x.shape[:2], cfg.n_head, cfg.d_head) for t in qkv.chunk(3, dim=-1)]

    def rel_keys(self, l, dist):
        """W_R R(dist): [..., H, dh] for a tensor of (float) distances."""
        cfg = self.cfg
        r = sinusoid(dist.reshape(-1), cfg.d_model).double() @ self.lp(l, "attn.r_net.weight").T
        return r.reshape(*dist.shape, cfg.n_head, cfg.d_head)

    def clamp(self, dist, clamp_len):
        return dist.clamp(max=clamp_len) if clamp_len > 0 else dist

    def softmax_attend(self, scores, allowed, v):
        """scores [B, H, I, J] (scaled), allowed [(B,) I, J] -> vectors [B, I, H, dh], log-normalisers [B, H, I]."""
        s = scores.masked_fill(~allowed, float("-inf"))
        p = torch.softmax(s, -1)
        return torch.einsum("bhij,bjhd->bihd", p, v), torch.logsumexp(s, -1)

    def ffn(self, x, l):
        pre = f"stack.layers.{l}.ffn."
        h = self.ln(x, pre + "norm") if self.cfg.pre_lnorm else x
        h = torch.relu(h @ self.p(pre + "fc1.weight").T + self.p(pre + "fc1.bias"))
        h = h @ self.p(pre + "fc2.weight").T + self.p(pre + "fc2.bias")
        return x + h if self.cfg.pre_lnorm else self.ln(x + h, pre + "norm")

    def attn_out(self, x, a, l, norm="attn.norm", out="attn.out.weight"):
        """Residual + output projection (+ post-LN) of per-head vectors a [B, L, H, dh]."""
        h = x + a.reshape(*a.shape[:2], -1) @ self.lp(l, out).T
        return h if self.cfg.pre_lnorm else self.ln(h, f"stack.layers.{l}.mixer.{norm}")

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
        cfg = self.cfg
        x = self.embed(tokens)
        B, N, _ = x.shape
        memory = memory or {"layers": [None] * cfg.n_layer}
        K = self.rmt.num_mem_tokens if self.rmt else 0
        if self.rmt:
            mem_tokens = memory.get("rmt.mem")
            if mem_tokens is None:                      # the first segment: the learned memory
                mem_tokens = self.p("stack.memories.rmt.memory")[None].expand(B, -1, -1)
            x = torch.cat([mem_tokens, x, mem_tokens] if self.rmt.mem_at_end else [mem_tokens, x], 1)
        L = x.shape[1]
        if cfg.absolute_positions():
            x = x + sinusoid(self.clamp(torch.arange(L - 1, -1, -1.0), clamp_len), cfg.d_model).double()
        new: List[dict] = []
        rows = None                 # LaMemo's refreshed memory rows, handed up between LaMemo layers
        slots = self._slots_begin(B, memory) if any(s.mechanism == "memformer" for s in self.specs) else None
        for l, spec in enumerate(self.specs):
            mem = memory["layers"][l]
            if spec.mechanism == "xl":
                x, st = self._xl(l, x, mem, mem_len, clamp_len, same_length)
                rows = None
            elif spec.mechanism == "lamemo":
                x, rows, st = self._lamemo(l, x, rows, mem, mem_len, clamp_len, same_length)
            elif spec.mechanism == "fast_weight":
                x, st = self._fast_weight(l, x, mem)
                rows = None
            elif spec.mechanism == "memformer":
                x, st = self._memformer(l, x, slots, clamp_len)
            elif spec.mechanism == "compressive":
                x, st = self._compressive(l, x, mem, mem_len, clamp_len, same_length)
                rows = None
            else:
                raise NotImplementedError(spec.mechanism)
            new.append(st)
        out = {"layers": new}
        if slots is not None:
            out["slots.mem"] = self._slots_end(slots)
        if self.rmt:
            out["rmt.mem"] = x[:, L - K:] if self.rmt.mem_at_end else x[:, :K]
            x = x[:, K:K + N]
        if cfg.pre_lnorm:
            x = self.ln(x, "final_norm")
        lp = self.log_probs(x)
        nll = -lp.gather(-1, targets[..., None]).squeeze(-1)
        return nll, lp, out

    def rmt_allowed(self, n: int, m: int) -> Optional[torch.Tensor]:
        """RMT's attention pattern for the ``n`` positions of ``[read ; tokens (; write)]`` over ``[cache (m) ;
        those positions]``, from the definition (LM-RMT's mask): bool [n, m + n], or None without RMT."""
        if not self.rmt:
            return None
        K = self.rmt.num_mem_tokens
        kind = ["read"] * K + ["token"] * (n - (2 if self.rmt.mem_at_end else 1) * K) + \
            (["write"] * K if self.rmt.mem_at_end else [])
        allowed = torch.zeros(n, m + n, dtype=torch.bool)
        for i in range(n):
            for j in range(m + n):
                if j < m:                               # the Transformer-XL cache
                    ok = kind[i] == "token" or self.rmt.read_mem_from_cache
                else:
                    t = j - m
                    if kind[i] == "read":               # the read rows, both ways
                        ok = kind[t] == "read"
                    elif kind[i] == "token":            # causal; the write rows come after every token
                        ok = t <= i
                    else:                               # everything before, and the write rows both ways
                        ok = t <= i or kind[t] == "write"
                allowed[i, j] = ok
        return allowed

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
        rmt = self.rmt_allowed(N, m)
        if rmt is not None:
            if same_length:
                raise NotImplementedError("reference: RMT with same_length")
            allowed = rmt
        shaw = self.specs[l].variant == "shaw"
        u, vb = self.bias(l, "u"), (None if shaw else self.bias(l, "v"))
        ac = torch.einsum("bihd,bjhd->bhij", q + u, k)
        if shaw:
            rows = cfg.tgt_len + cfg.mem_len
            if clamp_len > 0:
                rows = min(rows, clamp_len)
            idx = (m + i - j).clamp(0, rows - 1)
            e, rb = self.lp(l, "r_emb")[:, idx], self.lp(l, "r_bias")[:, idx]     # [H, N, K, dh], [H, N, K]
            bd = torch.einsum("bihd,hijd->bhij", q, e) + rb[None]
        else:
            bd = torch.einsum("bihd,ijhd->bhij", q + vb, self.rel_keys(l, self.clamp(dist, clamp_len)))
        return self.softmax_attend((ac + bd) / math.sqrt(cfg.d_head), allowed, v)

    def _xl(self, l, x, mem, mem_len, clamp_len, same_length):
        cfg = self.cfg
        B, N, _ = x.shape
        absolute = self.specs[l].variant == "absolute"
        memory = x.new_zeros(B, 0, cfg.d_model) if mem is None or absolute else mem["mem"]
        m = memory.shape[1]
        c = torch.cat([memory, x], 1)
        q, k, v = self.heads(self.ln(c, f"stack.layers.{l}.mixer.attn.norm") if cfg.pre_lnorm else c, l)
        q = q[:, m:]
        if absolute:
            rmt = self.rmt_allowed(N, 0)
            allowed = torch.ones(N, N, dtype=torch.bool).tril() if rmt is None else rmt
            a, _ = self.softmax_attend(torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(cfg.d_head), allowed, v)
        else:
            a, _ = self._causal(q, k, v, l, m, clamp_len, same_length, mem_len)
        out = self.ffn(self.attn_out(x, a, l), l)
        st = {} if absolute else {"mem": torch.cat([memory, x], 1)[:, max(0, m + N - mem_len):][:, :mem_len]}
        return out, st

    def _lamemo(self, l, x, rows, mem, mem_len, clamp_len, same_length):
        cfg = self.cfg
        at = self.specs[l].code
        B, N, _ = x.shape
        H, dh = cfg.n_head, cfg.d_head
        first = l == 0 or self.specs[l - 1].mechanism != "lamemo"
        feeds = l + 1 < cfg.n_layer and self.specs[l + 1].mechanism == "lamemo"
        if mem is None:
            mem = {"attn": x.new_zeros(B, 0, H, dh), "lse": x.new_zeros(B, H, 0), "mem": x.new_zeros(B, 0, cfg.d_model)}
        m_h = mem["mem"] if first else rows
        m = m_h.shape[1]
        c = torch.cat([m_h, x], 1)
        q, k, v = self.heads(self.ln(c, f"stack.layers.{l}.mixer.attn.norm") if cfg.pre_lnorm else c, l)
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
            z_old, a_old = mem["lse"], mem["attn"]
            alpha = torch.sigmoid(z_old - z_new).transpose(1, 2)[..., None]       # [B, m, H, 1]
            a_m = alpha * a_old + (1 - alpha) * a_new
            z_m = torch.logaddexp(z_old, z_new)
        out_rows = None
        if feeds:
            h = self.ffn(self.attn_out(c, torch.cat([a_m, a_x], 1), l), l)
            out_rows, x = h[:, :m], h[:, m:]
        else:
            x = self.ffn(self.attn_out(x, a_x, l), l)
        st = {"attn": torch.cat([a_m, a_x], 1)[:, -mem_len:], "lse": torch.cat([z_m, z_x], 2)[:, :, -mem_len:]}
        if first:
            st["mem"] = torch.cat([mem["mem"], c[:, m:]], 1)[:, -mem_len:]
        return x, out_rows, st

    def _fast_weight(self, l, x, mem):
        """The fast-weight layer with an explicit loop over time (the equations of the mixer's docstring)."""
        cfg = self.cfg
        spec = self.specs[l]
        sec = cfg.fast_weight
        rule, fmap = spec.settings["rule"], spec.settings["feature_map"]
        attn_norm = spec.settings["attn_norm"] if sec.attn_norm is None else sec.attn_norm
        B, N, _ = x.shape
        H, dh = cfg.n_head, cfg.d_head
        xin = self.ln(x, f"stack.layers.{l}.mixer.norm") if cfg.pre_lnorm else x
        y = xin @ self.lp(l, "qkvb.weight").T
        hd = H * dh
        q, k, v = (y[..., i * hd:(i + 1) * hd].reshape(B, N, H, dh) for i in range(3))
        beta = torch.sigmoid(y[..., 3 * hd:]) if rule == "delta" else None               # [B, N, H]

        def phi(t):
            if fmap == "elu":
                f = F.elu(t) + 1
            elif fmap == "favor":
                wx = t @ self.favor[l]                                                 # [B, N, H, m]
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
        out = self.ffn(self.attn_out(x, a, l, norm="norm", out="out.weight"), l)
        st = {"fw": W}
        if attn_norm:
            st["z"] = z
        return out, st

    # -- Memformer slots (pretrain/model/mixers/slots.py) ----------------------------------------------------
    def _slots_begin(self, B, stack):
        """m_0 = LN(M_t + b_mem) (M_t = 0 for a fresh stream): the write stream starts there, every slot layer's
        tokens read it."""
        cfg = self.cfg
        mem = stack.get("slots.mem")
        if mem is None:
            mem = torch.zeros(B, cfg.slots.num_slots, cfg.d_model, dtype=torch.float64)
        m0 = self.ln(mem + self.w["stack.memories.slots.memory_bias"], "stack.memories.slots.norm")
        return {"m0": m0, "m": m0}

    def _slots_end(self, slots):
        """M_{t+1} = a m_L + (1 - a) m_0, a = sigmoid(w_2^T GELU(W_1 m_L + b_1) + b_2) per slot."""
        pre = "stack.memories.slots."
        m, m0 = slots["m"], slots["m0"]
        h = F.gelu(m @ self.w[pre + "gate_fc1.weight"].T + self.w[pre + "gate_fc1.bias"])
        a = torch.sigmoid(h @ self.w[pre + "gate_fc2.weight"].T + self.w[pre + "gate_fc2.bias"])    # [B, K, 1]
        return a * m + (1 - a) * m0

    def _memformer(self, l, x, slots, clamp_len):
        """A slot layer: tokens attend over [m_0 (no positions) ; causal tokens (XL relative positions)]; in a
        writing layer (50) the write stream m -> m' by slot attention, one slot at a time over [itself ; the
        layer's tokens]."""
        cfg = self.cfg
        B, N, _ = x.shape
        H, dh = cfg.n_head, cfg.d_head
        K = slots["m0"].shape[1]
        pre = f"stack.layers.{l}.mixer."
        xin = self.ln(x, pre + "attn.norm") if cfg.pre_lnorm else x
        q, k, v = self.heads(xin, l)                                                 # [B, N, H, dh]

        writes = self.specs[l].variant == "slots"

        def mem_qkv(t):
            """[q, k, v] (writing layer) or [k, v] (reading layer) of slot rows t, [B, K, H, dh] each."""
            t = self.ln(t, pre + ("mem_attn.norm" if writes else "mem_norm")) if cfg.pre_lnorm else t
            y = t @ self.lp(l, "mem_attn.qkv.weight" if writes else "mem_kv.weight").T
            return [z.reshape(B, K, H, dh) for z in y.chunk(3 if writes else 2, dim=-1)]

        ks, vs = mem_qkv(slots["m0"])[-2:]
        u, vb = self.bias(l, "u"), self.bias(l, "v")
        i = torch.arange(N)[:, None]
        j = torch.arange(N)[None, :]
        dist = (i - j).double()
        tok = (torch.einsum("bihd,bjhd->bhij", q + u, k) +
               torch.einsum("bihd,ijhd->bhij", q + vb, self.rel_keys(l, self.clamp(dist, clamp_len))))
        slot = torch.einsum("bihd,bjhd->bhij", q + u, ks)                           # [B, H, N, K]
        allowed = torch.cat([torch.ones(N, K, dtype=torch.bool), dist >= 0], 1)
        a, _ = self.softmax_attend(torch.cat([slot, tok], -1) / math.sqrt(dh), allowed, torch.cat([vs, v], 1))
        out = self.ffn(self.attn_out(x, a, l), l)
        if not writes:
            return out, {}
        # write stream: slot s attends to its own key and the N token keys, never to another slot
        m = slots["m"]
        qm, km, vm = mem_qkv(m)
        aw = torch.zeros(B, K, H, dh, dtype=x.dtype)
        for s in range(K):
            keys = torch.cat([km[:, s:s + 1], k], 1)                                 # [B, 1 + N, H, dh]
            vals = torch.cat([vm[:, s:s + 1], v], 1)
            p = torch.softmax(torch.einsum("bhd,bjhd->bhj", qm[:, s], keys) / math.sqrt(dh), -1)
            aw[:, s] = torch.einsum("bhj,bjhd->bhd", p, vals)
        h = m + aw.reshape(B, K, -1) @ self.lp(l, "mem_attn.out.weight").T
        h = h if cfg.pre_lnorm else self.ln(h, pre + "mem_attn.norm")
        f = self.ln(h, pre + "mem_ffn.norm") if cfg.pre_lnorm else h
        f = torch.relu(f @ self.lp(l, "mem_ffn.fc1.weight").T + self.lp(l, "mem_ffn.fc1.bias"))
        f = h + f @ self.lp(l, "mem_ffn.fc2.weight").T + self.lp(l, "mem_ffn.fc2.bias")
        slots["m"] = f if cfg.pre_lnorm else self.ln(f, pre + "mem_ffn.norm")
        return out, {}
    # -- Compressive Transformer ----------------------------------------------------------------------------
    @property
    def aux_loss(self) -> Optional[torch.Tensor]:
        """The last segment's auxiliary loss: the sum of the compressing layers' reconstruction losses."""
        aux = getattr(self, "_aux", {})
        return sum(aux.values()) if aux else None

    def _gru_gate(self, l, name, x, y):
        """GTrXL gating g(x, y) = z x + (1 - z) tanh(W_n y + U_n (r x)) with the layer's gate ``name``."""
        p = f"stack.layers.{l}.mixer.{name}."
        d = x.shape[-1]
        wy, wx, un, bz = (self.w[p + k] for k in ("w_y", "w_x", "u_n", "b_z"))
        r = torch.sigmoid(y @ wy[:d].T + x @ wx[:d].T)
        z = torch.sigmoid(y @ wy[d:2 * d].T + x @ wx[d:].T + bz)
        n = torch.tanh(y @ wy[2 * d:].T + (r * x) @ un.T)
        return z * x + (1 - z) * n

    def _compress(self, l, blocks, frozen):
        """f_c over whole blocks: [B, k c, d] -> [B, k, d]; conv: slot j = b + sum_t W[:, :, t] h_{jc+t}."""
        sec = self.cfg.compressive
        B, L, d = blocks.shape
        blk = blocks.reshape(B, L // sec.cmem_ratio, sec.cmem_ratio, d)
        if sec.compression == "max":
            return blk.amax(2)
        if sec.compression == "mean":
            return blk.mean(2)
        w, b = self.lp(l, "compressor.weight"), self.lp(l, "compressor.bias")
        if frozen:
            w, b = w.detach(), b.detach()
        return torch.einsum("bjti,oit->bjo", blk, w) + b

    def _compressive(self, l, x, mem, mem_len, clamp_len, same_length):
        """A Compressive Transformer layer (mixers/compressive.py) from the equations, with growing memories:
        attention over [cmem ; mem ; x] with distances over that frame; the FIFO as a queue of positions cut
        into whole blocks; the reconstruction loss of the blocks compressed in this segment."""
        cfg, sec = self.cfg, self.cfg.compressive
        spec = self.specs[l]
        B, N, d = x.shape
        compressed, memory = bool(spec.settings.get("compressed")), spec.uses_memory
        c, C = sec.cmem_ratio, (sec.slots(cfg.mem_len) if compressed else 0)
        pre = f"stack.layers.{l}.mixer."
        mem = mem or {}
        empty = x.new_zeros(B, 0, d)
        m_h, cm, pend = mem.get("mem", empty), mem.get("cmem", empty), mem.get("pending", empty)
        frame = torch.cat([cm, m_h, x], 1)
        q, k, v = self.heads(self.ln(frame, pre + "attn.norm") if cfg.pre_lnorm else frame, l)
        off = cm.shape[1] + m_h.shape[1]
        q = q[:, off:]
        a, _ = self._causal(q, k, v, l, off, clamp_len, same_length and memory, C + (mem_len if memory else 0))
        y = a.reshape(B, N, -1) @ self.lp(l, "attn.out.weight").T
        h = self._gru_gate(l, "attn_gate", x, y) if sec.gru_gating else x + y
        h = h if cfg.pre_lnorm else self.ln(h, pre + "attn.norm")
        f = f"stack.layers.{l}.ffn."
        t = self.ln(h, f + "norm") if cfg.pre_lnorm else h
        t = torch.relu(t @ self.p(f + "fc1.weight").T + self.p(f + "fc1.bias")) @ self.p(f + "fc2.weight").T
        t = t + self.p(f + "fc2.bias")
        out = self._gru_gate(l, "ffn_gate", h, t) if sec.gru_gating else h + t
        out = out if cfg.pre_lnorm else self.ln(out, f + "norm")
        st = {}
        if memory:
            seq = torch.cat([m_h, x], 1)
            st["mem"] = seq[:, seq.shape[1] - min(mem_len, seq.shape[1]):]
        if compressed:
            left = seq[:, :seq.shape[1] - st["mem"].shape[1]]      # what leaves the memory, oldest first
            queue = torch.cat([pend, left], 1)
            nb = queue.shape[1] // c
            blocks = queue[:, :nb * c]
            new_cm = torch.cat([cm, self._compress(l, blocks, frozen=True)], 1)
            new_cm = new_cm[:, new_cm.shape[1] - min(C, new_cm.shape[1]):]
            st.update(cmem=new_cm, pending=queue[:, nb * c:],
                      cmem_valid=torch.full((B,), new_cm.shape[1], dtype=torch.long),
                      pending_valid=torch.full((B,), queue.shape[1] - nb * c, dtype=torch.long))
            if sec.compression == "conv" and sec.reconstruction_loss_weight > 0:
                if not hasattr(self, "_aux"):
                    self._aux = {}
                self._aux[l] = self._reconstruction(l, q.detach(), blocks.detach()) if nb else x.new_zeros(())
        return out, st

    def _reconstruction(self, l, q, old):
        """weight * mean ||attn(q, old) - attn(q, f_c(old))||^2 / n_compressing, content-only attention with
        the layer's detached k/v projection (and norm); the gradient reaches f_c's parameters only."""
        cfg, sec = self.cfg, self.cfg.compressive
        hd = cfg.n_head * cfg.d_head
        w_kv = self.lp(l, "attn.qkv.weight")[hd:].detach()
        nw, nb = (self.w[f"stack.layers.{l}.mixer.attn.norm.{k}"].detach() for k in ("weight", "bias"))

        def attend(t):
            if cfg.pre_lnorm:
                t = F.layer_norm(t, t.shape[-1:], nw, nb, 1e-5)
            kk, vv = (z.reshape(*t.shape[:2], cfg.n_head, cfg.d_head) for z in (t @ w_kv.T).chunk(2, -1))
            p = torch.softmax(torch.einsum("bihd,bjhd->bhij", q, kk) / math.sqrt(cfg.d_head), -1)
            return torch.einsum("bhij,bjhd->bihd", p, vv)

        mse = ((attend(self._compress(l, old, frozen=False)) - attend(old)) ** 2).mean()
        n = sum(1 for s in self.specs if s.mechanism == "compressive" and s.settings.get("compressed"))
        return mse * sec.reconstruction_loss_weight / n
