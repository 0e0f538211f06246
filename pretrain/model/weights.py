"""Parameter bookkeeping: how each parameter is initialised and split across tensor-parallel ranks.

Every parameter is ``describe``d by the module that creates it (an init rule and, for sharded ones, a
``ShardSpec``).  From that the model

* initialises itself: each full tensor is drawn from a generator seeded by (``cfg.seed``, parameter name),
  then cut to this rank's shard, so every tensor-parallel layout (and every device) starts from the same
  full weights;
* gathers a consolidated, layout-independent state dict (``gather_full``) and loads one (``load_full``).

Init rules (Transformer-XL's ``weights_init``): ``weight`` = normal(0, init_std) or uniform(+-init_range)
per ``cfg.init``; ``proj`` = normal(0, proj_init_std); ``zeros``; ``norm`` = normal(1, init_std) (XL's
LayerNorm init); ``xavier`` = Xavier-uniform over the full shape (LaMemo's look-ahead biases); ``embedded`` =
the ``weight`` draw times sqrt(d_model), distributed like a token embedding as the layers see it (embeddings are
scaled by sqrt(d_model)): RMT's memory vectors, each row drawn independently; ``const:<value>`` = every element
``value`` (the GRU gate's bias); a callable ``init(shape, cfg, generator) -> Tensor``: a mechanism's own
rule, drawn like the others on the full shape from the parameter's generator, then cut to this rank's shard
(GatedDeltaNet's ``A_log`` and ``dt_bias``, initialised as in Mamba2).
"""
from __future__ import annotations

import dataclasses
import re
import zlib
from typing import Callable, Dict, Optional, Tuple, Union

import torch
from torch import nn

from pretrain.model import parallel
from pretrain.model.parallel import ShardSpec

INIT_RULES = ("weight", "proj", "zeros", "norm", "xavier", "embedded")


@dataclasses.dataclass(frozen=True)
class ParamMeta:
    init: Union[str, Callable[..., torch.Tensor]]
    shard: Optional[ShardSpec] = None


def describe(module: nn.Module, name: str, init: str, shard: Optional[ShardSpec] = None) -> None:
    """Record how ``module.<name>`` is initialised and sharded (and mark it tensor-parallel if sharded).
    ``init``: a rule name (module docstring) or a callable ``(shape, cfg, generator) -> Tensor``."""
    if not callable(init) and init not in INIT_RULES and not init.startswith("const:"):
        raise ValueError(f"unknown init rule {init!r}")
    meta = module.__dict__.setdefault("_param_meta", {})
    meta[name] = ParamMeta(init, shard)
    if shard is not None:
        parallel.mark_tensor_parallel(getattr(module, name), shard.dim)


def described_parameters(model: nn.Module) -> Dict[str, Tuple[nn.Parameter, ParamMeta]]:
    """name -> (parameter, meta) for every distinct parameter (tied ones under their first name)."""
    metas = {}
    for mod_name, mod in model.named_modules():
        for pname, meta in mod.__dict__.get("_param_meta", {}).items():
            p = getattr(mod, pname)
            metas.setdefault(id(p), meta)
    out = {}
    for name, p in model.named_parameters():
        if id(p) not in metas:
            raise RuntimeError(f"parameter {name} has no init/shard description")
        out[name] = (p, metas[id(p)])
    return out


def full_shape(p: torch.Tensor, meta: ParamMeta, world: int) -> Tuple[int, ...]:
    """The shape of parameter ``p`` with every tensor-parallel shard together.  Under ZeRO-3 a partitioned
    parameter's data is an empty placeholder: its shape is DeepSpeed's ``ds_shape``."""
    shape = list(getattr(p, "ds_shape", p.shape))
    if meta.shard is not None:
        shape[meta.shard.dim] = sum(meta.shard.sections)
    return tuple(shape)


def _draw(shape, meta: ParamMeta, cfg, gen: torch.Generator) -> torch.Tensor:
    if callable(meta.init):
        out = meta.init(tuple(shape), cfg, gen)
        if tuple(out.shape) != tuple(shape):
            raise ValueError(f"init rule {meta.init!r} drew shape {tuple(out.shape)}, expected {tuple(shape)}")
        return out
    t = torch.empty(shape)
    if meta.init == "zeros":
        return t.zero_()
    if meta.init.startswith("const:"):
        return t.fill_(float(meta.init[len("const:"):]))
    if meta.init == "norm":
        return t.normal_(1.0, cfg.init_std, generator=gen)
    if meta.init == "proj":
        return t.normal_(0.0, cfg.proj_init_std, generator=gen)
    if meta.init == "xavier":
        fan_out, fan_in = shape[0], shape[1] if len(shape) > 1 else 1
        bound = (6.0 / (fan_in + fan_out)) ** 0.5
        return t.uniform_(-bound, bound, generator=gen)
    if meta.init == "embedded":
        return _draw(shape, ParamMeta("weight"), cfg, gen).mul_(cfg.d_model ** 0.5)
    if cfg.init == "uniform":
        return t.uniform_(-cfg.init_range, cfg.init_range, generator=gen)
    return t.normal_(0.0, cfg.init_std, generator=gen)


