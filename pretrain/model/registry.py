"""The registry of memory mechanisms: the single source of their names, ``attn_type`` codes, config sections
and implementations.  No torch here: config validation and ``--help`` read it before anything heavy is imported.

A *mechanism* is a kind of token mixer with its memory (Transformer-XL attention, LaMemo look-ahead attention,
fast-weight layers, ...).  Every layer of the stack holds one mixer, chosen per layer (``ModelConfig.layers``) or
for all layers at once (``ModelConfig.attn_type``).  Each mechanism lives in a folder of its own,
``pretrain/model/mechanisms/<name>/``:

* ``__init__.py`` (torch-free): its ``Mechanism`` declaration(s) in a tuple ``MECHANISMS`` and the config
  section class of its options;
* the implementation (a ``pretrain.model.mixer.Mixer`` or ``StackMemory`` subclass) and its fp64 reference, in
  modules imported only when a model or the reference is built (named by ``implementation`` and ``reference``);
* ``README.md``: what it computes, its state, its options, its sources.

The registry imports every folder's ``__init__`` (``discover``, run once at import) and registers its
``MECHANISMS`` in ``Mechanism.order``.  Each declaration (``pretrain.model.spec.Mechanism``) says:

* ``name``: the mechanism's name (config values, state signatures stored in checkpoints, docs);
* ``variants``: the ``attn_type`` codes it accepts, each with a name used inside the code and the settings that
  code implies (``{24: Variant("delta_elu", rule="delta", feature_map="elu", ...)}``); the codes stay at the
  config surface (they are the original projects' numbering), the code reads the names;
* ``aliases``: short names usable in a layer pattern instead of codes (``"delta"`` for 24);
* ``section``: the config dataclass of its own options (``model.<section>``), with its own ``validate()``;
* ``implementation``: ``"module:Class"`` of the mixer; ``reference``: ``"module:attribute"`` of its fp64
  reference hook (``pretrain/model/reference.py`` runs every layer through its mechanism's hook); a target
  starting with ``.`` is relative to the folder (``".mixer:XLMixer"``), and a mixer's reference defaults to
  ``".reference:layer"``;
* test and benchmark metadata: the small configs the registry-driven test matrix runs
  (``test_configs``; an optional ``label`` key names the case), whether a longer segment equals recurrence over
  shorter ones (``recurrence_exact``), and for a stack-level memory its benchmark variants (``bench_configs``).

A *stack-level memory* (``kind="stack"``: RMT's memory tokens) is not chosen per layer: it is present when its
``enabled(cfg)`` test says so (``model.rmt.num_mem_tokens > 0``) and then wraps the whole stack, whatever mixers
the layers hold.

Adding a mechanism = one new folder in ``pretrain/model/mechanisms/``; config validation, the reference check,
the test matrix and the benchmarks read this registry.  Module paths of earlier layouts
(``pretrain.model.mixers.xl:XLMixer``) still resolve (``load``); mechanism names never change (checkpoints and
exports store them in state signatures and metadata).

Layer patterns (``ModelConfig.layers``): a comma-separated list (or a YAML list) of ``attn_type`` codes or
aliases, ``entry*k`` repeating an entry, the whole list repeated to fill ``n_layer`` (its length must divide
``n_layer``).  Examples: ``"delta*3,xl"`` (three delta-rule layers to one XL layer), ``"24,24,24,0"``,
``"lamemo"`` (every layer).  A mechanism section may then resolve a per-layer option of its own into the codes
(``rewrite_layers``: ``compressive.memory_layers`` keeps attn_type 60 at the listed layers only).
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.abc
import importlib.util
import pkgutil
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from pretrain.config_base import ConfigError
from pretrain.model.spec import LayerSpec, Mechanism, Variant

__all__ = ["LayerSpec", "Mechanism", "Variant", "register", "discover", "mechanisms", "mechanism",
           "mechanism_of_code", "stack_memories", "all_codes", "sections", "load", "mixer_class",
           "reference_hook", "attn_type_help", "mechanism_help", "parse_pattern", "resolve_layers", "signature"]

MECHANISMS_PACKAGE = "pretrain.model.mechanisms"

_MECHANISMS: Dict[str, Mechanism] = {}
_CODES: Dict[int, str] = {}
_ALIASES: Dict[str, int] = {}


def register(mech: Mechanism) -> Mechanism:
    """Add ``mech`` to the registry.  ValueError on a name, ``attn_type`` code or alias already taken, or a
    ``kind`` that does not match ``enabled``."""
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


def discover(package: str = MECHANISMS_PACKAGE) -> List[Mechanism]:
    """Import the ``__init__`` of every sub-package of ``package`` (one folder per mechanism) and register the
    ``MECHANISMS`` each declares, in ``(order, name)`` order.  Only those light modules are imported: the
    implementations and references load when first asked for (``load``).  Returns what it registered."""
    pkg = importlib.import_module(package)
    found: List[Mechanism] = []
    for info in pkgutil.iter_modules(pkg.__path__):
        if not info.ispkg:
            continue
        module = importlib.import_module(f"{package}.{info.name}")
        declared = getattr(module, "MECHANISMS", None)
        if declared is None:
            raise ImportError(f"{module.__name__}: a mechanism folder must declare MECHANISMS, a tuple of "
                              f"Mechanism (see pretrain/model/registry.py)")
        found += [_resolved(m, module.__name__) for m in declared]
    found.sort(key=lambda m: (m.order, m.name))
    return [register(m) for m in found]


def _resolved(mech: Mechanism, package: str) -> Mechanism:
    """``mech`` with its ``implementation`` and ``reference`` made absolute: a target starting with ``.`` is
    relative to the folder's package (``".mixer:XLMixer"``); a mixer without a ``reference`` gets the
    convention ``".reference:layer"``."""
    def absolute(target: Optional[str]) -> Optional[str]:
        return f"{package}{target}" if target and target.startswith(".") else target
    reference = mech.reference or (".reference:layer" if mech.kind == "mixer" else None)
    return dataclasses.replace(mech, implementation=absolute(mech.implementation), reference=absolute(reference))


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


# Module paths of earlier layouts (one file per mixer in pretrain/model/mixers/; the building blocks in
# pretrain/model/attention.py; MemBART's files pretrain/model/membart_*.py) -> the modules that hold their names
# now, searched in order (``load("module:attr")``).  A path whose module moved whole (one module here) and whose
# parent package still exists (``pretrain.model.membart_*``) is also importable under its old name
# (``LegacyModuleFinder``); the ``mixers.*`` paths resolve through ``load`` only (``pretrain.model.mixers`` is gone).
LEGACY_MODULES: Dict[str, Tuple[str, ...]] = {
    "pretrain.model.mixers.xl": ("pretrain.model.mechanisms.xl.mixer", "pretrain.model.modules.memory",
                                 "pretrain.model.modules.rel_attention"),
    "pretrain.model.mixers.lamemo": ("pretrain.model.mechanisms.lamemo.mixer",),
    "pretrain.model.mixers.fast_weight": ("pretrain.model.mechanisms.fast_weight.mixer",),
    "pretrain.model.mixers.slots": ("pretrain.model.mechanisms.slots.mixer",),
    "pretrain.model.mixers.rmt": ("pretrain.model.mechanisms.rmt.memory",),
    "pretrain.model.mixers.compressive": ("pretrain.model.mechanisms.compressive.mixer",),
    "pretrain.model.mixers.base": ("pretrain.model.mixer",),
    "pretrain.model.attention": ("pretrain.model.modules.attention", "pretrain.model.modules.linear",
                                 "pretrain.model.modules.norm", "pretrain.model.modules.ffn"),
    "pretrain.model.membart_config": ("pretrain.model.membart.config",),
    "pretrain.model.membart_weights": ("pretrain.model.membart.weights",),
    "pretrain.model.membart_generate": ("pretrain.model.membart.generate",),
}


class LegacyModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports of a module path of an earlier layout whose module moved whole (``LEGACY_MODULES`` with one module:
    ``pretrain.model.membart_config``) give that module itself, the same object under both names: old imports,
    ``module:attribute`` strings and pickles that name the old path (``torch.save`` of a config or a state made
    before the move) resolve to the same classes.  Installed last on ``sys.meta_path`` when this module is
    imported (``pretrain.model`` imports it), so a real module of that name would win."""

    def find_spec(self, fullname: str, path=None, target=None):
        moved = LEGACY_MODULES.get(fullname, ())
        if len(moved) != 1:
            return None
        spec = importlib.util.spec_from_loader(fullname, self)
        spec.loader_state = moved[0]
        return spec

    def create_module(self, spec):
        module = importlib.import_module(spec.loader_state)
        spec.loader_state = module.__spec__       # the import system sets __spec__ to ``spec``: exec_module undoes it
        return module

    def exec_module(self, module) -> None:
        module.__spec__ = module.__spec__.loader_state


