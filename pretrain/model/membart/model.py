"""MemBART: a BART encoder-decoder whose encoder reads and writes K memory slots carried from step to step, on
megatron-core tensor-parallel layers.

Sources: Wu & Yu, "Stateful Memory-Augmented Transformers for Dialogue Modeling" (arXiv 2209.07634, MemBART) and
Wu et al., "Memformer" (arXiv 2010.06891); parameter layout and details from qywu/memformers
(``membart_encoder.py``, ``membart_attention.py``); the BART part is Lewis et al. 2019 as Hugging Face's
``BartForConditionalGeneration`` computes it (post-LN, learned positions with an offset of 2, ``layernorm_embedding``,
GELU, biases in every projection, tied input / output embeddings plus ``final_logits_bias``; with
``tie_word_embeddings`` false, transformers' untied layout: separate encoder, decoder and output tables).

    model = build_membart(cfg)                          # after parallel.initialize(tp_size)
    state = model.init_state(batch_size)                # MemoryState: slots.mem [B, K, d], zeros
    enc, state = model.encode(tokens, state)            # one time step; enc.hidden [B, K + S, d]
    out, state = model(tokens, state, targets)          # encode + decode; out.nll [B, T] fp32
    ids = model.generate(enc, num_beams=4)              # greedy / sampling / beam search from an encoder output

One time step t (K slots, S source tokens; r_b the row's reset flag; §4.2 of the mechanisms notes):

1. biased-normalisation forgetting: ``m_0 = LN((1 - r_b) M_t + b_mem)`` (b_mem [K, d], init N(0, init_std)); a
   fresh row's memory is zeros, so its first ``m_0 = LN(b_mem)``;
2. every encoder layer l runs one attention over ``[m_l ; x_l]`` (K + S rows) with separate projections for the
   slot rows (``mem_qkv``, ``mem_out_proj``) and the token rows (``qkv``, ``out_proj``): a token query sees every
   slot and every non-pad token (bidirectional); slot s sees only itself among the slots, and every non-pad token
   (slots never read each other).  Each stream then has its own residual + LayerNorm and GELU FFN (``mem_fc1``,
   ``mem_fc2``), post-LN as BART: ``m' = LN(m + Drop(W_o^mem a_m))``, ``m_{l+1} = LN(m' + FFN^mem(m'))``;
3. update gate per slot: ``a = sigmoid(w_2^T GELU(W_1 m_L + b_1) + b_2)`` (dropout on its input and hidden
   layer), ``M_{t+1} = a m_L + (1 - a) m_0``;
4. the encoder output is ``[M_{t+1} ; x_L]`` with its key mask padded by K ``True`` entries: the decoder (causal
   self-attention, then cross-attention over that output, then the FFN; BART's decoder) reads the updated memory
   and the current input by ordinary cross-attention.

``num_slots`` 0 leaves plain BART (the state then holds an empty ``[B, 0, d]`` entry).

Tensor parallelism: heads are split across ranks (fused ``[q; k; v]`` column-parallel projections with their
biases, row-parallel output projections), the FFNs by their inner dimension, the shared embedding / output layer
by vocabulary rows (padded; padded logits are -inf; loss: megatron-core's ``vocab_parallel_cross_entropy``); so are
the three tables of an untied model.
Positions, LayerNorms, ``b_mem``, the gate and the state are replicated.  Every parameter is initialised from
(seed, name) as a full tensor and cut to the rank's shard (``pretrain/model/weights.py``), so every layout starts
from the same model; ``gather_full_state_dict`` / ``load_full_state_dict`` use layout-independent names, and
``membart/weights.py`` maps them to Hugging Face's and memformers' names.

Precision: products in the parameters' dtype, scores / softmax / log-probabilities in fp32 (fp64 for fp64
weights).  Dropout in tensor-parallel regions (attention probabilities, FFN inner activations) draws from the
per-rank generator; activation checkpointing replays it (``parallel.replay_rng``).
"""
from __future__ import annotations

import dataclasses
import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from megatron.core.tensor_parallel import (VocabParallelEmbedding, copy_to_tensor_model_parallel_region,
                                           vocab_parallel_cross_entropy)

from pretrain.config_base import ConfigError
from pretrain.model import parallel, weights
from pretrain.model.modules.attention import score_dtype
from pretrain.model.modules.linear import (_no_init, column_linear, column_parallel, replicated_linear, row_linear,
                                           row_parallel)
from pretrain.model.dropout import dropout
from pretrain.model.family_base import ModelFamilyMixin
from pretrain.model.embeddings import _log_softmax, _pad_mask
from pretrain.model.membart.config import MemBartConfig
from pretrain.model.parallel import ShardSpec
from pretrain.model.state import MemoryState
from pretrain.model.weights import describe

MECHANISM = "membart"
STATE_KEY = "slots.mem"
POSITION_OFFSET = 2          # BART's learned positions start at row 2 (fairseq's padding_idx + 1 convention)
MASKED = -1e30               # additive mask value: finite, so a row with every key masked stays finite


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


