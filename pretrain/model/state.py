"""The memory state: an explicit value passed into and returned by the model.

A ``MemoryState`` is a small set of named tensors with fixed shapes (a ``mem_len`` buffer per entry, plus
``valid``: how many of the last slots of each row hold real positions), together with what the generic
code needs to handle any mechanism's state without knowing it: which dimension of each entry is the batch
(for resets and row selection) and which, if any, is the attention-head dimension (split across
tensor-parallel ranks).  The engine keeps one per gradient-accumulation slot, detaches it (or not, for
backpropagation through several segments), resets rows at document boundaries (``model.reset_state``),
saves it with the checkpoint and reloads it under another tensor-parallel layout (``tp_gather`` /
``tp_split``).
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional

import torch

FORMAT = "memtrain.memory_state/1"


class MemoryState:
    """Named memory tensors of one mechanism (see the mechanism's docs for the entries).

    ``batch_dims[name]``: the batch dimension of entry ``name``; ``head_dims[name]``: its head dimension or
    None (replicated on every tensor-parallel rank).  ``tp_rank`` / ``tp_world``: the layout the head
    dimensions are split for (``tp_world == 1``: full heads).
    """

    def __init__(self, mechanism: str, mem_len: int, tensors: Dict[str, torch.Tensor],
                 batch_dims: Mapping[str, int], head_dims: Mapping[str, Optional[int]],
                 tp_rank: int = 0, tp_world: int = 1):
        missing = set(tensors) ^ set(batch_dims)
        if missing or set(head_dims) != set(tensors):
            raise ValueError(f"state entries and their dims disagree: {sorted(missing)}")
        self.mechanism = mechanism
        self.mem_len = int(mem_len)
        self.tensors = dict(tensors)
        self.batch_dims = dict(batch_dims)
        self.head_dims = dict(head_dims)
        self.tp_rank = int(tp_rank)
        self.tp_world = int(tp_world)

    # -- access ---------------------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def keys(self):
        return self.tensors.keys()

    @property
    def batch_size(self) -> int:
        name, t = next(iter(self.tensors.items()))
        return t.shape[self.batch_dims[name]]

    @property
    def device(self) -> torch.device:
        return next(iter(self.tensors.values())).device

    def replace(self, **tensors: torch.Tensor) -> "MemoryState":
        """A state with the same layout and some entries replaced."""
        unknown = set(tensors) - set(self.tensors)
        if unknown:
            raise KeyError(f"unknown state entries {sorted(unknown)}")
        return MemoryState(self.mechanism, self.mem_len, {**self.tensors, **tensors}, self.batch_dims,
                           self.head_dims, self.tp_rank, self.tp_world)

    def _map(self, fn) -> "MemoryState":
        return MemoryState(self.mechanism, self.mem_len, {k: fn(v) for k, v in self.tensors.items()},
                           self.batch_dims, self.head_dims, self.tp_rank, self.tp_world)

    def detach(self) -> "MemoryState":
        """The same values, cut from the autograd graph (truncated backpropagation)."""
        return self._map(lambda t: t.detach())

    def to(self, device) -> "MemoryState":
        return self._map(lambda t: t.to(device))

    def select_rows(self, rows: torch.Tensor) -> "MemoryState":
        """The state of the rows ``rows`` (a LongTensor of row indices, or a BoolTensor over rows)."""
        if rows.dtype == torch.bool:
            rows = rows.nonzero().squeeze(1)
        rows = rows.to(self.device)
        return MemoryState(self.mechanism, self.mem_len,
                           {k: v.index_select(self.batch_dims[k], rows) for k, v in self.tensors.items()},
                           self.batch_dims, self.head_dims, self.tp_rank, self.tp_world)

    def equal(self, other: "MemoryState", atol: float = 0.0) -> bool:
        if set(self.tensors) != set(other.tensors):
            return False
        return all(torch.allclose(self[k].float(), other[k].float(), atol=atol, rtol=0)
                   if atol else torch.equal(self[k], other[k]) for k in self.tensors)

    # -- saving ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Plain data (tensors, ints, strings) for ``torch.save``."""
        return {"format": FORMAT, "mechanism": self.mechanism, "mem_len": self.mem_len,
                "tp_rank": self.tp_rank, "tp_world": self.tp_world,
                "batch_dims": dict(self.batch_dims), "head_dims": dict(self.head_dims),
                "tensors": {k: v for k, v in self.tensors.items()}}

    @classmethod
    def from_state_dict(cls, d: Mapping) -> "MemoryState":
        if not isinstance(d, Mapping) or d.get("format") != FORMAT:
            got = d.get("format") if isinstance(d, Mapping) else type(d).__name__
            raise ValueError(f"not a memory state (format {got!r}, expected {FORMAT!r})")
        for key in ("mechanism", "mem_len", "tp_rank", "tp_world", "batch_dims", "head_dims", "tensors"):
            if key not in d:
                raise ValueError(f"memory state lacks {key!r}")
        return cls(d["mechanism"], d["mem_len"], dict(d["tensors"]), d["batch_dims"], d["head_dims"],
                   d["tp_rank"], d["tp_world"])

    # -- tensor parallelism ---------------------------------------------------------------------------------
    def tp_split(self, rank: int, world: int) -> "MemoryState":
        """This full-head state's shard for tensor-parallel ``rank`` of ``world`` (no communication)."""
        if self.tp_world != 1:
            raise ValueError(f"tp_split needs a full state, this one is shard {self.tp_rank} of {self.tp_world} "
                             f"(tp_gather it first)")
        out = {}
        for k, t in self.tensors.items():
            hd = self.head_dims[k]
            if hd is None:
                out[k] = t
                continue
            if t.shape[hd] % world:
                raise ValueError(f"state entry {k!r}: {t.shape[hd]} heads do not split over {world} ranks")
            n = t.shape[hd] // world
            out[k] = t.narrow(hd, rank * n, n).contiguous()
        return MemoryState(self.mechanism, self.mem_len, out, self.batch_dims, self.head_dims, rank, world)

    def tp_gather(self) -> "MemoryState":
        """The full-head state, assembled from every tensor-parallel rank (a collective: call it on all ranks
        of the group)."""
        from pretrain.model import parallel
        if self.tp_world == 1:
            return self
        if parallel.tp_world_size() != self.tp_world:
            raise ValueError(f"state is split over {self.tp_world} ranks but the tensor-parallel group has "
                             f"{parallel.tp_world_size()}")
        out = {}
        for k, t in self.tensors.items():
            hd = self.head_dims[k]
            out[k] = t if hd is None else torch.cat(parallel.all_gather(t), hd)
        return MemoryState(self.mechanism, self.mem_len, out, self.batch_dims, self.head_dims, 0, 1)

    def __repr__(self) -> str:
        entries = ", ".join(f"{k}{tuple(v.shape)}:{str(v.dtype).replace('torch.', '')}"
                            for k, v in self.tensors.items())
        tp = f", tp {self.tp_rank}/{self.tp_world}" if self.tp_world > 1 else ""
        return f"MemoryState({self.mechanism}, mem_len={self.mem_len}{tp}: {entries})"
