"""Compressive Transformer layers (attn_type 60, 61, 62) as a mixer: Rae, Potapenko, Jayakumar & Lillicrap 2020,
"Compressive Transformers for Long-Range Sequence Modelling" (ICLR; arXiv 1911.05507), with optional GRU-type
gating of the residual connections (Parisotto et al. 2019, "Stabilizing Transformers for Reinforcement
Learning", GTrXL, §3.2).

Variants (``model.compressive.memory_layers`` resolves attn_type 60 into 61 / 62 per layer, ``__init__.py``):

* 60 ``compressed``: Transformer-XL relative attention over [cmem ; mem ; segment];
* 61 ``memory``:     over [mem ; segment] (Transformer-XL; no compressed memory);
* 62 ``local``:      over the segment only (relative positions, no memory).

State of a layer of variant 60 (``mem_len`` M, ``cmem_len`` C, compression rate c, batch B, width d; all hidden
states in the parameters' dtype, replicated under tensor parallelism):

* ``mem``           [B, M, d]: the layer's inputs for the last M positions (as Transformer-XL); the stack's
  ``valid`` [B] says how many of the last slots hold positions (variant 61 keeps this entry alone);
* ``cmem``          [B, C, d]: the compressed memory, oldest first; ``cmem_valid`` [B] int64: how many of its
  last slots hold compressed blocks;
* ``pending``       [B, c - 1, d]: positions that have left the memory but do not yet fill a block of c;
  ``pending_valid`` [B] int64: how many of its last slots hold such positions.

One segment of N positions x (the layer's input), per row:

1. Attention (paper §3): queries from x, keys and values from [cmem ; mem ; x] (pre-LN: LN of each row),
   scores ``(q_i + u)^T k_j + (q_i + v)^T W_R R(delta)`` with ``delta`` counted over that concatenated frame
   (``delta = C + M + i - j``: a compressed slot is one position of the frame), masked to the valid slots.
   Because a block is compressed only once the memory is full, the valid slots of [cmem ; mem] are always
   the last ``cmem_valid + valid`` of the frame.  ``same_length``: every query sees C + M frame slots
   (``delta < C + M``).  Then ``LN(x + Dropout(W_o a))`` (pre-LN: ``x + ...``), or with ``gru_gating`` the
   gate ``g(x, Dropout(W_o a))`` in place of the sum (below); the FFN that follows is gated the same way.
2. The FIFOs (paper §3.1, Algorithm 1), exact for any segment lengths: the positions of [pending ; mem ; x]
   beyond the last M (the ``pending_valid`` pending ones, then the ones that leave the memory now) are cut,
   oldest first, into whole blocks of c; each block is compressed by f_c into one slot appended to cmem (which
   keeps its last C slots); the remainder (< c positions) waits in ``pending`` for the next segment.  So which
   positions form a block depends only on the row's position count, never on how it was cut into segments;
   pending positions are not attended (at most c - 1 positions between the memory and the compressed memory).
   A document that starts inside the segment (``ctx.reset``) empties all three before its first position;
   positions of the earlier document are never compressed.
3. f_c (``compression``): ``conv``, a 1-D convolution over time with kernel = stride = c (d -> d channels,
   with bias); ``max`` / ``mean`` pooling with kernel = stride = c.  The compressor always sees the hidden
   states it compresses through *frozen* weights for the state it writes: the LM loss never trains it, and
   with ``detach_state=False`` the gradient through the state flows through f_c into the compressed hidden
   states (as through the memory).
4. Attention-reconstruction loss (paper §3.2, conv only, training only): for the rows that compressed a block
   in this segment, with the layer's *current* projections applied functionally to detached weights,
   ``L = mean || attn(q, old) - attn(q, f_c(old)) ||^2``, attn content-only (``softmax(q k^T / sqrt(dh)) v``,
   no position terms), q the detached queries of the row's current document, old the detached positions just
   compressed, k/v of old detached.  The gradient reaches f_c's parameters only: nothing flows into the
   queries, the projections (which keep ``requires_grad``; nothing is frozen in place), the norms or the
   hidden states.  Each compressing layer returns ``weight * L / n_compressing_layers`` as its ``aux_loss``
   (the stack sums them: the weighted mean over compressing layers), in fp32.

GRU-type gating (GTrXL eq. in §3.2, written with z = 1 - z_GTrXL): for the stream x and a block output y,
``r = sigmoid(W_r y + U_r x)``, ``z = sigmoid(W_z y + U_z x + b_z)``, ``n = tanh(W_n y + U_n (r * x))``,
``g(x, y) = z * x + (1 - z) * n``, with ``b_z`` initialised to ``gate_bias`` (2: z ~ 0.88, the block starts
close to the identity).  One gate for the attention residual, one for the FFN's (``ffn_residual``).
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatron.core.tensor_parallel import (copy_to_tensor_model_parallel_region,
                                           reduce_from_tensor_model_parallel_region)

from pretrain.model.dropout import dropout
from pretrain.model.mixer import Mixer, MixerOutput, StateEntry
from pretrain.model.modules.attention import (AttentionProjections, RelBiases, attend, biased, layer_biases,
                                              masked_scores, position_scores, score_dtype)
from pretrain.model.modules.linear import row_linear
from pretrain.model.modules.memory import keep_last
from pretrain.model.positions import NEG_INF, causal_distances, causal_mask, sinusoid
from pretrain.model.weights import describe


# ----------------------------------------------------------------------------------------------------------
# the FIFO bookkeeping (pure functions on fixed-size buffers; tested on their own)

@dataclasses.dataclass
class Eviction:
    """What leaves the memory in one segment.  ``blocks`` [B, K c, d]: the positions compressed now, oldest
    first, right-aligned: the last ``count[b] * c`` are real (zeros before), K = (c - 1 + N) // c the most
    blocks a segment of N can complete; ``count`` [B] int64 whole blocks; ``pending`` [B, c - 1, d] and
    ``pending_valid`` [B] int64: the remainder, right-aligned."""
    blocks: torch.Tensor
    count: torch.Tensor
    pending: torch.Tensor
    pending_valid: torch.Tensor


def last_start(reset: Optional[torch.Tensor], batch: int, device) -> torch.Tensor:
    """[B] int64: the position of the last document start in each row of the segment (``reset`` bool [B, N]),
    -1 where none starts (or ``reset`` is None)."""
    if reset is None:
        return torch.full((batch,), -1, dtype=torch.long, device=device)
    pos = torch.arange(reset.shape[1], device=device)
    return torch.where(reset, pos, -1).amax(1)


def evict(pending: torch.Tensor, pending_valid: torch.Tensor, mem: torch.Tensor, valid: torch.Tensor,
          x: torch.Tensor, start: torch.Tensor, ratio: int) -> Eviction:
    """The FIFO step of one segment before compression (module docstring, step 2).

    ``pending`` [B, c - 1, d] with ``pending_valid`` [B]; ``mem`` [B, M, d] with ``valid`` [B] (the stack's
    count); ``x`` [B, N, d] the segment; ``start`` [B] from ``last_start`` (rows with a start drop pending and
    memory, and only positions from ``start`` on count); ``ratio`` c.  Invariant used (and kept): a row with
    pending positions has a full memory, so the real positions of S = [pending ; mem ; x] are its last
    ``L = pending_valid + valid + N`` (after a start: ``N - start``).  The memory after the segment is the last
    M of S (``keep_last``); the T = max(0, L - M) real positions before it are cut into ``T // c`` blocks
    (oldest first) and ``T % c`` pending positions."""
    B, N, d = x.shape
    M, P0, c = mem.shape[1], pending.shape[1], ratio
    if P0 != c - 1:
        raise ValueError(f"pending buffer holds {P0} positions, expected cmem_ratio - 1 = {c - 1}")
    S = torch.cat([pending.to(x.dtype), mem.to(x.dtype), x], 1)
    P = S.shape[1]
    fresh = start >= 0
    L = torch.where(fresh, torch.zeros_like(valid), pending_valid + valid) + N - start.clamp(min=0)
    T = (L - M).clamp(min=0)
    count, rest = T // c, T % c
    end = P - M                                       # S[:, :end]: what is not in the memory after the segment
    K = (P0 + N) // c
    t = torch.arange(K * c, device=x.device)
    idx = (end - rest)[:, None] - K * c + t[None, :]                           # [B, K c]
    real = t[None, :] >= ((K - count) * c)[:, None]
    blocks = S.gather(1, idx.clamp(min=0)[..., None].expand(B, K * c, d)).masked_fill(~real[..., None], 0.0)
    s = torch.arange(P0, device=x.device)
    pend = S[:, end - P0:end].masked_fill((s[None, :] < (P0 - rest)[:, None])[..., None], 0.0)
    return Eviction(blocks, count, pend, rest)


def push(cmem: torch.Tensor, cmem_valid: torch.Tensor, comp: torch.Tensor, count: torch.Tensor,
         start: torch.Tensor):
    """The compressed FIFO: the last C slots of [the real slots of cmem ; the last ``count[b]`` of ``comp``].

    ``cmem`` [B, C, d] with ``cmem_valid`` [B]; ``comp`` [B, K, d] the compressed blocks (right-aligned, as
    ``Eviction.blocks``); rows with ``start >= 0`` drop their old slots.  Returns (cmem [B, C, d] with zeros
    in the empty slots, cmem_valid [B])."""
    B, C, d = cmem.shape
    K = comp.shape[1]
    Z = torch.cat([cmem.to(comp.dtype), comp], 1)
    u = torch.arange(C - 1, -1, -1, device=comp.device)[None, :]          # slot C-1-u holds the u-th newest
    src = torch.where(u < count[:, None], C + K - 1 - u, C - 1 - u + count[:, None])
    old = torch.where(start >= 0, torch.zeros_like(cmem_valid), cmem_valid)
    new_valid = (old + count).clamp(max=C)
    out = Z.gather(1, src.clamp(0, C + K - 1)[..., None].expand(B, C, d))
    return out.masked_fill(~(u < new_valid[:, None])[..., None], 0.0), new_valid


# ----------------------------------------------------------------------------------------------------------
# parameters

class GRUGate(nn.Module):
    """GTrXL's GRU-type gating of a residual connection (module docstring): ``forward(x, y)`` for the stream
    x and the block output y, both [..., d] -> [..., d].  Parameters replicated under tensor parallelism (they
    act on d_model hidden states): ``w_y`` [3d, d] = [W_r; W_z; W_n], ``w_x`` [2d, d] = [U_r; U_z], ``u_n``
    [d, d], ``b_z`` [d] (initialised to ``bias``)."""

    def __init__(self, d: int, bias: float):
        super().__init__()
        for name, shape in (("w_y", (3 * d, d)), ("w_x", (2 * d, d)), ("u_n", (d, d))):
            self.register_parameter(name, nn.Parameter(torch.empty(shape)))
            describe(self, name, "weight")
        self.b_z = nn.Parameter(torch.empty(d))
        describe(self, "b_z", f"const:{float(bias)!r}")

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        yr, yz, yn = F.linear(y, self.w_y).chunk(3, -1)
        xr, xz = F.linear(x, self.w_x).chunk(2, -1)
        r = torch.sigmoid(yr + xr)
        z = torch.sigmoid(yz + xz + self.b_z)
        n = torch.tanh(yn + F.linear(r * x, self.u_n))
        return torch.lerp(n, x, z)                   # z * x + (1 - z) * n

    def flops(self, rows: int) -> int:
        d = self.u_n.shape[0]
        return 2 * rows * 6 * d * d


class Compressor(nn.Module):
    """f_c: [B, K c, d] -> [B, K, d], one slot per block of c positions.  ``conv``: ``weight`` [d, d, c]
    (torch's Conv1d layout: out, in, kernel; XL's normal init), ``bias`` [d] (zeros), replicated under tensor
    parallelism; ``max`` / ``mean``: pooling, no parameters."""

    def __init__(self, d: int, ratio: int, kind: str):
        super().__init__()
        self.kind, self.ratio = kind, ratio
        if kind == "conv":
            self.weight = nn.Parameter(torch.empty(d, d, ratio))
            describe(self, "weight", "weight")
            self.bias = nn.Parameter(torch.empty(d))
            describe(self, "bias", "zeros")

    def forward(self, blocks: torch.Tensor, frozen: bool = False) -> torch.Tensor:
        """``frozen``: use detached parameters (the gradient may reach ``blocks``, never the parameters)."""
        B, L, d = blocks.shape
        if self.kind == "conv":
            w, b = (self.weight.detach(), self.bias.detach()) if frozen else (self.weight, self.bias)
            return F.conv1d(blocks.transpose(1, 2), w, b, stride=self.ratio).transpose(1, 2)
        v = blocks.view(B, L // self.ratio, self.ratio, d)
        return v.amax(2) if self.kind == "max" else v.mean(2)


# ----------------------------------------------------------------------------------------------------------

class CompressiveMixer(Mixer):
    mechanism = "compressive"

    def __init__(self, cfg, mp, spec, specs):
        super().__init__(cfg, mp, spec, specs)
        sec = cfg.compressive
        self.sec = sec
        self.memory = spec.uses_memory
        self.compressed = bool(spec.settings.get("compressed"))
        self.ratio = sec.cmem_ratio
        self.cmem_len = sec.slots(cfg.mem_len) if self.compressed else 0
        self.n_compressing = sum(1 for s in specs if s.mechanism == self.mechanism and s.settings.get("compressed"))
        self.attn = AttentionProjections(cfg, mp, r_net=True)
        if cfg.untie_r:
            self.biases = RelBiases(cfg, ("u", "v"))
        if self.compressed:
            self.compressor = Compressor(cfg.d_model, self.ratio, sec.compression)
        if sec.gru_gating:
            self.attn_gate = GRUGate(cfg.d_model, sec.gate_bias)
            self.ffn_gate = GRUGate(cfg.d_model, sec.gate_bias)

    def shared_biases(self):
        return ("u", "v")

    def ffn_residual(self):
        return self.ffn_gate if self.sec.gru_gating else None

    def frame(self, mem_len: int) -> int:
        """Slots before the segment in this layer's key frame: C + M, M or 0."""
        return self.cmem_len + (mem_len if self.memory else 0)

    @property
    def reconstructs(self) -> bool:
        """Whether training computes the attention-reconstruction loss (a conv compressor, weight > 0)."""
        return self.compressed and self.sec.compression == "conv" and self.sec.reconstruction_loss_weight > 0

    # -- state ----------------------------------------------------------------------------------------------
    def initial_state(self, batch_size, mem_len, device, dtype):
        B, d = batch_size, self.cfg.d_model
        out = {}
        if self.memory:
            out["mem"] = StateEntry(torch.zeros(B, mem_len, d, device=device, dtype=dtype), 0)
        if self.compressed:
            count = torch.zeros(B, dtype=torch.long, device=device)
            out["cmem"] = StateEntry(torch.zeros(B, self.cmem_len, d, device=device, dtype=dtype), 0)
            out["cmem_valid"] = StateEntry(count, 0)
            out["pending"] = StateEntry(torch.zeros(B, self.ratio - 1, d, device=device, dtype=dtype), 0)
            out["pending_valid"] = StateEntry(count.clone(), 0)
        return out

    # -- one segment ----------------------------------------------------------------------------------------
    @classmethod
    def prepare(cls, ctx, layers, drop):
        N, M, dev = ctx.n, ctx.mem_len, ctx.device
        part = ctx.parts.setdefault(cls.mechanism, {})
        for frame in sorted({m.frame(M) for m in layers}):
            part[("pos", frame)] = drop(sinusoid(causal_distances(N, frame, ctx.clamp_len).to(dev),
                                                 layers[0].cfg.d_model))
        variants = {m.variant for m in layers}
        if "memory" in variants:
            part["mask_memory"] = ctx.attention_mask(causal_mask(N, M, ctx.valid, ctx.same_length, dev))
        if "local" in variants:
            part["mask_local"] = ctx.attention_mask(causal_mask(N, M, None, False, dev))[..., M:]
        part["start"] = last_start(ctx.reset, ctx.batch_size, dev)

    def _compressed_mask(self, ctx, cmem_valid: torch.Tensor) -> torch.Tensor:
        """[B, N, C + M + N]: causal over the frame, the valid slots (the last cmem_valid + valid), same_length
        over the frame; the document mask and the stack's edits on [mem ; segment] (``ctx.attention_mask``);
        compressed slots belong to the memory's document."""
        C, M = self.cmem_len, ctx.mem_len
        full = causal_mask(ctx.n, C + M, ctx.valid + cmem_valid, ctx.same_length, ctx.device)
        cm = full[..., :C]
        if ctx.doc is not None:
            cm = cm.masked_fill((ctx.doc != 0)[..., None], NEG_INF)
        return torch.cat([cm.expand(ctx.batch_size, -1, -1), ctx.attention_mask(full[..., C:])
                          .expand(ctx.batch_size, -1, -1)], -1)

    def forward(self, x, state, rows, ctx, biases):
        attn = self.attn
        sc = attn.scale
        part = ctx.parts[self.mechanism]
        B, N, _ = x.shape
        M = ctx.mem_len if self.memory else 0
        C = self.cmem_len
        norm = attn.norm if self.pre_lnorm else (lambda t: t)
        xq = norm(x)
        frame = [norm(state["cmem"].to(x.dtype))] if C else []
        frame += [norm(state["mem"].to(x.dtype))] if M else []
        if frame:
            q, k, val = attn.heads(torch.cat(frame + [xq], 1), xq)     # queries for the current rows only
        else:
            q, k, val = attn.heads(xq)
        K = C + M + N
        b = layer_biases(self, biases)
        if self.compressed:
            mask = self._compressed_mask(ctx, state["cmem_valid"])
        else:
            mask = part["mask_memory" if self.memory else "mask_local"]
        pos = position_scores(biased(q, b["v"], sc), attn.position_keys(part[("pos", C + M)]), K, N - 1)
        scores = masked_scores(pos, biased(q, b["u"], sc), k, mask)
        if ctx.recorder is not None:        # analysis: compressed slots count as frame positions before the memory
            ctx.recorder(self.index, torch.softmax(scores.detach(), -1), C + M)
        a = attend(scores, val, attn.dropatt, self.training)
        if self.sec.gru_gating:
            Hl, _, _, dh = a.shape
            o = row_linear(a.permute(1, 2, 0, 3).reshape(B, N, Hl * dh), attn.out)
            h = self.attn_gate(x, dropout(o, attn.p, self.training))
        else:
            h = attn.project_add(x, a)
        new, aux = {}, None
        if self.memory:
            with torch.no_grad() if ctx.detach else contextlib.nullcontext():
                new["mem"] = keep_last(state["mem"], x, M) if M else state["mem"]
        if self.compressed:
            aux = self._compress(x, q, state, ctx, part["start"], new)
        return MixerOutput(h if self.pre_lnorm else attn.norm(h), new, dict(rows), aux)

    def _compress(self, x, q, state, ctx, start, new) -> Optional[torch.Tensor]:
        """Steps 2-4 of the module docstring: writes the new cmem / pending entries into ``new`` and returns the
        reconstruction loss (training with a conv compressor) or None."""
        no_grad = torch.no_grad() if ctx.detach else contextlib.nullcontext()
        with no_grad:
            ev = evict(state["pending"], state["pending_valid"], state["mem"], ctx.valid, x, start, self.ratio)
        live = None
        if self.training and self.reconstructs:      # gradient to the compressor's parameters only
            live = self.compressor(ev.blocks.detach())
        with no_grad:
            comp = live.detach() if live is not None and ctx.detach else self.compressor(ev.blocks, frozen=True)
            new["cmem"], new["cmem_valid"] = push(state["cmem"], state["cmem_valid"], comp, ev.count, start)
            new["pending"], new["pending_valid"] = ev.pending, ev.pending_valid
        if live is None:
            return None
        return self._reconstruction_loss(q.detach(), ev, live, start)

    def _reconstruction_loss(self, q, ev: Eviction, comp, start) -> torch.Tensor:
        """Step 4: ``weight * mean ||attn(q, old) - attn(q, f_c(old))||^2 / n_compressing`` (fp32 or wider).
        ``q`` [H, B, N, dh] detached scaled queries, ``ev`` this segment's eviction, ``comp`` [B, K, d] the
        compressed blocks with the compressor's gradient.  Under tensor parallelism each rank scores its heads:
        ``comp`` enters through ``copy_to_tensor_model_parallel_region`` (its gradient summed over the heads of
        every rank) and the squared error is summed over ranks (``reduce_from_tensor_model_parallel_region``)."""
        attn = self.attn
        H, B, N, dh = q.shape
        K = comp.shape[1]
        sdt = score_dtype(q.dtype)
        w_kv = attn.qkv.weight[H * dh:].detach()             # this rank's [k; v] rows, frozen
        has = ev.count > 0

        def keys_values(t):
            if self.pre_lnorm:
                t = F.layer_norm(t, t.shape[-1:], attn.norm.weight.detach(), attn.norm.bias.detach(), attn.norm.eps)
            kk, vv = attn._split(F.linear(t, w_kv), 2)
            return kk.to(sdt), vv.to(sdt)

        def content_attention(kk, vv, first):           # keys before index ``first`` are empty (rows with blocks)
            j = torch.arange(kk.shape[2], device=q.device)
            empty = (j[None, :] < first[:, None]) & has[:, None]
            mask = torch.zeros(empty.shape, dtype=sdt, device=q.device).masked_fill_(empty, NEG_INF)
            s = torch.matmul(q.to(sdt), kk.transpose(-1, -2)) + mask[:, None, :]
            return torch.matmul(torch.softmax(s, -1), vv)

        with torch.no_grad():
            target = content_attention(*keys_values(ev.blocks.detach()), (K - ev.count) * self.ratio)
        comp_in = copy_to_tensor_model_parallel_region(comp) if attn.tp_size > 1 else comp
        got = content_attention(*keys_values(comp_in), K - ev.count)
        n = torch.arange(N, device=q.device)
        scored = has[:, None] & (n[None, :] >= start.clamp(min=0)[:, None])              # [B, N]
        total = (((got - target) ** 2).sum(-1) * scored).sum().reshape(1)
        if attn.tp_size > 1:
            total = reduce_from_tensor_model_parallel_region(total)
        count = scored.sum() * (self.cfg.n_head * dh)
        return total[0] / count.clamp(min=1) * (self.sec.reconstruction_loss_weight / self.n_compressing)

    # -- cost -----------------------------------------------------------------------------------------------
    def flops(self, batch_size, tgt_len, mem_len):
        """Forward FLOPs as evaluation runs it (training adds the reconstruction loss's products)."""
        cfg = self.cfg
        B, N = batch_size, tgt_len
        K = self.frame(mem_len) + N
        hd, d = cfg.n_head * cfg.d_head, cfg.d_model
        f = 2 * B * (N + 2 * K) * d * hd               # queries for the segment, keys/values for the frame
        f += 2 * 2 * B * N * K * hd                     # q k^T and p v
        f += 2 * (K + 1) * d * hd                       # W_R over the distances
        f += 2 * B * N * (K + 1) * hd                   # position term
        f += 2 * B * N * hd * d                         # output projection
        if self.sec.gru_gating:
            f += 2 * self.attn_gate.flops(B * N)        # the attention and the FFN gates
        if self.compressed and self.sec.compression == "conv":
            blocks = (self.ratio - 1 + N) // self.ratio
            f += 2 * B * blocks * self.ratio * d * d    # f_c over the most blocks a segment can complete
        return f