# The feed-forward activations by their transformers ACT2FN names, each computed with the same operations as
# transformers (so fp64 results agree to rounding); config.ACTIVATIONS lists the same names.
ACTIVATION_FNS = {
    "gelu": F.gelu,
    "gelu_python": lambda x: x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0))),
    "gelu_new": _gelu_tanh,
    "gelu_accurate": _gelu_tanh,
    "gelu_python_tanh": _gelu_tanh,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x))),
    "gelu_10": lambda x: torch.clip(F.gelu(x), -10, 10),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "relu": F.relu,
    "relu2": lambda x: torch.square(F.relu(x)),
    "relu6": F.relu6,
    "leaky_relu": F.leaky_relu,
    "silu": F.silu,
    "swish": F.silu,
    "mish": F.mish,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "hardswish": F.hardswish,
    "laplace": lambda x: 0.5 * (1.0 + torch.erf((x - 0.707107).div(0.282095 * math.sqrt(2.0)))),
    "sqrtsoftplus": lambda x: F.softplus(x).sqrt(),
    "linear": lambda x: x,
}


def _activation(name: str):
    """The activation ``name`` (a key of ACTIVATION_FNS; the config's validation refuses others)."""
    return ACTIVATION_FNS[name]


def _norm(d: int) -> nn.LayerNorm:
    """A LayerNorm initialised as BART's (weight 1, bias 0; eps 1e-5)."""
    ln = nn.LayerNorm(d)
    describe(ln, "weight", "const:1.0")
    describe(ln, "bias", "zeros")
    return ln


def _column(d_in: int, sections: Tuple[int, ...], mp) -> nn.Module:
    """A column-parallel linear with bias whose output is the concatenation of ``sections`` (each split by heads
    or inner units across ranks)."""
    layer = column_parallel(d_in, sum(sections), mp, bias=True)
    describe(layer, "weight", "weight", ShardSpec(0, sections))
    describe(layer, "bias", "zeros", ShardSpec(0, sections))
    return layer


def _row(d_in: int, d_out: int, mp) -> nn.Module:
    """A row-parallel linear with bias (input split across ranks, output all-reduced then the bias)."""
    layer = row_parallel(d_in, d_out, mp, bias=True)
    describe(layer, "weight", "weight", ShardSpec(1, (d_in,)))
    describe(layer, "bias", "zeros")
    return layer


