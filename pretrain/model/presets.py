"""Model presets: YAML files in ``pretrain/configs`` whose ``model:`` mapping configures a model (a ``base:``
chain inherits from another preset).  Shared by the decoder-only (``model_config.py``) and the MemBART
(``membart/config.py``) configurations.  No torch here."""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, Mapping, Optional, Type, TypeVar

from pretrain.config_base import ConfigError, from_dict, load_preset, validate

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")

T = TypeVar("T")


def preset_path(name: str) -> str:
    """``name`` itself when it is a file, else the preset ``pretrain/configs/<name>.yaml``.  ConfigError
    (field ``config``) when neither exists."""
    if os.path.exists(name):
        return name
    candidate = os.path.join(CONFIG_DIR, name if name.endswith(".yaml") else name + ".yaml")
    if not os.path.exists(candidate):
        raise ConfigError("config", f"{name}: no such file or preset in {CONFIG_DIR}")
    return candidate


def preset_data(path_or_name: str) -> Dict[str, Any]:
    """The whole mapping of a preset (its ``base:`` chain applied), unvalidated."""
    path = preset_path(path_or_name)
    return load_preset(path, preset_path)


def build_config(cls: Type[T], section: Mapping[str, Any], path: str,
                 overrides: Optional[Mapping[str, Any]] = None) -> T:
    """``cls`` from a preset's ``model:`` mapping ``section`` with ``overrides`` applied, validated.  ConfigError
    naming the preset file ``path`` and the field."""
    section = {**section, **(overrides or {})}
    try:
        cfg = from_dict(cls, section, "model")
        validate(cfg, "model")
    except ConfigError as e:
        raise ConfigError(e.field, f"{path}: {str(e).split(': ', 1)[-1]}") from None
    return cfg


def replace(cfg: T, **changes) -> T:
    """A copy of the config ``cfg`` with ``changes`` applied (validated: ConfigError on a bad value)."""
    out = dataclasses.replace(cfg, **changes)
    out.validate()
    return out
