"""The memory states of the gradient-accumulation slots, as one component.

One optimizer step is ``grad_accum`` micro-batches.  Micro-batch ``slot`` of step ``t`` continues the text of
micro-batch ``slot`` of step ``t - 1`` (the ordered stream guarantees it, ``data_tools/streams.py``), so each
slot carries its own memory state (``pretrain.model.MemoryState``) from step to step.  ``MemorySlots`` owns
everything that happens to those states:

* created fresh (``model.init_state``) for ``micro_batch`` rows;
* reset per row where a row starts new text (``data.reset_memory``; ``model.reset_state``);
* unrolled over ``k = train.bptt_segments`` segments with gradients flowing through the memory, and detached
  after the last one (truncated backpropagation between micro-batches);
* committed after a micro-batch whose loss is finite on every rank; on a non-finite step every slot goes back to
  the state it had before the step (``begin_step`` / ``end_step``), so a skipped step leaves no trace;
* saved and loaded with the checkpoint (``state_dict`` / ``load_state_dict``, torchtitan's ``Stateful``
  protocol), including a tensor-parallel layout change (shards joined by head and re-split) and a reset when
  the layout cannot be mapped.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from pretrain.engine.batch import Batch, call_model

FORMAT = "memtrain.memory_slots/1"


class MemoryLayoutError(ValueError):
    """Saved memory states that do not fit this run (other mechanism, memory length, rows or slot count)."""


class MemorySlots:
    """``num_slots`` memory states of ``rows`` rows each, for ``model`` on ``device``.

    ``reset_memory``: reset a row's state before a batch whose ``reset`` flag is set for that row.
    ``bptt_segments``: segments per micro-batch; gradients flow through the memory between them.
    """

    def __init__(self, model, num_slots: int, rows: int, device: torch.device, reset_memory: bool = False,
                 bptt_segments: int = 1):
        if num_slots < 1 or rows < 1 or bptt_segments < 1:
            raise ValueError(f"num_slots, rows and bptt_segments must be >= 1, got {num_slots}, {rows}, "
                             f"{bptt_segments}")
        self.model = model
        self.num_slots, self.rows, self.device = int(num_slots), int(rows), device
        self.reset_memory = bool(reset_memory)
        self.k = int(bptt_segments)
        self.states = [self._fresh() for _ in range(self.num_slots)]
        self._pending: Dict[int, Any] = {}
        self._backup: Optional[List[Any]] = None

    def _fresh(self):
        return self.model.init_state(self.rows, device=self.device)

    def __len__(self) -> int:
        return self.num_slots

    def __getitem__(self, slot: int):
        return self.states[slot]

    def reset_all(self) -> None:
        """Every slot back to the initial (empty) memory."""
        self.states = [self._fresh() for _ in range(self.num_slots)]
        self._pending.clear()

    # ------------------------------------------------------------------------------------------------ a step
    def begin_step(self) -> None:
        """Remember every slot's state: ``end_step(False)`` returns to it."""
        self._backup = list(self.states)
        self._pending.clear()

    def unroll(self, slot: int, batch: Batch, forward: Callable, **kwargs) -> List[Tuple[Batch, Any]]:
        """Run the ``k`` segments of ``batch`` through ``forward`` (the model or its DeepSpeed engine) starting
        from slot ``slot``'s memory: with ``reset_memory`` the model resets each row's memory where a document
        starts (``batch.doc_starts``, the model's ``reset`` input: at that position, also inside a segment), each
        segment reads the memory the previous one left, the memory stays in the autograd graph between segments
        and is detached after the last.  Returns ``[(segment, output), ...]``; the final
        state waits for ``commit(slot)``."""
        state = self.states[slot]
        if self.reset_memory and batch.doc_starts is None and bool(batch.reset.any()):
            state = self.model.reset_state(state, batch.reset)   # (a batch built without document starts)
        outs = []
        for j, seg in enumerate(batch.segments(self.k)):
            out, state = call_model(forward, state, seg, detach_state=(j == self.k - 1), **kwargs)
            outs.append((seg, out))
        self._pending[slot] = state
        return outs

    def replay_forward(self, slot: int, batch: Batch, forward: Callable, **kwargs) -> "Replay":
        """Memory replay backpropagation (MRBP; Wu et al., MemBART, arXiv 2209.07634 §3.3, qywu/memformers'
        ``train_iteration_efficient``): backpropagation through the ``k`` segments at the activation memory of
        one.  This first pass runs the ``k`` segments without a graph, keeping only the state entering each and
        the random generators' states before it (dropout is replayed identically); the returned ``Replay``
        recomputes the segments one at a time, last first, in ``backward``.  Outputs and the final state are as
        ``unroll``'s (the state waits for ``commit(slot)``)."""
        from pretrain.engine.checkpoint import rng_state
        state = self.states[slot]
        if self.reset_memory and batch.doc_starts is None and bool(batch.reset.any()):
            state = self.model.reset_state(state, batch.reset)
        segs, entering, rngs, outs = batch.segments(self.k), [], [], []
        with torch.no_grad():
            for seg in segs:
                entering.append(state)
                rngs.append(rng_state())
                out, state = call_model(forward, state, seg, detach_state=True, **kwargs)
                outs.append((seg, out))
        self._pending[slot] = state
        return Replay(segs, entering, rngs, rng_state(), forward, outs, kwargs)

    def commit(self, slot: int) -> None:
        """Slot ``slot`` moves on to the state its last ``unroll`` produced (detached)."""
        self.states[slot] = self._pending.pop(slot).detach()

    def end_step(self, finite: bool) -> None:
        """Close the step: a non-finite step (skipped update) puts every slot back where ``begin_step`` found it."""
        if not finite and self._backup is not None:
            self.states = list(self._backup)
        self._backup = None
        self._pending.clear()

    def all_finite(self) -> bool:
        """Whether every floating-point entry of every slot is finite (this rank)."""
        for st in self.states:
            for k in st.keys():
                t = st[k]
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    return False
        return True

    # ------------------------------------------------------------------------------------------------ saving
    def state_dict(self) -> Dict[str, Any]:
        """``{"format", "slots": [MemoryState.state_dict(), ...]}``: this rank's slots (its tensor-parallel shard
        of the heads), plain data for ``torch.save``."""
        return {"format": FORMAT, "slots": [s.state_dict() for s in self.states]}

    def load_state_dict(self, sd: Any) -> None:
        """Restore the slots saved by ``state_dict`` (a list of ``MemoryState`` dicts is accepted too).

        ``sd`` may also be a list of such dicts, one per tensor-parallel rank of the saving run (in rank order):
        the shards are joined by head and re-split for this rank, which is how a run resumes under another
        tensor-parallel size.  Entries take this run's dtypes (a resume in another precision).  Raises ``MemoryLayoutError`` (a ValueError) naming what differs when the states
        cannot be used here: another mechanism, memory length, number of rows or of slots."""
        from pretrain.model import MemoryState, parallel
        shards = sd if isinstance(sd, list) and sd and _is_slots_dict(sd[0]) else [sd]
        per_shard = [_slot_dicts(s) for s in shards]
        counts = {len(p) for p in per_shard}
        if counts != {self.num_slots}:
            raise MemoryLayoutError(f"{sorted(counts)} saved accumulation slot(s), this run has {self.num_slots}")
        rank, world = parallel.tp_rank(), parallel.tp_world_size()
        fresh = self.states[0]
        out = []
        for slot in range(self.num_slots):
            parts = [MemoryState.from_state_dict(p[slot]) for p in per_shard]
            st = parts[0] if len(parts) == 1 else join_tp_shards(parts)
            if st.mechanism != fresh.mechanism:
                raise MemoryLayoutError(f"saved for mechanism {st.mechanism!r}, the model uses {fresh.mechanism!r}")
            if st.mem_len != fresh.mem_len:
                raise MemoryLayoutError(f"saved with mem_len {st.mem_len}, this run has {fresh.mem_len}")
            if st.batch_size != self.rows:
                raise MemoryLayoutError(f"saved with {st.batch_size} rows per slot, this run has {self.rows}")
            if set(st.keys()) != set(fresh.keys()):
                raise MemoryLayoutError(f"saved entries {sorted(st.keys())}, the model has {sorted(fresh.keys())}")
            if (st.tp_world, st.tp_rank) != (world, rank):
                if st.tp_world != 1:
                    raise MemoryLayoutError(f"saved as head shard {st.tp_rank} of {st.tp_world}; this rank is "
                                            f"shard {rank} of {world} (pass every shard to re-split)")
                st = st.tp_split(rank, world)
            for k in st.keys():
                if tuple(st[k].shape) != tuple(fresh[k].shape):
                    raise MemoryLayoutError(f"entry {k!r} has shape {tuple(st[k].shape)}, this run's is "
                                            f"{tuple(fresh[k].shape)}")
            # another precision (a bf16 run resumed in fp32 or back): each entry in this run's dtype for it
            st = st.replace(**{k: st[k].to(device=self.device, dtype=fresh[k].dtype) for k in st.keys()})
            out.append(st)
        self.states = out
        self._pending.clear()


