"""Model config: validation names the field, presets load and mirror the published sizes, the tiny
presets build and run."""
import glob
import os

import pytest
import torch

from model_checks import run_tiny_preset
from pretrain.config_base import ConfigError
from pretrain.model import ModelConfig, build_model, load_model_config, parallel
from pretrain.model.membart_config import is_membart_preset
from pretrain.model.model_config import CONFIG_DIR
from pretrain.model.mechanisms.fast_weight import FastWeightConfig

PRESETS = sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(CONFIG_DIR, "*.yaml"))
                 if not is_membart_preset(p))           # the encoder-decoder presets: tests/test_membart.py


pytestmark = pytest.mark.usefixtures("tp1")


@pytest.mark.parametrize("changes,field", [
    (dict(n_layer=0), "n_layer"),
    (dict(dropout=1.0), "dropout"),
    (dict(attn_type=7), "attn_type"),
    (dict(attn_type=24), "mem_len"),
    (dict(layers="delta,bogus", mem_len=0), "layers[1]"),
    (dict(layers="xl*3", n_layer=4), "layers"),
    (dict(layers="xl", mechanism="xl"), "mechanism"),
    (dict(attn_type=24, mem_len=0, fast_weight=dict(positions="learned")), "fast_weight.positions"),
    (dict(attn_type=2, mem_len=8), "mem_len"),
    (dict(attn_type=3, mem_len=0), "mem_len"),
    (dict(same_length=True, mem_len=0), "same_length"),
    (dict(d_model=17), "d_model"),
    (dict(mechanism="rmt"), "mechanism"),
    (dict(mechanism="xl", attn_type=3), "attn_type"),
    (dict(init="xavier"), "init"),
    (dict(div_val=2), "div_val"),
])
def test_invalid_values_name_the_field(changes, field):
    with pytest.raises(ConfigError) as e:
        ModelConfig(**changes).validate()
    assert e.value.field == field


def test_layout_errors_name_the_field(monkeypatch):
    monkeypatch.setattr(parallel, "tp_world_size", lambda: 3)
    with pytest.raises(ConfigError) as e:
        build_model(ModelConfig(n_head=4))
    assert e.value.field == "n_head"


def test_preset_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  n_head: four\n")
    with pytest.raises(ConfigError, match="bad.yaml") as e:
        load_model_config(str(bad))
    assert e.value.field == "model.n_head"
    (tmp_path / "nomodel.yaml").write_text("train: {}\n")
    with pytest.raises(ConfigError, match="model"):
        load_model_config(str(tmp_path / "nomodel.yaml"))
    with pytest.raises(ConfigError, match="no such file"):
        load_model_config("does_not_exist")


@pytest.mark.parametrize("name", PRESETS)
def test_presets_validate(name):
    cfg = load_model_config(name)
    assert cfg.tgt_len >= 1


def test_preset_sizes_match_the_published_models(monkeypatch):
    """Parameter counts of the reference configurations (Transformer-XL paper / code), from the shapes
    alone: built on the meta device, not initialised."""
    from pretrain.model import weights
    monkeypatch.setattr(weights, "init_weights", lambda model, cfg: None)
    expected = {"xl_wt103_base": 151.1e6, "xl_enwik8_base": 41.1e6, "xl_enwik8_large": 277.3e6,
                "lamemo_wt103_base": 151.1e6, "lamemo_enwik8_base": 41.1e6,
                # fast weights (lmtool-fwms small / medium: 34.3M / 68.5M of them in the adaptive embedding)
                "fastweight_wt103_small": 44.03e6, "fastweight_wt103_medium": 89.87e6,
                # RMT: the XL layers plus K memory vectors
                "rmt_wt103_base": 151.1e6, "rmt_enwik8_base": 41.1e6}
    for name, n in expected.items():
        with torch.device("meta"):
            model = build_model(load_model_config(name))
        assert sum(p.numel() for p in model.parameters()) == pytest.approx(n, rel=1e-3), name


