"""Short causal depthwise convolution with a carried state (the "short convolution" of Mamba, GatedDeltaNet
and other linear-recurrent layers), with in-segment document resets.

Names and conventions follow the causal-conv1d library (``causal_conv1d_fn(x, weight, bias, initial_states,
return_final_states, activation)``) and flash-linear-attention's ``causal_conv1d`` / ``ShortConvolution``:
``weight [D, W]`` with ``weight[:, W - 1]`` applied to the current token (``nn.Conv1d(D, D, W, groups=D,
padding=W - 1)`` cut to the first T outputs), input in fla's ``[B, T, D]`` layout, and the state of
causal-conv1d: ``[B, D, W - 1]``, the last W - 1 inputs (fla's ``causal_conv1d`` keeps ``[N, D, W]``, one
column more, which the next segment never reads)::

    y[b, t, d] = act(bias[d] + sum_{i=0}^{W-1} weight[d, i] x[b, t - (W - 1) + i, d])

where x at positions -(W - 1) .. -1 is ``initial_state[b, d, :]`` (zeros when None).

The final state is the last W - 1 inputs of [initial_state ; x] along time, so a segment shorter than W - 1
tokens passes the older carried inputs on (and their gradient back to ``initial_state``): carrying the state
through segments of any lengths, T = 1 included, is the same computation as one long segment.

``reset [B, T]`` (a document starts at t): the inputs before t are zeros for the outputs at t and later
(within the window), and the final state holds only inputs of the row's last document (zeros before it).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from pretrain.ops.common import check_reset, check_same_device, shape_str

__all__ = ["causal_conv1d", "ACTIVATIONS"]

ACTIVATIONS = (None, "silu", "swish")


def _check(x, weight, bias, initial_state, reset, activation) -> None:
    op = "causal_conv1d"
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be a floating-point tensor, got "
                            f"{getattr(t, 'dtype', type(t).__name__)}")
    if x.dim() != 3 or min(x.shape) < 1:
        raise ValueError(f"{op}: x has shape {shape_str(x)}, expected [B, T, D] with B, T, D >= 1")
    B, T, D = x.shape
    if weight.dim() != 2 or weight.shape[0] != D or weight.shape[1] < 1:
        raise ValueError(f"{op}: weight has shape {shape_str(weight)}, expected [{D}, W] ([D, W], W >= 1)")
    W = weight.shape[1]
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != (D,)):
        raise ValueError(f"{op}: bias has shape {shape_str(bias)}, expected [{D}] ([D]) or None")
    if initial_state is not None and (not isinstance(initial_state, torch.Tensor)
                                      or initial_state.shape != (B, D, W - 1)):
        raise ValueError(f"{op}: initial_state has shape {shape_str(initial_state)}, expected [{B}, {D}, {W - 1}] "
                         f"([B, D, W - 1]: the last W - 1 inputs of the previous segment) or None")
    check_reset(op, reset, B, T)
    if activation not in ACTIVATIONS:
        raise ValueError(f"{op}: activation={activation!r} is not one of {ACTIVATIONS}")
    check_same_device(op, (x, weight, bias, initial_state, reset))


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                  initial_state: Optional[torch.Tensor] = None, output_final_state: bool = True,
                  activation: Optional[str] = None, *,
                  reset: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Depthwise causal convolution over time with a carried state (module docstring).

    Args:
        x: ``[B, T, D]`` inputs.
        weight: ``[D, W]`` one filter of width W per channel; ``weight[:, -1]`` multiplies the current token.
        bias: ``[D]`` or None.
        initial_state: ``[B, D, W - 1]`` the last W - 1 inputs of the previous segment, oldest first (None:
            zeros).  It receives a gradient.
        output_final_state: return the state for the next segment (else None).
        activation: None, or ``"silu"`` / ``"swish"`` (the same) applied to the output.
        reset: None or bool ``[B, T]``: True at t zeroes the carried inputs before token t.

    Everything is computed in x's dtype (weight, bias and the state are cast to it).

    Returns:
        ``(y, final_state)``: y ``[B, T, D]`` in x's dtype; final_state ``[B, D, W - 1]`` in x's dtype (the
        last W - 1 inputs, including carried ones when T < W - 1) or None.

    Raises:
        TypeError, ValueError: an argument of the wrong type, shape or device, or an unknown activation; the
        message names the argument.
    """
    _check(x, weight, bias, initial_state, reset, activation)
    B, T, D = x.shape
    W = weight.shape[1]
    dt = x.dtype
    weight = weight.to(dt)
    h0 = x.new_zeros(B, D, W - 1) if initial_state is None else initial_state.to(dt)
    ext = torch.cat([h0, x.transpose(1, 2)], dim=2)                  # [B, D, W - 1 + T], oldest first
    if reset is not None and not bool(reset.any()):
        reset = None
    if reset is None:
        y = F.conv1d(ext, weight[:, None, :], None, groups=D)        # [B, D, T]
        final = ext[:, :, T:]
    else:
        # since[b, t] = t - (last reset at or before t), or "infinite" when the row has none up to t: the tap
        # of lag l (weight[:, W - 1 - l]) reads an input of t's document iff l <= since[b, t]
        pos = torch.arange(T, device=x.device).expand(B, T)
        start = torch.where(reset, pos, -(W + 1)).cummax(1).values
        since = pos - start                                          # [B, T]
        y = 0
        for i in range(W):
            lag = W - 1 - i
            keep = (since >= lag).to(dt)[:, None, :]                 # [B, 1, T]
            y = y + weight[:, i, None] * ext[:, :, i:i + T] * keep
        lags = torch.arange(W - 2, -1, -1, device=x.device)        # the final state's columns, oldest first
        final = ext[:, :, T:] * (since[:, -1:, None] >= lags).to(dt)           # [B, 1, W - 1] mask
    if bias is not None:
        y = y + bias.to(dt)[:, None]
    if activation is not None:
        y = F.silu(y)
    return y.transpose(1, 2), (final if output_final_state else None)
