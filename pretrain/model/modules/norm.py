"""Normalisation layers, described for the model's initialisation (``weights.init_weights``)."""
from __future__ import annotations

from torch import nn

from pretrain.model.weights import describe


def layer_norm(d: int) -> nn.LayerNorm:
    """``nn.LayerNorm(d)`` (eps 1e-5) with its weight described as a norm weight (ones) and its bias as zeros."""
    ln = nn.LayerNorm(d)
    describe(ln, "weight", "norm")
    describe(ln, "bias", "zeros")
    return ln