_INIT_NAMES = [  # today's names -> the names of the first layout, which seed the init (same seed, same weights)
    (re.compile(r"^stack\.layers\.(\d+)\.ffn\."), r"mechanism.layers.\1.ffn."),
    (re.compile(r"^stack\.layers\.(\d+)\.mixer\."), r"mechanism.layers.\1."),
    (re.compile(r"^stack\."), r"mechanism."),
]


def init_name(name: str) -> str:
    """The name whose hash seeds a parameter's init: the parameter's name in the first released layout
    (``mechanism.layers.3.attn.qkv.weight`` for ``stack.layers.3.mixer.attn.qkv.weight``), so that a seed
    keeps giving the same initial weights across the reshaping of the layer stack."""
    for pattern, repl in _INIT_NAMES:
        new, n = pattern.subn(repl, name)
        if n:
            return new
    return name


@torch.no_grad()
def init_weights(model: nn.Module, cfg) -> None:
    rank, world = parallel.tp_rank(), parallel.tp_world_size()
    for name, (p, meta) in described_parameters(model).items():
        gen = torch.Generator().manual_seed((cfg.seed * 1_000_003 + zlib.crc32(init_name(name).encode())) % 2 ** 63)
        full = _draw(full_shape(p, meta, world), meta, cfg, gen)
        local = meta.shard.split(full, rank, world) if meta.shard is not None else full
        p.copy_(local)


@torch.no_grad()
def gather_full(model: nn.Module, grads: bool = False) -> Dict[str, torch.Tensor]:
    """Consolidated weights (CPU, the parameters' dtype): the same keys and values for every layout; with
    ``grads`` the consolidated gradients instead (zeros where none).  A collective under tensor
    parallelism: call it on every rank of the group."""
    out = {}
    for name, (p, meta) in described_parameters(model).items():
        t = p.detach()
        if grads:
            t = p.grad.detach() if p.grad is not None else torch.zeros_like(t)
        if meta.shard is not None:
            t = meta.shard.join(parallel.all_gather(t))
        out[name] = t.cpu().clone()
    return out


_LEGACY = [  # parameter names before the per-layer stack (one mechanism owning the layer loop)
    (re.compile(r"^mechanism\.layers\.(\d+)\.ffn\."), r"stack.layers.\1.ffn."),
    (re.compile(r"^mechanism\.layers\.(\d+)\."), r"stack.layers.\1.mixer."),
    (re.compile(r"^mechanism\."), r"stack."),
]


def upgrade_names(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A state dict with parameter names of earlier versions renamed to today's (``mechanism.layers.3.attn.*``
    -> ``stack.layers.3.mixer.attn.*``); today's names pass unchanged."""
    out = {}
    for name, t in state.items():
        for pattern, repl in _LEGACY:
            new, n = pattern.subn(repl, name)
            if n:
                name = new
                break
        out[name] = t
    return out


@torch.no_grad()
def load_full(model: nn.Module, state: Dict[str, torch.Tensor], strict: bool = True) -> None:
    """Load consolidated weights (from ``gather_full`` under any layout; earlier parameter names are upgraded)
    into this rank's shards."""
    state = upgrade_names(state)
    params = described_parameters(model)
    if strict:
        missing = sorted(set(params) - set(state))
        unexpected = sorted(set(state) - set(params))
        if missing or unexpected:
            raise KeyError(f"full state dict mismatch: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                           f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    rank, world = parallel.tp_rank(), parallel.tp_world_size()
    for name, (p, meta) in params.items():
        if name not in state:
            continue
        full = state[name]
        expect = full_shape(p, meta, world)
        if tuple(full.shape) != expect:
            raise ValueError(f"{name}: shape {tuple(full.shape)}, the model has {expect}")
        local = meta.shard.split(full, rank, world) if meta.shard is not None else full
        p.copy_(local.to(p.dtype))
