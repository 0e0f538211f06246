"""A plain reference of the whole model, written straight from the equations, for tests.

It works on the consolidated weights (``model.gather_full_state_dict()``), without dropout, in batch-first
layout with explicit distance matrices, explicit masks and explicit time loops; the positional memory grows
from empty to ``mem_len`` positions as in the original Transformer-XL / LaMemo code (no fixed buffer, no valid
counts, no strided realignment, no chunked recurrence, no tensor parallelism).  Slow and simple on purpose:
``lm.py``, the stack and the mixers must agree with it.

This file is the machinery: embeddings, the adaptive softmax, the pieces every layer shares (projections,
norms, the FFN, Transformer-XL's relative attention) and the segment loop.  Every layer is run by the reference
hook of its own mechanism (``cfg.layer_specs()``; the registration's ``reference``, in
``pretrain/model/mechanisms/<name>/reference.py``): ``hook(ref, l, x, mem, seg) -> (x, state)``, so hybrids are
covered too.  A stack-level memory's reference (``RMTReference``, ``SlotsReference``) wraps the layers:
``begin(x, memory) -> x`` before the first one, ``end(x, out) -> x`` after the last one, and optionally
``allowed(n, m)``, the attention pattern it imposes on every attention layer, and ``layer_in(l, x, memory) -> x``
/ ``layer_out(l, x, memory, out) -> x`` around every layer (ARMT's associative memory, writing into ``out``).

Memory: ``{"layers": [...], <stack-level entries>}`` with one dict per layer: XL ``{"mem": [B, m, d]}``; LaMemo
``{"attn": [B, m, H, dh], "lse": [B, H, m]}`` plus ``"mem"`` (inputs cache) in a layer without a LaMemo layer
below; fast weights ``{"fw": [B, H, D, dh]}`` plus ``"z"`` [B, H, D] with attention normalisation; Compressive
(60) ``{"mem", "cmem": [B, n, d], "pending": [B, p, d], "cmem_valid", "pending_valid": [B] (n, p)}``, 61
``{"mem"}``; slot layers ``{}``; the stack-level entries by their state names: RMT ``"rmt.mem"`` [B, K, d], the
memory tokens the next segment reads; slots ``"slots.mem"`` [B, K, d].  Auxiliary losses:
``ReferenceLM.aux_loss`` after a segment.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from pretrain.model import registry
from pretrain.model.clusters import cluster_bounds
from pretrain.model.positions import sinusoid


@dataclasses.dataclass
class Segment:
    """What the layers of one segment share: the memory length, ``clamp_len``, ``same_length``, and the row
    streams handed from a layer to the next (``rows``: LaMemo's refreshed memory rows)."""
    mem_len: int
    clamp_len: int
    same_length: bool
    rows: Dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)


