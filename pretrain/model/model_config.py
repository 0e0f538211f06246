"""The model configuration: one dataclass, loaded from the ``model:`` mapping of a preset YAML.

Field names follow the Transformer-XL / LaMemo code (``n_layer``, ``d_model``, ``attn_type``, ``tgt_len``,
``mem_len``, ``clamp_len``, ``same_length``, ``div_val`` ...).  ``validate()`` checks everything that can be
checked without knowing the parallel layout; ``build_model`` checks the rest (heads divisible by the
tensor-parallel size).  No torch here: configs are read before anything heavy is imported.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import List, Optional

from pretrain.config_base import ConfigError, F, from_dict, load_yaml, validate

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")

# attn_type -> memory mechanism (LaMemo's numbering; see docs/model.md).
XL_TYPES = (0, 1, 2)
LAMEMO_TYPES = (3, 31, 32, 33)
ATTN_TYPES = XL_TYPES + LAMEMO_TYPES
SINUSOID_TYPES = (0, 2) + LAMEMO_TYPES


@dataclass
class ModelConfig:
    # vocabulary and sizes
    vocab_size: int = F(256, "vocabulary size (256 for byte-level data)")
    n_layer: int = F(4, "number of layers")
    d_model: int = F(128, "model width")
    n_head: int = F(4, "attention heads (split across tensor-parallel ranks)")
    d_head: int = F(32, "width of one head")
    d_inner: int = F(512, "feed-forward width (split across tensor-parallel ranks)")
    d_embed: Optional[int] = F(None, "embedding width before the projection to d_model (default d_model)")
    dropout: float = F(0.1, "dropout on embeddings, positions, sub-layer outputs and the FFN")
    dropatt: float = F(0.0, "dropout on attention probabilities")
    pre_lnorm: bool = F(False, "pre-LayerNorm blocks (+ a final norm); false = post-LN as in Transformer-XL")
    # attention / memory
    attn_type: int = F(0, "0 XL relative, 1 Shaw learned relative, 2 absolute (no memory), "
                          "3/31/32/33 LaMemo look-ahead memory variants")
    mechanism: str = F("auto", "memory mechanism ('auto' = by attn_type: xl for 0/1/2, lamemo for 3/31/32/33)")
    tgt_len: int = F(64, "training segment length N")
    mem_len: int = F(64, "memory length M (0 = no memory)")
    clamp_len: int = F(-1, "clamp relative distances to this value (<= 0: no clamp)")
    same_length: bool = F(False, "every query sees the same number of keys (evaluation protocol of XL)")
    untie_r: bool = F(False, "per-layer position biases u, v (and the look-ahead ones) instead of shared ones")
    # embeddings / softmax
    tie_weight: bool = F(True, "tie the output softmax weights to the input embedding")
    adaptive: bool = F(False, "adaptive input and adaptive softmax with `cutoffs`")
    cutoffs: List[int] = F([], "adaptive cluster boundaries, increasing, inside (0, vocab_size)")
    div_val: int = F(1, "cluster i has embedding width d_embed / div_val**i")
    tie_projs: bool = F(True, "tie the tail clusters' output projections to the input projections (WT103)")
    # initialisation
    init: str = F("normal", "weight init: 'normal' (init_std) or 'uniform' (init_range)")
    init_std: float = F(0.02, "std of the normal init")
    init_range: float = F(0.1, "range of the uniform init")
    proj_init_std: float = F(0.01, "std of the adaptive embedding / softmax projections")
    seed: int = F(1234, "weight init seed (the same full weights for every tensor-parallel layout; training sets "
                        "it from --seed)")
    # execution
    checkpoint_activations: bool = F(False, "recompute each layer in the backward pass")

    @property
    def embed_dim(self) -> int:
        return self.d_embed if self.d_embed is not None else self.d_model

    @property
    def mechanism_name(self) -> str:
        if self.mechanism != "auto":
            return self.mechanism
        return "lamemo" if self.attn_type in LAMEMO_TYPES else "xl"

    def validate(self):
        for name in ("vocab_size", "n_layer", "d_model", "n_head", "d_head", "d_inner", "tgt_len"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        if self.d_embed is not None and self.d_embed < 1:
            raise ConfigError("d_embed", f"must be >= 1, got {self.d_embed}")
        for name in ("dropout", "dropatt"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ConfigError(name, f"must be in [0, 1), got {v}")
        if self.attn_type not in ATTN_TYPES:
            raise ConfigError("attn_type", f"must be one of {list(ATTN_TYPES)}, got {self.attn_type}")
        if self.mem_len < 0:
            raise ConfigError("mem_len", f"must be >= 0, got {self.mem_len}")
        if self.attn_type == 2 and self.mem_len != 0:
            raise ConfigError("mem_len", "attn_type 2 (absolute positions) has no memory: set mem_len 0 "
                                         f"(got {self.mem_len}); absolute positions break the recurrence")
        if self.attn_type in LAMEMO_TYPES and self.mem_len == 0:
            raise ConfigError("mem_len", f"LaMemo (attn_type {self.attn_type}) needs a memory (mem_len >= 1); "
                                         "use attn_type 0 with mem_len 0 for none")
        if self.same_length and self.mem_len == 0:
            raise ConfigError("same_length", "needs a memory (mem_len > 0): each query sees mem_len keys")
        if self.attn_type in SINUSOID_TYPES and self.d_model % 2:
            raise ConfigError("d_model", f"sinusoid positions need an even width, got {self.d_model}")
        from pretrain.model.mechanisms.registry import MECHANISMS  # light: names only
        if self.mechanism != "auto" and self.mechanism not in MECHANISMS:
            raise ConfigError("mechanism", f"unknown mechanism {self.mechanism!r} (known: auto, "
                                           f"{', '.join(sorted(MECHANISMS))})")
        allowed = MECHANISMS[self.mechanism_name]
        if self.attn_type not in allowed:
            raise ConfigError("attn_type", f"mechanism {self.mechanism_name!r} supports attn_type "
                                           f"{list(allowed)}, got {self.attn_type}")
        if self.init not in ("normal", "uniform"):
            raise ConfigError("init", f"must be 'normal' or 'uniform', got {self.init!r}")
        for name in ("init_std", "init_range", "proj_init_std"):
            if getattr(self, name) <= 0:
                raise ConfigError(name, f"must be > 0, got {getattr(self, name)}")
        if self.div_val < 1:
            raise ConfigError("div_val", f"must be >= 1, got {self.div_val}")
        if not self.adaptive:
            if self.cutoffs:
                raise ConfigError("cutoffs", "set but adaptive is false (set adaptive: true or cutoffs: [])")
            if self.div_val != 1:
                raise ConfigError("div_val", "only used with adaptive: true")
        else:
            prev = 0
            for i, c in enumerate(self.cutoffs):
                if not prev < c < self.vocab_size:
                    raise ConfigError(f"cutoffs[{i}]", f"{c} must be increasing and inside (0, vocab_size="
                                                       f"{self.vocab_size})")
                prev = c
            smallest = self.embed_dim // self.div_val ** len(self.cutoffs)
            if smallest < 1:
                raise ConfigError("div_val", f"cluster {len(self.cutoffs)} would have width "
                                             f"{self.embed_dim} // {self.div_val}**{len(self.cutoffs)} = 0")


def load_model_config(path_or_name: str, overrides: Optional[dict] = None) -> ModelConfig:
    """The ``model:`` mapping of a preset (a name in pretrain/configs or a path), validated."""
    path = path_or_name
    if not os.path.exists(path):
        candidate = os.path.join(CONFIG_DIR, path_or_name if path_or_name.endswith(".yaml")
                                 else path_or_name + ".yaml")
        if not os.path.exists(candidate):
            raise ConfigError("config", f"{path_or_name}: no such file or preset in {CONFIG_DIR}")
        path = candidate
    data = load_yaml(path)
    if "model" not in data:
        raise ConfigError("model", f"{path}: no top-level 'model:' mapping")
    section = dict(data["model"] or {})
    section.update(overrides or {})
    try:
        cfg = from_dict(ModelConfig, section, "model")
        validate(cfg, "model")
    except ConfigError as e:
        raise ConfigError(e.field, f"{path}: {str(e).split(': ', 1)[-1]}") from None
    return cfg


def replace(cfg: ModelConfig, **changes) -> ModelConfig:
    """A copy of ``cfg`` with ``changes`` applied (validated)."""
    out = dataclasses.replace(cfg, **changes)
    out.validate()
    return out
