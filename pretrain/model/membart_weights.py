"""MemBART weights in Hugging Face's formats: ``BartForConditionalGeneration`` state dicts and the MemBART
checkpoints' (qywu/memformers: BART's names plus the memory's), read from and written to local files.

Names.  ``to_hf`` maps the model's consolidated state dict (``MemBart.gather_full_state_dict``, the same under
every tensor-parallel layout) to Hugging Face's names; ``from_hf`` maps back.  The fused projections are split /
concatenated (``self_attn.qkv`` = ``[q_proj; k_proj; v_proj]``, ``encoder_attn.kv`` = ``[k_proj; v_proj]``); the
memory's parameters keep memformers' names (``self_attn.mem_{q,k,v,out}_proj``, ``mem_self_attn_layer_norm``,
``mem_fc1``, ``mem_fc2``, ``mem_final_layer_norm``, ``encoder.memory_bias`` [1, K, d], ``encoder.memory_layer_norm``,
``encoder.memory_gate_net.dense`` / ``dense2``).  The token table is tied: ``model.shared.weight`` is written once (as
``save_pretrained`` does) and read from any of its tied names (``model.shared``, ``model.encoder.embed_tokens``,
``model.decoder.embed_tokens``, ``lm_head``).  ``final_logits_bias`` is [1, V] there, [V] here (zeros when absent).

Files: a ``.safetensors`` or a torch ``.bin`` / ``.pt`` state dict, or a directory with ``config.json`` and
``model.safetensors`` / ``pytorch_model.bin`` (or a sharded ``*.index.json``).  Loading never downloads.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from typing import Dict, Mapping, Optional, Tuple

import torch

from pretrain.model.membart_config import MemBartConfig, from_hf_config, to_hf_config

# our name (after "encoder.layers.{i}." / "decoder.layers.{i}.") -> Hugging Face name (same prefix, "model.")
_LAYER_PLAIN = {
    "self_attn.out_proj": "self_attn.out_proj",
    "self_attn.mem_out_proj": "self_attn.mem_out_proj",
    "self_attn_layer_norm": "self_attn_layer_norm",
    "mem_self_attn_layer_norm": "mem_self_attn_layer_norm",
    "ffn.fc1": "fc1",
    "ffn.fc2": "fc2",
    "ffn.norm": "final_layer_norm",
    "mem_ffn.fc1": "mem_fc1",
    "mem_ffn.fc2": "mem_fc2",
    "mem_ffn.norm": "mem_final_layer_norm",
    "encoder_attn.q_proj": "encoder_attn.q_proj",
    "encoder_attn.out_proj": "encoder_attn.out_proj",
    "encoder_attn_layer_norm": "encoder_attn_layer_norm",
}
# fused projections: our name -> the Hugging Face projections concatenated along dim 0, in order
_LAYER_FUSED = {
    "self_attn.qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attn.mem_qkv": ("self_attn.mem_q_proj", "self_attn.mem_k_proj", "self_attn.mem_v_proj"),
    "encoder_attn.kv": ("encoder_attn.k_proj", "encoder_attn.v_proj"),
}
_TOP = {
    "encoder.embed.embed_positions": "model.encoder.embed_positions",
    "encoder.embed.layernorm_embedding": "model.encoder.layernorm_embedding",
    "decoder.embed.embed_positions": "model.decoder.embed_positions",
    "decoder.embed.layernorm_embedding": "model.decoder.layernorm_embedding",
    "encoder.memory_layer_norm": "model.encoder.memory_layer_norm",
    "encoder.memory_gate_net.dense": "model.encoder.memory_gate_net.dense",
    "encoder.memory_gate_net.dense2": "model.encoder.memory_gate_net.dense2",
}
TIED = ("model.shared.weight", "model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight",
        "lm_head.weight")
_LAYER = re.compile(r"^(encoder|decoder)\.layers\.(\d+)\.(.+)\.(weight|bias)$")


class WeightsError(ValueError):
    """A weights file or state dict that does not fit the model (names the key or file and the way out)."""


def _is_memory(name: str) -> bool:
    return "mem_" in name or "memory_" in name


def to_hf(full: Mapping[str, torch.Tensor], cfg: MemBartConfig, membart: Optional[bool] = None) -> Dict[str, torch.Tensor]:
    """Hugging Face names for the consolidated state dict ``full`` of a model with config ``cfg``: MemBART's format
    when the model has slots, plain BART without (``membart=False`` with slots raises WeightsError: the encoder of
    such a model reads them, plain BART would compute something else)."""
    membart = cfg.num_slots > 0 if membart is None else membart
    if cfg.num_slots and not membart:
        raise WeightsError("to_hf: a model with memory slots cannot be written as plain BART (its encoder reads "
                           "the slots); write the MemBART format (membart=True)")
    out: Dict[str, torch.Tensor] = {"model.shared.weight": full["shared.weight"],
                                    "final_logits_bias": full["final_logits_bias"][None]}
    if cfg.num_slots:
        out["model.encoder.memory_bias"] = full["encoder.memory_bias"][None]
    for name, t in full.items():
        if name in ("shared.weight", "final_logits_bias", "encoder.memory_bias"):
            continue
        m = _LAYER.match(name)
        if m:
            side, i, mod, kind = m.groups()
            prefix = f"model.{side}.layers.{i}."
            if mod in _LAYER_FUSED:
                parts = _LAYER_FUSED[mod]
                for part, piece in zip(parts, t.chunk(len(parts), 0)):
                    out[f"{prefix}{part}.{kind}"] = piece.contiguous()
                continue
            if mod in _LAYER_PLAIN:
                out[f"{prefix}{_LAYER_PLAIN[mod]}.{kind}"] = t
                continue
        else:
            mod, kind = name.rsplit(".", 1)
            if mod in _TOP:
                out[f"{_TOP[mod]}.{kind}"] = t
                continue
        raise WeightsError(f"to_hf: no Hugging Face name for parameter {name!r}")
    return out


def from_hf(hf: Mapping[str, torch.Tensor], cfg: MemBartConfig, strict: bool = True) -> Dict[str, torch.Tensor]:
    """The model's consolidated state dict from a Hugging Face BART / MemBART state dict (``model.`` prefix
    optional, as in a ``BartModel`` state dict).  ``strict``: every parameter of the model must be present and
    every key used (tied copies of the token table and ``final_logits_bias`` may be absent); with ``strict=False``
    missing parameters are left out (a BART checkpoint for a model with slots: the memory keeps its init) and
    unused keys are ignored.  Raises WeightsError naming the key."""
    src = {}
    for k, v in hf.items():
        if not (k.startswith("model.") or k in ("final_logits_bias", "lm_head.weight")):
            k = "model." + k
        src[k] = v
    used = set()

    def take(key: str) -> Optional[torch.Tensor]:
        if key in src:
            used.add(key)
            return src[key]
        return None

    out: Dict[str, torch.Tensor] = {}
    table = None
    for key in TIED:
        t = take(key)
        if t is not None and table is None:
            table = t
    if table is None:
        raise WeightsError("from_hf: no token table (model.shared.weight or a tied copy)")
    out["shared.weight"] = table
    bias = take("final_logits_bias")
    out["final_logits_bias"] = (bias.reshape(-1) if bias is not None
                                else torch.zeros(table.shape[0], dtype=table.dtype))
    expected = _expected_names(cfg)
    missing = []
    for name in expected:
        if name in out:
            continue
        if name == "encoder.memory_bias":
            t = take("model.encoder.memory_bias")
            if t is not None:
                out[name] = t.reshape(t.shape[-2], t.shape[-1])
            else:
                missing.append("model.encoder.memory_bias")
            continue
        hf_names = _hf_names(name)
        parts = [take(n) for n in hf_names]
        if any(p is None for p in parts):
            missing += [n for n, p in zip(hf_names, parts) if p is None]
            continue
        out[name] = torch.cat(parts, 0) if len(parts) > 1 else parts[0]
    unused = sorted(set(src) - used)
    if strict and (missing or unused):
        hint = ""
        if missing and all(_is_memory(n) for n in missing):
            hint = ("; this is a plain BART checkpoint: load it with strict=False (the memory keeps its init) or "
                    "set num_slots 0")
        elif unused and all(_is_memory(n) for n in unused):
            hint = "; this is a MemBART checkpoint: set num_slots to its memory_len"
        raise WeightsError(f"from_hf: state dict does not fit the model: missing {missing[:4]}"
                           f"{'...' if len(missing) > 4 else ''}, unexpected {unused[:4]}"
                           f"{'...' if len(unused) > 4 else ''}{hint}")
    return out


def _expected_names(cfg: MemBartConfig):
    """Every parameter name of a model with config ``cfg`` (without building it)."""
    names = ["shared.weight", "final_logits_bias"]
    for side in ("encoder", "decoder"):
        for mod in ("embed_positions", "layernorm_embedding"):
            kinds = ("weight",) if mod == "embed_positions" else ("weight", "bias")
            names += [f"{side}.embed.{mod}.{k}" for k in kinds]
    enc = ["self_attn.qkv", "self_attn.out_proj", "self_attn_layer_norm", "ffn.fc1", "ffn.fc2", "ffn.norm"]
    if cfg.num_slots:
        enc += ["self_attn.mem_qkv", "self_attn.mem_out_proj", "mem_self_attn_layer_norm", "mem_ffn.fc1",
                "mem_ffn.fc2", "mem_ffn.norm"]
    dec = ["self_attn.qkv", "self_attn.out_proj", "self_attn_layer_norm", "encoder_attn.q_proj", "encoder_attn.kv",
           "encoder_attn.out_proj", "encoder_attn_layer_norm", "ffn.fc1", "ffn.fc2", "ffn.norm"]
    for side, mods, n in (("encoder", enc, cfg.encoder_layers), ("decoder", dec, cfg.decoder_layers)):
        for i in range(n):
            names += [f"{side}.layers.{i}.{m}.{k}" for m in mods for k in ("weight", "bias")]
    if cfg.num_slots:
        names += ["encoder.memory_bias"]
        names += [f"encoder.{m}.{k}" for m in ("memory_layer_norm", "memory_gate_net.dense",
                                               "memory_gate_net.dense2") for k in ("weight", "bias")]
    return names


def _hf_names(name: str) -> Tuple[str, ...]:
    m = _LAYER.match(name)
    if m:
        side, i, mod, kind = m.groups()
        prefix = f"model.{side}.layers.{i}."
        if mod in _LAYER_FUSED:
            return tuple(f"{prefix}{p}.{kind}" for p in _LAYER_FUSED[mod])
        return (f"{prefix}{_LAYER_PLAIN[mod]}.{kind}",)
    mod, kind = name.rsplit(".", 1)
    return (f"{_TOP[mod]}.{kind}",)


# ----------------------------------------------------------------------------------------------------------
# files

def _weights_file(path: str) -> str:
    if os.path.isfile(path):
        return path
    if os.path.isdir(path):
        for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                     "pytorch_model.bin.index.json"):
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise WeightsError(f"{path}: no model.safetensors or pytorch_model.bin (or their .index.json) in the "
                           f"directory")
    raise WeightsError(f"{path}: no such file or directory")


def read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """The tensors of a weights file (``.safetensors``, torch ``.bin`` / ``.pt``, a sharded ``.index.json``) or of
    the weights file in a model directory, on the CPU.  Raises WeightsError naming the file."""
    f = _weights_file(path)
    try:
        if f.endswith(".index.json"):
            with open(f) as fh:
                index = json.load(fh)
            out: Dict[str, torch.Tensor] = {}
            for shard in sorted(set(index["weight_map"].values())):
                out.update(read_state_dict(os.path.join(os.path.dirname(f), shard)))
            return out
        if f.endswith(".safetensors"):
            from safetensors.torch import load_file
            return load_file(f)
        sd = torch.load(f, map_location="cpu", weights_only=True)
    except WeightsError:
        raise
    except Exception as e:      # a corrupt or foreign file: one line naming it
        raise WeightsError(f"{f}: cannot read weights ({type(e).__name__}: {e})") from None
    if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f"{f}: not a state dict of tensors")
    return dict(sd)


def read_config(path: str, **overrides) -> MemBartConfig:
    """The config of a model directory's ``config.json`` (BART or MemBART; ``from_hf_config``)."""
    p = os.path.join(path, "config.json") if os.path.isdir(path) else path
    try:
        with open(p) as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise WeightsError(f"{p}: no such file (a model directory needs its config.json)") from None
    except json.JSONDecodeError as e:
        raise WeightsError(f"{p}:{e.lineno}: invalid JSON ({e.msg})") from None
    return from_hf_config(data, **overrides)