def join_tp_shards(shards: Sequence[Any]):
    """The full-head ``MemoryState`` from the shards of every tensor-parallel rank (in rank order), without
    communication (the shards come from a checkpoint): entries with a head dimension are concatenated along it,
    replicated entries are taken from the first shard.  Raises MemoryLayoutError for shards that do not form
    one layout."""
    from pretrain.model import MemoryState
    first = shards[0]
    world = len(shards)
    if [s.tp_rank for s in shards] != list(range(world)) or any(s.tp_world != world for s in shards):
        raise MemoryLayoutError(f"shards {[(s.tp_rank, s.tp_world) for s in shards]} are not ranks 0..{world - 1} "
                                f"of {world}")
    tensors = {}
    for k in first.keys():
        hd = first.head_dims[k]
        tensors[k] = first[k] if hd is None else torch.cat([s[k] for s in shards], hd)
    return MemoryState(first.mechanism, first.mem_len, tensors, first.batch_dims, first.head_dims, 0, 1)


def _is_slots_dict(d: Any) -> bool:
    return isinstance(d, Mapping) and d.get("format") == FORMAT or isinstance(d, list)


def _slot_dicts(sd: Any) -> List[Mapping]:
    if isinstance(sd, Mapping) and sd.get("format") == FORMAT:
        return list(sd["slots"])
    if isinstance(sd, list):  # checkpoints written before the format field: a plain list of MemoryState dicts
        return sd
    what = sd.get("format") if isinstance(sd, Mapping) else type(sd).__name__
    raise MemoryLayoutError(f"not a memory-slots state (format {what!r})")


