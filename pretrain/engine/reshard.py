"""Resuming under another layout: a layout-free copy of the weights and Adam moments, and loading it into any
engine.

DeepSpeed's checkpoint files belong to the layout that wrote them: ZeRO 1-3 partition the fp32 master weights and
the optimizer state over the data-parallel ranks (one file per rank, flat buffers), tensor parallelism splits
parameters over ranks (one file per tensor-parallel rank), and each ZeRO stage and precision has its own format.
DeepSpeed's answer is the *universal checkpoint* (``deepspeed/checkpoint/ds_to_universal.py``): one directory per
parameter holding the full fp32 weight and Adam moments, loaded back with ``load_universal``.  Its converter merges
tensor-parallel slices by parameter-name patterns and cannot express this model's shards (fused sections and
padded vocabulary pieces, ``pretrain.model.parallel.ShardSpec``) nor the ZeRO-0 client optimizer, so this module
does the same in two steps, with the model's own shard descriptions:

``convert`` (the first rank, once per checkpoint and layout change; ``TAG/universal/``, written under a temporary
name and renamed when complete, then reused):

* reads every (tensor-parallel, data-parallel) file of the saving run: ZeRO 1/2 flat partitions with their
  ``param_slice_mappings``, ZeRO-3 flat partitions with ``param_shapes`` (each parameter cut in
  ``ceil(numel / dp)`` pieces), or the ZeRO-0 model file with the client optimizer's state (fp32) or the fp32
  master copies of DeepSpeed's mixed-precision wrapper (bf16/fp16);
* joins the data-parallel pieces into each tensor-parallel rank's tensor, then the tensor-parallel shards into the
  full tensor (``ShardSpec.join``);
* writes DeepSpeed's universal layout: ``zero/<parameter name>/{fp32,exp_avg,exp_avg_sq}.pt``, each
  ``{"param": full fp32 tensor}``, and ``meta.json`` (the Adam step, the shapes, the source layout).

``load_into`` (every rank, after ``deepspeed.initialize`` of the new layout): cuts each full tensor to this rank's
tensor-parallel shard (``ShardSpec.split``) and writes it into the engine through DeepSpeed's fragment API
(``safe_set_full_fp32_param`` / ``safe_set_full_optimizer_state``, which keep this rank's data-parallel partition)
for ZeRO 1-3 and the bf16 optimizer, or directly into the parameters and the optimizer state for ZeRO-0; the
low-precision weights are refreshed from the fp32 masters.

The Adam step is stored as the number of updates the moments have seen.  DeepSpeed's ZeRO-0 mixed-precision
wrapper takes one extra (zero-gradient) step when it is built, so its counter is one ahead; ``convert`` and
``load_into`` correct for it.  Memory: the first rank holds the whole fp32 state of the model (weights and two
moments, 12 bytes per parameter) while converting.
"""
from __future__ import annotations

import glob
import json
import math
import os
import shutil
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from pretrain.engine.checkpoint import CheckpointError, load_torch_file

FORMAT = "memtrain.universal/1"
SUBDIR = "universal"
STATES = ("fp32", "exp_avg", "exp_avg_sq")
PARAM = "param"  # DeepSpeed's key in a universal file (deepspeed.checkpoint.constants.PARAM)


def universal_dir(load_dir: str, tag: str) -> str:
    return os.path.join(load_dir, tag, SUBDIR)


def is_complete(udir: str) -> bool:
    return os.path.isfile(os.path.join(udir, "meta.json"))


# ------------------------------------------------------------------------------------------------ reading
def _one(pattern: str) -> str:
    found = sorted(glob.glob(pattern))
    if len(found) != 1:
        raise CheckpointError(f"expected one file {pattern}, found {len(found)}")
    return found[0]


def _step_of(state: Mapping[str, Any]) -> Optional[int]:
    s = state.get("step")
    if s is None:
        return None
    return int(s.item() if torch.is_tensor(s) else s)


