"""Consolidated export: the model as one fp32 safetensors file plus its config and tokenizer.

An export directory holds::

    model.safetensors   full (tensor-parallel-independent) weights in fp32: the optimizer's master weights
                        when training kept them apart (bf16, ZeRO)
    model.yaml          the model config
    export.json         step, source checkpoint, tokenizer spec, metric, data prefixes
    <tokenizer files>   as written by the dataset's tokenizer

Evaluation and generation load it with ``load_exported`` in a single process, without DeepSpeed.  The
directory is written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any, Dict, Tuple

import torch
import yaml

from pretrain.config_base import from_dict, to_dict


def _fp32_local(engine, model) -> Dict[str, torch.Tensor]:
    """This rank's (tensor-parallel shard of the) weights in fp32, complete across ZeRO partitions."""
    from deepspeed.utils import safe_get_full_fp32_param
    # ZeRO-0 with bf16/fp16 keeps fp32 masters in the optimizer wrapper's parallel groups
    masters = {}
    opt = getattr(engine, "optimizer", None)
    for low, high in zip(getattr(opt, "fp16_groups", []) or [], getattr(opt, "fp32_groups", []) or []):
        if isinstance(low, (list, tuple)) and isinstance(high, (list, tuple)) and len(low) == len(high):
            masters.update({id(a): b for a, b in zip(low, high)})
    out = {}
    for name, p in model.named_parameters():
        t = masters.get(id(p))
        if t is None:
            t = safe_get_full_fp32_param(p)
        if t is None:
            if hasattr(p, "ds_id"):
                import deepspeed
                with deepspeed.zero.GatheredParameters([p]):
                    t = p.data.float().clone()
            else:
                t = p.data.float()
        out[name] = t.detach().cpu().clone()
    return out


@torch.no_grad()
def export_from_engine(trainer, out_dir: str) -> str | None:
    """Gather the fp32 weights of the trainer's model and write an export directory (first rank).
    Collective: every rank calls it."""
    from pretrain.model import build_model
    from pretrain.model.weights import gather_full
    local = _fp32_local(trainer.engine, trainer.model)
    # a float32 twin of the model on this rank's layout, to reuse the model's own tensor-parallel gather
    cfg = trainer.cfg.model
    twin = build_model(cfg)
    twin.float()
    params = dict(twin.named_parameters())
    for name, t in local.items():
        params[name].data.copy_(t.to(params[name].dtype))
    full = gather_full(twin)
    del twin
    if trainer.rank != 0:
        return None
    meta = {"step": trainer.step, "source": os.path.abspath(trainer.run_dir) if trainer.run_dir else None,
            "metric": trainer.data.metric, "data": trainer.data.prefixes,
            "vocab_size": trainer.data.vocab_size, "eod_id": trainer.data.eod_id, "pad_id": trainer.data.pad_id,
            "eval": to_dict(trainer.cfg.eval)}
    return write_export(out_dir, full, to_dict(cfg), trainer.data.prefixes["train"], meta)


def write_export(out_dir: str, full: Dict[str, torch.Tensor], model_cfg: Dict[str, Any], data_prefix: str,
                 meta: Dict[str, Any]) -> str:
    from safetensors.torch import save_file

    from data_tools.tokenization import load_tokenizer
    tmp = f"{out_dir.rstrip('/')}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file({k: v.float().contiguous() for k, v in full.items()}, os.path.join(tmp, "model.safetensors"))
    with open(os.path.join(tmp, "model.yaml"), "w") as f:
        yaml.safe_dump(model_cfg, f, sort_keys=False)
    tok = load_tokenizer(data_prefix)
    meta = dict(meta, tokenizer=tok.save(os.path.join(tmp, "tokenizer")))
    with open(os.path.join(tmp, "export.json"), "w") as f:
        json.dump(meta, f, indent=2)
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def read_export(path: str) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(model config dict, export meta) of an export directory, with clear errors."""
    for name in ("model.safetensors", "model.yaml", "export.json"):
        if not os.path.isfile(os.path.join(path, name)):
            raise FileNotFoundError(f"{path}: not an export directory ({name} missing; exports are written by "
                                    f"pretrain/train.py into SAVE/export, or by pretrain/export.py)")
    with open(os.path.join(path, "model.yaml")) as f:
        model_cfg = yaml.safe_load(f)
    with open(os.path.join(path, "export.json")) as f:
        meta = json.load(f)
    return model_cfg, meta


def load_weights_into(model, path: str) -> None:
    """Load an export's consolidated weights into ``model`` (any tensor-parallel layout)."""
    from safetensors.torch import load_file

    from pretrain.model.weights import load_full
    read_export(path)
    load_full(model, load_file(os.path.join(path, "model.safetensors")))


def load_exported(path: str, device=None, dtype: torch.dtype = torch.float32, **overrides):
    """(model, model config, tokenizer, export meta) of an export directory, in this single process.
    ``overrides`` replace model config fields (e.g. ``dropout=0.0``)."""
    from data_tools.tokenization import tokenizer_from_spec
    from pretrain.model import ModelConfig, build_model, parallel
    model_cfg, meta = read_export(path)
    model_cfg.update(overrides)
    cfg = from_dict(ModelConfig, model_cfg)
    if not parallel.is_initialized():
        parallel.initialize(1)
    model = build_model(cfg)
    load_weights_into(model, path)
    model.to(device or "cpu", dtype=dtype)
    model.eval()
    tok = tokenizer_from_spec(meta["tokenizer"], os.path.abspath(path))
    return model, cfg, tok, meta
