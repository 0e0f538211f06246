"""The MemBART configuration: a BART-shaped encoder-decoder with memory slots in its encoder (no torch here).

Field names follow Hugging Face's ``BartConfig`` and qywu/memformers' ``MemBartConfig`` (``d_model``,
``encoder_layers``, ``encoder_attention_heads``, ``encoder_ffn_dim``, ``max_position_embeddings``,
``activation_function``, ``attention_dropout``, ``activation_dropout``, ``init_std``, ``scale_embedding``, the
special token ids), so a ``config.json`` of either maps field for field (``from_hf_config``).  ``num_slots`` is
memformers' ``memory_len`` (the K memory slots; 0 turns the memory off and leaves plain BART).

A preset is a YAML file whose ``model:`` mapping says ``arch: membart`` (``pretrain/configs/membart_*.yaml``);
``load_membart_config(name)`` reads it (a ``base:`` chain as for the decoder presets), ``is_membart_preset``
tells the two kinds apart without building either.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional

from pretrain.config_base import ConfigError, F, from_dict, validate
from pretrain.model.presets import CONFIG_DIR, build_config, preset_data, preset_path, replace  # noqa: F401

ARCH = "membart"
# the feed-forward activations: transformers' ACT2FN names without parameters (model.ACTIVATION_FNS computes them
# as transformers does; ``prelu`` and ``xielu`` carry parameters of their own and are not among them)
ACTIVATIONS = ("gelu", "gelu_python", "gelu_new", "gelu_fast", "gelu_accurate", "gelu_pytorch_tanh",
               "gelu_python_tanh", "gelu_10", "quick_gelu", "relu", "relu2", "relu6", "leaky_relu", "silu", "swish",
               "mish", "tanh", "sigmoid", "hardswish", "laplace", "sqrtsoftplus", "linear")


@dataclass
class MemBartConfig:
    """The encoder-decoder's sizes, regularisation, special tokens and memory (docs/membart.md)."""
    arch: str = F(ARCH, "model family: 'membart' (this encoder-decoder); decoder-only presets leave it out")
    vocab_size: int = F(50265, "vocabulary size (BART's GPT-2 BPE: 50265)")
    d_model: int = F(768, "model width")
    encoder_layers: int = F(6, "encoder layers (each reads and writes the memory slots)")
    decoder_layers: int = F(6, "decoder layers (cross-attention over [updated memory ; encoder states])")
    encoder_attention_heads: int = F(12, "encoder heads (split across tensor-parallel ranks)")
    decoder_attention_heads: int = F(12, "decoder heads (split across tensor-parallel ranks)")
    encoder_ffn_dim: int = F(3072, "encoder feed-forward width (token and memory streams)")
    decoder_ffn_dim: int = F(3072, "decoder feed-forward width")
    max_position_embeddings: int = F(1024, "learned positions per sequence (the table has 2 more rows: BART's "
                                           "offset)")
    activation_function: str = F("gelu", "feed-forward activation, a name of transformers' ACT2FN: gelu (erf), "
                                         "gelu_new (tanh), relu, silu, quick_gelu, ... (ACTIVATIONS)")
    dropout: float = F(0.1, "dropout on embeddings and sub-layer outputs (and in the update gate)")
    attention_dropout: float = F(0.0, "dropout on attention probabilities")
    activation_dropout: float = F(0.0, "dropout after the feed-forward activation")
    init_std: float = F(0.02, "std of the normal init of every weight (memformers: 0.01 base, 0.001 large)")
    scale_embedding: bool = F(False, "multiply token embeddings by sqrt(d_model) (false for BART)")
    tie_word_embeddings: bool = F(True, "one token table for the encoder's and decoder's inputs and the output layer "
                                        "(BART); false: three tables (encoder, decoder, output layer), as "
                                        "transformers' untied BART")
    num_slots: int = F(64, "memory slots K in every row (memformers' memory_len; 0 = plain BART, no memory)")
    pad_token_id: int = F(1, "padding token")
    bos_token_id: int = F(0, "beginning-of-sequence token")
    eos_token_id: int = F(2, "end-of-sequence token")
    decoder_start_token_id: int = F(2, "first decoder input (BART: the EOS token)")
    mask_token_id: Optional[int] = F(None, "the <mask> of the denoising objective (BART's GPT-2 vocabulary: "
                                           "50264)")
    forced_bos_token_id: Optional[int] = F(None, "generation: token forced after the decoder start (none)")
    forced_eos_token_id: Optional[int] = F(2, "generation: token forced at the last position (BART: EOS)")
    tgt_len: int = F(128, "tokens of text per time step (the source of one encoder call); the noised source "
                          "and the target add BOS and EOS")
    seed: int = F(1234, "weight init seed (the same full weights for every tensor-parallel layout)")
    checkpoint_activations: bool = F(False, "recompute each layer in the backward pass")

    # -- what the shared init rules read (pretrain/model/weights.py) ---------------------------------------
    @property
    def init(self) -> str:
        return "normal"

    @property
    def init_range(self) -> float:
        return self.init_std

    @property
    def proj_init_std(self) -> float:
        return self.init_std

    @property
    def mechanism_name(self) -> str:
        """The memory mechanism's name in checkpoints and logs."""
        return "membart"

    @property
    def d_head_encoder(self) -> int:
        return self.d_model // self.encoder_attention_heads

    @property
    def d_head_decoder(self) -> int:
        return self.d_model // self.decoder_attention_heads

    @property
    def max_source_len(self) -> int:
        """Longest encoder input a time step makes: BOS + ``tgt_len`` tokens + EOS."""
        return self.tgt_len + 2

    def validate(self) -> None:
        """Raises ``ConfigError(field, why)`` for the first inconsistent field."""
        if self.arch != ARCH:
            raise ConfigError("arch", f"must be {ARCH!r} for this config, got {self.arch!r}")
        for name in ("vocab_size", "d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads",
                     "decoder_attention_heads", "encoder_ffn_dim", "decoder_ffn_dim", "max_position_embeddings",
                     "tgt_len"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("encoder_attention_heads", "decoder_attention_heads"):
            if self.d_model % getattr(self, name):
                raise ConfigError(name, f"{getattr(self, name)} heads do not divide d_model {self.d_model}")
        if self.num_slots < 0:
            raise ConfigError("num_slots", f"must be >= 0 (0 = no memory), got {self.num_slots}")
        for name in ("dropout", "attention_dropout", "activation_dropout"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ConfigError(name, f"must be in [0, 1), got {v}")
        if self.activation_function not in ACTIVATIONS:
            raise ConfigError("activation_function", f"must be one of {', '.join(ACTIVATIONS)} (transformers' "
                                                      f"activations without parameters), got "
                                                      f"{self.activation_function!r}")
        if self.init_std <= 0:
            raise ConfigError("init_std", f"must be > 0, got {self.init_std}")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id", "mask_token_id",
                     "forced_bos_token_id", "forced_eos_token_id"):
            v = getattr(self, name)
            if v is not None and not 0 <= v < self.vocab_size:
                raise ConfigError(name, f"{v} is outside the vocabulary [0, {self.vocab_size})")
        if self.max_source_len > self.max_position_embeddings:
            raise ConfigError("tgt_len", f"{self.tgt_len} tokens + BOS + EOS exceed max_position_embeddings "
                                         f"{self.max_position_embeddings}")


# ----------------------------------------------------------------------------------------------------------
# presets

def preset_model_section(path_or_name: str) -> Dict[str, Any]:
    """The ``model:`` mapping of a preset (its ``base:`` chain applied), unvalidated."""
    return dict(preset_data(path_or_name).get("model") or {})


def is_membart_preset(path_or_name: str) -> bool:
    """Whether a preset's ``model.arch`` is ``membart`` (False for the decoder-only presets, which have none)."""
    return preset_model_section(path_or_name).get("arch") == ARCH


def load_membart_config(path_or_name: str, overrides: Optional[Mapping[str, Any]] = None) -> MemBartConfig:
    """The ``model:`` mapping of a MemBART preset (a name in pretrain/configs or a path), validated.  Raises
    ConfigError naming the file and field (a decoder-only preset: ``model.arch``)."""
    path = preset_path(path_or_name)
    section = preset_model_section(path)
    if section.get("arch") != ARCH:
        raise ConfigError("model.arch", f"{path}: not a MemBART preset (model.arch is {section.get('arch')!r}, "
                                        f"expected {ARCH!r}); decoder-only presets load with load_model_config")
    return build_config(MemBartConfig, section, path, overrides)


# ----------------------------------------------------------------------------------------------------------
# Hugging Face config.json

# What loading does with each field of a Hugging Face BART ``config.json`` (transformers 5.x ``BartConfig`` and
# ``PreTrainedConfig``, plus the keys older transformers versions and fairseq conversions wrote); the table in
# docs/membart.md says the same with the reasons.
#
# honoured: mapped to the MemBartConfig field of the same name (shapes, activation, embedding scale, tying, dropout,
#   special tokens); BartConfig's aliases (its ``attribute_map``) are read when the field itself is absent.
_HF_FIELDS = ("vocab_size", "d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads",
              "decoder_attention_heads", "encoder_ffn_dim", "decoder_ffn_dim", "max_position_embeddings",
              "activation_function", "dropout", "attention_dropout", "activation_dropout", "init_std",
              "scale_embedding", "tie_word_embeddings", "pad_token_id", "bos_token_id", "eos_token_id",
              "decoder_start_token_id", "forced_bos_token_id", "forced_eos_token_id")
_ALIASES = {"hidden_size": "d_model", "num_attention_heads": "encoder_attention_heads",
            "num_hidden_layers": "encoder_layers"}
# refused: a value this model cannot compute -> ConfigError naming the field, the value and what is supported.
# (field, accepted(value), what is supported); absent keys are accepted.
_REFUSED = (
    ("normalize_before", lambda v: not v, "false: post-LN BART (pre-LN is mBART's layout)"),
    ("add_final_layer_norm", lambda v: not v, "false: no layer norm after the last encoder / decoder layer"),
    ("normalize_embedding", lambda v: v is None or v is True, "true: layernorm_embedding after the embeddings"),
    ("static_position_embeddings", lambda v: not v, "false: learned positions"),
    ("extra_pos_embeddings", lambda v: v is None or v == 2, "2: BART's learned position offset"),
    ("add_bias_logits", lambda v: not v, "false: the logits' only bias is final_logits_bias"),
    ("is_encoder_decoder", lambda v: v is None or v is True, "true: the encoder-decoder"),
    ("is_decoder", lambda v: not v, "false: the encoder-decoder (BartForCausalLM's decoder-only checkpoints are "
                                    "not supported)"),
    ("tie_encoder_decoder", lambda v: not v, "false: separate encoder and decoder layers"),
    ("pruned_heads", lambda v: not v, "none: every head of every layer"),
    ("quantization_config", lambda v: v is None, "none: full-precision weights"),
)
# honoured at evaluation, not in training: LayerDrop skips whole layers only in training mode; this model has no
# LayerDrop, so a nonzero value loads (the evaluation numerics are the same) with a warning, and is written as 0.
_TRAIN_ONLY = ("encoder_layerdrop", "decoder_layerdrop")
# irrelevant (read by nothing that changes the numerics of the loaded encoder-decoder; ignored like every other
# key): init_std (initialisation only; still mapped), use_cache (generation caching), classifier_dropout,
# id2label / label2id / num_labels / problem_type (classification heads), chunk_size_feed_forward (BART does not
# chunk), output_attentions / output_hidden_states / return_dict, dtype / torch_dtype (storage dtype), architectures,
# _name_or_path, transformers_version, and the generation defaults (num_beams, max_length, min_length,
# no_repeat_ngram_size, length_penalty, early_stopping, task_specific_params: arguments of ``generate`` here).


EXTRA_KEY = "memtrain"        # config.json entry with the fields Hugging Face's BartConfig has no name for
_EXTRA_FIELDS = ("tgt_len", "mask_token_id", "seed")


def from_hf_config(hf: Mapping[str, Any], **overrides) -> MemBartConfig:
    """A config from a Hugging Face BART ``config.json`` mapping (``model_type`` ``bart``), or a MemBART one
    (``memory_len`` -> ``num_slots``; a plain BART config gives ``num_slots`` 0); ``tgt_len``, ``mask_token_id`` and
    ``seed`` come from its ``memtrain`` entry when it has one (``to_hf_config`` writes it); ``overrides`` replace
    fields after the mapping.  Every field that changes the numerics is honoured or refused (the tables above):
    raises ConfigError naming the field, its value and what is supported (pre-LN variants, a final layer norm,
    no ``layernorm_embedding``, another position offset, quantized weights, ...; an activation outside
    ``ACTIVATIONS``; two spellings of a field that disagree).  Warns (UserWarning) for a nonzero LayerDrop."""
    if hf.get("model_type", "bart") != "bart":
        raise ConfigError("model_type", f"a BART config is needed, got model_type {hf.get('model_type')!r}")
    for field, accepted, supported in _REFUSED:
        if field in hf and not accepted(hf[field]):
            raise ConfigError(field, f"{hf[field]!r} is not supported; supported: {supported}")
    for field in _TRAIN_ONLY:
        if hf.get(field):
            import warnings
            warnings.warn(f"config field '{field}': {hf[field]!r} ignored: this model has no LayerDrop (it acts in "
                          f"training only; evaluation numerics are unchanged)", stacklevel=2)
    kw = {k: hf[k] for k in _HF_FIELDS if k in hf}
    for alias, field in _ALIASES.items():
        if alias in hf:
            if field in kw and kw[field] != hf[alias]:
                raise ConfigError(field, f"{kw[field]!r} disagrees with its alias {alias} {hf[alias]!r}")
            kw.setdefault(field, hf[alias])
    kw["num_slots"] = int(hf.get("memory_len", 0) or 0)
    kw.update({k: v for k, v in (hf.get(EXTRA_KEY) or {}).items() if k in _EXTRA_FIELDS})
    if "tgt_len" not in kw:     # a config from elsewhere: the default time step, or the longest the positions allow
        kw["tgt_len"] = min(MemBartConfig.tgt_len, int(kw.get("max_position_embeddings", 1024)) - 2)
    kw.update(overrides)
    cfg = from_dict(MemBartConfig, kw)          # errors name the fields as config.json spells them
    validate(cfg)
    return cfg


# the fields whose values change what a model computes from given weights (or the weights' shapes): a checkpoint's
# config.json and the model it is loaded into must agree on them (``weights.check_hf_config``)
NUMERIC_FIELDS = ("vocab_size", "d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads",
                  "decoder_attention_heads", "encoder_ffn_dim", "decoder_ffn_dim", "max_position_embeddings",
                  "activation_function", "scale_embedding", "tie_word_embeddings", "num_slots")


def to_hf_config(cfg: MemBartConfig, membart: Optional[bool] = None) -> Dict[str, Any]:
    """A ``config.json`` mapping for ``transformers.BartConfig`` that says what the model computes
    (``tie_word_embeddings`` as the model's; ``membart``: also ``memory_len``, as the MemBART checkpoints have;
    default: when the model has slots)."""
    membart = cfg.num_slots > 0 if membart is None else membart
    out = {k: getattr(cfg, k) for k in _HF_FIELDS}
    out[EXTRA_KEY] = {k: getattr(cfg, k) for k in _EXTRA_FIELDS}
    out.update(model_type="bart", architectures=["BartForConditionalGeneration"], is_encoder_decoder=True,
               normalize_before=False, normalize_embedding=True, add_final_layer_norm=False, encoder_layerdrop=0.0,
               decoder_layerdrop=0.0, use_cache=True)
    if membart:
        out["memory_len"] = cfg.num_slots
    return out
