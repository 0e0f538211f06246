"""Tensor parallelism for the model: megatron-core's parallel state, a CPU compatibility layer, sharding
of weights and states by head / vocabulary, and the ``mpu`` adapter DeepSpeed takes.

The model's layers are megatron-core's ``VocabParallelEmbedding``, ``ColumnParallelLinear`` and
``RowParallelLinear`` and its loss is ``vocab_parallel_cross_entropy``; they work on CPU tensors over gloo as
they are.  What megatron-core takes from CUDA, and what replaces it here (the whole compatibility layer; no
function of torch or megatron-core is patched):

* Dropout inside a tensor-parallel region (attention probabilities, the FFN's inner activations) must draw
  different masks on different tensor-parallel ranks, everything else the same masks.  megatron-core keeps
  a per-rank "model-parallel" CUDA generator state in its ``CudaRNGStatesTracker``; on CPU that tracker
  fails (``torch.cuda.get_rng_state``).  ``CpuRNGStatesTracker`` offers the same interface (add / fork /
  get_states / set_states) on the CPU default generator, and ``rng_tracker(device)`` picks the right one
  for a tensor's device.  With one tensor-parallel rank no fork is needed and none is made.
* Activation recomputation must replay those masks.  Every checkpoint implementation (torch's,
  DeepSpeed's, megatron's on CUDA) restores the default generators; ``replay_rng(fn)`` makes ``fn`` also start
  from the same tensor-parallel tracker states each time it runs, so any of them replays the per-rank
  masks too.
* megatron's gather helpers allocate on ``torch.cuda.current_device()``; ``all_gather`` here is a plain
  (non-differentiable) gather for weights and memory states, on any device.
* Layers are created on the CPU (``use_cpu_initialization``) without megatron's initialisation; the model
  initialises the full weights from its own seed and keeps each rank's shard, so every layout starts from
  the same model (see ``weights.py``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import math
import os
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.model_parallel_config import ModelParallelConfig

MODEL_PARALLEL_RNG = "model-parallel-rng"   # megatron-core's tracker name for per-rank states
_TP_SEED_OFFSET = 2718                       # megatron-core's offset for the per-rank seed


# ----------------------------------------------------------------------------------------------------------
# process groups

def initialize(tp_size: int = 1, *, backend: Optional[str] = None, seed: int = 1234,
               timeout_s: float = 1800.0) -> None:
    """Set up torch.distributed (if not yet) and megatron-core's parallel state with ``tp_size``.

    Launched by torchrun / deepspeed (``RANK`` and ``WORLD_SIZE`` set): joins that world (NCCL when CUDA is
    available, else gloo).  A plain single process: a world of one (gloo, in-memory store).  The world
    size must be a multiple of ``tp_size``; the remaining factor is data parallelism.  ``seed`` seeds the
    default generators (the same on all ranks of a tensor-parallel group) and the per-rank generators for
    dropout in tensor-parallel regions.  Calling it again with the same ``tp_size`` is a no-op.
    """
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            use_cuda = torch.cuda.is_available() and backend in (None, "nccl")
            if use_cuda:
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend or ("nccl" if use_cuda else "gloo"), timeout=timeout)
        else:
            dist.init_process_group(backend or "gloo", store=dist.HashStore(), rank=0, world_size=1,
                                    timeout=timeout)
    world = dist.get_world_size()
    if tp_size < 1 or world % tp_size:
        raise ValueError(f"tensor-parallel size {tp_size} does not divide the world size {world}")
    if ps.model_parallel_is_initialized():
        if ps.get_tensor_model_parallel_world_size() != tp_size:
            raise RuntimeError(f"parallel state already initialised with tensor-parallel size "
                               f"{ps.get_tensor_model_parallel_world_size()}, asked for {tp_size}")
        return
    ps.initialize_model_parallel(tensor_model_parallel_size=tp_size)
    seed_rng(seed)


def is_initialized() -> bool:
    return ps.model_parallel_is_initialized()


def destroy() -> None:
    """Tear down the parallel state and the process group (barrier first; see environment notes)."""
    if dist.is_initialized():
        dist.barrier()
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def _require():
    if not ps.model_parallel_is_initialized():
        raise RuntimeError("parallel state not initialised: call pretrain.model.parallel.initialize(tp_size) "
                           "first")


def tp_rank() -> int:
    _require()
    return ps.get_tensor_model_parallel_rank()


def tp_world_size() -> int:
    _require()
    return ps.get_tensor_model_parallel_world_size()


def tp_group():
    _require()
    return ps.get_tensor_model_parallel_group()


def model_parallel_config(dtype: torch.dtype = torch.float32) -> ModelParallelConfig:
    """The megatron-core layer config: CPU allocation, no megatron initialisation (the model does it)."""
    wanted = dict(tensor_model_parallel_size=tp_world_size(), params_dtype=dtype,
                  use_cpu_initialization=True, perform_initialization=False,
                  gradient_accumulation_fusion=False, sequence_parallel=False)
    known = {f.name for f in dataclasses.fields(ModelParallelConfig)}
    return ModelParallelConfig(**{k: v for k, v in wanted.items() if k in known})


# ----------------------------------------------------------------------------------------------------------
# random number generators

class CpuRNGStatesTracker:
    """megatron-core's ``CudaRNGStatesTracker`` interface on the CPU default generator.

    ``fork(name)`` swaps the named state into the default generator, runs the block, stores the advanced
    state back and restores the default one, so dropout inside the block draws from the named stream.
    """

    def __init__(self):
        self.reset()

    def reset(self):
        self.states_: Dict[str, torch.Tensor] = {}
        self.seeds_ = set()

    def is_initialized(self) -> bool:
        return bool(self.states_)

    def get_states(self) -> Dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: Dict[str, torch.Tensor]) -> None:
        self.states_ = dict(states)

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds_:
            raise ValueError(f"seed {seed} already used")
        if name in self.states_:
            raise ValueError(f"rng state {name} already exists")
        self.seeds_.add(seed)
        orig = torch.get_rng_state()
        torch.default_generator.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(orig)

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG):
        if name not in self.states_:
            raise RuntimeError(f"rng state {name} not added (call pretrain.model.parallel.seed_rng)")
        orig = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)


_CPU_TRACKER = CpuRNGStatesTracker()


def rng_tracker(device: torch.device):
    """The tracker of tensor-parallel generator states for tensors on ``device``: megatron-core's on CUDA,
    ``CpuRNGStatesTracker`` on CPU (both: get_states / set_states to save and restore them)."""
    if device.type == "cuda":
        return tensor_parallel.get_cuda_rng_tracker()
    return _CPU_TRACKER


def seed_rng(seed: int) -> None:
    """Seed the default generators with ``seed`` and the per-rank tensor-parallel ones with
    ``seed + 2718 + tp_rank`` (megatron-core's convention).  Data-parallel ranks should pass different seeds
    if their dropout masks are to differ."""
    torch.manual_seed(seed)
    _CPU_TRACKER.reset()
    _CPU_TRACKER.add(MODEL_PARALLEL_RNG, seed + _TP_SEED_OFFSET + tp_rank())
    if torch.cuda.is_available():
        tensor_parallel.model_parallel_cuda_manual_seed(seed)


def parallel_region_rng(device: torch.device):
    """Context for dropout on a tensor split across tensor-parallel ranks (different masks per rank)."""
    if tp_world_size() == 1:
        return contextlib.nullcontext()
    return rng_tracker(device).fork()


def replay_rng(function):
    """``function`` made to draw the same tensor-parallel dropout masks every time it runs: the first run
    (the forward pass) starts from the trackers' current states and leaves them advanced, as an ordinary
    call would; a later run (a recomputation) starts from those same states and leaves the trackers as it
    found them.  Wrap the function given to an activation-checkpoint implementation with it."""
    trackers = [_CPU_TRACKER]
    if torch.cuda.is_available():
        trackers.append(tensor_parallel.get_cuda_rng_tracker())
    start = [t.get_states() for t in trackers]
    runs = [0]

    def run(*args):
        runs[0] += 1
        if runs[0] == 1:
            return function(*args)
        saved = [t.get_states() for t in trackers]
        for t, s in zip(trackers, start):
            t.set_states(s)
        try:
            return function(*args)
        finally:
            for t, s in zip(trackers, saved):
                t.set_states(s)
    return run


def checkpoint(function, *args):
    """The default activation checkpoint: ``torch.utils.checkpoint`` (non-reentrant; it restores the default
    generators).  The model wraps ``function`` with ``replay_rng``, whichever implementation is used."""
    return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False)


# ----------------------------------------------------------------------------------------------------------
# sharding of weights and states

@dataclasses.dataclass(frozen=True)
class ShardSpec:
    """How a tensor is split across tensor-parallel ranks: along ``dim``, which is a concatenation of
    ``sections`` (full sizes); each section is cut into equal contiguous pieces, the last one zero-padded
    when the size is not a multiple of the world size (vocabularies).  A rank's shard is its piece of every
    section, concatenated.  Example: a fused QKV weight is sections (H*dh, H*dh, H*dh) along dim 0."""
    dim: int
    sections: tuple

    def local_sizes(self, world: int) -> List[int]:
        return [math.ceil(s / world) for s in self.sections]

    def local_size(self, world: int) -> int:
        return sum(self.local_sizes(world))

    def split(self, full: torch.Tensor, rank: int, world: int) -> torch.Tensor:
        """The shard of ``full`` for ``rank``."""
        if full.shape[self.dim] != sum(self.sections):
            raise ValueError(f"size {full.shape[self.dim]} along dim {self.dim}, expected {sum(self.sections)}")
        pieces = []
        for part, n in zip(full.split(list(self.sections), self.dim), self.local_sizes(world)):
            lo = min(rank * n, part.shape[self.dim])
            hi = min(lo + n, part.shape[self.dim])
            piece = part.narrow(self.dim, lo, hi - lo)
            if hi - lo < n:
                pad = list(piece.shape)
                pad[self.dim] = n - (hi - lo)
                piece = torch.cat([piece, piece.new_zeros(pad)], self.dim)
            pieces.append(piece)
        return torch.cat(pieces, self.dim) if len(pieces) > 1 else pieces[0].contiguous()

    def join(self, shards: Sequence[torch.Tensor]) -> torch.Tensor:
        """The full tensor from every rank's shard (in rank order)."""
        world = len(shards)
        sizes = self.local_sizes(world)
        per_rank = [s.split(sizes, self.dim) for s in shards]
        parts = []
        for i, full_size in enumerate(self.sections):
            part = torch.cat([pr[i] for pr in per_rank], self.dim)
            parts.append(part.narrow(self.dim, 0, full_size))
        return torch.cat(parts, self.dim) if len(parts) > 1 else parts[0].contiguous()


def mark_tensor_parallel(param: torch.nn.Parameter, dim: int) -> None:
    """Megatron's attributes on a sharded parameter (gradient-norm code counts it on every rank)."""
    param.tensor_model_parallel = True
    param.partition_dim = dim
    param.partition_stride = 1


def all_gather(x: torch.Tensor) -> List[torch.Tensor]:
    """Every tensor-parallel rank's ``x`` (same shape on all ranks), in rank order; not differentiable."""
    world = tp_world_size()
    if world == 1:
        return [x]
    x = x.detach().contiguous()
    out = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(out, x, group=tp_group())
    return out


# ----------------------------------------------------------------------------------------------------------
# DeepSpeed

class MpuAdapter:
    """The ``mpu`` object ``deepspeed.initialize(mpu=...)`` expects, backed by megatron-core's parallel state.

    megatron-core has no ``get_model_parallel_*`` functions (DeepSpeed's names for tensor parallelism);
    passing ``parallel_state`` itself fails with AttributeError.  Pipeline parallelism is not used here.
    """
    get_model_parallel_group = staticmethod(ps.get_tensor_model_parallel_group)
    get_model_parallel_rank = staticmethod(ps.get_tensor_model_parallel_rank)
    get_model_parallel_world_size = staticmethod(ps.get_tensor_model_parallel_world_size)
    get_model_parallel_src_rank = staticmethod(ps.get_tensor_model_parallel_src_rank)
    get_tensor_model_parallel_group = staticmethod(ps.get_tensor_model_parallel_group)
    get_tensor_model_parallel_rank = staticmethod(ps.get_tensor_model_parallel_rank)
    get_tensor_model_parallel_world_size = staticmethod(ps.get_tensor_model_parallel_world_size)
    get_tensor_model_parallel_src_rank = staticmethod(ps.get_tensor_model_parallel_src_rank)
    get_data_parallel_group = staticmethod(ps.get_data_parallel_group)
    get_data_parallel_rank = staticmethod(ps.get_data_parallel_rank)
    get_data_parallel_world_size = staticmethod(ps.get_data_parallel_world_size)
    get_pipeline_model_parallel_group = staticmethod(ps.get_pipeline_model_parallel_group)
    get_pipeline_model_parallel_rank = staticmethod(ps.get_pipeline_model_parallel_rank)
    get_pipeline_model_parallel_world_size = staticmethod(ps.get_pipeline_model_parallel_world_size)