def _install_legacy_finder() -> None:
    if not any(type(f).__name__ == LegacyModuleFinder.__name__ for f in sys.meta_path):
        sys.meta_path.append(LegacyModuleFinder())


def load(target: str):
    """The object a ``"module:attribute"`` string names (an implementation or reference of a registration),
    imported on first use.  A module path of an earlier layout is upgraded: the attribute is looked up in the
    modules that hold its names now (``LEGACY_MODULES``).  ValueError on a string without ``:``;
    AttributeError naming the target when no module has the attribute; ImportError for a missing module."""
    module, sep, attr = target.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"{target!r}: expected 'module:attribute'")
    for candidate in LEGACY_MODULES.get(module, (module,)):
        mod = importlib.import_module(candidate)
        if hasattr(mod, attr):
            return getattr(mod, attr)
    raise AttributeError(f"{target!r}: no attribute {attr!r} in "
                         f"{', '.join(LEGACY_MODULES.get(module, (module,)))}")


def mixer_class(name: str):
    """The implementation class of mechanism ``name`` (a Mixer, or a StackMemory for kind "stack")."""
    return load(mechanism(name).implementation)


def reference_hook(name: str):
    """The fp64 reference hook of mechanism ``name`` (``Mechanism.reference``; see ``pretrain.model.spec``).
    NotImplementedError when the mechanism registers none."""
    mech = mechanism(name)
    if not mech.reference:
        raise NotImplementedError(f"mechanism {name!r} registers no fp64 reference (Mechanism.reference)")
    return load(mech.reference)


def attn_type_help() -> str:
    """The help text of ``ModelConfig.attn_type`` (``--help``), written from the registrations: every mixer's
    codes with their variant names and aliases."""
    parts = []
    for mech in mechanisms("mixer").values():
        names = {code: alias for alias, code in mech.aliases.items()}
        codes = ", ".join(f"{code} {var.name}" + (f" ('{names[code]}')" if code in names else "")
                          for code, var in sorted(mech.variants.items()))
        parts.append(f"{mech.name}: {codes}")
    return "mixer of every layer (unless `layers` is given), by code: " + "; ".join(parts) + " (docs/model.md)"


def mechanism_help() -> str:
    """The help text of ``ModelConfig.mechanism``, written from the registrations."""
    return f"memory mechanism of every layer: auto (by attn_type) or {', '.join(mechanisms('mixer'))}"


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


discover()
_install_legacy_finder()


def __getattr__(name: str):
    """Config section classes by the names this module once defined (``registry.FastWeightConfig``)."""
    for mech in _MECHANISMS.values():
        if mech.section_class is not None and mech.section_class.__name__ == name:
            return mech.section_class
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
