"""Memformer memory slots for the decoder LM: a stack-level memory (``SlotMemory``, registered as ``slots``)
and the slot layers that read and write it (``SlotMixer``: attn_type 50, alias ``slots``, reads and writes;
51, alias ``slots_read``, only reads).

Sources: Wu et al., "Memformer: A Memory-Augmented Transformer for Sequence Modeling" (AACL-Findings 2022,
arXiv 2010.06891) and MemBART (arXiv 2209.07634; qywu/memformers, ``membart_encoder.py`` /
``membart_attention.py``): K memory slots per stream, read by the tokens through attention, written by *slot
attention* (each slot attends to itself and to the tokens, never to another slot) in a stream of its own
(own projections, residual, norm and FFN in every layer: MemBART's dual stream), gated into the next memory
after the last layer, and normalised with a learned bias that also implements forgetting.

State: ``slots.mem`` [B, K, d] (param dtype), the memory M_t written by the previous segment (zeros for a fresh
stream and after a reset).

One segment (K slots, N tokens, layers l = 0..L-1 of which the slot layers read and write the slots):

1. (``SlotMemory.begin``) biased-normalisation forgetting, per row b with its reset flag r_b:
   ``m_0 = LN((1 - r_b) M_t + b_mem)``, b_mem a learned [K, d] bias (init N(0, init_std)); a fresh stream's
   memory is zeros, so its first ``m_0 = LN(b_mem)``.  r_b = 1 for a row whose document starts inside the
   segment (a start at position 0 already reset the row's state to zeros: the same ``m_0``).
2. (every slot layer l, ``SlotMixer``) tokens: queries q_i of the segment attend over
   ``[slots (K) ; tokens j <= i]``: ``(q_i + u)^T k_j + (q_i + v)^T W_R R(i - j)`` for tokens (Transformer-XL's
   relative positions inside the segment), ``(q_i + u)^T W_k^mem m_0`` for the slots (no position term: a slot
   is not a place in the sequence); keys and values of the slots are the layer's memory projections of m_0.
   Then residual, norm (``attn.norm``) and the layer's FFN, as in an XL layer.
3. (every writing slot layer l, attn_type 50) write stream m_l -> m_{l+1} (m at the first slot layer: m_0):
   slot i queries ``W_q^mem m_l[i]`` over ``[its own key W_k^mem m_l[i] ; the layer's token keys]`` (values
   likewise; content scores only), ``m' = LN(m_l + W_o^mem a)``, ``m_{l+1} = LN(m' + FFN^mem(m'))`` (pre-LN:
   the pre-LN forms); the stream is handed up as the row stream ``slots`` and passes unchanged through other
   layers (reading slot layers included).
4. (``SlotMemory.end``) update gate per slot against the layer-0 memory:
   ``a = sigmoid(w_2^T GELU(W_1 m_L + b_1) + b_2)``, ``M_{t+1} = a m_L + (1 - a) m_0`` (W_1 [d, d], w_2 [d],
   MemBART's ``UpdateGate`` with its dropout).

Causality.  In MemBART the tokens of layer l read the slots m_l, which the same segment's tokens have already
written to (an encoder: no order).  In a decoder LM that would let token i read tokens > i through the slots.
Here the tokens of every slot layer read m_0, which depends on earlier segments only; the write stream runs
beside them and reaches the tokens of the next segment only, through M_{t+1}.  Each slot layer keeps its own
key / value projections of m_0 (the same memory projections its write stream uses), so the layers read the
memory in different ways, as they do in MemBART.

Documents inside a segment (``ctx.reset``): tokens of the segment's first document read the old slots
(``LN(M_t + b_mem)``), tokens of a later document read the fresh slots ``LN(b_mem)`` and only their own
document; the write stream of a row with a start begins at the fresh slots, attends only to the tokens of the
row's last document, and is gated against the fresh slots: the memory carried on is that document's alone.

Decoding: the slots are written once per complete segment (their state carries a summary, ``carries``: "part"):
generation re-reads the current partial segment from the state at its start and moves the state at segment
boundaries.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

from pretrain.config_base import ConfigError
from pretrain.model import parallel
from pretrain.model.dropout import dropout
from pretrain.model.mixer import Mixer, MixerOutput, StackMemory, StateEntry
from pretrain.model.modules.attention import (AttentionProjections, RelBiases, biased, layer_biases,
                                              position_scores, score_dtype)
from pretrain.model.modules.ffn import FeedForward
from pretrain.model.modules.linear import column_parallel, replicated_linear
from pretrain.model.modules.norm import layer_norm
from pretrain.model.parallel import ShardSpec
from pretrain.model.positions import NEG_INF, causal_distances, causal_mask, sinusoid
from pretrain.model.weights import describe

STREAM = "slots"            # the write stream m_l, handed up the stack
START = "slots.m0"          # m_0 of the write stream (per row: old or fresh slots); the gate's reference
READ = "slots.read"         # the slots the segment's first document reads: LN(M_t + b_mem)


class SlotMixer(Mixer):
    """A slot layer: the tokens read the slots m_0 and the causal segment (attn_type 50 and 51); in a writing
    layer (50) the slots' write stream advances by slot attention over itself and the tokens (module
    docstring, steps 2 and 3).

    Parameters: ``attn`` (the token stream: fused QKV, W_R, output projection, norm) and the relative-position
    biases u, v (shared with XL layers unless ``untie_r``); a writing layer has the slot stream's own
    ``mem_attn`` (QKV, output projection, norm) and ``mem_ffn``, a reading layer only ``mem_kv`` (the key and
    value projections of the slots it reads; ``mem_norm`` before them with pre-LN).  All projections are split
    by heads (the FFNs by their inner dimension) under tensor parallelism."""
    mechanism = "memformer"

    def __init__(self, cfg, mp, spec, specs):
        super().__init__(cfg, mp, spec, specs)
        self.num_slots = cfg.slots.num_slots
        self.writes = self.variant == "slots"
        self.attn = AttentionProjections(cfg, mp, r_net=True)
        if self.writes:
            self.mem_attn = AttentionProjections(cfg, mp, r_net=False)
            self.mem_ffn = FeedForward(cfg, mp)
        else:
            hd = cfg.n_head * cfg.d_head
            self.mem_kv = column_parallel(cfg.d_model, 2 * hd, mp, bias=False)
            describe(self.mem_kv, "weight", "weight", ShardSpec(0, (hd, hd)))
            if cfg.pre_lnorm:
                self.mem_norm = layer_norm(cfg.d_model)
        if cfg.untie_r:
            self.biases = RelBiases(cfg, ("u", "v"))

    def shared_biases(self):
        return ("u", "v")

    @classmethod
    def prepare(cls, ctx, layers, drop):
        """Position embeddings of the segment's distances (no positional memory: N - 1 .. 0 and a pad), the
        token mask over the segment (its columns of the common mask) and, with documents inside the segment,
        which queries read the fresh slots and which tokens the write stream sees."""
        N, M, dev = ctx.n, ctx.mem_len, ctx.device
        part = ctx.parts.setdefault(cls.mechanism, {})
        part["pos"] = drop(sinusoid(causal_distances(N, 0, ctx.clamp_len).to(dev), layers[0].cfg.d_model))
        # the segment's part of the common mask (document mask, stack-level edits), without the memory columns
        part["mask"] = ctx.attention_mask(causal_mask(N, M, None, False, dev))[:, :, M:]
        part["later_doc"] = part["write_mask"] = None
        if ctx.doc is not None:
            part["later_doc"] = (ctx.doc > 0)[None, :, :, None]                          # [1, B, N, 1]
            other = ctx.doc != ctx.doc[:, -1:]                                            # [B, N]
            wm = torch.zeros(other.shape[0], 1 + N, device=dev, dtype=torch.float32)
            wm[:, 1:].masked_fill_(other, NEG_INF)
            part["write_mask"] = wm[None, :, None, :]                                     # [1, B, 1, 1 + N]

    def _mem_in(self, t: torch.Tensor) -> torch.Tensor:
        """The slot rows as the memory projections see them (pre-LN: normalised)."""
        if not self.pre_lnorm:
            return t
        return self.mem_attn.norm(t) if self.writes else self.mem_norm(t)

    def _slot_heads(self, read: torch.Tensor, m: torch.Tensor):
        """Writing layer: keys / values of the slots the tokens read (``read`` [B, K, d]) and queries / keys /
        values of the write stream (``m`` [B, K, d]), from the memory projections in one product:
        ((k, v), (q, k, v)), each [H_local, B, K, dh] (q scaled by 1/sqrt(dh))."""
        K = read.shape[1]
        mi = self._mem_in(m)
        q, k, v = self.mem_attn.heads(torch.cat([self._mem_in(read), mi], 1), mi)
        return (k[:, :, :K], v[:, :, :K]), (q, k[:, :, K:], v[:, :, K:])

    def _slot_kv(self, slots: torch.Tensor):
        """Keys and values [H_local, B, K, dh] of ``slots`` [B, K, d] (the memory projections' k, v rows)."""
        if self.writes:
            ma = self.mem_attn
            w = ma.qkv.weight[ma.n_head * ma.d_head:]
        else:
            ma, w = self.attn, self.mem_kv.weight
        c = self._mem_in(slots)
        if ma.tp_size > 1:
            c = copy_to_tensor_model_parallel_region(c)
        return ma._split(F.linear(c, w), 2)

    def forward(self, x, state, rows, ctx, biases):
        attn = self.attn
        sc = attn.scale
        part = ctx.parts[self.mechanism]
        b = layer_biases(self, biases)
        read = rows[READ].to(x.dtype)
        H, dh = attn.n_head, attn.d_head
        B, N, _ = x.shape
        K = read.shape[1]
        xin = attn.norm(x) if self.pre_lnorm else x
        q, k, v = attn.heads(xin)                                       # [H, B, N, dh], q scaled
        if self.writes:
            m = rows[STREAM].to(x.dtype)
            (ks, vs), (qm, km, vm) = self._slot_heads(read, m)
        else:
            ks, vs = self._slot_kv(read)
        # -- tokens read the slots and the causal segment ------------------------------------------------
        qu = biased(q, b["u"], sc)
        pos = position_scores(biased(q, b["v"], sc), attn.position_keys(part["pos"]), N, N - 1)
        s_tok = torch.baddbmm(pos.reshape(H * B, N, N), qu.view(H * B, N, dh),
                              k.view(H * B, N, dh).transpose(1, 2))
        s_slot = torch.bmm(qu.view(H * B, N, dh), ks.reshape(H * B, K, dh).transpose(1, 2)).view(H, B, N, K)
        later = part["later_doc"]
        if later is not None:                                           # later documents read the fresh slots
            fresh = rows[START].to(x.dtype)
            kf, vf = self._slot_kv(fresh)
            s_new = torch.bmm(qu.view(H * B, N, dh), kf.reshape(H * B, K, dh).transpose(1, 2)).view(H, B, N, K)
            s_slot = torch.where(later, s_new, s_slot)
        sdt = score_dtype(x.dtype)
        scores = torch.cat([s_slot.to(sdt), s_tok.view(H, B, N, N).to(sdt) + part["mask"]], -1)
        probs = self._dropatt(torch.softmax(scores, -1)).to(v.dtype)   # [H, B, N, K + N]
        p_slot, p_tok = probs[..., :K], probs[..., K:]
        a_slot = torch.matmul(p_slot, vs)
        if later is not None:
            a_slot = torch.where(later, torch.matmul(p_slot, vf), a_slot)
        a = a_slot + torch.matmul(p_tok, v)
        h = attn.project_add(x, a)
        x_out = h if self.pre_lnorm else attn.norm(h)
        if not self.writes:
            return MixerOutput(x_out, {}, dict(rows))
        # -- the write stream: slot attention over [itself ; the tokens] -------------------------------------
        s_self = (qm * km).sum(-1, keepdim=True)                        # [H, B, K, 1]
        s_w = torch.cat([s_self, torch.matmul(qm, k.transpose(-1, -2))], -1).to(sdt)       # [H, B, K, 1 + N]
        if part["write_mask"] is not None:                              # the row's last document only
            s_w = s_w + part["write_mask"]
        pw = self._dropatt(torch.softmax(s_w, -1)).to(v.dtype)
        aw = pw[..., :1] * vm + torch.matmul(pw[..., 1:], v)
        mh = self.mem_attn.project_add(m, aw)
        m_next = self.mem_ffn(mh if self.pre_lnorm else self.mem_attn.norm(mh))
        return MixerOutput(x_out, {}, {**rows, STREAM: m_next})

    def _dropatt(self, probs):
        if self.attn.dropatt > 0 and self.training:
            with parallel.parallel_region_rng(probs.device):
                return dropout(probs, self.attn.dropatt, True)
        return probs

    def flops(self, batch_size, tgt_len, mem_len):
        cfg = self.cfg
        B, N, K = batch_size, tgt_len, self.num_slots
        hd, d = cfg.n_head * cfg.d_head, cfg.d_model
        f = 2 * B * N * d * 3 * hd                      # token QKV
        f += 2 * (N + 1) * d * hd                       # W_R over the distances
        f += 2 * B * N * (N + 1) * hd                   # position term
        f += 2 * 2 * B * N * (K + N) * hd               # scores and p v over [slots ; tokens]
        f += 2 * B * N * hd * d                         # token output projection
        if not self.writes:
            return f + 2 * B * K * d * 2 * hd           # keys / values of m_0
        f += 2 * B * K * d * hd + 2 * B * 2 * K * d * 2 * hd   # slot queries; keys / values of m_0 and m_l
        f += 2 * 2 * B * K * N * hd                     # slot attention over the tokens
        f += 2 * B * K * hd * d                         # slot output projection
        f += 2 * 2 * B * K * d * cfg.d_inner            # slot FFN
        return f


class SlotMemory(StackMemory):
    """The slots' state, their biased-normalisation forgetting below the layers and the update gate above them
    (module docstring, steps 1 and 4).  Parameters (replicated under tensor parallelism): ``memory_bias``
    b_mem [K, d] (init N(0, init_std)), ``norm`` (its LayerNorm), ``gate_fc1`` (W_1 [d, d], b_1), ``gate_fc2``
    (w_2 [1, d], b_2)."""
    name = "slots"

    def __init__(self, cfg, mp, specs):
        super().__init__(cfg, mp, specs)
        if not any(s.mechanism == "memformer" and s.variant == "slots" for s in specs):
            raise ConfigError("layers", "the slot layers only read the slots (attn_type 51, 'slots_read'): at "
                                        "least one layer must write them (attn_type 50, 'slots')")
        K, d = cfg.slots.num_slots, cfg.d_model
        self.num_slots = K
        self.memory_bias = nn.Parameter(torch.empty(K, d))
        describe(self, "memory_bias", "weight")
        self.norm = layer_norm(d)
        self.gate_fc1 = replicated_linear(d, d)
        self.gate_fc2 = replicated_linear(d, 1)
        self.p = cfg.dropout

    def initial_state(self, batch_size, mem_len, device, dtype):
        K, d = self.num_slots, self.cfg.d_model
        return {"mem": StateEntry(torch.zeros(batch_size, K, d, device=device, dtype=dtype), batch_dim=0)}

    def begin(self, emb, state, ctx):
        """m_0 = LN((1 - r) M_t + b_mem) per row; rows: the write stream and its start (m_0), and the slots the
        segment's first document reads (LN(M_t + b_mem): m_0 itself unless a document starts in the row)."""
        mem = state["mem"].to(emb.dtype)
        bias = self.memory_bias.to(emb.dtype)
        read = self.norm(mem + bias)
        if ctx.reset is None:
            return emb, {STREAM: read, START: read, READ: read}
        keep = (~ctx.reset.any(1)).to(emb.dtype)[:, None, None]       # 1 - r
        m0 = self.norm(keep * mem + bias)
        return emb, {STREAM: m0, START: m0, READ: read}

    def end(self, x, rows, state, ctx):
        """M_{t+1} = a m_L + (1 - a) m_0 with a = sigmoid(w_2^T GELU(W_1 m_L + b_1) + b_2) per slot."""
        m, m0 = rows[STREAM], rows[START]
        h = dropout(m, self.p, self.training)
        h = dropout(F.gelu(self.gate_fc1(h)), self.p, self.training)
        a = torch.sigmoid(self.gate_fc2(h))                            # [B, K, 1]
        return x, {"mem": torch.lerp(m0, m, a)}, None

    def flops(self, batch_size, tgt_len, mem_len):
        d = self.cfg.d_model
        return 2 * batch_size * self.num_slots * (d * d + d)
