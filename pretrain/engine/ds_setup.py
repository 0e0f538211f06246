"""DeepSpeed set-up: the JSON config reconciled with the run config, precision, optimizer.

The run config is the source of truth for batch sizes, clipping and the optimizer's hyper-parameters; the
DeepSpeed JSON chooses ZeRO stage, precision and offload.  A value given in both that disagrees is an error
naming both places.  Optimizer: a client ``torch.optim.AdamW`` (no JIT-built op needed), or DeepSpeed's own
when the JSON has an ``optimizer`` section (ZeRO-Offload needs DeepSpeed's CPU Adam); its ``lr``, ``betas``,
``eps`` and ``weight_decay`` are filled in from the run config.

Non-finite steps: DeepSpeed skips an update whose gradient norm is not finite under ZeRO 1-3 and its bf16
optimizer, but a plain fp32 run (ZeRO-0) hands the client optimizer the gradients as they are.
``GuardedAdamW`` closes that gap: it checks every gradient (agreeing across ranks), skips the update and
clears the gradients when one is not finite, and exposes ``overflow`` so DeepSpeed counts the skip.
"""
from __future__ import annotations

import copy
import json
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
    """AdamW that skips an update whose gradients are not all finite (on any rank)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.overflow = False
        self.skipped = 0

    @torch.no_grad()
    def step(self, closure=None):
        bad = torch.zeros(1)
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is not None and not torch.isfinite(p.grad).all():
                    bad.fill_(1.0)
                    break
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        self.overflow = bool(bad.item())
        if self.overflow:
            self.skipped += 1
            self.zero_grad(set_to_none=True)
            return None
        return super().step(closure)


def build_optimizer(model: torch.nn.Module, cfg, ds: Dict[str, Any]):
    """The client optimizer for deepspeed.initialize, or None when the JSON names DeepSpeed's own."""
    if "optimizer" in ds:
        return None
    groups = param_groups(model, cfg.optim.weight_decay)
    kw = dict(lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps)
    if zero_stage(ds) == 0 and precision_of(ds) == torch.float32:
        return GuardedAdamW(groups, **kw)
    return torch.optim.AdamW(groups, **kw)


def grad_norm(model: torch.nn.Module, tp_group=None) -> float:
    """Global L2 norm of the gradients as they are now (after the data-parallel average), tensor-parallel
    aware: a sharded parameter (``tensor_model_parallel``) counts on every rank, a replicated one once."""
    tp_rank = dist.get_rank(tp_group) if dist.is_initialized() else 0
    total = torch.zeros(1, dtype=torch.float64)
    for p in model.parameters():
        if p.grad is not None and (getattr(p, "tensor_model_parallel", False) or tp_rank == 0):
            total += p.grad.detach().double().pow(2).sum().cpu()
    if dist.is_initialized() and dist.get_world_size(tp_group) > 1:
        if dist.get_backend(tp_group) == "nccl":
            total = total.cuda()
        dist.all_reduce(total, group=tp_group)
    return float(total.sqrt())