@pytest.mark.parametrize("name", ["xl_tiny", "lamemo_tiny", "delta_tiny", "linear_tiny", "hybrid_tiny", "rmt_tiny",
                                  "rmt_xl_tiny"])
def test_tiny_presets_run(name):
    _, _, losses = run_tiny_preset(name)
    for nll in losses:
        assert torch.isfinite(nll).all()
        assert nll.mean().item() == pytest.approx(torch.log(torch.tensor(256.0)).item(), abs=0.5)


def test_presets_inherit_from_a_base(tmp_path):
    """``base:`` loads another preset first and merges this file's mappings over it, key by key."""
    (tmp_path / "child.yaml").write_text("base: xl_tiny\nmodel:\n  n_layer: 2\n  layers: 'delta,xl'\n")
    cfg = load_model_config(str(tmp_path / "child.yaml"))
    parent = load_model_config("xl_tiny")
    assert cfg.n_layer == 2 and cfg.layers == "delta,xl" and cfg.d_model == parent.d_model
    assert [s.mechanism for s in cfg.layer_specs()] == ["fast_weight", "xl"]
    (tmp_path / "a.yaml").write_text("base: b.yaml\nmodel: {}\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\nmodel: {}\n")
    with pytest.raises(ConfigError, match="loops"):
        load_model_config(str(tmp_path / "a.yaml"))
    (tmp_path / "c.yaml").write_text("base: no_such_preset\nmodel: {}\n")
    with pytest.raises(ConfigError, match="no_such_preset"):
        load_model_config(str(tmp_path / "c.yaml"))


def test_layer_patterns():
    cfg = ModelConfig(n_layer=8, layers="delta*3,xl", mem_len=4)
    assert [s.code for s in cfg.layer_specs()] == [24, 24, 24, 0] * 2
    cfg = ModelConfig(n_layer=3, layers=[24, "lamemo", 0], mem_len=4)
    assert [s.mechanism for s in cfg.layer_specs()] == ["fast_weight", "lamemo", "xl"]
    assert ModelConfig(n_layer=2, attn_type=3).layer_specs()[1].variant == "disentangled"


def test_full_parameter_shapes_read_zero3_placeholders():
    """Checkpoint metadata records every parameter's full shape; under ZeRO-3 a partitioned parameter's data is an
    empty placeholder and its shape is DeepSpeed's ``ds_shape``: the same shapes come out either way."""
    from pretrain.model.weights import described_parameters, full_shape
    parallel.initialize(1)
    model = build_model(ModelConfig(vocab_size=32, n_layer=1, d_model=16, n_head=2, d_head=8, d_inner=32,
                                    tgt_len=4, mem_len=4))
    plain = {n: full_shape(p, m, 1) for n, (p, m) in described_parameters(model).items()}
    for p in model.parameters():
        p.ds_shape = p.shape
        p.data = torch.empty(0)
    assert {n: full_shape(p, m, 1) for n, (p, m) in described_parameters(model).items()} == plain
    assert any(len(s) == 2 for s in plain.values())


def test_the_delta_rule_on_elu_features_without_sum_norm_is_refused_wherever_it_is():
    """It is NaN from its first forward (|phi(k)|^2 ~ d_head > 2); the sum rule, FAVOR+ and DPFP start inside the
    rule's bound and are accepted."""
    fw = dict(sum_norm=False)
    for kw in (dict(attn_type=24, mem_len=0), dict(attn_type=44, mem_len=0), dict(n_layer=4, layers="delta*3,xl")):
        with pytest.raises(ConfigError, match="cannot train the delta rule on ELU[+]1") as e:
            ModelConfig(**kw, fast_weight=FastWeightConfig(**fw)).validate()
        assert e.value.field == "fast_weight.sum_norm"
    for code in (4, 25, 26):
        ModelConfig(attn_type=code, mem_len=0, fast_weight=FastWeightConfig(**fw)).validate()
