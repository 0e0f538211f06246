"""Checkpoints: DeepSpeed's state plus what memory models need to resume exactly.

Layout of a save directory::

    SAVE/
      latest                         tag of the newest complete checkpoint (written last, atomically)
      iter_0000200/
        mp_rank_00_model_states.pt, zero_pp_rank_*_optim_states.pt, ...   (DeepSpeed's files)
        memtrain/rank_dp{D}_tp{T}.pt   one per rank: the memory state of every gradient-accumulation slot
                                       (this rank's tensor-parallel shard), the ordered-stream state, RNG states
        memtrain/meta.json             step, layout, config digest; written after every rank's files exist

A checkpoint counts only once ``meta.json`` and then ``latest`` are written, so a run killed while saving
resumes from the previous one.  After a save the oldest complete checkpoints beyond ``keep_last`` are
deleted, together with incomplete leftovers.  The RNG states (Python, numpy, torch CPU and CUDA, and
megatron-core's model-parallel tracker) are per rank: dropout continues exactly where it stopped.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist

TAG_RE = re.compile(r"^iter_(\d+)$")


def tag_for(step: int) -> str:
    return f"iter_{step:07d}"


def read_latest(load_dir: str) -> Optional[str]:
    """Tag named by ``load_dir/latest``, or None when there is no complete checkpoint."""
    path = os.path.join(load_dir, "latest")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        tag = f.read().strip()
    if not os.path.isfile(os.path.join(load_dir, tag, "memtrain", "meta.json")):
        raise FileNotFoundError(f"{path} names {tag!r}, but {load_dir}/{tag}/memtrain/meta.json is missing "
                                f"(checkpoint incomplete or deleted)")
    return tag


def _atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_torch_save(obj: Any, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------ RNG
def rng_state() -> Dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    tracker = _mp_rng_tracker()
    if tracker is not None:
        state["model_parallel"] = tracker.get_states()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tracker = _mp_rng_tracker()
    if tracker is not None and "model_parallel" in state:
        tracker.set_states(state["model_parallel"])


def _mp_rng_tracker():
    """The generator tracker used for dropout inside tensor-parallel regions (CPU or CUDA)."""
    from pretrain.model import parallel
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return parallel.rng_tracker(device)


# ------------------------------------------------------------------------------------------------ save/load
class CheckpointManager:
    """Saves and restores checkpoints of a DeepSpeed engine plus per-rank memory-model state."""

    def __init__(self, save_dir: Optional[str], keep_last: int, dp_rank: int, tp_rank: int,
                 dp_size: int, tp_size: int, rank: int):
        self.save_dir = save_dir
        self.keep_last = keep_last
        self.dp_rank, self.tp_rank = dp_rank, tp_rank
        self.dp_size, self.tp_size = dp_size, tp_size
        self.rank = rank

    def rank_file(self, root: str, tag: str, dp_rank: Optional[int] = None, tp_rank: Optional[int] = None) -> str:
        dp = self.dp_rank if dp_rank is None else dp_rank
        tp = self.tp_rank if tp_rank is None else tp_rank
        return os.path.join(root, tag, "memtrain", f"rank_dp{dp}_tp{tp}.pt")

    def save(self, engine, step: int, rank_state: Dict[str, Any], meta: Dict[str, Any]) -> str:
        """Write checkpoint ``iter_{step}``; every rank calls this (DeepSpeed's save is collective)."""
        if not self.save_dir:
            raise ValueError("no save directory configured (--save)")
        tag = tag_for(step)
        meta = dict(meta, step=step, tag=tag, dp_size=self.dp_size, tp_size=self.tp_size)
        engine.save_checkpoint(self.save_dir, tag=tag, client_state={"memtrain": meta}, save_latest=False)
        os.makedirs(os.path.join(self.save_dir, tag, "memtrain"), exist_ok=True)
        payload = dict(rank_state, rng=rng_state(), dp_rank=self.dp_rank, tp_rank=self.tp_rank)
        _atomic_torch_save(payload, self.rank_file(self.save_dir, tag))
        if dist.is_initialized():
            dist.barrier()
        if self.rank == 0:
            missing = [self.rank_file(self.save_dir, tag, d, t)
                       for d in range(self.dp_size) for t in range(self.tp_size)
                       if not os.path.isfile(self.rank_file(self.save_dir, tag, d, t))]
            if missing:
                raise RuntimeError(f"checkpoint {tag}: rank files missing after the barrier: {missing[:3]}")
            _atomic_write_text(os.path.join(self.save_dir, tag, "memtrain", "meta.json"),
                               json.dumps(meta, indent=2, sort_keys=True) + "\n")
            _atomic_write_text(os.path.join(self.save_dir, "latest"), tag)
            self._prune(tag)
        if dist.is_initialized():
            dist.barrier()
        return tag

    def _prune(self, newest: str) -> None:
        tags = []
        for name in os.listdir(self.save_dir):
            m = TAG_RE.match(name)
            if m and os.path.isdir(os.path.join(self.save_dir, name)):
                tags.append((int(m.group(1)), name))
        tags.sort()
        complete = [t for _, t in tags if os.path.isfile(os.path.join(self.save_dir, t, "memtrain", "meta.json"))]
        keep = set(complete[-self.keep_last:]) if self.keep_last > 0 else set(complete)
        keep.add(newest)
        newest_step = int(TAG_RE.match(newest).group(1))
        for step, name in tags:
            # incomplete leftovers of older steps go too; a newer incomplete one may be another writer's
            if name not in keep and step <= newest_step:
                shutil.rmtree(os.path.join(self.save_dir, name), ignore_errors=True)

    def load(self, engine, load_dir: str, tag: Optional[str] = None,
             load_optimizer: bool = True) -> Optional[Dict[str, Any]]:
        """Load DeepSpeed state and return {"meta", "rank_state"} (rank_state None if layouts differ)."""
        tag = tag or read_latest(load_dir)
        if tag is None:
            return None
        with open(os.path.join(load_dir, tag, "memtrain", "meta.json")) as f:
            meta = json.load(f)
        if meta["tp_size"] != self.tp_size:
            raise ValueError(
                f"{load_dir}/{tag}: saved with tensor-parallel size {meta['tp_size']}, this run uses "
                f"{self.tp_size}; DeepSpeed's weight files are per tensor-parallel rank. Export the checkpoint "
                f"(pretrain/export.py) and start from the consolidated weights with --init-from instead")
        path, client = engine.load_checkpoint(load_dir, tag=tag, load_optimizer_states=load_optimizer,
                                              load_lr_scheduler_states=load_optimizer)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load {load_dir}/{tag}")
        rank_state = None
        if meta["dp_size"] == self.dp_size:
            rank_state = torch.load(self.rank_file(load_dir, tag), map_location="cpu", weights_only=False)
        return {"meta": meta, "rank_state": rank_state, "tag": tag}

    def load_rank_states(self, load_dir: str, tag: str, dp_rank: int) -> List[Dict[str, Any]]:
        """Every tensor-parallel rank's file of one data-parallel rank (for re-layout of memory states)."""
        out = []
        t = 0
        while os.path.isfile(self.rank_file(load_dir, tag, dp_rank, t)):
            out.append(torch.load(self.rank_file(load_dir, tag, dp_rank, t), map_location="cpu",
                                  weights_only=False))
            t += 1
        return out
