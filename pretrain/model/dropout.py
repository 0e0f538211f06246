"""Dropout with a cheaper mask on CPU.

On CUDA this is ``torch.nn.functional.dropout``.  On CPU, torch's dropout draws one Bernoulli sample per
element from the MT19937 generator (``bernoulli_``: about 7 ns per element on the development machines),
which costs more than all the matrix products of a small model.  Here 64 random bits serve four elements:
an element is kept when its 16-bit share is at or above a threshold, so the keep probability is quantised
to 1/65536 (p = 0.1 drops with probability 6554/65536 = 0.100006) and kept elements are scaled by the exact
inverse keep probability (unbiased).  The mask is a plain tensor multiplied in (``x * m``, or fused with a
residual add as ``addcmul``), so autograd needs no custom function.  The bits come from the default CPU
generator: activation checkpointing replays the same masks and the tensor-parallel generator forks apply
unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_LEVELS = 1 << 16


def _cpu_path(x: torch.Tensor, p: float) -> bool:
    return x.device.type == "cpu" and 0 < round(p * _LEVELS) < _LEVELS


def keep_scale(p: float) -> float:
    """1 / keep-probability of the CPU mask."""
    drop = round(p * _LEVELS)
    return _LEVELS / (_LEVELS - drop)


def cpu_keep(x: torch.Tensor, p: float) -> torch.Tensor:
    """Bool mask like ``x``, False with probability p (quantised to 1/65536)."""
    drop = round(p * _LEVELS)
    n = x.numel()
    bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(1 << 63), None).view(torch.int16)[:n]
    return (bits >= drop - (_LEVELS >> 1)).view(x.shape)


def cpu_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """Multiplicative mask like ``x``: 0 with probability p (quantised to 1/65536), else 1 / keep-probability."""
    return torch.where(cpu_keep(x, p), keep_scale(p), 0.0).to(x.dtype)


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    if not training or p == 0.0:
        return x
    if _cpu_path(x, p):
        return x * cpu_mask(x, p)
    return F.dropout(x, p, True)


def dropout_add(x: torch.Tensor, y: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """``x + dropout(y)`` (one fused pass on CPU)."""
    if not training or p == 0.0:
        return x + y
    if _cpu_path(y, p):
        return torch.addcmul(x, y, cpu_mask(y, p))
    return x + F.dropout(y, p, True)


class _MaskedRelu(torch.autograd.Function):
    """relu(x) with dropped elements zeroed (unscaled); the backward needs only the output."""

    @staticmethod
    def forward(ctx, x, keep):
        out = torch.where(keep, x, 0.0).relu_()
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        return torch.ops.aten.threshold_backward(grad, out, 0), None


def relu_dropout(x: torch.Tensor, p: float, training: bool):
    """``dropout(relu(x))`` as (z, scale) with ``dropout(relu(x)) = z * scale``: on CPU the scale is left to
    the caller (to fold into the next product) and relu, mask and their backward take one pass each."""
    if training and p > 0 and _cpu_path(x, p):
        return _MaskedRelu.apply(x, cpu_keep(x, p)), keep_scale(p)
    return dropout(torch.relu(x), p, training), 1.0


class Dropout(nn.Module):
    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