def _flat_groups(fp32_groups: List[torch.Tensor], base: Mapping[int, Mapping[str, Any]], step: Optional[int]
                 ) -> Tuple[List[Dict[str, torch.Tensor]], Optional[int]]:
    """One data-parallel rank's flat partitions of a ZeRO-2/3 checkpoint, by parameter group: ``{"fp32": the
    master weights, "exp_avg", "exp_avg_sq": Adam's moments where the base optimizer holds them}``, and the
    optimizer step (``step`` if already known, else the first group's)."""
    flats = []
    for g, fp32 in enumerate(fp32_groups):
        flat = {"fp32": fp32}
        if g in base:
            flat.update({k: base[g][k] for k in ("exp_avg", "exp_avg_sq") if k in base[g]})
            step = _step_of(base[g]) if step is None else step
        flats.append(flat)
    return flats, step


def _read_zero12(root: str, dp: int, t: int) -> Tuple[Dict[str, Dict[str, torch.Tensor]], Optional[int]]:
    """Tensor-parallel rank ``t`` of a ZeRO 1/2 checkpoint: name -> state -> tensor (this shard's shape)."""
    model = load_torch_file(os.path.join(root, f"mp_rank_{t:02d}_model_states.pt"))
    shapes = {}
    for group in model.get("param_shapes") or []:
        shapes.update({k: tuple(v) for k, v in group.items()})
    if not shapes:
        shapes = {k: tuple(v.shape) for k, v in model["module"].items() if torch.is_tensor(v)}
    pieces: Dict[str, Dict[str, List[torch.Tensor]]] = {}
    step = None
    for d in range(dp):
        osd = load_torch_file(_one(os.path.join(root, f"*zero_pp_rank_{d}_mp_rank_{t:02d}_optim_states.pt")))
        osd = osd["optimizer_state_dict"]
        flats, step = _flat_groups(osd["single_partition_of_fp32_groups"], osd["base_optimizer_state"]["state"],
                                   step)
        for flat, mapping in zip(flats, osd["param_slice_mappings"]):
            for name, frag in mapping.items():
                for k, buf in flat.items():
                    pieces.setdefault(name, {}).setdefault(k, []).append(buf.narrow(0, frag.start, frag.numel))
    out = {}
    for name, states in pieces.items():
        out[name] = {k: torch.cat(v).float().view(shapes[name]) for k, v in states.items()}
    return out, step


def _read_zero3(root: str, dp: int, t: int) -> Tuple[Dict[str, Dict[str, torch.Tensor]], Optional[int]]:
    """Tensor-parallel rank ``t`` of a ZeRO-3 checkpoint: each parameter is cut into ``ceil(numel / dp)``-element
    pieces (the last one padded), one per data-parallel rank, laid end to end in each rank's flat group."""
    model = load_torch_file(_one(os.path.join(root, f"*zero_pp_rank_0_mp_rank_{t:02d}_model_states.pt")))
    groups = [{k: tuple(v) for k, v in g.items()} for g in model["param_shapes"]]
    pieces: Dict[str, Dict[str, List[torch.Tensor]]] = {}
    step = None
    for d in range(dp):
        osd = load_torch_file(_one(os.path.join(root, f"*zero_pp_rank_{d}_mp_rank_{t:02d}_optim_states.pt")))
        osd = osd["optimizer_state_dict"]
        flats, step = _flat_groups(osd["fp32_flat_groups"][:len(groups)], osd["optimizer_state_dict"]["state"],
                                   step)
        for flat, shapes in zip(flats, groups):
            offset = 0
            for name, shape in shapes.items():
                numel = math.prod(shape)
                part = math.ceil(numel / dp)
                valid = max(0, min(part, numel - d * part))
                for k, buf in flat.items():
                    pieces.setdefault(name, {}).setdefault(k, []).append(buf.narrow(0, offset, valid))
                offset += part
    out = {}
    for g in groups:
        for name, shape in g.items():
            out[name] = {k: torch.cat(v).float().view(shape) for k, v in pieces[name].items()}
    return out, step


