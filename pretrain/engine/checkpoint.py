"""Checkpoints: DeepSpeed's state plus what memory models need to resume exactly.

Layout of a save directory::

    SAVE/
      latest                         tag of the newest complete checkpoint (written last, atomically)
      iter_0000200/
        mp_rank_00_model_states.pt, zero_pp_rank_*_optim_states.pt, ...   (DeepSpeed's files)
        memtrain/rank_dp{D}_tp{T}.pt   one per rank: the named per-rank parts (``memory``: the memory state of
                                       every gradient-accumulation slot, this rank's tensor-parallel shard;
                                       ``stream``: the ordered-stream position; ``rng``: the random generators)
        memtrain/meta.json             step, schedule step, layout (data/tensor-parallel sizes, ZeRO stage,
                                       precision, micro-batch, accumulation), model config and parameter shapes,
                                       and the size of every file of the checkpoint; written after every rank's
                                       files exist

The trainer hands the manager its per-rank parts by name, each with ``state_dict()`` / ``load_state_dict()``
(torchtitan's ``Stateful`` pattern); global counters go to ``meta.json``.

A checkpoint counts only once its ``meta.json`` is written (after every rank's files, atomically, recording the size
of each file), so a run killed while saving resumes from the previous one; ``latest`` is written after it.  Each
step is saved at most once by a run (the trainer joins the reasons that meet at a step into one save); a directory
of the same step left by an earlier run (interrupted, corrupt or another run's) is removed before the save writes
anything, so ``meta.json`` describes exactly the files of its own save.  A failed write (a full disk) removes the
half-written directory and raises ``CheckpointError`` naming the file and the cause; ``latest`` keeps naming the
previous checkpoint.  After a save the oldest complete checkpoints beyond ``keep_last`` are deleted (``meta.json``
first), together with incomplete leftovers.

Resuming (``candidates`` / ``verify``): the newest complete checkpoint whose every file has the size ``meta.json``
recorded is used, whatever ``latest`` names (never an older one while a newer complete one is intact); the log says
why a newer one was passed over, and when ``latest`` lags behind.
"""
from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import signal
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

