"""Attention shared by the mechanisms: the projections (``AttentionProjections``), the relative-position bias
vectors (``RelBiases``) and the shared-or-own choice of them (``layer_biases``), and the attention arithmetic on
head-major tensors.

Layouts.  Hidden states are batch-first ``[B, L, d]``.  Inside attention, heads come first:
``[H_local, B, L, d_head]``, so that a batch of matrix products over (head, row) is one ``bmm`` and the
position term, which is shared by all rows, is one ``bmm`` per head over all rows at once.  Scores are
``[H_local, B, L_query, L_key]``.

Tensor parallelism: the projections are ``linear.py``'s column- and row-parallel layers.  The QKV projection
keeps this rank's heads laid out as [q; k; v] (full layout: q, k, v blocks of all heads).  Dropout on split
tensors (attention probabilities) draws from the per-rank generator (``parallel.parallel_region_rng``).

Precision: matmuls run in the parameters' dtype; scores are masked and normalised in fp32 (``score_dtype``).
"""
from __future__ import annotations

import math
from typing import Dict, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

from pretrain.model import parallel
from pretrain.model.dropout import dropout, dropout_add
from pretrain.model.modules.linear import column_linear, column_parallel, head_param, row_linear, row_parallel
from pretrain.model.modules.norm import layer_norm
from pretrain.model.parallel import ShardSpec
from pretrain.model.positions import skew
from pretrain.model.weights import describe


class RelBiases(nn.Module):
    """Per-head bias vectors [H, dh] of the relative attention, by name: u (content), v (position), and
    LaMemo's look-ahead u_fut / v_fut.  u, v: normal(init_std) as in XL; the look-ahead ones Xavier-uniform
    (LaMemo's init).  Shared by all layers, or one set per layer with ``untie_r``."""

    def __init__(self, cfg, names):
        super().__init__()
        for name in names:
            head_param(self, name, cfg.n_head, (cfg.d_head,), "xavier" if name.endswith("_fut") else "weight")

    def as_dict(self):
        return dict(self.named_parameters())


