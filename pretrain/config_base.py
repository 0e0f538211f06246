"""Config as data: dataclasses with defaults, loaded from YAML, overridden field by field, validated once.

* ``from_dict(Cls, mapping)`` builds a (nested) dataclass, coercing values to the annotated types; an unknown
  key or a value of the wrong type raises ``ConfigError`` naming the dotted field (``model.n_head``).
* ``set_field(cfg, "model.n_head", "8")`` applies one override; the string is parsed as YAML (so ``8`` is an
  int, ``[1, 2]`` a list, ``null`` None) and then coerced like a YAML value.
* ``validate(cfg)`` calls ``validate()`` on every nested dataclass that defines it (bottom-up); those methods
  raise ``ConfigError(field, why)``.
* ``to_dict(cfg)`` gives plain data for YAML/JSON (the resolved config saved beside a run).
* ``F(default, help)`` declares a field with its ``--help`` text.

No torch here: configs are read before anything heavy is imported.
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import yaml


class ConfigError(ValueError):
    """An invalid config value; ``field`` is the dotted path of the offending field."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"config field '{field}': {message}")


def F(default, help: str):
    """A dataclass field with a default and the help text shown by the commands' ``--help`` (a list or dict
    default is copied per instance)."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _hints(cls) -> Dict[str, Any]:
    return typing.get_type_hints(cls)


def check_at_least(cfg, **bounds) -> None:
    """ConfigError naming the first field of ``cfg`` below its lower bound (``check_at_least(cfg, keep_last=1)``:
    "must be >= 1, got 0")."""
    for name, low in bounds.items():
        value = getattr(cfg, name)
        if value < low:
            raise ConfigError(name, f"must be >= {low}, got {value}")


def _number(tp: type, value: Any, field: str):
    """``value`` as a config value of type ``tp`` (int or float): an int (an integral float for an int field), a
    float for a float field, or a string that parses as one; never a bool.  ConfigError naming ``field``
    otherwise."""
    if not isinstance(value, bool):
        if tp is int and isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, int) or (tp is float and isinstance(value, float)):
            return tp(value)
        if isinstance(value, str):
            try:
                return tp(value)
            except ValueError:
                pass
    raise ConfigError(field, f"expected {'an integer' if tp is int else 'a number'}, got {value!r}")


def _coerce(value: Any, tp: Any, field: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, field)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:   # Optional[X]: X's own error, which names the innermost field (a list item's key)
            raise errors[0]
        raise ConfigError(field, f"{value!r} matches none of {tp}")
    if dataclasses.is_dataclass(tp):
        if dataclasses.is_dataclass(value) and isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(field, f"expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, field)
    if origin in (list, List, tuple, Tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(field, f"expected a list, got {value!r}")
        if origin in (tuple, Tuple) and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(field, f"expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{field}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        out = [_coerce(v, item, f"{field}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin in (tuple, Tuple) else out
    if origin in (dict, Dict):
        if not isinstance(value, Mapping):
            raise ConfigError(field, f"expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(field, f"expected true/false, got {value!r}")
    if tp is int or tp is float:
        return _number(tp, value, field)
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(field, f"expected a string, got {value!r}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(field, f"cannot use {value!r} as {tp}")


def from_dict(cls, data: Optional[Mapping[str, Any]], prefix: str = ""):
    """Build dataclass ``cls`` from ``data``; missing fields keep their defaults."""
    data = dict(data or {})
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ConfigError(_join(prefix, unknown[0]),
                          f"unknown field (valid fields{' of ' + prefix if prefix else ''}: {', '.join(names)})")
    kwargs = {k: _coerce(v, hints[k], _join(prefix, k)) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(prefix or cls.__name__, str(e)) from None


def to_dict(cfg) -> Dict[str, Any]:
    def conv(v):
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v
    return conv(cfg)


def field_paths(cls, prefix: str = "") -> Dict[str, Tuple[Any, Any, str]]:
    """Every leaf field of ``cls``: dotted path -> (type, default, help text from ``metadata['help']``)."""
    out = {}
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        path = _join(prefix, f.name)
        if dataclasses.is_dataclass(tp):
            out.update(field_paths(tp, path))
        else:
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                default = f.default_factory()  # type: ignore[misc]
            else:
                default = None
            out[path] = (tp, default, f.metadata.get("help", ""))
    return out


def set_field(cfg, path: str, value: Any) -> None:
    """Set the dotted ``path`` of ``cfg`` (in place).  A string value is parsed as YAML first."""
    parts = path.split(".")
    obj = cfg
    for i, p in enumerate(parts[:-1]):
        if not dataclasses.is_dataclass(obj) or p not in {f.name for f in dataclasses.fields(obj)}:
            raise ConfigError(".".join(parts[:i + 1]), "unknown field")
        obj = getattr(obj, p)
    name = parts[-1]
    if not dataclasses.is_dataclass(obj) or name not in {f.name for f in dataclasses.fields(obj)}:
        valid = ", ".join(f.name for f in dataclasses.fields(obj)) if dataclasses.is_dataclass(obj) else ""
        raise ConfigError(path, f"unknown field (valid here: {valid})")
    tp = _hints(type(obj))[name]
    if isinstance(value, str):
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            parsed = value
        # "null", "none", "~" mean None for a field that takes None; a string field keeps them as text
        # (fast_weight.positions: none)
        nullable = tp is Any or (typing.get_origin(tp) in (Union, types.UnionType)
                                 and type(None) in typing.get_args(tp))
        if value.strip().lower() in ("null", "none", "~", ""):
            value = None if nullable else value
        elif parsed is not None:
            value = parsed
    setattr(obj, name, _coerce(value, tp, path))


def load_yaml(path: str) -> Dict[str, Any]:
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError("config", f"{path}: no such file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else path
        raise ConfigError("config", f"{where}: invalid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, Mapping):
        raise ConfigError("config", f"{path}: top level must be a mapping, got {type(data).__name__}")
    return dict(data)


def _merge(base: Dict[str, Any], over: Mapping[str, Any]) -> Dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def load_preset(path: str, resolve_name=None, _seen: Tuple[str, ...] = ()) -> Dict[str, Any]:
    """A preset YAML with its ``base:`` chain applied: ``base: <preset name or path>`` loads that preset first
    and merges this file's mappings over it, key by key (nested mappings merged, other values replaced), as
    GPT-NeoX merges its config files.  The base is a path relative to this file, or else a name that
    ``resolve_name(name) -> path`` finds (a preset).  ConfigError on a missing base or a cycle, naming the files."""
    data = load_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError("base", f"{path}: 'base' must be a preset name or a path, got {base!r}")
    base_path = base if os.path.isabs(base) else os.path.join(os.path.dirname(path), base)
    if not os.path.isfile(base_path):
        if resolve_name is None:
            raise ConfigError("base", f"{path}: base {base!r}: no such file")
        base_path = resolve_name(base)
    real = os.path.realpath(base_path)
    if real in _seen or real == os.path.realpath(path):
        raise ConfigError("base", f"{path}: base chain loops through {base_path}")
    return _merge(load_preset(base_path, resolve_name, _seen + (os.path.realpath(path),)), data)


def validate(cfg, prefix: str = "") -> None:
    """Run ``validate()`` of every nested dataclass, innermost first."""
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            validate(v, _join(prefix, f.name))
    check = getattr(cfg, "validate", None)
    if callable(check):
        try:
            check()
        except ConfigError as e:
            if prefix and not e.field.startswith(prefix + "."):
                raise ConfigError(_join(prefix, e.field), str(e).split(": ", 1)[-1]) from None
            raise
