"""The registry and the mechanism folders (``pretrain/model/registry.py``, ``pretrain/model/mechanisms/<name>/``):

* the registry is torch-free at import (config validation and ``--help`` read it before torch is imported);
* every folder is discovered, in the registration order of the first releases (it fixes the config sections'
  order and the construction order of stack-level memories, hence the initial weights);
* every mechanism's implementation and fp64 reference load, and its folder documents it (README.md);
* no mechanism imports another mechanism (shared code lives in ``pretrain/model/modules/``);
* names stored outside the code keep resolving: mechanism names and ``attn_type`` codes (checkpoint metadata,
  memory-state signatures, exported ``model.yaml``, presets), module paths of the one-file-per-mixer layout
  (``pretrain.model.mixers.xl:XLMixer``), the section classes once defined in ``registry.py``.
"""
import ast
import os
import subprocess
import sys

import pytest

from pretrain.model import registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MECH_DIR = os.path.join(ROOT, "pretrain", "model", "mechanisms")

# What checkpoints, exports and presets of earlier releases name: mechanism -> its attn_type codes.
STORED_NAMES = {"xl": {0, 1, 2}, "lamemo": {3, 31, 32, 33},
                "fast_weight": {4, 5, 6, 34, 35, 36, 24, 25, 26, 44, 45, 46},
                "memformer": {50, 51}, "slots": set(), "rmt": set(), "compressive": {60, 61, 62}}


