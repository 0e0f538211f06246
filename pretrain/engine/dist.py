"""Process-group set-up and teardown for every way the trainer is launched.

* ``deepspeed`` launcher and ``torchrun``: RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT are set.
* Slurm with one task per GPU (``srun python pretrain/train.py ...``): SLURM_PROCID / SLURM_STEP_NUM_TASKS /
  SLURM_LOCALID are mapped to the variables above (MASTER_ADDR from the first host of the step's node list
  unless set; MASTER_PORT from the job id unless set).
* A plain ``python pretrain/train.py``: a one-process group on a free local port.

Backend: NCCL when CUDA is available, gloo otherwise.  ``teardown()`` is the exit recipe that avoids
gloo's abort-at-exit: barrier, drop references, collect garbage, destroy the group.

Shared memory.  On CPUs, when every rank runs on one machine, DeepSpeed's communication layer creates one 66 MB
POSIX shared-memory buffer per rank for its low-latency all-reduce (``/dev/shm/deepspeed_allreduce_buffer_<uid>_
<MASTER_ADDR>_<MASTER_PORT>_<rank>``, DeepSpeed's ``csrc/cpu/comm/shm.cpp``) and never removes it, so every run
left its buffers behind.  Each rank maps every rank's buffer during ``init_distributed``; after a barrier no rank
opens one again, so ``initialize`` removes this rank's name right away (``shm_unlink``: the mappings stay valid
until the process exits and the kernel frees the memory then).  Nothing is left in ``/dev/shm`` however the run
ends, whatever the launcher.
"""
from __future__ import annotations

import gc
import random
import os
import re
import socket
from dataclasses import dataclass
from typing import Tuple

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device


_ISSUED_PORTS: set = set()


def _ephemeral_range() -> Tuple[int, int]:
    """The kernel's range for local ports of outgoing connections and ``bind(0)`` (Linux), else its default."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo, hi = (int(v) for v in f.read().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A TCP port free now, outside the kernel's ephemeral range and never returned before by this process.

    A port from ``bind(0)`` comes from the ephemeral range and is released before the rendezvous listens on it;
    in between, any outgoing connection on the machine (another run's gloo or TCPStore clients) may be given it
    (``EADDRINUSE`` at start-up).  Ports below the range are never handed out by the kernel that way.
    RuntimeError when none is found in 1000 tries."""
    lo, hi = _ephemeral_range()
    ranges = [r for r in ((10000, min(lo, 30000)), (hi + 1, 65535)) if r[1] - r[0] > 1000]
    rng = random.Random()
    for _ in range(1000):
        a, b = rng.choice(ranges)
        port = rng.randrange(a, b)
        if port in _ISSUED_PORTS:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
        _ISSUED_PORTS.add(port)
        return port
    raise RuntimeError(f"no free TCP port found outside the ephemeral range {lo}-{hi}")


def _first_slurm_host(nodelist: str) -> str:
    """First host of a Slurm node list such as ``node[003-005,007],gpu1``."""
    m = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist)
    if not m:
        return nodelist
    base, _, ranges = m.groups()
    if not ranges:
        return base
    first = ranges.split(",")[0].split("-")[0]
    return base + first


def map_slurm_env() -> None:
    """Fill torch.distributed's variables from Slurm's when ``srun`` started this process as one task of a
    multi-task step and no launcher set them.  ``SLURM_STEP_NUM_TASKS`` (set by srun for its step, not in a batch
    script) decides: a plain ``python`` inside an allocation or batch script stays a single process."""
    ntasks = os.environ.get("SLURM_STEP_NUM_TASKS")
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ or ntasks is None or int(ntasks) <= 1:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = ntasks
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    if "MASTER_ADDR" not in os.environ:
        os.environ["MASTER_ADDR"] = _first_slurm_host(os.environ.get("SLURM_STEP_NODELIST")
                                                      or os.environ.get("SLURM_JOB_NODELIST", "127.0.0.1"))
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000)


def initialize(timeout_minutes: float = 30.0) -> DistInfo:
    """Initialise the default process group (through DeepSpeed's comm layer, which DeepSpeed needs)."""
    map_slurm_env()
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available()
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        import datetime

        import deepspeed
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                                   timeout=datetime.timedelta(minutes=timeout_minutes))
        release_shm_buffer(rank)
    return DistInfo(rank, world, local_rank, backend, device)


def shm_buffer_path(rank: int) -> str:
    """The shared-memory file DeepSpeed's CPU all-reduce creates for ``rank`` (see the module docstring)."""
    return (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank}")


def release_shm_buffer(rank: int) -> bool:
    """Remove this rank's DeepSpeed shared-memory name once every rank has mapped every buffer (a barrier);
    returns whether there was one.  The memory stays mapped (and in use) until the process exits."""
    path = shm_buffer_path(rank)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
    try:
        os.remove(path)
    except FileNotFoundError:
        return False
    return True


def all_reduce_max(value: float, group=None) -> float:
    """Largest ``value`` over the group (a float; used for flags and timers)."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64,
                     device="cuda" if dist.get_backend(group) == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return float(t.item())


def all_reduce_sum(values, group=None):
    """Element-wise sum of a list of floats over the group (float64)."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        if dist.get_backend(group) == "nccl":
            t = t.cuda()
        dist.all_reduce(t, group=group)
    return [float(x) for x in t.cpu()]


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def teardown() -> None:
    """Barrier, garbage collection, destroy the group: the clean-exit recipe for gloo."""
    if dist.is_initialized():
        try:
            if dist.get_world_size() > 1:
                dist.barrier()
        finally:
            gc.collect()
            dist.destroy_process_group()
