"""The registry of memory mechanisms: the single source of their names, ``attn_type`` codes, config sections
and implementations.  No torch here: config validation and ``--help`` read it before anything heavy is imported.

A *mechanism* is a kind of token mixer with its memory (Transformer-XL attention, LaMemo look-ahead attention,
fast-weight layers, ...).  Every layer of the stack holds one mixer, chosen per layer (``ModelConfig.layers``) or
for all layers at once (``ModelConfig.attn_type``).  Each registration says:

* ``name``: the mechanism's name (config values, state signatures, docs);
* ``variants``: the ``attn_type`` codes it accepts, each with a name used inside the code and the settings that
  code implies (``{24: Variant("delta_elu", rule="delta", feature_map="elu", ...)}``); the codes stay at the
  config surface (they are the original projects' numbering), the code reads the names;
* ``aliases``: short names usable in a layer pattern instead of codes (``"delta"`` for 24);
* ``section``: the config dataclass of its own options (``model.<section>``), with its own ``validate()``,
  defined next to the registration;
* ``implementation``: ``"module:Class"`` of the mixer (a ``pretrain.model.mixers.base.Mixer`` subclass);
* test and benchmark metadata: the small configs the registry-driven test matrix runs
  (``test_configs``; an optional ``label`` key names the case), whether a longer segment equals recurrence over
  shorter ones (``recurrence_exact``), and for a stack-level memory its benchmark variants (``bench_configs``).

A *stack-level memory* (``kind="stack"``: RMT's memory tokens) is not chosen per layer: it is present when its
``enabled(cfg)`` test says so (``model.rmt.num_mem_tokens > 0``) and then wraps the whole stack, whatever mixers
the layers hold.

Adding a mechanism = one implementation file in ``pretrain/model/mixers/`` plus one ``register(...)`` block
here; config validation, the reference check, the test matrix and the benchmarks read this registry.

Layer patterns (``ModelConfig.layers``): a comma-separated list (or a YAML list) of ``attn_type`` codes or
aliases, ``entry*k`` repeating an entry, the whole list repeated to fill ``n_layer`` (its length must divide
``n_layer``).  Examples: ``"delta*3,xl"`` (three delta-rule layers to one XL layer), ``"24,24,24,0"``,
``"lamemo"`` (every layer).  A mechanism section may then resolve a per-layer option of its own into the codes
(``rewrite_layers``: ``compressive.memory_layers`` keeps attn_type 60 at the listed layers only).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from pretrain.config_base import F, ConfigError


@dataclass(frozen=True)
class Variant:
    """One ``attn_type`` code of a mechanism: its name inside the code and the settings it implies."""
    name: str
    settings: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Mechanism:
    name: str
    implementation: str
    variants: Mapping[int, Variant] = field(default_factory=dict)
    aliases: Mapping[str, int] = field(default_factory=dict)
    # "mixer": a per-layer token mixer chosen by attn_type codes; "stack": a stack-level memory (a
    # ``StackMemory``: RMT tokens, Memformer slots), present when ``enabled(cfg)`` says so
    kind: str = "mixer"
    enabled: Optional[Any] = None
    section: Optional[str] = None            # config section name (model.<section>)
    section_class: Optional[type] = None
    description: str = ""
    # Test-matrix metadata: small model configs (overrides of a tiny base) the registry-driven tests run, and
    # whether running a long segment equals running it in pieces with the state carried (exactly).
    test_configs: Tuple[Mapping[str, Any], ...] = ()
    recurrence_exact: bool = False
    # Benchmark variants of a stack-level memory (name -> model overrides; mixers get theirs from their codes)
    bench_configs: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class LayerSpec:
    """The mixer of one layer: its index, the ``attn_type`` code, the mechanism and the variant.

    Settings every mechanism may set: ``memory`` (the layer reads the ``mem_len`` FIFO of past positions),
    ``sinusoid`` (it uses sinusoid position embeddings: d_model must be even), ``absolute_positions`` (it
    needs absolute positions added to the embeddings), ``standalone`` (False: a model of this code alone is
    invalid, e.g. slot layers that only read; benchmarks skip it as a variant of its own)."""
    index: int
    code: int
    mechanism: str
    variant: str
    settings: Mapping[str, Any]

    @property
    def uses_memory(self) -> bool:
        return bool(self.settings.get("memory", False))


_MECHANISMS: Dict[str, Mechanism] = {}
_CODES: Dict[int, str] = {}
_ALIASES: Dict[str, int] = {}


def register(mech: Mechanism) -> Mechanism:
    if mech.name in _MECHANISMS:
        raise ValueError(f"mechanism {mech.name!r} registered twice")
    if mech.kind not in ("mixer", "stack") or (mech.kind == "stack") != (mech.enabled is not None):
        raise ValueError(f"mechanism {mech.name!r}: kind 'mixer' (with attn_type variants) or 'stack' (with "
                         f"an enabled(cfg) test)")
    for code in mech.variants:
        if code in _CODES:
            raise ValueError(f"attn_type {code} claimed by {_CODES[code]!r} and {mech.name!r}")
        _CODES[code] = mech.name
    for alias, code in mech.aliases.items():
        if alias in _ALIASES or code not in mech.variants:
            raise ValueError(f"alias {alias!r} of {mech.name!r}: duplicate or unknown code {code}")
        _ALIASES[alias] = code
    _MECHANISMS[mech.name] = mech
    return mech


def mechanisms(kind: Optional[str] = None) -> Dict[str, Mechanism]:
    """Registered mechanisms by name (of one ``kind``, "mixer" or "stack", if given)."""
    return {n: m for n, m in _MECHANISMS.items() if kind is None or m.kind == kind}


def stack_memories(cfg) -> List[Mechanism]:
    """The stack-level memories a ModelConfig turns on, in registration order."""
    return [m for m in _MECHANISMS.values() if m.kind == "stack" and m.enabled is not None and m.enabled(cfg)]


def mechanism(name: str) -> Mechanism:
    if name not in _MECHANISMS:
        raise KeyError(f"unknown mechanism {name!r} (known: {', '.join(sorted(_MECHANISMS))})")
    return _MECHANISMS[name]


def mechanism_of_code(code: int) -> Mechanism:
    return _MECHANISMS[_CODES[code]]


def all_codes() -> List[int]:
    return sorted(_CODES)


def sections() -> Dict[str, type]:
    """Config section name -> dataclass, for every mechanism that has one (ModelConfig grows these fields)."""
    return {m.section: m.section_class for m in _MECHANISMS.values() if m.section}


def mixer_class(name: str):
    """The implementation class of mechanism ``name`` (a Mixer, or a StackMemory for kind "stack")."""
    import importlib
    module, cls = mechanism(name).implementation.split(":")
    return getattr(importlib.import_module(module), cls)


# ----------------------------------------------------------------------------------------------------------
# layer patterns

def _parse_entry(entry: Union[int, str], where: str) -> int:
    if isinstance(entry, bool):
        raise ConfigError(where, f"{entry!r} is not an attn_type code or mechanism alias")
    if isinstance(entry, int):
        code = entry
    else:
        text = str(entry).strip()
        if text.lstrip("-").isdigit():
            code = int(text)
        elif text in _ALIASES:
            code = _ALIASES[text]
        else:
            raise ConfigError(where, f"unknown layer mixer {text!r} (attn_type codes: {all_codes()}; aliases: "
                                     f"{', '.join(sorted(_ALIASES))})")
    if code not in _CODES:
        raise ConfigError(where, f"unknown attn_type {code} (known: {all_codes()})")
    return code


def parse_pattern(pattern: Union[str, Sequence[Union[int, str]]], n_layer: int,
                  field_name: str = "layers") -> List[int]:
    """The per-layer ``attn_type`` codes of a layer pattern (see the module docstring).

    Raises ``ConfigError(field_name, ...)`` on an unknown entry, a bad repeat count, or a length that does not
    divide ``n_layer``."""
    if isinstance(pattern, str):
        items: List[Any] = [p for p in (s.strip() for s in pattern.split(",")) if p]
    else:
        items = list(pattern)
    codes: List[int] = []
    for i, item in enumerate(items):
        where = f"{field_name}[{i}]"
        if isinstance(item, str) and "*" in item:
            name, _, count = item.partition("*")
            if not count.strip().isdigit() or int(count) < 1:
                raise ConfigError(where, f"{item!r}: the repeat count after '*' must be a positive integer")
            codes += [_parse_entry(name, where)] * int(count)
        else:
            codes.append(_parse_entry(item, where))
    if not codes:
        raise ConfigError(field_name, "empty layer pattern")
    if n_layer % len(codes):
        raise ConfigError(field_name, f"the pattern has {len(codes)} layers, which does not divide n_layer="
                                      f"{n_layer} (give one entry per layer or a pattern that repeats evenly)")
    return codes * (n_layer // len(codes))


def resolve_layers(cfg) -> List[LayerSpec]:
    """Every layer's mixer for a ModelConfig: ``cfg.layers`` if given, else ``cfg.attn_type`` for all; then a
    mechanism section with a ``rewrite_layers(codes) -> codes`` method resolves its own per-layer option into
    the codes (``compressive.memory_layers``)."""
    codes = parse_pattern(cfg.layers, cfg.n_layer) if cfg.layers else [cfg.attn_type] * cfg.n_layer
    for name in sections():         # a section may resolve its own per-layer choice into the pattern
        rewrite = getattr(getattr(cfg, name, None), "rewrite_layers", None)
        if rewrite is not None:
            codes = rewrite(codes)
    out = []
    for i, code in enumerate(codes):
        mech = mechanism_of_code(code)
        var = mech.variants[code]
        out.append(LayerSpec(i, code, mech.name, var.name, dict(var.settings)))
    return out


def signature(specs: Sequence[LayerSpec]) -> str:
    """A short name of a layer layout, carried by memory states (``lamemo``, ``fast_weight*3,xl``): a state
    made for one layout is refused by another."""
    names = [s.mechanism if len({t.code for t in specs if t.mechanism == s.mechanism}) == 1
             else f"{s.mechanism}:{s.code}" for s in specs]
    if len(set(names)) == 1:
        return names[0]
    runs: List[Tuple[str, int]] = []
    for n in names:
        if runs and runs[-1][0] == n:
            runs[-1] = (n, runs[-1][1] + 1)
        else:
            runs.append((n, 1))
    return ",".join(n if k == 1 else f"{n}*{k}" for n, k in runs)


# ==========================================================================================================
# registrations

register(Mechanism(
    name="xl",
    implementation="pretrain.model.mixers.xl:XLMixer",
    description="Transformer-XL segment recurrence: attention over [cached layer inputs ; segment]",
    variants={0: Variant("rel", {"memory": True, "sinusoid": True}),      # XL relative positions (u, v, W_R R)
              1: Variant("shaw", {"memory": True}),                       # Shaw learned relative positions
              2: Variant("absolute", {"sinusoid": True, "absolute_positions": True})},  # absolute, no memory
    aliases={"xl": 0, "shaw": 1, "absolute": 2},
    test_configs=({"attn_type": 0}, {"attn_type": 1}, {"attn_type": 2, "mem_len": 0}),
    recurrence_exact=True,
))

_LAMEMO = {"memory": True, "sinusoid": True}

register(Mechanism(
    name="lamemo",
    implementation="pretrain.model.mixers.lamemo:LaMemoMixer",
    description="LaMemo look-ahead memory: memory rows refreshed by attending to their right context",
    variants={3: Variant("disentangled", _LAMEMO),      # causal look-ahead, |distance|, a future position bias
              31: Variant("negative", _LAMEMO),         # XL's sinusoid of negative distances, XL's v
              32: Variant("disentangled_v2", _LAMEMO),  # as 3, plus a future content bias
              33: Variant("full", _LAMEMO)},            # full look-ahead inside the window
    aliases={"lamemo": 3},
    test_configs=({"attn_type": 3}, {"attn_type": 31}, {"attn_type": 32}, {"attn_type": 33}),
    recurrence_exact=False,   # memory rows see their right context: a longer segment is a different model
))


@dataclass
class FastWeightConfig:
    """Options of the fast-weight layers (``model.fast_weight``); the rule and feature map come from each
    layer's attn_type (4/5/6, 34/35/36: sum rule; 24/25/26: delta rule; 44/45/46: delta rule with attention
    normalisation; x4 ELU+1, x5 FAVOR+, x6 DPFP).  4/5/6 and 34/35/36 differ in where 1/sqrt(d_head) applies
    (the scores or the normalised output; docs/model.md, "The fast-weight toolkit's attn_type codes").  The
    toolkit's sum-rule layers do not sum-normalise their features: reproduce them with ``sum_norm: false``."""
    performer_proj_dim: int = F(16, "FAVOR+ random features m (feature size 2m)")
    dpfp_nu: int = F(2, "DPFP roll count nu (feature size 2 nu d_head)")
    sum_norm: bool = F(True, "divide phi(k), phi(q) by their sum before the rule (lmtool: crucial for stability)")
    attn_norm: Optional[bool] = F(None, "divide the output by z_t . phi(q_t), z the running key sum (default: "
                                        "by attn_type: on for the sum rule and 44/45/46, off for 24/25/26)")
    eps: float = F(1e-5, "attention normalisation: added to the denominator")
    positions: str = F("none", "'none' (order comes from the recurrence; the default with carried state) or "
                               "'absolute' (sinusoid counted from the segment end, added to the embeddings)")
    carry_state: bool = F(True, "carry the fast weights from segment to segment (false: every segment starts "
                                "from zero, lmtool's limited-context training)")
    impl: str = F("auto", "rule implementation: auto (fused kernel on CUDA when built, else chunk), chunk, naive, "
                          "fused (the CUDA kernel, or an error)")
    chunk_size: int = F(64, "chunk length of the chunkwise-parallel rule")

    def absolute_positions(self, mechanisms) -> bool:
        """Whether the model adds absolute positions to its embeddings for its fast-weight layers."""
        return self.positions == "absolute" and "fast_weight" in mechanisms

    def validate(self):
        for name in ("performer_proj_dim", "dpfp_nu", "chunk_size"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        if self.eps <= 0:
            raise ConfigError("eps", f"must be > 0, got {self.eps}")
        if self.positions not in ("none", "absolute"):
            raise ConfigError("positions", f"must be 'none' or 'absolute', got {self.positions!r}")
        if self.impl not in ("auto", "chunk", "naive", "fused"):
            raise ConfigError("impl", f"must be auto, chunk, naive or fused, got {self.impl!r}")

    def validate_layers(self, specs) -> None:
        """ConfigError for a setting the layers ``specs`` (this section's) cannot train with: the delta rule on
        ELU+1 features without sum normalisation.  The update W += beta k' (v - W^T k')^T contracts only while
        beta |k'|^2 <= 2 (Schlag et al. 2021, §4.2: phi(k) is sum-normalised for stability); ELU+1 is 1 at 0 in
        every dimension, so |phi(k)|^2 is about d_head for the small keys of a fresh model and the recurrence
        diverges within its first segment (NaN at step 1, measured at d_head 32).  FAVOR+ (|phi(0)|^2 = 2) and
        DPFP (phi(0) = 0) start inside the bound and are left to the user."""
        bad = sorted({s.code for s in specs if s.settings.get("rule") == "delta"
                      and s.settings.get("feature_map") == "elu"})
        if bad and not self.sum_norm:
            raise ConfigError("sum_norm", f"false cannot train the delta rule on ELU+1 features (attn_type "
                                          f"{', '.join(map(str, bad))}): |phi(k)|^2 is about d_head, beyond the "
                                          f"rule's bound beta |phi(k)|^2 <= 2, and the fast weights diverge (NaN "
                                          f"from the first step); keep sum_norm true")


def _fw(rule: str, fmap: str, attn_norm: bool, scale: str = "output") -> Variant:
    """A fast-weight code: its rule, feature map, default attention normalisation, and where the factor
    1/sqrt(d_head) applies: ``"output"`` (on the normalised output: the toolkit's CUDA-path layers 24-26, 34, 35,
    44-46) or ``"scores"`` (on the scores phi(q) . phi(k), inside the attention normalisation, where it cancels but
    for eps: the toolkit's pure-PyTorch linear attention 4/5/6).  docs/model.md maps the toolkit's codes."""
    name = f"{rule}_{fmap}" + ("_norm" if attn_norm and rule == "delta" else "") + \
        ("_scaled" if rule == "sum" and scale == "output" else "")
    return Variant(name, {"rule": rule, "feature_map": fmap, "attn_norm": attn_norm, "scale": scale})


register(Mechanism(
    name="fast_weight",
    implementation="pretrain.model.mixers.fast_weight:FastWeightMixer",
    description="fast-weight layers (linear transformers): sum rule or delta rule, ELU+1 / FAVOR+ / DPFP",
    # 4/5/6: the toolkit's pure-PyTorch linear attention (LinearMultiHeadAttn, PerformerMultiHeadAttn,
    # DPFPMultiHeadAttn); 34/35/36: its sum rule through the CUDA kernel (the output scaled after normalising)
    variants={4: _fw("sum", "elu", True, "scores"), 5: _fw("sum", "favor", True, "scores"),
              6: _fw("sum", "dpfp", True, "scores"),
              34: _fw("sum", "elu", True), 35: _fw("sum", "favor", True), 36: _fw("sum", "dpfp", True),
              24: _fw("delta", "elu", False), 25: _fw("delta", "favor", False), 26: _fw("delta", "dpfp", False),
              44: _fw("delta", "elu", True), 45: _fw("delta", "favor", True), 46: _fw("delta", "dpfp", True)},
    aliases={"linear": 4, "performer": 5, "dpfp_sum": 6, "delta": 24, "delta_favor": 25, "delta_dpfp": 26,
             "delta_norm": 44},
    section="fast_weight",
    section_class=FastWeightConfig,
    test_configs=({"attn_type": 24, "mem_len": 0}, {"attn_type": 4, "mem_len": 0}, {"attn_type": 34, "mem_len": 0},
                  {"attn_type": 25, "mem_len": 0}, {"attn_type": 46, "mem_len": 0}),
    recurrence_exact=True,
))


@dataclass
class SlotsConfig:
    """Options of Memformer's memory slots (``model.slots``): a fixed set of K learned-to-write vectors per
    stream, read by every slot layer (attn_type 50, alias ``slots``) and rewritten once per segment (Wu et al.
    2022, "Memformer"; MemBART's dual stream, qywu/memformers).  The slots exist when some layer is a slot
    layer (attn_type 50 reads and writes them, 51 only reads them; at least one layer must write)."""
    num_slots: int = F(64, "memory slots K per stream (MemBART: 64 base, 128 large)")

    def validate(self):
        if self.num_slots < 1:
            raise ConfigError("num_slots", f"must be >= 1, got {self.num_slots}")


def _has_slot_layers(cfg) -> bool:
    return any(s.mechanism == "memformer" for s in cfg.layer_specs())


register(Mechanism(
    name="memformer",
    implementation="pretrain.model.mixers.slots:SlotMixer",
    description="Memformer slot layer: tokens read the memory slots (and the segment, XL relative positions); in "
                "a writing layer (50) the slots' write stream attends to itself and the segment's tokens",
    variants={50: Variant("slots", {"sinusoid": True}),      # reads the slots and writes them (MemBART's encoder)
              51: Variant("read", {"sinusoid": True, "standalone": False})},   # reads only (MemBART's decoder)
    aliases={"slots": 50, "slots_read": 51},
    test_configs=({"attn_type": 50, "mem_len": 0, "slots": {"num_slots": 4}},),
    recurrence_exact=False,   # the slots summarise a segment as a whole: a longer segment is another model
))

register(Mechanism(
    name="slots",
    kind="stack",
    enabled=_has_slot_layers,
    implementation="pretrain.model.mixers.slots:SlotMemory",
    description="Memformer memory slots: biased-normalisation forgetting m_0 = LN((1-r) M + b_mem) below the "
                "layers, the update gate M' = a m_L + (1-a) m_0 above them",
    section="slots",
    section_class=SlotsConfig,
    # (a writing and a reading slot layer, pre-LN, per-layer position biases)
    test_configs=({"attn_type": 51, "layers": "slots,slots_read", "mem_len": 0, "pre_lnorm": True,
                   "untie_r": True, "slots": {"num_slots": 3}},),
))


@dataclass
class RMTConfig:
    """Options of the Recurrent Memory Transformer (``model.rmt``; Bulatov, Kuratov & Burtsev 2022, "Recurrent
    Memory Transformer", §3, and their LM-RMT code): K memory tokens added to every segment, written by the last
    layer and read by the next segment at the bottom of the stack."""
    num_mem_tokens: int = F(0, "memory tokens K (0: no RMT memory)")
    mem_at_end: bool = F(True, "read memory before the segment and write memory after it (LM-RMT's mem_at_end, "
                               "the paper's setting); false: [memory ; segment], the next memory is read back "
                               "from the leading positions (which see only each other and, with "
                               "read_mem_from_cache, the Transformer-XL cache)")
    read_mem_from_cache: bool = F(False, "memory rows also attend to the Transformer-XL cache (mem_len > 0); "
                                         "tokens always do")

    def validate(self):
        if self.num_mem_tokens < 0:
            raise ConfigError("num_mem_tokens", f"must be >= 0 (0 turns RMT off), got {self.num_mem_tokens}")


register(Mechanism(
    name="rmt",
    kind="stack",
    enabled=lambda cfg: cfg.rmt.num_mem_tokens > 0,
    implementation="pretrain.model.mixers.rmt:RMTMemory",
    description="Recurrent Memory Transformer: K memory tokens read before the segment, written after it by the "
                "last layer, fed to the next segment's first layer",
    section="rmt",
    section_class=RMTConfig,
    test_configs=({"label": "k2", "attn_type": 0, "mem_len": 0, "rmt": {"num_mem_tokens": 2}},
                  {"label": "k3-xl", "attn_type": 0, "mem_len": 5, "rmt": {"num_mem_tokens": 3}},
                  {"label": "k2-xl-cache", "attn_type": 0, "mem_len": 5,
                   "rmt": {"num_mem_tokens": 2, "read_mem_from_cache": True}},
                  {"label": "k2-read-only", "attn_type": 0, "mem_len": 5,
                   "rmt": {"num_mem_tokens": 2, "mem_at_end": False, "read_mem_from_cache": True}}),
    recurrence_exact=False,   # the memory is a learned summary, not the past positions themselves
    bench_configs={"rmt8": {"attn_type": 0, "mem_len": 0, "rmt": {"num_mem_tokens": 8}},
                   "rmt16": {"attn_type": 0, "mem_len": 0, "rmt": {"num_mem_tokens": 16}},
                   "rmt8_xl": {"attn_type": 0, "rmt": {"num_mem_tokens": 8}}},
))


@dataclass
class CompressiveConfig:
    """Options of the Compressive Transformer layers (``model.compressive``; Rae et al. 2020, "Compressive
    Transformers for Long-Range Sequence Modelling").  attn_type 60 (``compressive``): XL relative attention
    over [compressed memory ; memory ; segment]; 61 (``compressive_xl``): over [memory ; segment] (no
    compression); 62 (``compressive_local``): within the segment only.  61 and 62 exist for the layers that keep
    no compressed memory (``memory_layers``) and share the section's residual gating."""
    cmem_len: Optional[int] = F(None, "compressed memory slots per memory layer, n_cm (default: mem_len // "
                                      "cmem_ratio, at least 1)")
    cmem_ratio: int = F(4, "compression rate c: every c positions that leave the memory become one compressed "
                           "slot (the paper's best: 3 on enwik8, 4 on WikiText-103)")
    compression: str = F("conv", "compression function f_c: conv (1-D convolution, kernel = stride = c, trained "
                                 "by the attention-reconstruction loss only), max or mean (pooling, kernel = stride "
                                 "= c, nothing to train)")
    reconstruction_loss_weight: float = F(1.0, "weight of the attention-reconstruction loss (conv only), "
                                               "returned as the model's aux_loss: weight x the mean over the "
                                               "compressing layers (0: not computed)")
    memory_layers: List[int] = F([], "layers (0-based; negative counts from the top) whose attn_type 60 keeps a "
                                      "compressed memory; the other attn_type 60 layers become `other_layers` "
                                      "(empty: every attn_type 60 layer compresses)")
    other_layers: str = F("xl", "what the attn_type 60 layers outside `memory_layers` become: xl (61: the "
                                "Transformer-XL memory, no compression) or local (62: the segment only)")
    gru_gating: bool = F(False, "GRU-type gating of both residual connections instead of x + f(x) (GTrXL, "
                                "Parisotto et al. 2019), in the layers of attn_type 60, 61 and 62")
    gate_bias: float = F(2.0, "initial bias of the gate's update z (z = sigmoid(2) ~ 0.88 keeps the residual: "
                              "each gated block starts close to the identity)")

    def validate(self):
        if self.cmem_len is not None and self.cmem_len < 1:
            raise ConfigError("cmem_len", f"must be >= 1 (or null for mem_len // cmem_ratio), got {self.cmem_len}")
        if self.cmem_ratio < 1:
            raise ConfigError("cmem_ratio", f"must be >= 1, got {self.cmem_ratio}")
        if self.compression not in ("conv", "max", "mean"):
            raise ConfigError("compression", f"must be conv, max or mean, got {self.compression!r}")
        if self.reconstruction_loss_weight < 0:
            raise ConfigError("reconstruction_loss_weight", f"must be >= 0, got {self.reconstruction_loss_weight}")
        if self.other_layers not in ("xl", "local"):
            raise ConfigError("other_layers", f"must be xl or local, got {self.other_layers!r}")

    def slots(self, mem_len: int) -> int:
        """The compressed memory length n_cm for a model whose config has ``mem_len``."""
        return self.cmem_len if self.cmem_len is not None else max(1, mem_len // self.cmem_ratio)

    def rewrite_layers(self, codes: List[int]) -> List[int]:
        """``memory_layers`` resolved into the layer pattern: attn_type 60 at a layer not listed becomes 61
        (``other_layers: xl``) or 62 (``local``).  Raises ConfigError naming ``compressive.memory_layers`` for an
        index outside the model or a listed layer that is not attn_type 60."""
        if not self.memory_layers:
            return codes
        n = len(codes)
        listed = set()
        for i, idx in enumerate(self.memory_layers):
            if not -n <= idx < n:
                raise ConfigError(f"compressive.memory_layers[{i}]", f"layer {idx} outside a model of {n} layers "
                                                                     f"(0-based; -1 is the top layer)")
            if codes[idx % n] != 60:
                raise ConfigError(f"compressive.memory_layers[{i}]", f"layer {idx % n} has attn_type "
                                                                     f"{codes[idx % n]}, not 60 (compressive)")
            listed.add(idx % n)
        other = 61 if self.other_layers == "xl" else 62
        return [other if c == 60 and i not in listed else c for i, c in enumerate(codes)]


_CT = {"sinusoid": True}

register(Mechanism(
    name="compressive",
    implementation="pretrain.model.mixers.compressive:CompressiveMixer",
    description="Compressive Transformer: XL memory plus a compressed memory of what leaves it",
    variants={60: Variant("compressed", {**_CT, "memory": True, "compressed": True}),   # [cmem ; mem ; segment]
              61: Variant("memory", {**_CT, "memory": True}),                           # [mem ; segment]
              62: Variant("local", _CT)},                                               # the segment only
    aliases={"compressive": 60, "compressive_xl": 61, "compressive_local": 62},
    section="compressive",
    section_class=CompressiveConfig,
    test_configs=({"attn_type": 60, "compressive": {"cmem_len": 3, "cmem_ratio": 2}},
                  {"attn_type": 61, "compressive": {"gru_gating": True}},
                  {"attn_type": 62, "mem_len": 0, "compressive": {"gru_gating": True}}),
    recurrence_exact=False,   # what leaves the memory is compressed: a longer segment sees it uncompressed
))