class ReferenceLM:
    def __init__(self, cfg, weights: Dict[str, torch.Tensor], favor_projections: Optional[Dict[int, torch.Tensor]]
                 = None, hooks: Optional[Dict[str, Callable]] = None, stack_memories: Optional[List[str]] = None):
        """``favor_projections``: layer index -> the FAVOR+ projection [dh, m] the model used (random draws).
        ``hooks`` (mechanism name -> its reference hook) and ``stack_memories`` (the names of the stack-level
        memories ``cfg`` turns on, in registration order): None reads both from the registry; a copy of this file
        outside the project (an exported Hugging Face model directory, ``pretrain/hf``) passes them."""
        self.cfg = cfg
        self.w = {k: v.double() for k, v in weights.items()}
        self.specs = cfg.layer_specs()
        self.favor = {k: v.double() for k, v in (favor_projections or {}).items()}
        if hooks is None or stack_memories is None:
            hooks = {n: registry.reference_hook(n) for n in {s.mechanism for s in self.specs}
                     | {m.name for m in registry.stack_memories(cfg)}}
            stack_memories = [m.name for m in registry.stack_memories(cfg)]
        # each mechanism's reference hook (the registration's ``reference``); the stack-level memories' references
        self.layers: Dict[str, Callable] = {n: hooks[n] for n in {s.mechanism for s in self.specs}}
        self.memories = {name: hooks[name](self, cfg) for name in stack_memories}
        self.aux_losses: Dict[int, torch.Tensor] = {}      # the last segment's auxiliary losses, by layer

    # -- helpers --------------------------------------------------------------------------------------------
    def p(self, name: str) -> torch.Tensor:
        return self.w[name]

    def lp(self, l: int, name: str) -> torch.Tensor:
        """Parameter ``name`` of layer l's mixer."""
        return self.w[f"stack.layers.{l}.mixer.{name}"]

    def bias(self, layer: int, name: str) -> torch.Tensor:
        """The relative-position bias ``name`` [H, dh] of a layer: its own (``untie_r``) or the shared one."""
        return self.lp(layer, "biases." + name) if self.cfg.untie_r else self.w["stack.biases." + name]

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
        memory = memory or {"layers": [None] * cfg.n_layer}
        for mem in self.memories.values():              # stack-level memories may add positions
            x = mem.begin(x, memory)
        L = x.shape[1]
        if cfg.absolute_positions():
            x = x + sinusoid(self.clamp(torch.arange(L - 1, -1, -1.0), clamp_len), cfg.d_model).double()
        seg = Segment(mem_len, clamp_len, same_length)
        new: List[dict] = []
        out: dict = {}
        wrapping = [mem for mem in self.memories.values() if hasattr(mem, "layer_in")]
        for l, spec in enumerate(self.specs):
            for mem in wrapping:                        # per-layer stack-level memories (ARMT): read ...
                x = mem.layer_in(l, x, memory)
            x, st = self.layers[spec.mechanism](self, l, x, memory["layers"][l], seg)
            for mem in wrapping:                        # ... and write
                x = mem.layer_out(l, x, memory, out)
            new.append(st)
        out["layers"] = new
        for mem in self.memories.values():              # their new state; back to the segment's N tokens
            x = mem.end(x, out)
        if cfg.pre_lnorm:
            x = self.ln(x, "final_norm")
        lp = self.log_probs(x)
        nll = -lp.gather(-1, targets[..., None]).squeeze(-1)
        return nll, lp, out

    @property
    def aux_loss(self) -> Optional[torch.Tensor]:
        """The last segment's auxiliary loss: the sum of the layers' (Compressive's reconstruction losses)."""
        return sum(self.aux_losses.values()) if self.aux_losses else None

    def stack_allowed(self, n: int, m: int) -> Optional[torch.Tensor]:
        """The attention pattern a stack-level memory imposes (RMT's, from its definition) for ``n`` positions
        over ``[cache (m) ; those positions]``: bool [n, m + n], or None when no memory imposes one."""
        for mem in self.memories.values():
            allowed = getattr(mem, "allowed", None)
            if allowed is not None:
                return allowed(n, m)
        return None

    def causal_attention(self, q, k, v, l, m, clamp_len, same_length, mem_len, u=None, position=None):
        """Current queries q [B, N, H, dh] over keys [memory (m) ; segment]: Transformer-XL relative attention
        ``(q + u)^T k + (q + v)^T W_R R(dist)`` (distances clamped at ``clamp_len``), scaled by 1/sqrt(dh), causal
        (``same_length``: the last ``mem_len`` keys), or the stack-level memories' pattern.  ``u`` replaces the
        layer's bias u; ``position(q, dist)`` [B, H, N, K] replaces the position term (Shaw's tables).  Returns
        vectors [B, N, H, dh] and log-normalisers [B, H, N]."""
        cfg = self.cfg
        N, K = q.shape[1], k.shape[1]
        i = torch.arange(N)[:, None]
        j = torch.arange(K)[None, :]
        dist = (m + i - j).double()
        allowed = dist >= 0
        if same_length:
            allowed &= dist < mem_len
        pattern = self.stack_allowed(N, m)
        if pattern is not None:
            if same_length:
                raise NotImplementedError("reference: a stack-level memory's attention pattern with same_length")
            allowed = pattern
        u = self.bias(l, "u") if u is None else u
        ac = torch.einsum("bihd,bjhd->bhij", q + u, k)
        if position is not None:
            bd = position(q, dist)
        else:
            bd = torch.einsum("bihd,ijhd->bhij", q + self.bias(l, "v"), self.rel_keys(l, self.clamp(dist, clamp_len)))
        return self.softmax_attend((ac + bd) / math.sqrt(cfg.d_head), allowed, v)