LATEST_BEHIND = "the run stopped before updating latest"   # a note of ``candidates``, not a problem
TAG_RE = re.compile(r"^iter_(\d+)$")
META_FORMAT = 2  # 1: written before meta.json recorded the layout, model and file sizes
DISK_FULL_BYTES = 16 << 20  # less free space than this after a failed write: the disk is full


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names the file and the way out."""


def tag_for(step: int) -> str:
    return f"iter_{step:07d}"


def step_of(tag: str) -> int:
    m = TAG_RE.match(tag)
    return int(m.group(1)) if m else -1


def meta_path(root: str, tag: str) -> str:
    return os.path.join(root, tag, "memtrain", "meta.json")


def read_latest(load_dir: str) -> Optional[str]:
    """The tag ``load_dir/latest`` names (whether or not that checkpoint exists), or None without the file."""
    path = os.path.join(load_dir, "latest")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return f.read().strip()


def complete_tags(load_dir: str) -> List[str]:
    """Tags of the complete checkpoints in ``load_dir`` (``meta.json`` written), newest first."""
    if not os.path.isdir(load_dir):
        return []
    tags = [n for n in os.listdir(load_dir) if TAG_RE.match(n) and os.path.isfile(meta_path(load_dir, n))]
    return sorted(tags, key=step_of, reverse=True)


def has_checkpoint(load_dir: str) -> bool:
    """Whether ``load_dir`` holds a ``latest`` file or any complete checkpoint."""
    return read_latest(load_dir) is not None or bool(complete_tags(load_dir))


def read_meta(load_dir: str, tag: str) -> Dict[str, Any]:
    path = meta_path(load_dir, tag)
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from None
    if not isinstance(meta, dict) or "step" not in meta:
        raise CheckpointError(f"{path}: not a checkpoint description (no 'step')")
    return meta


def candidates(load_dir: str) -> Tuple[List[str], List[str]]:
    """(tags to try in order, notes).  Every complete checkpoint (``meta.json`` written), newest first: an older
    checkpoint is never chosen while a newer complete one exists.  ``latest`` only explains: a ``latest`` naming a
    missing or incomplete checkpoint, or an older one than the newest complete (a run killed after writing a
    checkpoint's ``meta.json`` and before ``latest``), is noted."""
    tags = complete_tags(load_dir)
    notes = []
    named = read_latest(load_dir)
    if named is not None:
        if named not in tags:
            what = "missing" if not os.path.isdir(os.path.join(load_dir, named)) else \
                "incomplete (no memtrain/meta.json)"
            notes.append(f"{load_dir}/latest names {named!r}, which is {what}")
        elif tags[0] != named:
            notes.append(f"{load_dir}/latest names {named!r}, older than the complete {tags[0]} ({LATEST_BEHIND})")
    return tags, notes


def verify(load_dir: str, tag: str, meta: Mapping[str, Any]) -> Optional[str]:
    """Why checkpoint ``tag`` cannot be loaded (a missing file, or one whose size differs from the size recorded
    when it was written: truncated or replaced), or None.  Checkpoints written before sizes were recorded are only
    checked for their per-rank files."""
    root = os.path.join(load_dir, tag)
    files = meta.get("files")
    if not isinstance(files, dict):
        return None
    for rel, size in sorted(files.items()):
        path = os.path.join(root, rel)
        if not os.path.isfile(path):
            return f"{path} is missing"
        actual = os.path.getsize(path)
        if actual != size:
            return f"{path} has {actual} bytes, {size} were written (truncated or corrupt)"
    return None


def _file_sizes(root: str) -> Dict[str, int]:
    """relative path -> size in bytes of every file of a checkpoint directory, but meta.json (which records them)
    and temporary files."""
    out = {}
    skip = os.path.join(root, "memtrain", "meta.json")
    for base, _, names in os.walk(root):
        for n in names:
            if ".tmp" in n or os.path.join(base, n) == skip:
                continue
            p = os.path.join(base, n)
            out[os.path.relpath(p, root)] = os.path.getsize(p)
    return out


def _atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def _atomic_torch_save(obj: Any, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def load_torch_file(path: str) -> Any:
    """``torch.load`` of a file this project wrote; CheckpointError naming the file when it cannot be read."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except Exception as e:  # truncated zip archive, unpickling error, ...
        raise CheckpointError(f"{path}: truncated or corrupt ({type(e).__name__}: {str(e).splitlines()[0][:160]})") \
            from None


# ------------------------------------------------------------------------------------------------ RNG
class RNGState:
    """The random generators of this process as a checkpoint part: Python, numpy, torch CPU and CUDA, and
    megatron-core's model-parallel tracker (dropout inside tensor-parallel regions)."""

    def state_dict(self) -> Dict[str, Any]:
        state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()
        tracker = _mp_rng_tracker()
        if tracker is not None:
            state["model_parallel"] = tracker.get_states()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])
        tracker = _mp_rng_tracker()
        if tracker is not None and "model_parallel" in state:
            tracker.set_states(state["model_parallel"])


def rng_state() -> Dict[str, Any]:
    return RNGState().state_dict()


def set_rng_state(state: Dict[str, Any]) -> None:
    RNGState().load_state_dict(state)


def _mp_rng_tracker():
    """The generator tracker used for dropout inside tensor-parallel regions (CPU or CUDA)."""
    from pretrain.model import parallel
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return parallel.rng_tracker(device)


# ------------------------------------------------------------------------------------------------ save/load
def _agree_any(flag: bool) -> bool:
    """True on every rank when ``flag`` is True on any (a collective)."""
    from pretrain.engine.dist import all_reduce_max
    return all_reduce_max(1.0 if flag else 0.0) > 0.0


