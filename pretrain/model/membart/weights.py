"""MemBART weights in Hugging Face's formats: ``BartForConditionalGeneration`` state dicts and the MemBART
checkpoints' (qywu/memformers: BART's names plus the memory's), read from and written to local files.

Names.  ``to_hf`` maps the model's consolidated state dict (``MemBart.gather_full_state_dict``, the same under
every tensor-parallel layout) to Hugging Face's names; ``from_hf`` maps back.  The fused projections are split /
concatenated (``self_attn.qkv`` = ``[q_proj; k_proj; v_proj]``, ``encoder_attn.kv`` = ``[k_proj; v_proj]``); the
memory's parameters keep memformers' names (``self_attn.mem_{q,k,v,out}_proj``, ``mem_self_attn_layer_norm``,
``mem_fc1``, ``mem_fc2``, ``mem_final_layer_norm``, ``encoder.memory_bias`` [1, K, d], ``encoder.memory_layer_norm``,
``encoder.memory_gate_net.dense`` / ``dense2``).  ``final_logits_bias`` is [1, V] there, [V] here (zeros when
absent, as in transformers).

Token tables.  Tied (``tie_word_embeddings`` true, BART): ``model.shared.weight`` is written once (as transformers'
``save_pretrained`` does) and read from any of its tied names (``model.shared``, ``model.encoder.embed_tokens``,
``model.decoder.embed_tokens``, ``lm_head``); every copy in the file must equal it (a distinct ``lm_head`` means an
untied checkpoint whose config says tied: refused).  Untied (false; transformers' layout): the encoder reads
``model.encoder.embed_tokens``, the decoder ``model.decoder.embed_tokens`` (each falls back to ``model.shared``,
the one table transformers 4.x wrote for both), the output layer is ``lm_head`` (required); ``model.shared`` is
written as a copy of the encoder's table.

Checks.  Every tensor's shape is checked against the config (the error names the key and the config fields that
set the shape; the position tables have ``max_position_embeddings`` + 2 rows, BART's offset); every tensor of the
file must have a role (``model.encoder.version`` / ``model.decoder.version``, fairseq's bookkeeping, are skipped, as
transformers skips them), and every parameter must be in the file (``strict=False`` lets only the memory's be
missing).  The config's fields are honoured or refused by ``config.from_hf_config``; ``check_hf_config``
holds a checkpoint directory's config against the config of a model built from elsewhere (``train.init_from``).

Files: a ``.safetensors`` or a torch ``.bin`` / ``.pt`` state dict, or a directory with ``config.json`` and
``model.safetensors`` / ``pytorch_model.bin`` (or a sharded ``*.index.json``).  Loading never downloads.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from typing import Dict, Mapping, Optional, Tuple

import torch

from data_tools.cli import staged_dir
from pretrain.config_base import ConfigError
from pretrain.model.membart.config import NUMERIC_FIELDS, MemBartConfig, from_hf_config, to_hf_config

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
# the untied model's tables: our name -> Hugging Face's
_UNTIED = {"encoder_embed_tokens.weight": "model.encoder.embed_tokens.weight",
           "decoder_embed_tokens.weight": "model.decoder.embed_tokens.weight",
           "lm_head.weight": "lm_head.weight"}
_TABLES = ("shared.weight",) + tuple(_UNTIED)
# fairseq's bookkeeping buffers in converted checkpoints: no numerics (transformers ignores them on load too)
_SKIPPED = ("model.encoder.version", "model.decoder.version")
_LAYER = re.compile(r"^(encoder|decoder)\.layers\.(\d+)\.(.+)\.(weight|bias)$")


class WeightsError(ValueError):
    """A weights file or state dict that does not fit the model (names the key or file and the way out)."""


def _is_memory(name: str) -> bool:
    return "mem_" in name or "memory_" in name


def to_hf(full: Mapping[str, torch.Tensor], cfg: MemBartConfig, membart: Optional[bool] = None) -> Dict[str, torch.Tensor]:
    """Hugging Face names for the consolidated state dict ``full`` of a model with config ``cfg``: MemBART's format
    when the model has slots, plain BART without (``membart=False`` with slots raises WeightsError: the encoder of
    such a model reads them, plain BART would compute something else).  Tied: ``model.shared.weight`` [V, d] only;
    untied: ``model.encoder.embed_tokens.weight``, ``model.decoder.embed_tokens.weight``, ``lm_head.weight`` and
    ``model.shared.weight`` (a copy of the encoder's table: transformers keeps it, though neither stack reads it).
    Raises WeightsError for a parameter with no Hugging Face name."""
    membart = cfg.num_slots > 0 if membart is None else membart
    if cfg.num_slots and not membart:
        raise WeightsError("to_hf: a model with memory slots cannot be written as plain BART (its encoder reads "
                           "the slots); write the MemBART format (membart=True)")
    out: Dict[str, torch.Tensor] = {"final_logits_bias": full["final_logits_bias"][None]}
    if cfg.tie_word_embeddings:
        out["model.shared.weight"] = full["shared.weight"]
    else:
        for ours, theirs in _UNTIED.items():
            out[theirs] = full[ours]
        out["model.shared.weight"] = full["encoder_embed_tokens.weight"].clone()   # its own storage (safetensors)
    if cfg.num_slots:
        out["model.encoder.memory_bias"] = full["encoder.memory_bias"][None]
    for name, t in full.items():
        if name in ("final_logits_bias", "encoder.memory_bias") or name in _TABLES:
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


def _unexpected_hint(unused, cfg: MemBartConfig) -> str:
    """Why tensors of a checkpoint have no role in the model (for the error line)."""
    if all(_is_memory(n) for n in unused):
        return "; this is a MemBART checkpoint: set num_slots to its memory_len"
    for n in unused:
        if re.match(r"^model\.(encoder|decoder)\.layer_norm\.", n):
            return (f"; {n} is a layer norm after the last layer (add_final_layer_norm, mBART's pre-LN layout), "
                    f"which this post-LN model does not have")
        m = re.match(r"^model\.(encoder|decoder)\.layers\.(\d+)\.", n)
        if m and int(m.group(2)) >= getattr(cfg, f"{m.group(1)}_layers"):
            return (f"; the checkpoint has more {m.group(1)} layers than the config's {m.group(1)}_layers "
                    f"{getattr(cfg, m.group(1) + '_layers')}")
        if n.startswith(("classification_head.", "model.classification_head.", "qa_outputs.", "model.qa_outputs.")):
            return "; a task head (sequence classification / question answering) has no role in this model"
    return "; no role of this model reads them"


def from_hf(hf: Mapping[str, torch.Tensor], cfg: MemBartConfig, strict: bool = True,
            source: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """The model's consolidated state dict from a Hugging Face BART / MemBART state dict (``model.`` prefix
    optional, as in a ``BartModel`` state dict), for a model with config ``cfg``; the token tables as the module
    docstring says (tied or untied by ``cfg.tie_word_embeddings``).  Every tensor must have the shape the config
    gives, every key must have a role (fairseq's ``*.version`` buffers are skipped) and every parameter must be
    present (``final_logits_bias`` may be absent: zeros); ``strict=False`` lets the memory's parameters be missing
    (a BART checkpoint for a model with slots: they are left out and keep their init).  Raises WeightsError, one
    line beginning with ``source`` (the file, when given) and naming the key and the config field."""
    where = f"{source}: " if source else "from_hf: "
    src = {}
    for k, v in hf.items():
        if not (k.startswith("model.") or k in ("final_logits_bias", "lm_head.weight")):
            k = "model." + k
        src[k] = v
    used = {k for k in _SKIPPED if k in src}
    shapes = _expected_shapes(cfg)

    def check(key: str, t: torch.Tensor, shape: Tuple[int, ...], ours: str) -> torch.Tensor:
        if tuple(t.shape) != tuple(shape):
            raise WeightsError(f"{where}{key} has shape {tuple(t.shape)}, the config gives {tuple(shape)} "
                               f"({_shape_fields(ours, cfg)})")
        return t

    def take(key: str) -> Optional[torch.Tensor]:
        if key in src:
            used.add(key)
            return src[key]
        return None

    out: Dict[str, torch.Tensor] = {}
    V, d = cfg.vocab_size, cfg.d_model
    if cfg.tie_word_embeddings:
        present = [k for k in TIED if k in src]
        if not present:
            raise WeightsError(f"{where}no token table (model.shared.weight or a tied copy)")
        table = check(present[0], take(present[0]), (V, d), "shared.weight")
        for k in present[1:]:
            t = take(k)
            if t.shape != table.shape or not torch.equal(t.to(table.dtype), table):
                raise WeightsError(
                    f"{where}{k} differs from {present[0]}, but tie_word_embeddings is true (one table for the "
                    f"inputs and the output layer): an untied checkpoint; load it with tie_word_embeddings false "
                    f"(its config.json, or the override tie_word_embeddings=False)")
        out["shared.weight"] = table
    else:
        shared = take("model.shared.weight")
        if shared is not None:
            check("model.shared.weight", shared, (V, d), "shared.weight")
        for ours, theirs in _UNTIED.items():
            t = take(theirs)
            if t is None and ours != "lm_head.weight":
                t = shared      # transformers 4.x: both stacks read model.shared and the file holds it alone
            if t is None:
                if ours == "lm_head.weight":
                    raise WeightsError(f"{where}no lm_head.weight, but tie_word_embeddings is false (an output layer "
                                       f"of its own): a tied checkpoint; load it with tie_word_embeddings true")
                raise WeightsError(f"{where}no {theirs} (nor model.shared.weight)")
            out[ours] = check(theirs, t, (V, d), ours)
    bias = take("final_logits_bias")
    if bias is not None:
        if bias.numel() != V or bias.dim() not in (1, 2):
            raise WeightsError(f"{where}final_logits_bias has shape {tuple(bias.shape)}, the config gives (1, {V}) "
                               f"(vocab_size)")
        out["final_logits_bias"] = bias.reshape(-1)
    else:
        ref = out.get("shared.weight", out.get("lm_head.weight"))
        out["final_logits_bias"] = torch.zeros(V, dtype=ref.dtype)
    missing = []
    for name, shape in shapes.items():
        if name in out:
            continue
        if name == "encoder.memory_bias":
            t = take("model.encoder.memory_bias")
            if t is None:
                missing.append("model.encoder.memory_bias")
                continue
            if tuple(t.shape) not in ((1,) + tuple(shape), tuple(shape)):
                raise WeightsError(f"{where}model.encoder.memory_bias has shape {tuple(t.shape)}, the config gives "
                                   f"(1, {shape[0]}, {shape[1]}) ({_shape_fields(name, cfg)})")
            out[name] = t.reshape(shape)
            continue
        hf_names = _hf_names(name)
        parts = [take(n) for n in hf_names]
        if any(p is None for p in parts):
            missing += [n for n, p in zip(hf_names, parts) if p is None]
            continue
        part_shape = (shape[0] // len(parts),) + tuple(shape[1:])
        for n, p in zip(hf_names, parts):
            check(n, p, part_shape, name)
        out[name] = torch.cat(parts, 0) if len(parts) > 1 else parts[0]
    unused = sorted(set(src) - used)
    memory_only = bool(missing) and all(_is_memory(n) for n in missing)
    if (missing and (strict or not memory_only)) or unused:
        hint = ""
        if unused:
            hint = _unexpected_hint(unused, cfg)
        elif memory_only:
            hint = ("; this is a plain BART checkpoint: load it with strict=False (the memory keeps its init) or "
                    "set num_slots 0")
        raise WeightsError(f"{where}the checkpoint does not fit the model: missing {missing[:4]}"
                           f"{'...' if len(missing) > 4 else ''}, unexpected {unused[:4]}"
                           f"{'...' if len(unused) > 4 else ''}{hint}")
    return out


def _expected_shapes(cfg: MemBartConfig) -> Dict[str, Tuple[int, ...]]:
    """Every parameter name of a model with config ``cfg`` -> its full (unsharded) shape, without building it."""
    V, d, K = cfg.vocab_size, cfg.d_model, cfg.num_slots
    shapes: Dict[str, Tuple[int, ...]] = {}
    for name in (("shared.weight",) if cfg.tie_word_embeddings else tuple(_UNTIED)):
        shapes[name] = (V, d)
    shapes["final_logits_bias"] = (V,)
    for side in ("encoder", "decoder"):
        shapes[f"{side}.embed.embed_positions.weight"] = (cfg.max_position_embeddings + 2, d)
        shapes[f"{side}.embed.layernorm_embedding.weight"] = (d,)
        shapes[f"{side}.embed.layernorm_embedding.bias"] = (d,)

    def linear(prefix, n_out, n_in):
        shapes[prefix + ".weight"], shapes[prefix + ".bias"] = (n_out, n_in), (n_out,)

    for i in range(cfg.encoder_layers):
        p = f"encoder.layers.{i}."
        streams = [("self_attn.qkv", "self_attn.out_proj", "self_attn_layer_norm", "ffn")]
        if K:
            streams.append(("self_attn.mem_qkv", "self_attn.mem_out_proj", "mem_self_attn_layer_norm", "mem_ffn"))
        for qkv, out_proj, norm, ffn in streams:
            linear(p + qkv, 3 * d, d)
            linear(p + out_proj, d, d)
            shapes[p + norm + ".weight"], shapes[p + norm + ".bias"] = (d,), (d,)
            linear(p + ffn + ".fc1", cfg.encoder_ffn_dim, d)
            linear(p + ffn + ".fc2", d, cfg.encoder_ffn_dim)
            shapes[p + ffn + ".norm.weight"], shapes[p + ffn + ".norm.bias"] = (d,), (d,)
    for i in range(cfg.decoder_layers):
        p = f"decoder.layers.{i}."
        linear(p + "self_attn.qkv", 3 * d, d)
        linear(p + "self_attn.out_proj", d, d)
        shapes[p + "self_attn_layer_norm.weight"], shapes[p + "self_attn_layer_norm.bias"] = (d,), (d,)
        linear(p + "encoder_attn.q_proj", d, d)
        linear(p + "encoder_attn.kv", 2 * d, d)
        linear(p + "encoder_attn.out_proj", d, d)
        shapes[p + "encoder_attn_layer_norm.weight"], shapes[p + "encoder_attn_layer_norm.bias"] = (d,), (d,)
        linear(p + "ffn.fc1", cfg.decoder_ffn_dim, d)
        linear(p + "ffn.fc2", d, cfg.decoder_ffn_dim)
        shapes[p + "ffn.norm.weight"], shapes[p + "ffn.norm.bias"] = (d,), (d,)
    if K:
        shapes["encoder.memory_bias"] = (K, d)
        shapes["encoder.memory_layer_norm.weight"], shapes["encoder.memory_layer_norm.bias"] = (d,), (d,)
        linear("encoder.memory_gate_net.dense", d, d)
        linear("encoder.memory_gate_net.dense2", 1, d)
    return shapes


def _shape_fields(name: str, cfg: MemBartConfig) -> str:
    """The config fields that set the shape of parameter ``name`` (for error lines)."""
    if name in _TABLES or name == "final_logits_bias":
        return f"vocab_size {cfg.vocab_size}, d_model {cfg.d_model}"
    if "embed_positions" in name:
        return (f"max_position_embeddings {cfg.max_position_embeddings} + BART's position offset 2 rows, d_model "
                f"{cfg.d_model}")
    if name == "encoder.memory_bias":
        return f"num_slots {cfg.num_slots}, d_model {cfg.d_model}"
    if ".fc1." in name or ".fc2." in name:
        side = name.split(".", 1)[0]
        return f"{side}_ffn_dim {getattr(cfg, side + '_ffn_dim')}, d_model {cfg.d_model}"
    return f"d_model {cfg.d_model}"


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

def weights_file(path: str) -> str:
    """The weights file of ``path``: itself when a file, else the directory's ``model.safetensors``,
    ``model.safetensors.index.json``, ``pytorch_model.bin`` or ``pytorch_model.bin.index.json`` (the first present).
    Raises WeightsError when there is none."""
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
    f = weights_file(path)
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


def _config_path(path: str) -> str:
    return os.path.join(path, "config.json") if os.path.isdir(path) else path


def _read_config_json(p: str) -> dict:
    try:
        with open(p) as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise WeightsError(f"{p}: no such file (a model directory needs its config.json)") from None
    except json.JSONDecodeError as e:
        raise WeightsError(f"{p}:{e.lineno}: invalid JSON ({e.msg})") from None


def read_config(path: str, **overrides) -> MemBartConfig:
    """The config of a model directory's ``config.json`` (or of that file; BART or MemBART; ``from_hf_config``,
    ``overrides`` applied).  Raises WeightsError for a missing or invalid file, ConfigError (naming the field and
    the file) for a field this model refuses."""
    p = _config_path(path)
    data = _read_config_json(p)
    try:
        return from_hf_config(data, **overrides)
    except ConfigError as e:
        raise ConfigError(e.field, f"{p}: {str(e).split(': ', 1)[-1]}") from None


def check_hf_config(path: str, cfg: MemBartConfig) -> bool:
    """Hold the checkpoint directory ``path``'s ``config.json`` against ``cfg``, the config of the model its weights
    are about to be loaded into (built from a preset: ``train.init_from``): the fields refused by
    ``from_hf_config`` are refused, and the fields that change the numerics (``config.NUMERIC_FIELDS``:
    sizes, heads, ``activation_function``, ``scale_embedding``, ``tie_word_embeddings``) must agree (``num_slots``
    is left to the tensors: BART's weights initialise a model with slots).  Returns False when ``path`` is not a
    directory with a ``config.json`` (a bare weights file: only its tensors are checked), True when it agrees.
    Raises ConfigError naming the field, both values and the file."""
    p = os.path.join(path, "config.json")
    if not (os.path.isdir(path) and os.path.isfile(p)):
        return False
    theirs = read_config(path)
    for field in NUMERIC_FIELDS:
        if field != "num_slots" and getattr(theirs, field) != getattr(cfg, field):
            raise ConfigError(field, f"{p}: the checkpoint has {getattr(theirs, field)!r}, the model "
                                     f"{getattr(cfg, field)!r}; set the model's {field} to the checkpoint's")
    return True


def load_pretrained(path: str, strict: bool = True, device: Optional[torch.device] = None,
                    dtype: Optional[torch.dtype] = None, **overrides):
    """A model built from a Hugging Face model directory (``config.json`` + weights; ``overrides`` change config
    fields such as ``dropout``), for this rank's tensor-parallel shard, with parameters of ``dtype`` (default
    fp32; weights stored in a wider dtype are rounded to it: pass ``torch.float64`` for fp64 checkpoints).
    ``strict=False`` accepts a plain BART checkpoint for a model with slots (``num_slots=64`` override): the memory
    keeps its init.  Raises ConfigError (a config field this model refuses) or WeightsError (a tensor that does not
    fit), each one line naming the file and the field or key."""
    from pretrain.model.membart.model import build_membart
    cfg = read_config(path, **overrides)
    model = build_membart(cfg)
    if dtype is not None:
        model = model.to(dtype)
    load_hf_weights(model, read_state_dict(path), strict=strict, source=weights_file(path))
    return model.to(device) if device is not None else model


def load_hf_weights(model, hf: Mapping[str, torch.Tensor], strict: bool = True, source: Optional[str] = None) -> None:
    """Load a Hugging Face BART / MemBART state dict into ``model`` (any tensor-parallel layout); ``from_hf`` says
    what must fit (WeightsError otherwise, beginning with ``source``, the file, when given)."""
    ours = from_hf(hf, model.cfg, strict=strict, source=source)
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
    with staged_dir(tmp, path):
        with open(os.path.join(tmp, "config.json"), "w") as fh:
            json.dump(to_hf_config(cfg, membart), fh, indent=2)
        sd = {k: v.contiguous() for k, v in sd.items()}
        if safe:
            from safetensors.torch import save_file
            save_file(sd, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        else:
            torch.save(sd, os.path.join(tmp, "pytorch_model.bin"))
