"""The CUDA path: flash-linear-attention's Triton kernels (``fla.ops.gated_delta_rule.chunk_gated_delta_rule``,
fla-core 0.6) behind our signature.

fla's conventions are ours (layout ``[B, T, H, K]``, log decay g, state ``[B, H, K, V]`` fp32, default scale
K^-1/2), so without resets the call passes straight through.  In-segment resets are mapped onto fla's
variable-length mode: the ``[B, T]`` batch is flattened to one row of B*T tokens cut at every row start and
every reset (``cu_seqlens``); a sequence that starts a row without a reset there gets that row's initial state,
every other sequence a zero state, and each row's final state is that of its last sequence.  Gradients reach
the initial state through the gather (fla's kernels return dh0).

fla's own chunk size (64) is used; our ``chunk_size`` applies to the CPU chunk path only.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

_UNSET = object()
_fn = _UNSET
_why = None


def function() -> Optional[Callable]:
    """fla's ``chunk_gated_delta_rule``, or None when fla-core (with Triton) cannot be imported."""
    global _fn, _why
    if _fn is _UNSET:
        try:
            from fla.ops.gated_delta_rule import chunk_gated_delta_rule
            _fn = chunk_gated_delta_rule
        except Exception as exc:  # ImportError without fla-core or triton; triton raises others without a GPU
            _fn, _why = None, f"fla-core not importable ({type(exc).__name__}: {exc})"
    return _fn


def unsupported(q, k, v, g, beta, initial_state) -> Optional[str]:
    """None when fla's kernel can take these inputs, else why not (for the log and errors)."""
    if function() is None:
        return _why
    if q.device.type != "cuda":
        return f"{q.device.type} tensors (fla's kernels are Triton, CUDA only here)"
    if any(t.dtype == torch.float64 for t in (q, k, v, g, beta, initial_state) if t is not None):
        return "fp64 inputs"
    if not (q.dtype == k.dtype == v.dtype):
        return f"q, k, v of different dtypes ({q.dtype}, {k.dtype}, {v.dtype})"
    return None


def gated_delta_rule(fn: Callable, q, k, v, g, beta, initial_state, output_final_state: bool, scale: float,
                     reset: Optional[torch.Tensor]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Call ``fn`` (fla's ``chunk_gated_delta_rule`` signature) with our contract: see the module docstring."""
    fp32 = lambda t: t.to(torch.promote_types(t.dtype, torch.float32))    # the state in fp32 (or wider)
    h0 = None if initial_state is None else fp32(initial_state)
    if reset is None or not bool(reset.any()):
        o, ht = fn(q, k, v, g, beta, scale=scale, initial_state=h0, output_final_state=output_final_state)
        return o, (fp32(ht) if output_final_state else None)
    B, T, H, K = q.shape
    starts = reset.clone()
    starts[:, 0] = True                                              # every row starts a sequence
    first = starts.reshape(-1).nonzero().squeeze(1)                  # [N] flat positions of sequence starts
    cu_seqlens = torch.cat([first, first.new_tensor([B * T])])
    row = torch.div(first, T, rounding_mode="floor")
    if h0 is not None:
        inherits = (first % T == 0) & ~reset[:, 0][row]              # a row's first sequence, not reset at 0
        h0 = h0[row] * inherits[:, None, None, None].to(h0.dtype)
    flat = lambda x: x.reshape(1, B * T, *x.shape[2:])
    o, ht = fn(flat(q), flat(k), flat(v), flat(g), flat(beta), scale=scale, initial_state=h0,
               output_final_state=output_final_state, cu_seqlens=cu_seqlens)
    o = o.reshape(B, T, *o.shape[2:])
    if not output_final_state:
        return o, None
    last = starts.sum(1).cumsum(0) - 1                               # each row's last sequence
    return o, fp32(ht[last])
