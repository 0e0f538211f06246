"""What a mechanism declares about itself (``Mechanism``, ``Variant``) and what a layer of a model is
(``LayerSpec``): plain data, no torch, importable by the mechanism folders' ``__init__.py`` and by the registry
(``registry.py``), which discovers the folders and indexes their declarations.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Tuple


@dataclass(frozen=True)
class Variant:
    """One ``attn_type`` code of a mechanism: its name inside the code and the settings it implies."""
    name: str
    settings: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Mechanism:
    """One registered mechanism (see ``registry.py`` for the fields' meaning).

    ``implementation`` and ``reference`` are ``"module:attribute"`` strings, imported only when a model or the
    fp64 reference is built (the registry stays torch-free); a leading ``.`` makes the module relative to the
    mechanism's folder, and a mixer's ``reference`` defaults to ``".reference:layer"`` (``registry.discover``).  ``reference`` names, for a mixer, a function
    ``(ref, l, x, mem, seg) -> (x, state)`` that runs layer ``l`` in ``pretrain.model.reference.ReferenceLM``
    ``ref``; for a stack-level memory, a class ``(ref, cfg)`` with ``begin(x, memory) -> x`` and ``end(x, out) ->
    x`` (and optionally ``allowed(n, m)``: the attention pattern it imposes, bool [n, m + n], or None).
    ``order`` fixes the registration order, which decides the order of the config sections and the order in
    which stack-level memories are built (their parameters, hence the initial weights): the mechanisms of the
    first releases keep 10..70, a new one defaults to 100 (then by name)."""
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
    reference: Optional[str] = None          # "module:attribute" of its fp64 reference (see above)
    order: int = 100
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


def memory_tokens(name: str, section_class: type, **fields) -> Mechanism:
    """The declaration of a stack-level memory of memory tokens added to every segment (RMT, ARMT): kind
    ``"stack"``, config section ``model.<name>`` (``section_class``, a dataclass with a ``num_mem_tokens``
    field), present when ``num_mem_tokens > 0``.  ``fields``: the other ``Mechanism`` fields (``implementation``,
    ``reference``, ``order``, ``description``, the test and benchmark metadata)."""
    return Mechanism(name=name, kind="stack", enabled=lambda cfg: getattr(cfg, name).num_mem_tokens > 0,
                     section=name, section_class=section_class, **fields)