def _read_zero0(root: str, t: int, param_names: List[List[str]]
                ) -> Tuple[Dict[str, Dict[str, torch.Tensor]], Optional[int]]:
    """Tensor-parallel rank ``t`` of a ZeRO-0 checkpoint: the module's weights (fp32) or the fp32 masters of
    DeepSpeed's mixed-precision wrapper, and the client optimizer's per-parameter state (``param_names``: the names
    of the parameters of each optimizer group, in order)."""
    sd = load_torch_file(os.path.join(root, f"mp_rank_{t:02d}_model_states.pt"))
    opt = sd.get("optimizer") or {}
    masters = None
    if "fp32_groups" in opt:  # the unfused bf16/fp16 wrapper: per-parameter fp32 masters
        masters = opt["fp32_groups"]
        opt = opt["optimizer_state_dict"]
    elif "fp32_groups_flat" in opt:
        raise CheckpointError(f"{root}: a ZeRO-0 checkpoint of DeepSpeed's fused fp16 optimizer cannot be resharded "
                              f"(resume it with its own layout)")
    out: Dict[str, Dict[str, torch.Tensor]] = {}
    step = None
    groups = opt.get("param_groups", [])
    if groups and len(groups) != len(param_names):
        raise CheckpointError(f"{root}: {len(groups)} optimizer groups, meta.json names {len(param_names)}")
    for g, names in enumerate(param_names):
        ids = groups[g]["params"] if groups else [None] * len(names)
        for j, name in enumerate(names):
            fp32 = masters[g][j] if masters is not None else sd["module"][name]
            out[name] = {"fp32": fp32.float().view(tuple(sd["module"][name].shape))}
            st = opt.get("state", {}).get(ids[j]) if ids[j] is not None else None
            if st:
                out[name].update({k: st[k].float().view_as(out[name]["fp32"]) for k in ("exp_avg", "exp_avg_sq")})
                step = _step_of(st) if step is None else step
    if masters is not None and step is not None:
        step -= 1  # the wrapper's zero-gradient step at construction
    return out, step


# ------------------------------------------------------------------------------------------------ convert
def convert(load_dir: str, tag: str, meta: Mapping[str, Any], specs: Mapping[str, Any],
            out_dir: Optional[str] = None) -> str:
    """Write the layout-free copy of checkpoint ``load_dir/tag`` (``meta``: its ``meta.json``; ``specs``: parameter
    name -> ``ShardSpec`` or None, from the model) and return its directory.  A complete copy is reused.
    CheckpointError naming the file when a source file is missing or unreadable, or the copy cannot be written."""
    out_dir = out_dir or universal_dir(load_dir, tag)
    if is_complete(out_dir):
        return out_dir
    root = os.path.join(load_dir, tag)
    dp, tp, zero = int(meta["dp_size"]), int(meta["tp_size"]), int(meta["zero_stage"])
    per_tp = []
    steps = set()
    for t in range(tp):
        if zero in (1, 2):
            local, step = _read_zero12(root, dp, t)
        elif zero == 3:
            local, step = _read_zero3(root, dp, t)
        else:
            names = meta.get("optimizer_params")
            if not names:
                raise CheckpointError(f"{root}/memtrain/meta.json does not name the optimizer's parameters "
                                      f"(written by an older version): resume it with its own layout")
            local, step = _read_zero0(root, t, names)
        per_tp.append(local)
        steps.add(step)
    steps.discard(None)
    if len(steps) > 1:
        raise CheckpointError(f"{root}: the tensor-parallel ranks' optimizers disagree on the step ({sorted(steps)})")
    unknown = sorted(set(per_tp[0]) - set(specs))
    missing = sorted(set(specs) - set(per_tp[0]))
    if unknown or missing:
        raise CheckpointError(f"{root}: parameters {unknown[:3]} unknown to the model, {missing[:3]} missing")
    tmp = f"{out_dir}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    shapes = {}
    try:
        for name, spec in specs.items():
            states = [k for k in STATES if all(k in local[name] for local in per_tp)]
            os.makedirs(os.path.join(tmp, "zero", name), exist_ok=True)
            for k in states:
                shards = [local[name][k] for local in per_tp]
                full = spec.join(shards) if spec is not None else shards[0]
                torch.save({PARAM: full.contiguous()}, os.path.join(tmp, "zero", name, f"{k}.pt"))
                shapes[name] = list(full.shape)
        info = {"format": FORMAT, "step": steps.pop() if steps else None, "params": shapes,
                "source": {k: meta.get(k) for k in ("dp_size", "tp_size", "zero_stage", "precision", "step")}}
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(info, f, indent=2, sort_keys=True)
        try:
            os.replace(tmp, out_dir)
        except OSError:
            if not is_complete(out_dir):  # not another run converting the same checkpoint at the same time
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"cannot write the resharded copy of {root} to {out_dir}: {e.strerror or e} (free space, "
                              f"or copy the checkpoint to a writable place and --load it from there)") from None
    return out_dir


