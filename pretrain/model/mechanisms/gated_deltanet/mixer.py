"""Gated DeltaNet layer (attn_type 70, "gdn"): Yang, Kautz & Hatamizadeh, "Gated Delta Networks: Improving Mamba2
with Delta Rule" (ICLR 2025, arXiv 2412.06464), built as flash-linear-attention's ``fla.layers.GatedDeltaNet``
builds it (written here from the paper and that layer's structure; the arithmetic of the rule is in
``pretrain/ops/gated_delta``, the convolution in ``pretrain/ops/short_conv.py``).

H heads (``model.n_head``; H/tp on a tensor-parallel rank), key width K (``gated_deltanet.head_dim``, default
``model.d_head``), value width V = expand_v K.  One segment of N tokens, x the layer input (after the pre-LN
norm with ``pre_lnorm``):

1. q, k [N, H, K], v, r [N, H, V], a, b [N, H] = x W (one fused column-parallel product, split by head);
2. q, k, v = SiLU(causal depthwise conv of width W over time) (``use_short_conv``; else SiLU only), carrying the
   last W - 1 inputs of every channel;
3. q, k = q / |q|, k / |k| (L2 over K, eps 1e-6 inside the root as fla's l2norm);
4. beta = sigmoid(b) (x 2 with ``allow_neg_eigval``); g = -exp(A_log) softplus(a + dt_bias) (Mamba2's decay,
   alpha = exp(g) in (0, 1));
5. the gated delta rule (paper Eq. 10, fla's orientation S in R^{K x V} per head), in fp32:
   S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,  o_t = S_t^T q_t / sqrt(K);
6. o = RMSNorm(o) * w_h * SiLU(r) per head (fla's FusedRMSNormGated), then the row-parallel W_o;
7. out = x + Dropout(W_o o) (pre-LN), or LN(x + Dropout(W_o o)) (post-LN), then the layer's FFN.

State of one layer (this rank's heads, fp32 whatever the training precision): ``S`` [B, H, K, V] and, with
short convolutions, ``conv`` [B, H, 2K + V, W - 1]: the last W - 1 inputs of the q, k and v convolutions of
each head (channels q_h, k_h, v_h in that order).  Both are split by head under tensor parallelism, restart at
document starts inside a segment (``ctx.reset`` goes to both ops), and carry the gradient across segments unless
the trainer detaches the state.  With ``carry_state: false`` every segment starts from zeros.

Parameters (fla's names in brackets): ``proj`` [H(2K + 2V + 2), d] fused column-parallel (q_proj, k_proj,
v_proj, g_proj, a_proj, b_proj), ``q_conv``, ``k_conv`` [H, K, W], ``v_conv`` [H, V, W] (q_conv1d, ... with the
``[D, 1, W]`` weight reshaped per head; no bias as fla's default), ``A_log``, ``dt_bias`` [H], ``o_norm``
[H, V] (fla: one [V] weight shared by the heads; ours is per head so that tensor parallelism needs no
gradient reduction; at init both are ones), ``out`` [d, H V] row-parallel (o_proj).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pretrain.config_base import ConfigError
from pretrain.model import parallel
from pretrain.model.mixer import StateEntry
from pretrain.model.modules.linear import column_linear, column_parallel, head_param
from pretrain.model.modules.recurrent import RecurrentMixer
from pretrain.model.parallel import ShardSpec
from pretrain.model.weights import describe
from pretrain.ops.gated_delta import gated_delta_rule
from pretrain.ops.short_conv import causal_conv1d

L2_EPS = 1e-6                       # fla's l2norm: x / sqrt(sum x^2 + 1e-6)


def init_A_log(shape, cfg, gen):
    """fla / Mamba2: A ~ U(0, 16) per head, A_log = log A."""
    return torch.empty(shape).uniform_(0, 16, generator=gen).log_()


def init_dt_bias(shape, cfg, gen, dt_min=0.001, dt_max=0.1, dt_floor=1e-4):
    """fla / Mamba2: dt log-uniform in [dt_min, dt_max] (floored), dt_bias = softplus^-1(dt)."""
    u = torch.empty(shape).uniform_(0, 1, generator=gen)
    dt = torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=dt_floor)
    return dt + torch.log(-torch.expm1(-dt))


def l2_normalise(t: torch.Tensor) -> torch.Tensor:
    return t * torch.rsqrt((t * t).sum(-1, keepdim=True) + L2_EPS)


def gated_rms_norm(o: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm(o) * weight * SiLU(gate) over the last dimension (fla's FusedRMSNormGated, swish)."""
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + eps) * weight
    return o * F.silu(gate)


