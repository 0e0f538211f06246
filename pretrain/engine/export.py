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

    from data_tools.cli import staged_dir
    from data_tools.tokenization import load_tokenizer
    tmp = f"{out_dir.rstrip('/')}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    with staged_dir(tmp, out_dir):
        save_file({k: v.float().contiguous() for k, v in full.items()}, os.path.join(tmp, "model.safetensors"))
        with open(os.path.join(tmp, "model.yaml"), "w") as f:
            yaml.safe_dump(model_cfg, f, sort_keys=False)
        tok = load_tokenizer(data_prefix)
        meta = dict(meta, tokenizer=tok.save(os.path.join(tmp, "tokenizer")))
        with open(os.path.join(tmp, "export.json"), "w") as f:
            json.dump(meta, f, indent=2)
    return out_dir


class ExportError(ValueError):
    """An export directory that is missing, incomplete, corrupt or asked for something it cannot do; the
    message (one line) names the file and the way out."""


_WHERE = "exports are written by pretrain/train.py at the end of training, into SAVE/export"


def _redo(path: str, meta: Dict[str, Any] | None = None) -> str:
    """How to write an export again."""
    source = (meta or {}).get("source")
    run = f"--save {source}" if source else "--save RUN"
    return (f"write it again by rerunning the training command (pretrain/train.py ... {run}): it resumes from "
            f"the last checkpoint and exports at the end")


def read_export(path: str) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(model config dict, export meta) of an export directory.  ``ExportError`` naming the folder or file
    when it is missing, incomplete or unreadable (``model.safetensors`` is checked in ``load_weights_into``)."""
    if not os.path.isdir(path):
        what = "is a file, not an" if os.path.exists(path) else "no such"
        raise ExportError(f"{path}: {what} export directory ({_WHERE})")
    for name in ("model.safetensors", "model.yaml", "export.json"):
        if not os.path.isfile(os.path.join(path, name)):
            raise ExportError(f"{path}: not an export directory ({name} missing; {_WHERE})")
    meta = _read_structured(path, "export.json", json.load, json.JSONDecodeError)
    model_cfg = _read_structured(path, "model.yaml", yaml.safe_load, yaml.YAMLError, meta)
    if not isinstance(meta.get("tokenizer"), dict):
        raise ExportError(f"{os.path.join(path, 'export.json')}: no tokenizer spec; {_redo(path, meta)}")
    return model_cfg, meta


def _read_structured(path: str, name: str, load, error, meta=None) -> Dict[str, Any]:
    """The mapping in the file ``name`` of the export ``path``, parsed by ``load``.  ``ExportError`` naming the
    file when it cannot be read, does not parse (``error``, or not UTF-8) or holds no mapping."""
    f = os.path.join(path, name)
    try:
        with open(f, encoding="utf-8") as fh:
            data = load(fh)
    except OSError as e:
        raise ExportError(f"{f}: cannot read ({e.strerror})") from None
    except (error, UnicodeDecodeError) as e:
        problem = f"unreadable ({' '.join(str(e).split())[:200]})"
    else:
        if isinstance(data, dict):
            return data
        problem = f"expected a mapping, got {type(data).__name__}"
    raise ExportError(f"{f}: {problem}; {_redo(path, meta)}")


def read_weights(path: str, meta: Dict[str, Any] | None = None) -> Dict[str, torch.Tensor]:
    """The consolidated fp32 weights of an export; ``ExportError`` naming the file when it is truncated or
    corrupt."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    f = os.path.join(path, "model.safetensors")
    try:
        return load_file(f)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        detail = " ".join(str(e).split())[:200]
        raise ExportError(f"{f}: truncated or corrupt ({detail}); {_redo(path, meta)}") from None


def load_weights_into(model, path: str) -> None:
    """Load an export's consolidated weights into ``model`` (any tensor-parallel layout).  ``ExportError``
    when the file is unreadable or its tensors do not fit the model."""
    from pretrain.model.weights import load_full
    _, meta = read_export(path)
    state = read_weights(path, meta)
    try:
        load_full(model, state)
    except (KeyError, ValueError, RuntimeError) as e:
        detail = " ".join(str(e).strip("'\"").split())[:300]
        raise ExportError(f"{os.path.join(path, 'model.safetensors')}: does not fit the model ({detail}); "
                          f"{_redo(path, meta)}") from None


def check_overrides(cfg, **fields) -> None:
    """Check evaluation/generation settings (``tgt_len``, ``mem_len``, ``clamp_len``, ``same_length``)
    against the model's own rules (``ModelConfig.validate``); ``ExportError`` names the command-line flag,
    e.g. ``--mem-len 0: LaMemo (attn_type 3) needs a memory (mem_len >= 1); ...``."""
    import dataclasses

    from pretrain.config_base import ConfigError
    changed = {k: v for k, v in fields.items() if v is not None}
    try:
        dataclasses.replace(cfg, **changed).validate()
    except ConfigError as e:
        flag = "--" + e.field.replace("_", "-")
        value = changed.get(e.field)
        shown = "" if value is None or isinstance(value, bool) else f" {value}"
        raise ExportError(f"{flag}{shown}: {str(e).split(': ', 1)[-1]}") from None


def load_exported(path: str, device=None, dtype: torch.dtype = torch.float32, **overrides):
    """(model, model config, tokenizer, export meta) of an export directory, in this single process.
    ``overrides`` replace model config fields (e.g. ``dropout=0.0``).  ``ExportError`` (one line, naming the
    file and the way out) for a missing, incomplete or corrupt export."""
    from data_tools.tokenization import TokenizerError, tokenizer_from_spec
    from pretrain.config_base import ConfigError
    from pretrain.model import ModelConfig, build_model, parallel
    model_cfg, meta = read_export(path)
    model_cfg.update(overrides)
    try:
        cfg = from_dict(ModelConfig, model_cfg)
        cfg.validate()
    except (ConfigError, TypeError, ValueError) as e:
        raise ExportError(f"{os.path.join(path, 'model.yaml')}: {e}; {_redo(path, meta)}") from None
    try:
        tok = tokenizer_from_spec(meta["tokenizer"], os.path.abspath(path))
    except (TokenizerError, ValueError) as e:
        raise ExportError(f"{path}: the export's tokenizer: {e}; {_redo(path, meta)}") from None
    if not parallel.is_initialized():
        parallel.initialize(1)
    model = build_model(cfg)
    load_weights_into(model, path)
    model.to(device or "cpu", dtype=dtype)
    model.eval()
    return model, cfg, tok, meta