def describe_write_error(e: BaseException, directory: str, path_hint: Optional[str]) -> str:
    """The cause of a failed checkpoint write in words: a full disk is named as such (torch's writer reports it as
    an 'unexpected pos' or an iostream error, without the errno), with the file being written."""
    errs = [e]
    while errs[-1].__cause__ is not None or errs[-1].__context__ is not None:
        errs.append(errs[-1].__cause__ or errs[-1].__context__)
        if len(errs) > 8:
            break
    full = any(isinstance(x, OSError) and x.errno in (errno.ENOSPC, errno.EDQUOT) for x in errs)
    free = None
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        pass
    if full or (free is not None and free < DISK_FULL_BYTES):
        cause = f"No space left on device ({free / 2**20:.1f} MiB free)" if free is not None else \
            "No space left on device"
    else:
        cause = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    where = f" while writing {path_hint}" if path_hint else ""
    return f"{cause}{where}"


def _newest_file(root: str) -> Optional[str]:
    best, when = None, -1.0
    for base, _, names in os.walk(root):
        for n in names:
            p = os.path.join(base, n)
            try:
                t = os.path.getmtime(p)
            except OSError:
                continue
            if t >= when:
                best, when = p, t
    return best


class CheckpointManager:
    """Saves and restores checkpoints of a DeepSpeed engine plus the named per-rank parts."""

    def __init__(self, save_dir: Optional[str], keep_last: int, dp_rank: int, tp_rank: int,
                 dp_size: int, tp_size: int, rank: int):
        self.save_dir = save_dir
        self.keep_last = keep_last
        self.dp_rank, self.tp_rank = dp_rank, tp_rank
        self.dp_size, self.tp_size = dp_size, tp_size
        self.rank = rank
        self.kill_at: Optional[str] = None   # fault injection (tests): see _fault

    def rank_file(self, root: str, tag: str, dp_rank: Optional[int] = None, tp_rank: Optional[int] = None) -> str:
        dp = self.dp_rank if dp_rank is None else dp_rank
        tp = self.tp_rank if tp_rank is None else tp_rank
        return os.path.join(root, tag, "memtrain", f"rank_dp{dp}_tp{tp}.pt")

    def save(self, engine, step: int, parts: Mapping[str, Any], meta: Dict[str, Any]) -> str:
        """Write checkpoint ``iter_{step}``: DeepSpeed's files, ``{name: part.state_dict()}`` of this rank, then
        (first rank) ``meta.json`` with the size of every file, then ``latest``.  Every rank calls this (DeepSpeed's
        save is collective).  On a failed write on any rank the checkpoint directory is removed and every rank
        raises CheckpointError naming the file and the cause."""
        if not self.save_dir:
            raise ValueError("no save directory configured (--save)")
        tag = tag_for(step)
        root = os.path.join(self.save_dir, tag)
        meta = dict(meta, format=META_FORMAT, step=step, tag=tag, dp_size=self.dp_size, tp_size=self.tp_size)
        error: Optional[BaseException] = None
        hint: Optional[str] = None
        # a directory of this step already there (a save interrupted in an earlier run, a checkpoint that failed its
        # check and was passed over, another run's): it goes before anything is written, so that the files
        # meta.json records are exactly this save's (the trainer never saves one of its own steps twice)
        if self.rank == 0 and os.path.lexists(root):
            _remove(meta_path(self.save_dir, tag))
            shutil.rmtree(root, ignore_errors=True)
        if dist.is_initialized():
            dist.barrier()
        try:
            self._fault("start")
            engine.save_checkpoint(self.save_dir, tag=tag, client_state={"memtrain": meta}, save_latest=False)
            os.makedirs(os.path.join(root, "memtrain"), exist_ok=True)
            payload = {name: part.state_dict() for name, part in parts.items()}
            payload.update(dp_rank=self.dp_rank, tp_rank=self.tp_rank)
            hint = self.rank_file(self.save_dir, tag)
            _atomic_torch_save(payload, hint)
            hint = None
            self._fault("rank_files")
        except Exception as e:  # a full disk, a permission problem, a vanished file system
            error = e
            if hint is None:
                hint = _newest_file(root)
        failed = _agree_any(error is not None)
        if not failed and self.rank == 0:
            try:
                missing = [self.rank_file(self.save_dir, tag, d, t)
                           for d in range(self.dp_size) for t in range(self.tp_size)
                           if not os.path.isfile(self.rank_file(self.save_dir, tag, d, t))]
                if missing:
                    raise CheckpointError(f"rank files missing after the barrier: {missing[:3]} (is {self.save_dir} "
                                          f"on a file system every node shares?)")
                meta["files"] = _file_sizes(root)
                hint = meta_path(self.save_dir, tag)
                _atomic_write_text(hint, json.dumps(meta, indent=2, sort_keys=True) + "\n")
                self._fault("meta")
                hint = os.path.join(self.save_dir, "latest")
                _atomic_write_text(hint, tag)
                self._fault("latest")
            except Exception as e:
                error = e
        failed = _agree_any(error is not None)
        if failed:
            reason = describe_write_error(error, self.save_dir, hint) if error is not None else \
                "another rank failed to write its files"
            if self.rank == 0:
                self._discard(tag)
            if dist.is_initialized():
                dist.barrier()
            previous = read_latest(self.save_dir)
            raise CheckpointError(
                f"cannot write checkpoint {tag} to {self.save_dir}: {reason}; nothing of it was kept, "
                f"{'latest still names ' + previous if previous else 'no earlier checkpoint exists'}"
                f" (free space or choose another --save, then rerun the same command to resume)")
        if self.rank == 0:
            self._prune(tag)
        if dist.is_initialized():
            dist.barrier()
        return tag

    def _fault(self, point: str) -> None:
        """Fault injection for the tests (``debug.kill_in_save``): this process dies with SIGKILL at ``point`` of
        the save (``start``: nothing written yet; ``rank_files``: DeepSpeed's and this rank's files written;
        ``meta``: meta.json written, ``latest`` not yet; ``latest``: before old checkpoints are pruned)."""
        if self.kill_at == point:
            os.kill(os.getpid(), signal.SIGKILL)

    def _discard(self, tag: str) -> None:
        """Remove a half-written checkpoint (never the one ``latest`` names)."""
        if read_latest(self.save_dir) == tag:
            return
        shutil.rmtree(os.path.join(self.save_dir, tag), ignore_errors=True)

    def _prune(self, newest: str) -> None:
        tags = []
        for name in os.listdir(self.save_dir):
            m = TAG_RE.match(name)
            if m and os.path.isdir(os.path.join(self.save_dir, name)):
                tags.append((int(m.group(1)), name))
        tags.sort()
        complete = [t for _, t in tags if os.path.isfile(meta_path(self.save_dir, t))]
        keep = set(complete[-self.keep_last:]) if self.keep_last > 0 else set(complete)
        keep.add(newest)
        newest_step = step_of(newest)
        for step, name in tags:
            # incomplete leftovers of older steps go too; a newer incomplete one may be another writer's.  meta.json
            # goes first, so that a deletion cut short leaves an incomplete directory, never a complete-looking one
            if name not in keep and step <= newest_step:
                _remove(meta_path(self.save_dir, name))
                shutil.rmtree(os.path.join(self.save_dir, name), ignore_errors=True)

    def load_rank_state(self, load_dir: str, tag: str, dp_rank: Optional[int] = None,
                        tp_rank: Optional[int] = None) -> Dict[str, Any]:
        """One rank's parts of checkpoint ``tag`` (this rank's by default).  CheckpointError naming the file when it
        is missing or unreadable."""
        return load_torch_file(self.rank_file(load_dir, tag, dp_rank, tp_rank))