def _tp_region_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Dropout on a tensor split across tensor-parallel ranks (different masks per rank)."""
    if p == 0.0 or not training:
        return x
    with parallel.parallel_region_rng(x.device):
        return dropout(x, p, True)


class FeedForward(nn.Module):
    """BART's FFN with its residual and post-LN: ``LN(x + Drop(fc2(Drop_act(act(fc1 x)))))``.  ``fc1`` is
    column-parallel and ``fc2`` row-parallel (inner dimension split); parameters ``fc1``, ``fc2``, ``norm``
    (Hugging Face's ``fc1``, ``fc2``, ``final_layer_norm``)."""

    def __init__(self, cfg: MemBartConfig, mp, ffn_dim: int):
        super().__init__()
        self.fc1 = _column(cfg.d_model, (ffn_dim,), mp)
        self.fc2 = _row(ffn_dim, cfg.d_model, mp)
        self.norm = _norm(cfg.d_model)
        self.act = _activation(cfg.activation_function)
        self.p, self.p_act = cfg.dropout, cfg.activation_dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, d] -> [B, L, d]."""
        h = self.act(column_linear(x, self.fc1))
        h = _tp_region_dropout(h, self.p_act, self.training)
        h = dropout(row_linear(h, self.fc2), self.p, self.training)
        return self.norm(x + h)


class Attention(nn.Module):
    """Multi-head attention projections of one stream: a fused ``[q; k; v]`` column-parallel projection with
    biases (``qkv``; or ``q_proj`` + fused ``kv`` for cross-attention) and the row-parallel ``out_proj``.  Heads
    are ``[H_local, B, L, d_head]``; queries are scaled by 1/sqrt(d_head) after their bias (BART)."""

    def __init__(self, cfg: MemBartConfig, mp, n_head: int, cross: bool = False):
        super().__init__()
        d = cfg.d_model
        tp = parallel.tp_world_size()
        self.n_head, self.d_head = n_head // tp, d // n_head
        self.scale = self.d_head ** -0.5
        self.cross = cross
        if cross:
            self.q_proj = _column(d, (d,), mp)
            self.kv = _column(d, (d, d), mp)
        else:
            self.qkv = _column(d, (d, d, d), mp)
        self.out_proj = _row(d, d, mp)
        self.p_att = cfg.attention_dropout

    def _heads(self, y: torch.Tensor, parts: int):
        B, L, _ = y.shape
        return y.view(B, L, parts, self.n_head, self.d_head).permute(2, 3, 0, 1, 4).unbind(0)

    def project(self, x: torch.Tensor):
        """Self-attention: ``x`` [B, L, d] -> q (scaled), k, v, each [H_local, B, L, d_head]."""
        q, k, v = self._heads(column_linear(x, self.qkv), 3)
        return q * self.scale, k, v

    def query(self, x: torch.Tensor) -> torch.Tensor:
        """Cross-attention queries (scaled) [H_local, B, L, d_head]."""
        (q,) = self._heads(column_linear(x, self.q_proj), 1)
        return q * self.scale

    def keys_values(self, enc: torch.Tensor):
        """Cross-attention keys and values of the encoder output [B, C, d], each [H_local, B, C, d_head]."""
        return self._heads(column_linear(enc, self.kv), 2)

    def attend(self, q, k, v, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """softmax(q k^T + mask) v per head: q [H, B, R, dh] (scaled), k, v [H, B, C, dh], ``mask`` additive fp32
        broadcastable to [H, B, R, C] (or None) -> [H, B, R, dh].  Scores and softmax in fp32 (wider for fp64)."""
        s = torch.matmul(q, k.transpose(-1, -2)).to(score_dtype(q.dtype))
        if mask is not None:
            s = s + mask
        p = _tp_region_dropout(torch.softmax(s, -1), self.p_att, self.training)
        return torch.matmul(p.to(v.dtype), v)

    def output(self, a: torch.Tensor, proj: Optional[nn.Module] = None) -> torch.Tensor:
        """Per-head vectors [H_local, B, R, dh] -> ``out_proj`` (or ``proj``) output [B, R, d]."""
        Hl, B, R, dh = a.shape
        return row_linear(a.permute(1, 2, 0, 3).reshape(B, R, Hl * dh), proj if proj is not None else self.out_proj)


class EncoderAttention(Attention):
    """The encoder's joint attention over ``[slots ; tokens]`` with the slots' own projections (``mem_qkv``,
    ``mem_out_proj``; MemBART's dual stream).  Without slots it is BART's encoder self-attention."""

    def __init__(self, cfg: MemBartConfig, mp):
        super().__init__(cfg, mp, cfg.encoder_attention_heads)
        if cfg.num_slots:
            d = cfg.d_model
            self.mem_qkv = _column(d, (d, d, d), mp)
            self.mem_out_proj = _row(d, d, mp)

    def forward(self, x: torch.Tensor, m: Optional[torch.Tensor], mask: torch.Tensor):
        """``x`` [B, S, d] tokens, ``m`` [B, K, d] slots (or None), ``mask`` additive [1 or B, K + S, K + S] (or
        [B, 1, S] without slots) -> (token output [B, S, d], slot output [B, K, d] or None), before dropout and
        residual."""
        q, k, v = self.project(x)
        if m is None:
            return self.output(self.attend(q, k, v, mask[None])), None
        qm, km, vm = self._heads(column_linear(m, self.mem_qkv), 3)
        q = torch.cat([qm * self.scale, q], 2)
        k, v = torch.cat([km, k], 2), torch.cat([vm, v], 2)
        a = self.attend(q, k, v, mask[None])
        K = m.shape[1]
        return self.output(a[:, :, K:]), self.output(a[:, :, :K], self.mem_out_proj)


class EncoderLayer(nn.Module):
    """One MemBART encoder layer: the joint attention, then per stream residual + LayerNorm and the FFN
    (``self_attn_layer_norm``, ``fc1``, ``fc2``, ``final_layer_norm``; the slots' ``mem_self_attn_layer_norm``,
    ``mem_fc1``, ``mem_fc2``, ``mem_final_layer_norm``)."""

    def __init__(self, cfg: MemBartConfig, mp):
        super().__init__()
        self.self_attn = EncoderAttention(cfg, mp)
        self.self_attn_layer_norm = _norm(cfg.d_model)
        self.ffn = FeedForward(cfg, mp, cfg.encoder_ffn_dim)
        if cfg.num_slots:
            self.mem_self_attn_layer_norm = _norm(cfg.d_model)
            self.mem_ffn = FeedForward(cfg, mp, cfg.encoder_ffn_dim)
        self.p = cfg.dropout

    def forward(self, x: torch.Tensor, m: Optional[torch.Tensor], mask: torch.Tensor):
        """(tokens [B, S, d], slots [B, K, d] or None, mask) -> (tokens, slots) after the layer."""
        a, am = self.self_attn(x, m, mask)
        x = self.ffn(self.self_attn_layer_norm(x + dropout(a, self.p, self.training)))
        if m is not None:
            m = self.mem_ffn(self.mem_self_attn_layer_norm(m + dropout(am, self.p, self.training)))
        return x, m


class DecoderLayer(nn.Module):
    """BART's decoder layer: causal self-attention, cross-attention over the encoder output, FFN; each with
    dropout, residual and post-LN (``self_attn_layer_norm``, ``encoder_attn_layer_norm``, ``final_layer_norm``)."""

    def __init__(self, cfg: MemBartConfig, mp):
        super().__init__()
        self.self_attn = Attention(cfg, mp, cfg.decoder_attention_heads)
        self.self_attn_layer_norm = _norm(cfg.d_model)
        self.encoder_attn = Attention(cfg, mp, cfg.decoder_attention_heads, cross=True)
        self.encoder_attn_layer_norm = _norm(cfg.d_model)
        self.ffn = FeedForward(cfg, mp, cfg.decoder_ffn_dim)
        self.p = cfg.dropout

    def forward(self, y: torch.Tensor, enc_k: torch.Tensor, enc_v: torch.Tensor, self_mask: Optional[torch.Tensor],
                cross_mask: torch.Tensor, past: Optional[Tuple[torch.Tensor, torch.Tensor]] = None):
        """``y`` [B, T, d]; encoder keys / values [H_local, B, C, dh]; ``self_mask`` [T, t0 + T] additive (None: no
        mask); ``cross_mask`` [B, 1, C] additive; ``past``: cached self-attention keys and values of earlier
        positions [H_local, B, t0, dh] (generation).  Returns (y, (k, v) of all positions so far)."""
        q, k, v = self.self_attn.project(y)
        if past is not None:
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
        a = self.self_attn.output(self.self_attn.attend(q, k, v, self_mask))
        y = self.self_attn_layer_norm(y + dropout(a, self.p, self.training))
        qc = self.encoder_attn.query(y)
        c = self.encoder_attn.output(self.encoder_attn.attend(qc, enc_k, enc_v, cross_mask[None]))
        y = self.encoder_attn_layer_norm(y + dropout(c, self.p, self.training))
        return self.ffn(y), (k, v)


class UpdateGate(nn.Module):
    """MemBART's update gate: ``a = sigmoid(w_2^T GELU(W_1 Drop(m) + b_1) + b_2)`` per slot (``dense`` [d, d],
    ``dense2`` [1, d]; dropout on the input and the hidden layer).  Replicated under tensor parallelism."""

    def __init__(self, cfg: MemBartConfig):
        super().__init__()
        d = cfg.d_model
        self.dense = replicated_linear(d, d)
        self.dense2 = replicated_linear(d, 1)
        self.p = cfg.dropout

    def forward(self, m: torch.Tensor) -> torch.Tensor:
        """[B, K, d] -> gate [B, K, 1] in (0, 1)."""
        h = dropout(F.gelu(self.dense(dropout(m, self.p, self.training))), self.p, self.training)
        return torch.sigmoid(self.dense2(h))


class Embeddings(nn.Module):
    """Learned positions (``embed_positions``, ``max_position_embeddings + 2`` rows, BART's offset of 2) and
    ``layernorm_embedding`` of one side; the token table is the model's (``MemBart.token_table``)."""

    def __init__(self, cfg: MemBartConfig):
        super().__init__()
        self.embed_positions = nn.Embedding(cfg.max_position_embeddings + POSITION_OFFSET, cfg.d_model)
        describe(self.embed_positions, "weight", "weight")
        self.layernorm_embedding = _norm(cfg.d_model)
        self.max_positions = cfg.max_position_embeddings

    def forward(self, tok: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Token embeddings [B, L, d] (already scaled) at positions ``start .. start + L - 1`` -> LN(tok + pos)."""
        L = tok.shape[1]
        if start + L > self.max_positions:
            raise ValueError(f"positions up to {start + L} exceed max_position_embeddings {self.max_positions}")
        pos = self.embed_positions.weight[start + POSITION_OFFSET:start + L + POSITION_OFFSET]
        return self.layernorm_embedding(tok + pos.to(tok.dtype))


class Encoder(nn.Module):
    """Embeddings, the encoder layers and (with slots) the memory's bias, norm and update gate
    (``memory_bias`` [K, d], ``memory_layer_norm``, ``memory_gate_net``)."""

    def __init__(self, cfg: MemBartConfig, mp):
        super().__init__()
        self.embed = Embeddings(cfg)
        self.layers = nn.ModuleList(EncoderLayer(cfg, mp) for _ in range(cfg.encoder_layers))
        if cfg.num_slots:
            self.memory_bias = nn.Parameter(torch.empty(cfg.num_slots, cfg.d_model))
            describe(self, "memory_bias", "weight")
            self.memory_layer_norm = _norm(cfg.d_model)
            self.memory_gate_net = UpdateGate(cfg)


class Decoder(nn.Module):
    def __init__(self, cfg: MemBartConfig, mp):
        super().__init__()
        self.embed = Embeddings(cfg)
        self.layers = nn.ModuleList(DecoderLayer(cfg, mp) for _ in range(cfg.decoder_layers))


@dataclasses.dataclass
class EncoderOutput:
    """What the decoder reads.  ``hidden`` [B, K + S, d]: ``[M_{t+1} ; token states]``; ``mask`` bool [B, K + S]:
    the keys the decoder may attend to (slots always, tokens unless padding); ``memory`` [B, K, d]: ``M_{t+1}``
    (the gated memory, also the new state's ``slots.mem``)."""
    hidden: torch.Tensor
    mask: torch.Tensor
    memory: torch.Tensor

    @property
    def batch_size(self) -> int:
        return int(self.hidden.shape[0])

    def index_select(self, rows: torch.Tensor) -> "EncoderOutput":
        """The rows ``rows`` (LongTensor) of every field (beam expansion, row selection)."""
        return EncoderOutput(self.hidden.index_select(0, rows), self.mask.index_select(0, rows),
                             self.memory.index_select(0, rows))


@dataclasses.dataclass
class Seq2SeqOutput:
    """``nll`` [B, T] fp32 per-target negative log-likelihood (0 where the target is negative: ignored), or None
    without targets; ``logits`` [B, T, V] full-vocabulary log-probabilities (``return_logits``; gathered under TP,
    no gradient); ``aux_loss`` None (the interface of ``LMOutput``); ``encoder`` the encoder output."""
    nll: Optional[torch.Tensor]
    logits: Optional[torch.Tensor]
    aux_loss: Optional[torch.Tensor]
    encoder: EncoderOutput


class DecoderCache:
    """Per-layer self-attention keys / values of the positions decoded so far and the cross-attention keys /
    values of the encoder output (computed once), for incremental decoding.  Rows are reordered with
    ``reorder(rows)`` (beam search)."""

    def __init__(self, cross: List[Tuple[torch.Tensor, torch.Tensor]], cross_mask: torch.Tensor):
        self.cross = cross
        self.cross_mask = cross_mask
        self.past: List[Optional[Tuple[torch.Tensor, torch.Tensor]]] = [None] * len(cross)
        self.length = 0

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep rows ``rows`` (LongTensor [B']) of every cached tensor, in that order."""
        self.cross = [(k.index_select(1, rows), v.index_select(1, rows)) for k, v in self.cross]
        self.cross_mask = self.cross_mask.index_select(0, rows)
        self.past = [None if p is None else (p[0].index_select(1, rows), p[1].index_select(1, rows))
                     for p in self.past]


class MemBart(ModelFamilyMixin, nn.Module):
    """The MemBART encoder-decoder for this rank's tensor-parallel shard (a ``pretrain.model.family.ModelFamily``;
    module docstring)."""

    decode_policy = "encoder-decoder"

    def __init__(self, cfg: MemBartConfig):
        super().__init__()
        cfg.validate()
        tp = parallel.tp_world_size()
        for name in ("encoder_attention_heads", "decoder_attention_heads", "encoder_ffn_dim", "decoder_ffn_dim"):
            if getattr(cfg, name) % tp:
                raise ConfigError(name, f"{getattr(cfg, name)} is not divisible by the tensor-parallel size {tp}")
        self.cfg = cfg
        mp = parallel.model_parallel_config()
        V = cfg.vocab_size

        def table() -> VocabParallelEmbedding:
            t = VocabParallelEmbedding(math.ceil(V / tp) * tp, cfg.d_model, init_method=_no_init, config=mp)
            describe(t, "weight", "weight", ShardSpec(0, (V,)))
            return t

        # token tables [V, d] split by vocabulary rows: tied, one ``shared`` table for the encoder's and the decoder's
        # inputs and the output layer (BART); untied, ``encoder_embed_tokens``, ``decoder_embed_tokens`` and
        # ``lm_head`` (transformers' BART with tie_word_embeddings false)
        self.tied = cfg.tie_word_embeddings
        if self.tied:
            self.shared = table()
        else:
            self.encoder_embed_tokens = table()
            self.decoder_embed_tokens = table()
            self.lm_head = table()
        # Hugging Face's final_logits_bias (zeros in BART's checkpoints; a frozen parameter so that it is saved,
        # loaded and sharded with the weights, and never trained)
        self.final_logits_bias = nn.Parameter(torch.empty(math.ceil(V / tp)), requires_grad=False)
        describe(self, "final_logits_bias", "zeros", ShardSpec(0, (V,)))
        self.register_buffer("vocab_pad", _pad_mask((V,), parallel.tp_rank(), tp), persistent=False)
        self.has_vocab_pad = bool((parallel.tp_rank() + 1) * math.ceil(V / tp) > V)
        self.encoder = Encoder(cfg, mp)
        self.decoder = Decoder(cfg, mp)
        self.embed_scale = math.sqrt(cfg.d_model) if cfg.scale_embedding else 1.0
        self.num_slots = cfg.num_slots
        # activation checkpoint hook per layer (cfg.checkpoint_activations): checkpoint_fn(function, *tensors)
        self.checkpoint_fn = parallel.checkpoint
        weights.init_weights(self, cfg)

    # -- state ----------------------------------------------------------------------------------------------
    @property
    def _param(self) -> torch.Tensor:
        return self.token_table("encoder").weight

    def token_table(self, role: str) -> VocabParallelEmbedding:
        """This rank's shard of the token table of ``role``: ``"encoder"`` / ``"decoder"`` (the inputs) or
        ``"output"`` (the output layer's weight); all three are ``shared`` when tied.  Raises ValueError on another
        role."""
        if role not in ("encoder", "decoder", "output"):
            raise ValueError(f"role must be encoder, decoder or output, got {role!r}")
        if self.tied:
            return self.shared
        return {"encoder": self.encoder_embed_tokens, "decoder": self.decoder_embed_tokens,
                "output": self.lm_head}[role]

    def init_state(self, batch_size: int, mem_len: Optional[int] = None,
                   device: Optional[torch.device] = None) -> MemoryState:
        """A fresh memory for ``batch_size`` rows: ``slots.mem`` zeros [B, K, d] in the parameters' dtype (the first
        step then reads ``LN(b_mem)``, as memformers' ``construct_memory``).  ``mem_len`` exists for the
        interface of the decoder LMs and must be None or 0."""
        if mem_len:
            raise ValueError(f"MemBART has no positional memory: mem_len must be 0 or None, got {mem_len}")
        device = device or self._param.device
        mem = torch.zeros(batch_size, self.num_slots, self.cfg.d_model, device=device, dtype=self._param.dtype)
        return MemoryState(MECHANISM, 0, {STATE_KEY: mem}, {STATE_KEY: 0}, {STATE_KEY: None},
                           tp_rank=parallel.tp_rank(), tp_world=parallel.tp_world_size())

    @property
    def state_signature(self) -> str:
        return MECHANISM

    def _owns_state(self, state: MemoryState) -> bool:
        return STATE_KEY in state

    def _check_state_fits(self, state: MemoryState) -> None:
        shape = tuple(state[STATE_KEY].shape[1:])
        if shape != (self.num_slots, self.cfg.d_model):
            raise ValueError(f"state slots have shape {shape}, the model has ({self.num_slots}, {self.cfg.d_model})")

    # -- pieces ---------------------------------------------------------------------------------------------
    def embed_tokens(self, ids: torch.Tensor, side: str = "encoder") -> torch.Tensor:
        """[B, L] int64 ids -> [B, L, d] in the parameters' dtype from ``side``'s table (``"encoder"`` or
        ``"decoder"``; the same one when tied), times sqrt(d) with ``scale_embedding``."""
        e = self.token_table(side)(ids)
        return e * self.embed_scale if self.embed_scale != 1.0 else e

    def _encoder_mask(self, key_ok: torch.Tensor, K: int, dtype) -> torch.Tensor:
        """Additive mask [B, K + S, K + S] (or [B, 1, S] without slots) of the joint attention: every query sees the
        slots it may (a token: all; slot s: only itself) and the non-pad tokens."""
        B, S = key_ok.shape
        sdt = score_dtype(dtype)
        tok = torch.zeros(B, S, dtype=sdt, device=key_ok.device).masked_fill_(~key_ok, MASKED)
        if K == 0:
            return tok[:, None, :]
        slots = torch.full((K + S, K), MASKED, dtype=sdt, device=key_ok.device)
        slots[K:] = 0.0
        slots[:K].fill_diagonal_(0.0)
        return torch.cat([slots[None].expand(B, -1, -1), tok[:, None, :].expand(-1, K + S, -1)], 2)

    def encode(self, tokens: torch.Tensor, state: MemoryState, attention_mask: Optional[torch.Tensor] = None,
               reset: Optional[torch.Tensor] = None, detach_state: bool = True) -> Tuple[EncoderOutput, MemoryState]:
        """One time step of the encoder.  ``tokens`` [B, S] int64 (the same on every tensor-parallel rank);
        ``attention_mask`` [B, S] (1/True = a real token; default ``tokens != pad_token_id``); ``reset`` bool [B]:
        rows whose memory is forgotten before this step (memformers' ``memory_resets``: ``m_0 = LN(b_mem)``).
        Returns (EncoderOutput, the state holding ``M_{t+1}``; cut from the graph unless ``detach_state=False``,
        with which a later step's loss backpropagates into this one).  Raises ValueError on shapes that disagree."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [batch, length], got shape {tuple(tokens.shape)}")
        B, S = tokens.shape
        self.check_state(state, B)
        cfg = self.cfg
        if attention_mask is None:
            key_ok = tokens != cfg.pad_token_id
        else:
            if tuple(attention_mask.shape) != (B, S):
                raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != tokens shape {(B, S)}")
            key_ok = attention_mask.to(tokens.device).bool()
        x = self.encoder.embed(self.embed_tokens(tokens, "encoder"))
        x = dropout(x, cfg.dropout, self.training)
        K = self.num_slots
        m = m0 = None
        if K:
            mem = state[STATE_KEY].to(x.dtype)
            if reset is not None:
                reset = torch.as_tensor(reset, device=tokens.device).bool()
                if reset.shape != (B,):
                    raise ValueError(f"reset must be bool [batch] ({B},), got shape {tuple(reset.shape)}")
                mem = mem * (~reset).to(x.dtype)[:, None, None]
            m = m0 = self.encoder.memory_layer_norm(mem + self.encoder.memory_bias.to(x.dtype))
        mask = self._encoder_mask(key_ok, K, x.dtype)
        for layer in self.encoder.layers:
            if K:
                x, m = self._run_layer(lambda a, b, layer=layer: layer(a, b, mask), x, m)
            else:
                x, _ = self._run_layer(lambda a, layer=layer: layer(a, None, mask), x)
        if K:
            gate = self.encoder.memory_gate_net(m)
            new_mem = torch.lerp(m0, m, gate.to(m.dtype))                  # a m_L + (1 - a) m_0
            hidden = torch.cat([new_mem, x], 1)
            keys = torch.cat([key_ok.new_ones(B, K), key_ok], 1)
        else:
            new_mem = x.new_zeros(B, 0, cfg.d_model)
            hidden, keys = x, key_ok
        kept = new_mem.detach() if detach_state else new_mem
        new_state = state.replace(**{STATE_KEY: kept.to(state[STATE_KEY].dtype) if detach_state else kept})
        return EncoderOutput(hidden, keys, new_mem), new_state

    def _cross_mask(self, enc: EncoderOutput) -> torch.Tensor:
        sdt = score_dtype(enc.hidden.dtype)
        m = torch.zeros(enc.mask.shape, dtype=sdt, device=enc.mask.device).masked_fill_(~enc.mask, MASKED)
        return m[:, None, :]

    def decode(self, decoder_input: torch.Tensor, enc: EncoderOutput,
               cache: Optional[DecoderCache] = None) -> torch.Tensor:
        """Decoder hidden states [B, T, d] for ``decoder_input`` [B, T] int64 (positions from ``cache.length``, which
        it advances by T, with a cache; else from 0) over the encoder output."""
        B, T = decoder_input.shape
        start = cache.length if cache is not None else 0
        y = self.decoder.embed(self.embed_tokens(decoder_input, "decoder"), start)
        y = dropout(y, self.cfg.dropout, self.training)
        causal = None
        if T > 1:
            i = torch.arange(T, device=y.device)[:, None] + start
            j = torch.arange(start + T, device=y.device)[None, :]
            causal = torch.zeros(T, start + T, dtype=score_dtype(y.dtype), device=y.device).masked_fill_(j > i, MASKED)
        if cache is None:
            cross_mask = self._cross_mask(enc)
            for layer in self.decoder.layers:
                def fn(a, h, layer=layer):
                    k, v = layer.encoder_attn.keys_values(h)
                    return layer(a, k, v, causal, cross_mask)[0]
                y = self._run_layer(fn, y, enc.hidden)
            return y
        for i, layer in enumerate(self.decoder.layers):
            k, v = cache.cross[i]
            y, cache.past[i] = layer(y, k, v, causal, cache.cross_mask, cache.past[i])
        cache.length += T
        return y

    def new_cache(self, enc: EncoderOutput) -> DecoderCache:
        """A decoding cache for the encoder output (its cross-attention keys and values, once)."""
        return DecoderCache([layer.encoder_attn.keys_values(enc.hidden) for layer in self.decoder.layers],
                            self._cross_mask(enc))

    def local_logits(self, h: torch.Tensor) -> torch.Tensor:
        """This rank's vocabulary columns of ``h W_out^T + final_logits_bias`` for ``h`` [..., d] (``W_out`` the token
        table, or ``lm_head`` when untied), in fp32 (fp64 for fp64 weights), padded rows -inf."""
        w = self.token_table("output").weight
        x = copy_to_tensor_model_parallel_region(h) if parallel.tp_world_size() > 1 else h
        out = F.linear(x, w, self.final_logits_bias.to(w.dtype))
        out = out.to(score_dtype(out.dtype))
        return out.masked_fill(self.vocab_pad, float("-inf")) if self.has_vocab_pad else out

    def log_probs(self, h: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary log-probabilities [..., V] for ``h`` [..., d] (gathered under TP; no gradient)."""
        with torch.no_grad():
            lp = _log_softmax(self.local_logits(h))
            if parallel.tp_world_size() > 1:
                lp = ShardSpec(lp.dim() - 1, (self.cfg.vocab_size,)).join(parallel.all_gather(lp))
            return lp[..., :self.cfg.vocab_size]

    def shift_right(self, targets: torch.Tensor) -> torch.Tensor:
        """BART's decoder input for ``targets`` [B, T]: ``[decoder_start, targets[:, :-1]]`` with ignored (negative)
        targets replaced by the pad token."""
        out = targets.new_full(targets.shape, self.cfg.pad_token_id)
        out[:, 1:] = targets[:, :-1]
        out[:, 0] = self.cfg.decoder_start_token_id
        return out.masked_fill(out < 0, self.cfg.pad_token_id)

    # -- forward --------------------------------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, state: MemoryState, targets: Optional[torch.Tensor] = None,
                decoder_input: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                reset: Optional[torch.Tensor] = None, detach_state: bool = True, return_logits: bool = False):
        """One time step: encode ``tokens`` (the source [B, S]) with the memory ``state``, decode
        ``decoder_input`` [B, T] (default ``shift_right(targets)``) and score ``targets`` [B, T] (negative entries
        are ignored: nll 0).  Returns (Seq2SeqOutput, new_state); see ``encode`` for ``attention_mask``, ``reset``
        and ``detach_state``.  Raises ValueError when neither targets nor decoder_input is given, or on shapes
        that disagree."""
        if decoder_input is None:
            if targets is None:
                raise ValueError("give targets (the decoder input is then targets shifted right) or decoder_input")
            decoder_input = self.shift_right(targets)
        if targets is not None and targets.shape != decoder_input.shape:
            raise ValueError(f"targets shape {tuple(targets.shape)} != decoder_input shape "
                             f"{tuple(decoder_input.shape)}")
        enc, new_state = self.encode(tokens, state, attention_mask, reset, detach_state)
        h = self.decode(decoder_input, enc)
        nll = None
        if targets is not None:
            B, T = targets.shape
            logits = self.local_logits(h.reshape(B * T, -1))
            ignore = targets.reshape(-1) < 0
            nll = vocab_parallel_cross_entropy(logits, targets.reshape(-1).clamp(min=0))
            nll = nll.masked_fill(ignore, 0.0).view(B, T)
        lp = self.log_probs(h) if return_logits else None
        return Seq2SeqOutput(nll=nll, logits=lp, aux_loss=None, encoder=enc), new_state

    # -- generation -----------------------------------------------------------------------------------------
    def generate(self, enc: EncoderOutput, **kwargs) -> torch.Tensor:
        """Token ids [B * num_return_sequences, L] decoded from the encoder output (starting with
        ``decoder_start_token_id``); greedy, sampling (``do_sample``, ``temperature``, ``top_k``, ``top_p``) or beam
        search (``num_beams`` > 1, ``length_penalty``, ``early_stopping``), with Hugging Face's semantics; see
        ``generate.generate`` for every option."""
        from pretrain.model.membart.generate import generate
        return generate(self, enc, **kwargs)

    # -- sharding -------------------------------------------------------------------------------------------
    def sharding_units(self) -> List[Tuple[nn.Module, List[nn.Parameter]]]:
        """(module, extra parameters) whose parameters a sharded engine (ZeRO-3) gathers as a whole for the module's
        forward: each layer (its projections are read directly), and the model itself with every other parameter
        (embeddings, positions, the memory's bias, norm and gate, the output layer: read during the whole step)."""
        units = [(layer, []) for layer in self.encoder.layers] + [(layer, []) for layer in self.decoder.layers]
        in_layers = {id(p) for layer, _ in units for p in layer.parameters()}
        rest = [p for p in self.parameters() if id(p) not in in_layers]
        return units + [(self, rest)]

    # -- cost -----------------------------------------------------------------------------------------------
    def flops(self, batch_size: int, tgt_len: Optional[int] = None, mem_len: Optional[int] = None,
              source_len: Optional[int] = None) -> int:
        """Analytic forward FLOPs (2 per multiply-add of the matrix products) of one time step: ``source_len``
        encoder positions (default ``cfg.max_source_len``) with K slots, ``tgt_len`` decoder positions (default
        ``cfg.max_source_len``), the output layer over the whole vocabulary.  ``mem_len`` is ignored (interface of
        the decoder LMs)."""
        cfg = self.cfg
        B, d, K, V = batch_size, cfg.d_model, self.num_slots, cfg.vocab_size
        S = cfg.max_source_len if source_len is None else source_len
        T = cfg.max_source_len if tgt_len is None else tgt_len
        R = K + S
        enc = 2 * B * R * d * 3 * d                   # token and slot QKV
        enc += 2 * 2 * B * R * R * d                  # scores and p v over [slots ; tokens]
        enc += 2 * B * R * d * d                      # output projections
        enc += 2 * 2 * B * R * d * cfg.encoder_ffn_dim
        total = cfg.encoder_layers * enc
        total += 2 * B * K * (d * d + d)              # update gate
        dec = 2 * B * T * d * 3 * d + 2 * 2 * B * T * T * d + 2 * B * T * d * d          # self-attention
        dec += 2 * B * T * d * d + 2 * B * R * d * 2 * d + 2 * 2 * B * T * R * d + 2 * B * T * d * d   # cross
        dec += 2 * 2 * B * T * d * cfg.decoder_ffn_dim
        total += cfg.decoder_layers * dec
        total += 2 * B * T * d * V                    # output layer
        return int(total)


def build_membart(cfg: MemBartConfig, device: Optional[torch.device] = None) -> MemBart:
    """The model for this rank's tensor-parallel shard (``parallel.initialize`` first), on ``device``."""
    model = MemBart(cfg)
    return model.to(device) if device is not None else model
