"""DeepSpeed set-up: the JSON config reconciled with the run config, precision, optimizer.

The run config is the source of truth for batch sizes, clipping and the optimizer's hyper-parameters; the
DeepSpeed JSON chooses ZeRO stage, precision and offload.  A value given in both that disagrees is an error
naming both places.  Optimizer: a client ``torch.optim.AdamW`` (no JIT-built op needed), or DeepSpeed's own
when the JSON has an ``optimizer`` section (ZeRO-Offload needs DeepSpeed's CPU Adam); its ``lr``, ``betas``,
``eps`` and ``weight_decay`` are filled in from the run config.

Non-finite steps: DeepSpeed skips an update whose gradient norm is not finite under ZeRO 1-3 and its bf16
optimizer, but a plain fp32 run (ZeRO-0) hands the client optimizer the gradients as they are.
``GuardedAdamW`` closes that gap: from the gradient norm it measures for clipping (agreeing across ranks) it skips
an update whose gradients are not all finite, clears them, and exposes ``overflow`` so DeepSpeed counts the skip.
"""
from __future__ import annotations

import copy
import json
import math
from typing import Any, Dict, List, Tuple

import torch
import torch.distributed as dist

from pretrain.config_base import ConfigError


DEFAULT_DS_CONFIG = {"zero_optimization": {"stage": 0}, "steps_per_print": 10 ** 9}