class Replay:
    """The backward half of memory replay backpropagation (``MemorySlots.replay_forward``).

    ``backward(loss_fn, backward_fn)``: for t = k-1 ... 0, restore the random generators of segment t's first
    pass, recompute segment t with a graph from its saved entering state (made a leaf that requires grad, for
    t > 0), and backpropagate ``loss_fn(segment, output) + <state after t, incoming state gradient>`` with
    ``backward_fn(loss, last)`` (``last`` for t = 0, the call that may reduce gradients across ranks).  The
    gradient that reaches the entering state, times the factor ``backward_fn`` returns (the scale it applied to
    the loss: DeepSpeed divides by the accumulation steps and multiplies by a loss scale), is handed to segment
    t - 1.  The parameters' gradients are those of ordinary backpropagation through the k segments (the same
    dropout masks), at the activation memory of one segment, for about one forward pass more.  Afterwards the
    generators are where the first pass left them."""

    def __init__(self, segs, entering, rngs, rng_after, forward, outs, kwargs):
        self.segs, self.entering, self.rngs, self.rng_after = segs, entering, rngs, rng_after
        self.forward, self.outs, self.kwargs = forward, outs, kwargs

    def backward(self, loss_fn: Callable, backward_fn: Callable) -> None:
        from pretrain.engine.checkpoint import set_rng_state
        grad = None
        try:
            for t in reversed(range(len(self.segs))):
                set_rng_state(self.rngs[t])
                st = self.entering[t]
                leaves = {}
                if t > 0:                       # the state's gradient goes on to segment t - 1
                    leaves = {k: st[k].detach().requires_grad_(True) for k in st.keys()
                              if st[k].is_floating_point()}
                    st = st.replace(**leaves)
                out, st_out = call_model(self.forward, st, self.segs[t], detach_state=False, **self.kwargs)
                loss = loss_fn(self.segs[t], out)
                if grad:
                    loss = loss + sum((st_out[k].float() * g).sum() for k, g in grad.items()
                                      if st_out[k].requires_grad)
                factor = backward_fn(loss, t == 0)
                grad = {k: v.grad.float() * factor for k, v in leaves.items() if v.grad is not None}
        finally:
            set_rng_state(self.rng_after)
