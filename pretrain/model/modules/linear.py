"""Tensor-parallel linear layers as the mechanisms use them.

The parameters live in megatron-core's ``ColumnParallelLinear`` / ``RowParallelLinear`` modules (which define
their shapes, sharding and tensor-parallel attributes).  Their products are computed by ``column_linear`` /
``row_linear`` below, with megatron-core's region mappings for the communication: the same arithmetic as the
modules' own forward (a column-parallel layer all-reduces its input gradient, a row-parallel layer all-reduces
its output before the bias), but with the bias fused into the product and no autograd function of its own at
tensor-parallel size 1, and with the freedom to use a slice of the weight (XL needs queries for the current rows
only).  ``head_param`` registers a parameter with a head dimension (split across ranks).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatron.core.tensor_parallel import (ColumnParallelLinear, RowParallelLinear,
                                           copy_to_tensor_model_parallel_region,
                                           reduce_from_tensor_model_parallel_region)

from pretrain.model import parallel
from pretrain.model.parallel import ShardSpec
from pretrain.model.weights import describe


def _no_init(_):
    """Layers are initialised by the model (weights.init_weights), not by megatron-core."""


def column_linear(x: torch.Tensor, layer: ColumnParallelLinear, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x`` (replicated) -> this rank's output columns of ``layer`` (gather_output=False semantics), with
    ``weight`` in place of the layer's own (a tied or rescaled one) if given."""
    if layer.tp_size > 1:
        x = copy_to_tensor_model_parallel_region(x)
    return F.linear(x, layer.weight if weight is None else weight, layer.bias)


def row_linear(x: torch.Tensor, layer: RowParallelLinear, scale: float = 1.0) -> torch.Tensor:
    """This rank's input columns -> the full output of ``layer`` (all-reduced, then the bias), with the
    product (not the bias) multiplied by ``scale`` (applied to the weight: the smaller tensor)."""
    w = layer.weight if scale == 1.0 else layer.weight * scale
    if layer.tp_size == 1:
        return F.linear(x, w, layer.bias)
    y = reduce_from_tensor_model_parallel_region(F.linear(x, w))
    return y if layer.bias is None else y + layer.bias


def column_parallel(d_in: int, d_out: int, mp, bias: bool, **kw) -> ColumnParallelLinear:
    layer = ColumnParallelLinear(d_in, d_out, config=mp, init_method=_no_init, bias=bias, gather_output=False,
                                 **kw)
    layer.tp_size = parallel.tp_world_size()
    return layer


def row_parallel(d_in: int, d_out: int, mp, bias: bool) -> RowParallelLinear:
    layer = RowParallelLinear(d_in, d_out, config=mp, init_method=_no_init, bias=bias, input_is_parallel=True,
                              skip_bias_add=False)
    layer.tp_size = parallel.tp_world_size()
    return layer


def head_param(module: nn.Module, name: str, n_head_full: int, shape_tail, init: str, head_dim: int = 0):
    """A parameter with a head dimension (split across tensor-parallel ranks), registered and described."""
    tp = parallel.tp_world_size()
    shape = list(shape_tail)
    shape.insert(head_dim, n_head_full // tp)
    module.register_parameter(name, nn.Parameter(torch.empty(shape)))
    describe(module, name, init, ShardSpec(head_dim, (n_head_full,)))


def replicated_linear(d_in: int, d_out: int) -> nn.Linear:
    """A plain ``nn.Linear(d_in, d_out)`` with bias, replicated under tensor parallelism (small gates acting on
    d_model vectors), described for the model's init: weight ``weight`` (normal init_std), bias zeros."""
    lin = nn.Linear(d_in, d_out)
    describe(lin, "weight", "weight")
    describe(lin, "bias", "zeros")
    return lin