def load_pretrained(path: str, strict: bool = True, device: Optional[torch.device] = None, **overrides):
    """A model built from a Hugging Face model directory (``config.json`` + weights; ``overrides`` change config
    fields such as ``dropout``), for this rank's tensor-parallel shard.  ``strict=False`` accepts a plain BART
    checkpoint for a model with slots (``num_slots=64`` override): the memory keeps its init."""
    from pretrain.model.membart import build_membart
    cfg = read_config(path, **overrides)
    model = build_membart(cfg)
    load_hf_weights(model, read_state_dict(path), strict=strict)
    return model.to(device) if device is not None else model


def load_hf_weights(model, hf: Mapping[str, torch.Tensor], strict: bool = True) -> None:
    """Load a Hugging Face BART / MemBART state dict into ``model`` (any tensor-parallel layout)."""
    ours = from_hf(hf, model.cfg, strict=strict)
    model.load_full_state_dict(ours, strict=strict)


def save_pretrained(model, path: str, membart: Optional[bool] = None, safe: bool = True,
                    write: Optional[bool] = None) -> None:
    """Write ``config.json`` and ``model.safetensors`` (``safe``) or ``pytorch_model.bin`` in Hugging Face's
    names (MemBART's format when the model has slots; ``membart=False``: plain BART).  A collective under tensor
    parallelism (the weights are gathered); the process with ``write`` (default: tensor-parallel rank 0; with data
    parallelism pass ``write=(global rank == 0)``) writes, into a temporary directory renamed into place."""
    from pretrain.model import parallel
    cfg = model.cfg
    sd = to_hf(model.gather_full_state_dict(), cfg, membart)
    if not (parallel.tp_rank() == 0 if write is None else write):
        return
    parent = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-membart-", dir=parent)
    try:
        with open(os.path.join(tmp, "config.json"), "w") as fh:
            json.dump(to_hf_config(cfg, membart), fh, indent=2)
        sd = {k: v.contiguous() for k, v in sd.items()}
        if safe:
            from safetensors.torch import save_file
            save_file(sd, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        else:
            torch.save(sd, os.path.join(tmp, "pytorch_model.bin"))
        if os.path.isdir(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