class GatedDeltaNetMixer(RecurrentMixer):
    mechanism = "gated_deltanet"

    def __init__(self, cfg, mp, spec, specs):
        super().__init__(cfg, mp, spec, specs)
        sec = self.sec
        tp = parallel.tp_world_size()
        Hf = cfg.n_head
        self.n_head = Hf // tp
        try:
            self.K, self.V = sec.widths(cfg.d_head)
        except ConfigError as e:     # name the dotted field
            raise ConfigError(f"gated_deltanet.{e.field}", str(e).split(": ", 1)[-1]) from None
        K, V, W = self.K, self.V, sec.conv_size
        self.W = W
        sections = (Hf * K, Hf * K, Hf * V, Hf * V, Hf, Hf)        # q, k, v, output gate r, a (decay), b (beta)
        self.proj = column_parallel(cfg.d_model, sum(sections), mp, bias=False)
        describe(self.proj, "weight", "weight", ShardSpec(0, sections))
        if sec.use_short_conv:
            head_param(self, "q_conv", Hf, (K, W), "weight")
            head_param(self, "k_conv", Hf, (K, W), "weight")
            head_param(self, "v_conv", Hf, (V, W), "weight")
        head_param(self, "A_log", Hf, (), init_A_log)
        head_param(self, "dt_bias", Hf, (), init_dt_bias)
        head_param(self, "o_norm", Hf, (V,), "const:1.0")
        self.output_block(Hf * V, mp)

    # -- state ----------------------------------------------------------------------------------------------
    def initial_state(self, batch_size, mem_len, device, dtype):
        sdt = torch.promote_types(dtype, torch.float32)         # fp32 (fp64 for fp64 models)
        H, B = self.n_head, batch_size
        out = {"S": StateEntry(torch.zeros(B, H, self.K, self.V, device=device, dtype=sdt), 0, 1)}
        if self.sec.use_short_conv:
            out["conv"] = StateEntry(torch.zeros(B, H, 2 * self.K + self.V, self.W - 1, device=device, dtype=sdt),
                                     0, 1)
        return out

    # -- one segment ----------------------------------------------------------------------------------------
    def forward(self, x, state, rows, ctx, biases):
        B, N, _ = x.shape
        H, K, V = self.n_head, self.K, self.V
        xin = self.norm(x) if self.pre_lnorm else x
        y = column_linear(xin, self.proj)
        sizes = (H * K, H * K, H * V, H * V, H, H)
        q, k, v, r, a, b = y.split(sizes, dim=-1)
        carry = self.sec.carry_state
        new = {}
        if self.sec.use_short_conv:
            C = 2 * K + V
            qkv = torch.cat([q.reshape(B, N, H, K), k.reshape(B, N, H, K), v.reshape(B, N, H, V)], -1)
            weight = torch.cat([self.q_conv, self.k_conv, self.v_conv], 1).reshape(H * C, self.W)
            c0 = state["conv"].reshape(B, H * C, self.W - 1) if carry else None
            qkv, c_new = causal_conv1d(qkv.reshape(B, N, H * C), weight, None, c0, True, "silu", reset=ctx.reset)
            new["conv"] = c_new.reshape(B, H, C, self.W - 1).to(state["conv"].dtype)
            q, k, v = qkv.reshape(B, N, H, C).split((K, K, V), -1)
        else:
            q, k, v = (F.silu(t) for t in (q.reshape(B, N, H, K), k.reshape(B, N, H, K), v.reshape(B, N, H, V)))
        cdt = torch.promote_types(x.dtype, torch.float32)        # the rule, the gates and the norm in fp32
        q, k = l2_normalise(q.to(cdt)), l2_normalise(k.to(cdt))
        beta = torch.sigmoid(b.to(cdt))
        if self.sec.allow_neg_eigval:
            beta = beta * 2
        g = -self.A_log.to(cdt).exp() * F.softplus(a.to(cdt) + self.dt_bias.to(cdt))          # [B, N, H]
        o, s_new = gated_delta_rule(q, k, v.to(cdt), g, beta, initial_state=state["S"] if carry else None,
                                    output_final_state=True, reset=ctx.reset, impl=self.sec.impl,
                                    chunk_size=self.sec.chunk_size)
        new["S"] = s_new
        o = gated_rms_norm(o, r.reshape(B, N, H, V).to(cdt), self.o_norm.to(cdt), self.sec.norm_eps)
        return self.residual_output(x, o.to(x.dtype).reshape(B, N, H * V), new, rows, ctx)

    def flops(self, batch_size, tgt_len, mem_len):
        cfg = self.cfg
        B, N, H, K, V = batch_size, tgt_len, cfg.n_head, self.K, self.V
        f = 2 * B * N * cfg.d_model * H * (2 * K + 2 * V + 2)                     # fused projection
        if self.sec.use_short_conv:
            f += 2 * B * N * H * (2 * K + V) * self.W                            # depthwise convolutions
        C = min(self.sec.chunk_size, N)
        # chunkwise rule per head: q k^T and k k^T inside chunks (K), their products with values (V), the
        # state reads and writes (q S, k S, k^T u: 3 K V per token)
        f += B * H * (2 * N * C * K * 2 + 2 * N * C * V * 2 + 2 * N * K * V * 3)
        f += 2 * B * N * H * V * cfg.d_model                                     # output projection
        return f