def load_ds_config(path: str | None) -> Dict[str, Any]:
    if path is None:
        return copy.deepcopy(DEFAULT_DS_CONFIG)
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConfigError("ds_config", f"{path}: no such file") from None
    except json.JSONDecodeError as e:
        raise ConfigError("ds_config", f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None


def precision_of(ds: Dict[str, Any]) -> torch.dtype:
    bf16 = ds.get("bf16", ds.get("bfloat16", {})).get("enabled", False)
    fp16 = ds.get("fp16", {}).get("enabled", False)
    if bf16 and fp16:
        raise ConfigError("ds_config", "bf16 and fp16 are both enabled")
    if fp16:
        return torch.float16
    return torch.bfloat16 if bf16 else torch.float32


def zero_stage(ds: Dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def reconcile(ds: Dict[str, Any], cfg, dp_size: int, ds_path: str | None) -> Tuple[Dict[str, Any], int, int]:
    """Fill the DeepSpeed dict from the run config; returns (ds dict, micro_batch, grad_accum)."""
    ds = copy.deepcopy(ds)
    where = ds_path or "the default DeepSpeed config"

    def pick(name: str, ds_key: str, ours, default):
        theirs = ds.get(ds_key)
        if theirs == "auto":
            theirs = None
        if ours is not None and theirs is not None and int(theirs) != int(ours):
            raise ConfigError(name, f"{ours} here but {ds_key}={theirs} in {where}; set one of them")
        return int(ours if ours is not None else theirs if theirs is not None else default)

    micro = pick("train.micro_batch", "train_micro_batch_size_per_gpu", cfg.train.micro_batch, 8)
    accum = pick("train.grad_accum", "gradient_accumulation_steps", cfg.train.grad_accum, 1)
    global_batch = ds.get("train_batch_size")
    if global_batch not in (None, "auto") and int(global_batch) != micro * accum * dp_size:
        raise ConfigError("train.micro_batch", f"train_batch_size={global_batch} in {where} but micro_batch "
                          f"{micro} x grad_accum {accum} x data-parallel {dp_size} = {micro * accum * dp_size}")
    ds["train_micro_batch_size_per_gpu"] = micro
    ds["gradient_accumulation_steps"] = accum
    ds["train_batch_size"] = micro * accum * dp_size
    clip = ds.get("gradient_clipping")
    if clip is not None and float(clip) != float(cfg.optim.clip_grad):
        raise ConfigError("optim.clip_grad", f"{cfg.optim.clip_grad} here but gradient_clipping={clip} in {where}")
    ds["gradient_clipping"] = float(cfg.optim.clip_grad)
    if "scheduler" in ds:
        raise ConfigError("ds_config", f"{where} has a 'scheduler' section; the learning-rate schedule comes from "
                                       f"the run config (optim.schedule), remove it")
    if "optimizer" in ds:
        params = ds["optimizer"].setdefault("params", {})
        params.update(lr=cfg.optim.lr, betas=[cfg.optim.beta1, cfg.optim.beta2], eps=cfg.optim.eps,
                      weight_decay=cfg.optim.weight_decay)
    if precision_of(ds) == torch.float16 and not torch.cuda.is_available():
        raise ConfigError("ds_config", f"{where} enables fp16, which DeepSpeed supports only on GPUs; use a bf16 "
                                       f"or fp32 config on this machine")
    ds.setdefault("steps_per_print", 10 ** 9)
    return ds, micro, accum


def param_groups(model: torch.nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """Weight decay on matrices only: biases, norms and 1-d parameters are excluded (as in Megatron)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


class GuardedAdamW(torch.optim.AdamW):
    """Fused AdamW that measures the gradient norm, clips to it and skips an update whose gradients are not all
    finite, in one pass over the gradients (the client optimizer of a ZeRO-0 fp32 run; DeepSpeed's own clipping is
    switched off for it).

    ``step``:

    1. the global L2 norm of the gradients as they are (after DeepSpeed's data-parallel average), from one
       ``torch._foreach_norm`` over every gradient: with ``tp_group`` given, a tensor-parallel shard
       (``tensor_model_parallel``) counts on every rank and a replicated parameter on tensor-parallel rank 0 only,
       and the squares are summed over the group, so every rank gets the same norm;
    2. a norm that is not finite means a gradient is not (or the squares overflowed fp32): the update is skipped,
       the gradients cleared, ``overflow`` set (DeepSpeed counts the skip and holds the learning-rate schedule);
    3. otherwise the gradients are scaled by ``clip_grad / (norm + 1e-6)`` when that is below 1 (DeepSpeed's and
       ``torch.nn.utils.clip_grad_norm_``'s rule; ``clip_grad`` 0 disables it) and the fused AdamW kernel
       (``fused=True``) updates every parameter.

    The norm before clipping is ``_global_grad_norm`` (a float, which DeepSpeed's ``get_global_grad_norm``
    returns).  One host synchronisation per optimizer step (the norm's finiteness); nothing per parameter.
    """

    def __init__(self, params, *args, clip_grad: float = 0.0, tp_group=None, fused: bool = True, **kwargs):
        super().__init__(params, *args, fused=fused, **kwargs)
        self.clip_grad = float(clip_grad)
        self.tp_group = tp_group
        self.overflow = False
        self.skipped = 0
        self._global_grad_norm: float | None = None

    def _grads(self) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """(every gradient, those that count towards the norm on this rank)."""
        tp_rank = dist.get_rank(self.tp_group) if self.tp_group is not None and dist.is_initialized() else 0
        every, counted = [], []
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is not None:
                    every.append(p.grad)
                    if tp_rank == 0 or getattr(p, "tensor_model_parallel", False):
                        counted.append(p.grad)
        return every, counted

    @torch.no_grad()
    def step(self, closure=None):
        every, counted = self._grads()
        if counted:
            sq = torch.stack(torch._foreach_norm(counted)).double().pow(2).sum().reshape(1)
        else:
            sq = torch.zeros(1, dtype=torch.float64, device=every[0].device if every else "cpu")
        if self.tp_group is not None and dist.is_initialized() and dist.get_world_size(self.tp_group) > 1:
            dist.all_reduce(sq, group=self.tp_group)
        norm = sq.sqrt()
        value = float(norm)                               # the one synchronisation
        self.overflow = not math.isfinite(value)
        self._global_grad_norm = value
        if self.overflow:
            self.skipped += 1
            self.zero_grad(set_to_none=True)
            return None
        if self.clip_grad > 0 and every:
            coef = self.clip_grad / (value + 1e-6)
            if coef < 1.0:
                torch._foreach_mul_(every, coef)
        return super().step(closure)


def build_optimizer(model: torch.nn.Module, cfg, ds: Dict[str, Any], tp_group=None):
    """The client optimizer for deepspeed.initialize, or None when the JSON names DeepSpeed's own: fused
    ``GuardedAdamW`` (norm, clipping and the finiteness check of its own) for ZeRO-0 fp32, else fused
    ``torch.optim.AdamW`` inside DeepSpeed's ZeRO or mixed-precision optimizer (which clip and check)."""
    if "optimizer" in ds:
        return None
    groups = param_groups(model, cfg.optim.weight_decay)
    kw = dict(lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps)
    if own_clipping(ds):
        return GuardedAdamW(groups, clip_grad=cfg.optim.clip_grad, tp_group=tp_group, **kw)
    return torch.optim.AdamW(groups, fused=True, **kw)


def own_clipping(ds: Dict[str, Any]) -> bool:
    """Whether the client optimizer measures, clips and checks the gradients itself (ZeRO-0 fp32 with a client
    optimizer): DeepSpeed then gets ``gradient_clipping`` 0 (``engine_config``)."""
    return "optimizer" not in ds and zero_stage(ds) == 0 and precision_of(ds) == torch.float32


def engine_config(ds: Dict[str, Any]) -> Dict[str, Any]:
    """The config handed to ``deepspeed.initialize``: ``ds`` itself, with DeepSpeed's clipping off where the
    client optimizer clips (``own_clipping``).  ``ds`` (saved beside checkpoints) is left as it is."""
    return dict(ds, gradient_clipping=0.0) if own_clipping(ds) else ds