def layer_biases(mixer: nn.Module, shared: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The relative-position biases a layer uses: its own ``mixer.biases`` (a ``RelBiases``) with ``untie_r``,
    else ``shared``, the stack's set (each [H_local, d_head])."""
    return mixer.biases.as_dict() if mixer.cfg.untie_r else shared


class AttentionProjections(nn.Module):
    """QKV in (fused, column-parallel), output out (row-parallel), the sub-layer norm and dropout;
    optionally ``r_net``, the projection of position embeddings to per-head position keys (XL's W_R)."""

    def __init__(self, cfg, mp, r_net: bool):
        super().__init__()
        self.tp_size = parallel.tp_world_size()
        self.n_head, self.d_head = cfg.n_head // self.tp_size, cfg.d_head
        hd = cfg.n_head * cfg.d_head
        self.qkv = column_parallel(cfg.d_model, 3 * hd, mp, bias=False)
        describe(self.qkv, "weight", "weight", ShardSpec(0, (hd, hd, hd)))
        self.out = row_parallel(hd, cfg.d_model, mp, bias=False)
        describe(self.out, "weight", "weight", ShardSpec(1, (hd,)))
        if r_net:
            self.r_net = column_parallel(cfg.d_model, hd, mp, bias=False)
            describe(self.r_net, "weight", "weight", ShardSpec(0, (hd,)))
        self.norm = layer_norm(cfg.d_model)
        self.p = cfg.dropout
        self.dropatt = cfg.dropatt
        self.scale = 1.0 / math.sqrt(cfg.d_head)

    def _split(self, y: torch.Tensor, parts: int):
        B, L, _ = y.shape
        return y.view(B, L, parts, self.n_head, self.d_head).permute(2, 3, 0, 1, 4).contiguous().unbind(0)

    def heads(self, c: torch.Tensor, x: Optional[torch.Tensor] = None):
        """Queries scaled by 1/sqrt(d_head) (the scale is applied to the weight, the smaller tensor), keys and
        values, each [H_local, B, L, d_head].  Keys and values for all rows of ``c`` [B, K, d]; queries for
        all of them too (one fused product), or only for ``x`` [B, N, d], the last N rows (a view)."""
        hd = self.n_head * self.d_head
        wq, wkv = self.qkv.weight.split([hd, 2 * hd])
        wq = wq * self.scale
        if x is None:
            return self._split(column_linear(c, self.qkv, torch.cat([wq, wkv])), 3)
        if self.tp_size > 1:
            c, x = copy_to_tensor_model_parallel_region(c), copy_to_tensor_model_parallel_region(x)
        B, N, _ = x.shape
        q = F.linear(x, wq).view(B, N, self.n_head, self.d_head).permute(2, 0, 1, 3)
        k, v = self._split(F.linear(c, wkv), 2)
        return q, k, v

    def position_keys(self, pos_emb: torch.Tensor) -> torch.Tensor:
        """[P, d] position embeddings -> [H_local, P, d_head].  The input is replicated and needs no gradient,
        so no input-gradient all-reduce is needed: a plain product with this rank's shard of W_R."""
        r = F.linear(pos_emb.to(self.r_net.weight.dtype), self.r_net.weight)
        return r.view(-1, self.n_head, self.d_head).transpose(0, 1)

    def project_add(self, residual: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """``residual + dropout(W_o a)`` for per-head vectors ``a`` [H_local, B, L, d_head]."""
        Hl, B, L, dh = a.shape
        o = row_linear(a.permute(1, 2, 0, 3).reshape(B, L, Hl * dh), self.out)
        return dropout_add(residual, o, self.p, self.training)


# ----------------------------------------------------------------------------------------------------------
# attention arithmetic (head-major)

def score_dtype(dtype: torch.dtype) -> torch.dtype:
    """Scores, softmax and log-normalisers: fp32 for low-precision parameters, else the parameters' dtype."""
    return torch.promote_types(dtype, torch.float32)


def biased(q: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
    """q + bias * scale for scaled queries q [H, B, R, dh] (any strides) and a per-head bias [H, dh], so that
    the score is (q_raw + bias)^T k / sqrt(dh); contiguous."""
    return q + (bias * scale)[:, None, None]


def position_scores(q: torch.Tensor, r: torch.Tensor, cols: int, offset: int,
                    bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Relative position term: ``q`` [H, B, R, dh] against position keys ``r`` [H, P, dh] (+ a per-head,
    per-position ``bias`` [H, P]), realigned with ``positions.skew`` to [H, B, R, cols] (a view)."""
    H, B, R, dh = q.shape
    raw = torch.bmm(q.reshape(H, B * R, dh), r.transpose(1, 2))
    if bias is not None:
        raw = raw + bias[:, None, :]
    return skew(raw.view(H, B, R, r.shape[1]), cols, offset)


def masked_scores(pos: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor,
                  mask: torch.Tensor) -> torch.Tensor:
    """Scores ``pos + q @ k^T + mask`` [H, B, R, C] in ``score_dtype`` (``q`` already scaled; ``pos`` None or
    a view).  Low-precision products are summed and masked in fp32."""
    H, B, R, dh = q.shape
    C = k.shape[2]
    q2, kt = q.reshape(H * B, R, dh), k.reshape(H * B, C, dh).transpose(1, 2)
    s = torch.bmm(q2, kt) if pos is None else torch.baddbmm(pos.reshape(H * B, R, C), q2, kt)
    return s.view(H, B, R, C).to(score_dtype(q.dtype)) + mask


class _SoftmaxLse(torch.autograd.Function):
    """softmax(s) and logsumexp(s) over the last dim from one softmax pass: the largest probability is
    that of the largest score, so lse = max(s) - log max(p) (max(p) >= 1 / width: a well-conditioned log;
    two cheap reductions instead of logsumexp's exp pass).  Backward: the softmax backward plus
    dlse/ds = p."""

    @staticmethod
    def forward(ctx, s):
        p = torch.softmax(s, dim=-1)
        lse = s.amax(dim=-1) - p.amax(dim=-1).log()
        ctx.save_for_backward(p)
        return p, lse

    @staticmethod
    def backward(ctx, grad_p, grad_lse):
        (p,) = ctx.saved_tensors
        grad = torch._softmax_backward_data(grad_p, p, -1, p.dtype) if grad_p is not None else None
        if grad_lse is not None:
            grad = p * grad_lse.unsqueeze(-1) if grad is None else grad.addcmul_(p, grad_lse.unsqueeze(-1))
        return grad


def attend(scores: torch.Tensor, v: torch.Tensor, dropatt: float, training: bool, lse: bool = False):
    """softmax(scores) @ v: [H, B, R, C] scores, [H, B, C, dh] values -> [H, B, R, dh]; with ``lse`` also
    the log-normalisers logsumexp(scores) [H, B, R] (in the scores' dtype)."""
    H, B, R, C = scores.shape
    probs, z = _SoftmaxLse.apply(scores) if lse else (torch.softmax(scores, dim=-1), None)
    if dropatt > 0 and training:
        with parallel.parallel_region_rng(probs.device):
            probs = dropout(probs, dropatt, True)
    out = torch.bmm(probs.to(v.dtype).view(H * B, R, C), v.reshape(H * B, C, v.shape[-1]))
    out = out.view(H, B, R, v.shape[-1])
    return (out, z) if lse else out