def test_registry_import_does_not_import_torch():
    code = ("import sys; from pretrain.model import registry, ModelConfig; ModelConfig(attn_type=24, mem_len=0).validate(); "
            "assert registry.mechanisms(); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False", "importing the registry (or validating a config) imported torch"


def test_every_folder_is_discovered_in_registration_order():
    folders = sorted(d for d in os.listdir(MECH_DIR) if os.path.isfile(os.path.join(MECH_DIR, d, "__init__.py")))
    homes = {m.implementation.split(":")[0].split(".")[3] for m in registry.mechanisms().values()}
    assert homes == set(folders)
    # the mechanisms of the first releases in their order (10..70), then later ones (order >= 100, default 100)
    # by (order, name): adding a folder does not disturb the first ones
    first = ["xl", "lamemo", "fast_weight", "memformer", "slots", "rmt", "compressive"]
    later = [n for n, m in sorted(registry.mechanisms().items(), key=lambda nm: (nm[1].order, nm[0]))
             if m.order >= 100]
    assert list(registry.mechanisms()) == first + later
    assert list(registry.sections())[:4] == ["fast_weight", "slots", "rmt", "compressive"]


@pytest.mark.parametrize("name", sorted(registry.mechanisms()))
def test_implementation_reference_and_readme(name):
    from pretrain.model.mixer import Mixer, StackMemory
    mech = registry.mechanism(name)
    cls = registry.mixer_class(name)
    assert issubclass(cls, StackMemory if mech.kind == "stack" else Mixer)
    assert callable(registry.reference_hook(name))
    folder = os.path.join(MECH_DIR, mech.implementation.split(":")[0].split(".")[3])
    assert os.path.getsize(os.path.join(folder, "README.md")) > 200, f"{folder}: no README.md"


def test_no_mechanism_imports_another():
    for folder in os.listdir(MECH_DIR):
        path = os.path.join(MECH_DIR, folder)
        if not os.path.isdir(path) or folder.startswith("__"):
            continue
        for fname in os.listdir(path):
            if not fname.endswith(".py"):
                continue
            tree = ast.parse(open(os.path.join(path, fname)).read())
            for node in ast.walk(tree):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                    [a.name for a in node.names] if isinstance(node, ast.Import) else []
                for mod in names:
                    if mod.startswith("pretrain.model.mechanisms."):
                        assert mod.split(".")[3] == folder, f"{folder}/{fname} imports {mod}"


def test_stored_names_still_resolve():
    for name, codes in STORED_NAMES.items():
        assert registry.mechanism(name).name == name
        assert set(registry.mechanism(name).variants) == codes
        for code in codes:
            assert registry.mechanism_of_code(code).name == name


@pytest.mark.parametrize("old,new", [
    ("pretrain.model.mixers.xl:XLMixer", "pretrain.model.mechanisms.xl.mixer:XLMixer"),
    ("pretrain.model.mixers.lamemo:LaMemoMixer", "pretrain.model.mechanisms.lamemo.mixer:LaMemoMixer"),
    ("pretrain.model.mixers.fast_weight:FastWeightMixer",
     "pretrain.model.mechanisms.fast_weight.mixer:FastWeightMixer"),
    ("pretrain.model.mixers.slots:SlotMixer", "pretrain.model.mechanisms.slots.mixer:SlotMixer"),
    ("pretrain.model.mixers.slots:SlotMemory", "pretrain.model.mechanisms.slots.mixer:SlotMemory"),
    ("pretrain.model.mixers.rmt:RMTMemory", "pretrain.model.mechanisms.rmt.memory:RMTMemory"),
    ("pretrain.model.mixers.compressive:CompressiveMixer",
     "pretrain.model.mechanisms.compressive.mixer:CompressiveMixer"),
    ("pretrain.model.mixers.base:Mixer", "pretrain.model.mixer:Mixer"),
    ("pretrain.model.mixers.xl:keep_last", "pretrain.model.modules.memory:keep_last"),
    ("pretrain.model.attention:FeedForward", "pretrain.model.modules.ffn:FeedForward"),
    ("pretrain.model.attention:column_parallel", "pretrain.model.modules.linear:column_parallel"),
    ("pretrain.model.attention:attend", "pretrain.model.modules.attention:attend"),
])
def test_old_module_paths_are_upgraded_on_load(old, new):
    assert registry.load(old) is registry.load(new)


def test_old_implementation_strings_name_todays_classes():
    """Every registration of that layout's time is reachable by its class name in the one-file-per-mixer layout
    (a mechanism added later never had such a path)."""
    for mech in registry.mechanisms().values():
        cls = registry.mixer_class(mech.name)
        folder = cls.__module__.split(".")[3]
        if f"pretrain.model.mixers.{folder}" not in registry.LEGACY_MODULES:
            continue
        assert registry.load(f"pretrain.model.mixers.{folder}:{cls.__name__}") is cls


def test_bad_targets_are_named():
    with pytest.raises(ValueError, match="module:attribute"):
        registry.load("pretrain.model.mixer")
    with pytest.raises(AttributeError, match="NoSuchMixer"):
        registry.load("pretrain.model.mixers.xl:NoSuchMixer")


def test_section_classes_keep_their_old_names():
    from pretrain.model.mechanisms.compressive import CompressiveConfig
    from pretrain.model.mechanisms.fast_weight import FastWeightConfig
    from pretrain.model.mechanisms.rmt import RMTConfig
    from pretrain.model.mechanisms.slots import SlotsConfig
    assert (registry.FastWeightConfig, registry.SlotsConfig, registry.RMTConfig, registry.CompressiveConfig) == \
        (FastWeightConfig, SlotsConfig, RMTConfig, CompressiveConfig)
    with pytest.raises(AttributeError):
        registry.NoSuchConfig


def test_a_state_saved_by_an_older_layout_loads():
    """A memory state as an earlier release's checkpoint stores it (plain data, its signature a string of
    mechanism names) loads into today's model of the same layout and runs."""
    import torch
    from pretrain.model import MemoryState, ModelConfig, build_model, parallel
    parallel.initialize(1)
    cfg = ModelConfig(n_layer=4, d_model=16, n_head=2, d_head=8, d_inner=24, vocab_size=31, dropout=0.0,
                      tgt_len=4, mem_len=3, layers="delta*3,xl", rmt={"num_mem_tokens": 2})
    model = build_model(cfg)
    sd = model.init_state(2).state_dict()
    assert sd["mechanism"] == "fast_weight*3,xl+rmt"         # what checkpoints of the earlier layout hold
    state = MemoryState.from_state_dict(sd)
    tokens = torch.randint(0, 31, (2, 4))
    out, new = model(tokens, state, tokens)
    assert torch.isfinite(out.nll).all() and new.mechanism == sd["mechanism"]


def test_help_texts_are_written_from_the_registry():
    """``--help`` of attn_type and mechanism lists every registered code and mixer (a new folder shows up)."""
    from pretrain.config_base import field_paths
    from pretrain.model import ModelConfig
    helps = {path: text for path, (_, _, text) in field_paths(ModelConfig).items()}
    for mech in registry.mechanisms("mixer").values():
        assert mech.name in helps["mechanism"]
        for code, var in mech.variants.items():
            assert f"{code} {var.name}" in helps["attn_type"]
