"""The model configuration: one dataclass, loaded from the ``model:`` mapping of a preset YAML.

Field names follow the Transformer-XL / LaMemo code (``n_layer``, ``d_model``, ``attn_type``, ``tgt_len``,
``mem_len``, ``clamp_len``, ``same_length``, ``div_val`` ...).  ``validate()`` checks everything that can be
checked without knowing the parallel layout; ``build_model`` checks the rest (heads divisible by the
tensor-parallel size).  No torch here: configs are read before anything heavy is imported.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import List, Optional, Union

from pretrain.config_base import ConfigError, F, from_dict
from pretrain.model import registry
from pretrain.model.presets import CONFIG_DIR, build_config, preset_data, preset_path, replace  # noqa: F401

@dataclass
class _ModelFields:
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
    attn_type: int = F(0, registry.attn_type_help())
    layers: Union[str, List[Union[int, str]]] = F("", "per-layer mixers: attn_type codes or names, comma-"
                          "separated, 'name*k' repeats, the list repeated to n_layer (e.g. 'delta*3,xl'); "
                          "empty: attn_type for every layer")
    mechanism: str = F("auto", registry.mechanism_help())
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

    def __post_init__(self):
        # mechanism sections given as mappings (ModelConfig(fast_weight={"chunk_size": 32})) become dataclasses
        for name, cls in registry.sections().items():
            value = getattr(self, name, None)
            if isinstance(value, dict):
                setattr(self, name, from_dict(cls, value, name))

    @property
    def embed_dim(self) -> int:
        return self.d_embed if self.d_embed is not None else self.d_model

    def layer_specs(self) -> List["registry.LayerSpec"]:
        """Every layer's mixer (registry.LayerSpec), from ``layers`` or ``attn_type``."""
        return registry.resolve_layers(self)

    def absolute_positions(self) -> bool:
        """Whether absolute sinusoid positions are added to the embeddings: a layer's variant asks for them
        (attn_type 2), or a mechanism section does (``fast_weight.positions: absolute``)."""
        specs = self.layer_specs()
        if any(s.settings.get("absolute_positions") for s in specs):
            return True
        for name in registry.sections():
            wants = getattr(getattr(self, name, None), "absolute_positions", None)
            if wants is not None and wants({s.mechanism for s in specs}):
                return True
        return False

    @property
    def mechanism_name(self) -> str:
        """The mechanism of every layer, or 'hybrid' when layers differ."""
        names = {s.mechanism for s in self.layer_specs()}
        return names.pop() if len(names) == 1 else "hybrid"

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
        if self.attn_type not in registry.all_codes():
            raise ConfigError("attn_type", f"must be one of {registry.all_codes()}, got {self.attn_type}")
        if self.mem_len < 0:
            raise ConfigError("mem_len", f"must be >= 0, got {self.mem_len}")
        if self.mechanism != "auto":
            if self.mechanism not in registry.mechanisms("mixer"):
                extra = ""
                if self.mechanism in registry.mechanisms("stack"):
                    sec = registry.mechanism(self.mechanism).section
                    extra = f"; {self.mechanism} wraps the whole stack: turn it on in model.{sec}"
                raise ConfigError("mechanism", f"unknown mechanism {self.mechanism!r} (known: auto, "
                                               f"{', '.join(sorted(registry.mechanisms('mixer')))}){extra}")
            if self.layers:
                raise ConfigError("mechanism", "give either `layers` (per-layer mixers) or `mechanism`, not both")
            allowed = sorted(registry.mechanism(self.mechanism).variants)
            if self.attn_type not in allowed:
                raise ConfigError("attn_type", f"mechanism {self.mechanism!r} supports attn_type {allowed}, "
                                               f"got {self.attn_type}")
        specs = self.layer_specs()                     # raises ConfigError('layers', ...) on a bad pattern
        uses_memory = [s for s in specs if s.uses_memory]
        if not uses_memory and self.mem_len != 0:
            kinds = sorted({f"{s.mechanism} (attn_type {s.code})" for s in specs})
            raise ConfigError("mem_len", f"no layer reads a memory of past positions ({', '.join(kinds)}): set "
                                         f"mem_len 0 (got {self.mem_len})")
        lamemo = [s for s in specs if s.mechanism == "lamemo"]
        if lamemo and self.mem_len == 0:
            raise ConfigError("mem_len", f"LaMemo (attn_type {lamemo[0].code}) needs a memory (mem_len >= 1); "
                                         "use attn_type 0 with mem_len 0 for none")
        if self.same_length and self.mem_len == 0:
            raise ConfigError("same_length", "needs a memory (mem_len > 0): each query sees mem_len keys")
        for name in registry.sections():                # each mechanism section validates its own fields, and
            section = getattr(self, name)               # (validate_layers) against the layers of its mechanism
            mine = [s for s in specs if registry.mechanism(s.mechanism).section == name]
            try:
                section.validate()
                if hasattr(section, "validate_model"):    # checks against the rest of the model config
                    section.validate_model(self)
                if mine and hasattr(section, "validate_layers"):
                    section.validate_layers(mine)
            except ConfigError as e:
                raise ConfigError(f"{name}.{e.field}", str(e).split(": ", 1)[-1]) from None
        sinusoid = [s for s in specs if s.settings.get("sinusoid")]
        if (sinusoid or self.absolute_positions()) and self.d_model % 2:
            raise ConfigError("d_model", f"sinusoid positions need an even width, got {self.d_model}")
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


class ModelConfig(_ModelFields):
    """The model configuration (``model:`` mapping of a preset); see the fields' help and docs/model.md.

    Besides the fields above it has one section per registered mechanism with options of its own
    (``model.fast_weight``, ...; see ``registry.py``), added from the registry below."""


def _add_mechanism_sections(cls):
    """ModelConfig with a field per mechanism section of the registry (``fast_weight: FastWeightConfig``)."""
    extra = [(name, sec, dataclasses.field(default_factory=sec, metadata={"help": f"{name} options"}))
             for name, sec in registry.sections().items()]
    new = dataclasses.make_dataclass(cls.__name__, extra, bases=(cls,))
    new.__module__, new.__qualname__, new.__doc__ = cls.__module__, cls.__qualname__, cls.__doc__
    return new


ModelConfig = _add_mechanism_sections(ModelConfig)


def load_model_config(path_or_name: str, overrides: Optional[dict] = None) -> ModelConfig:
    """The ``model:`` mapping of a preset (a name in pretrain/configs or a path), validated."""
    path = preset_path(path_or_name)
    data = preset_data(path)
    if "model" not in data:
        raise ConfigError("model", f"{path}: no top-level 'model:' mapping")
    section = dict(data["model"] or {})
    arch = section.pop("arch", "decoder")
    if arch != "decoder":
        raise ConfigError("model.arch", f"{path}: an encoder-decoder preset (arch {arch!r}); load it with "
                                        f"pretrain.model.membart.config.load_membart_config")
    return build_config(ModelConfig, section, path, overrides)