# ------------------------------------------------------------------------------------------------ load
def _engine_kind(engine) -> str:
    params = list(engine.module.parameters())
    if any(hasattr(p, "ds_id") for p in params):
        return "zero3"
    if any(getattr(p, "_hp_mapping", None) is not None for p in params):
        return "fragments"  # ZeRO 1/2 and the bf16 optimizer
    if hasattr(engine.optimizer, "fp32_groups") and hasattr(engine.optimizer, "fp16_groups"):
        return "unfused"   # ZeRO-0 mixed precision
    return "plain"         # ZeRO-0 fp32: the client optimizer itself


def _fresh_state(like: torch.Tensor, step: int) -> Dict[str, torch.Tensor]:
    return {"step": torch.tensor(float(step), dtype=torch.float32), "exp_avg": torch.zeros_like(like),
            "exp_avg_sq": torch.zeros_like(like)}


@torch.no_grad()
def load_into(engine, model, udir: str, load_optimizer: bool = True) -> Dict[str, Any]:
    """Load the layout-free copy ``udir`` into ``engine`` (this rank's tensor-parallel shard of every parameter,
    through the engine's own partitioning).  With ``load_optimizer`` False only the weights (the fp32 masters and
    the low-precision copies).  Collective under ZeRO-3 only in the sense that every rank must call it.  Returns the
    copy's ``meta.json``."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    from pretrain.model import parallel
    from pretrain.model.weights import described_parameters
    with open(os.path.join(udir, "meta.json")) as f:
        info = json.load(f)
    rank, world = parallel.tp_rank(), parallel.tp_world_size()
    step = int(info["step"] or 0)
    params = described_parameters(model)

    def local(name: str, key: str, spec) -> Optional[torch.Tensor]:
        path = os.path.join(udir, "zero", name, f"{key}.pt")
        if not os.path.isfile(path):
            return None
        full = load_torch_file(path)[PARAM]
        return spec.split(full, rank, world) if spec is not None else full

    kind = _engine_kind(engine)
    opt = engine.optimizer
    keys = ("exp_avg", "exp_avg_sq") if load_optimizer else ()
    if kind == "plain":
        for name, (p, meta) in params.items():
            p.data.copy_(local(name, "fp32", meta.shard))
            if keys:
                st = {k: local(name, k, meta.shard) for k in keys}
                if all(v is not None for v in st.values()):
                    opt.state[p] = {"step": torch.tensor(float(step), dtype=torch.float32),
                                    **{k: v.to(p.dtype).clone() for k, v in st.items()}}
    elif kind == "unfused":
        masters = {id(lo): hi for lo_g, hi_g in zip(opt.fp16_groups, opt.fp32_groups) for lo, hi in zip(lo_g, hi_g)}
        for name, (p, meta) in params.items():
            value = local(name, "fp32", meta.shard)
            master = masters[id(p)]
            master.data.copy_(value)
            p.data.copy_(value.to(p.dtype))
            if keys:
                st = {k: local(name, k, meta.shard) for k in keys}
                if all(v is not None for v in st.values()):
                    # the wrapper's counter is one ahead of the updates (its zero-gradient step when built)
                    opt.optimizer.state[master] = {"step": torch.tensor(float(step + 1), dtype=torch.float32),
                                                   **{k: v.clone() for k, v in st.items()}}
    elif kind == "fragments":
        base = opt.optimizer
        if keys:
            for group in base.param_groups:
                for hp in group["params"]:
                    base.state[hp] = _fresh_state(hp, step)
            for p in model.parameters():
                m = getattr(p, "_hp_mapping", None)
                if m is not None:
                    hp = base.param_groups[m.param_group_index]["params"][0]
                    m.set_optim_state_fragment(hp, base.state[hp])
        for name, (p, meta) in params.items():
            value = local(name, "fp32", meta.shard)
            safe_set_full_fp32_param(p, value)
            p.data.copy_(value.to(p.dtype))
            for k in keys:
                v = local(name, k, meta.shard)
                if v is not None and getattr(p, "_hp_mapping", None) is not None:
                    safe_set_full_optimizer_state(p, v, k)
    else:  # zero3
        base = opt.optimizer
        if keys:
            for flat in opt.fp32_partitioned_groups_flat:
                base.state[flat] = _fresh_state(flat, step)
        for name, (p, meta) in params.items():
            safe_set_full_fp32_param(p, local(name, "fp32", meta.shard))
            for k in keys:
                v = local(name, k, meta.shard)
                if v is not None:
                    safe_set_full_optimizer_state(p, v, k)
        # the partitioned low-precision weights from the fp32 masters (what DeepSpeed's universal load does)
        for i, flat in enumerate(opt.fp32_partitioned_groups_flat):
            if flat.numel():
                opt.fp16_partitioned_groups_flat[i].data.copy_(flat.data)
            updated = opt.unflatten(opt.fp16_partitioned_groups_flat[i], opt.fp16_partitioned_groups[i])
            for part, q in zip(opt.fp16_partitioned_groups[i], updated):
                part.data = q.data
    return info


@torch.no_grad()
def full_state(engine, model, optimizer: bool = True) -> Dict[str, Dict[str, torch.Tensor]]:
    """The full (all data- and tensor-parallel pieces joined) fp32 weight and, with ``optimizer``, Adam moments of
    every parameter, plus ``"__step__": {"step": tensor}`` (updates the moments have seen; -1 without state): what
    ``convert`` writes, read from a live engine.  A collective over the data- and tensor-parallel groups (every
    rank calls it; every rank gets the result).  For tests and checks, not for the training loop."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from pretrain.model import parallel
    from pretrain.model.weights import described_parameters
    kind = _engine_kind(engine)
    opt = engine.optimizer
    masters = {}
    if kind == "unfused":
        masters = {id(lo): hi for lo_g, hi_g in zip(opt.fp16_groups, opt.fp32_groups) for lo, hi in zip(lo_g, hi_g)}
    base = opt if kind == "plain" else opt.optimizer
    flats = list(opt.fp32_partitioned_groups_flat) if kind == "zero3" else \
        [hp for g in base.param_groups for hp in g["params"]] if kind == "fragments" else []
    moments = optimizer and all("exp_avg" in base.state.get(hp, {}) for hp in flats)  # (the same on every rank)
    if kind == "fragments" and moments:
        for p in model.parameters():  # link the fragments (DeepSpeed does it lazily, at its first step)
            m = getattr(p, "_hp_mapping", None)
            if m is not None:
                hp = base.param_groups[m.param_group_index]["params"][0]
                m.set_optim_state_fragment(hp, base.state[hp])
    step = -1
    out: Dict[str, Dict[str, torch.Tensor]] = {}
    for name, (p, meta) in described_parameters(model).items():
        if kind in ("fragments", "zero3"):
            states = {"fp32": safe_get_full_fp32_param(p)}
            if moments:
                states.update({k: safe_get_full_optimizer_state(p, k) for k in ("exp_avg", "exp_avg_sq")})
        else:
            holder = masters.get(id(p), p)
            states = {"fp32": holder.detach()}
            st = base.state.get(holder, {})
            if optimizer and st:
                states.update({k: st[k] for k in ("exp_avg", "exp_avg_sq")})
        full = {}
        for k, t in states.items():
            t = t.detach().float().cpu().view(p.ds_shape if hasattr(p, "ds_shape") else p.shape).clone()
            if meta.shard is not None:
                t = meta.shard.join(parallel.all_gather(t))
            full[k] = t
        out[name] = full
    for st in base.state.values():
        if "step" in st:
            step = _step_of(st) - (1 if kind == "unfused" else 0)
            break
    out["__step__"] = {"step": torch.tensor(step)}
    return out
