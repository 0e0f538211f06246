"""Fixed-size memories of past positions (FIFOs), shared by the mechanisms that keep one."""
from __future__ import annotations

import torch


def keep_last(old: torch.Tensor, cur: torch.Tensor, m: int, dim: int = 1) -> torch.Tensor:
    """The last ``m`` positions of [old ; cur] along ``dim`` (old holds exactly ``m`` positions)."""
    n = cur.shape[dim]
    if n >= m:
        return cur.narrow(dim, n - m, m).contiguous()
    return torch.cat([old.narrow(dim, n, m - n).to(cur.dtype), cur], dim)
