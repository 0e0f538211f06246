"""The position-wise feed-forward block of every layer (column- then row-parallel)."""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from pretrain.model import parallel
from pretrain.model.dropout import dropout, dropout_add, relu_dropout
from pretrain.model.modules.linear import column_linear, column_parallel, row_linear, row_parallel
from pretrain.model.modules.norm import layer_norm
from pretrain.model.parallel import ShardSpec
from pretrain.model.weights import describe


class FeedForward(nn.Module):
    """Position-wise ReLU FFN with residual and LayerNorm (post-LN: LN(x + FFN(x)); pre-LN:
    x + FFN(LN(x)))."""

    def __init__(self, cfg, mp):
        super().__init__()
        self.fc1 = column_parallel(cfg.d_model, cfg.d_inner, mp, bias=True)
        describe(self.fc1, "weight", "weight", ShardSpec(0, (cfg.d_inner,)))
        describe(self.fc1, "bias", "zeros", ShardSpec(0, (cfg.d_inner,)))
        self.fc2 = row_parallel(cfg.d_inner, cfg.d_model, mp, bias=True)
        describe(self.fc2, "weight", "weight", ShardSpec(1, (cfg.d_inner,)))
        describe(self.fc2, "bias", "zeros")
        self.norm = layer_norm(cfg.d_model)
        self.p = cfg.dropout
        self.pre_lnorm = cfg.pre_lnorm

    def forward(self, x: torch.Tensor, residual=None) -> torch.Tensor:
        """``residual(x, y)``: how the block's output y (after dropout) joins the stream x, instead of x + y
        (a gated residual, ``Mixer.ffn_residual``)."""
        h = column_linear(self.norm(x) if self.pre_lnorm else x, self.fc1)
        with parallel.parallel_region_rng(h.device) if self.p > 0 and self.training else contextlib.nullcontext():
            h, scale = relu_dropout(h, self.p, self.training)
        if residual is None:
            h = dropout_add(x, row_linear(h, self.fc2, scale), self.p, self.training)
        else:
            h = residual(x, dropout(row_linear(h, self.fc2, scale), self.p, self.training))
        return h if self.pre_lnorm else self.norm(h)
