"""Every field of a Hugging Face BART config or checkpoint that changes how the weights map or what the model computes
is honoured (log-probabilities equal transformers' in fp64, loading transformers' files and transformers loading
ours) or refused with one line naming the field or tensor and the file (docs/membart.md, "Hugging Face fields")."""
import json
import os
import shutil
import warnings
from types import SimpleNamespace

import pytest
import torch

from pretrain.config_base import ConfigError
from pretrain.model.membart import ACTIVATION_FNS, build_membart
from pretrain.model.membart_config import ACTIVATIONS, MemBartConfig
from pretrain.model.membart_weights import (WeightsError, check_hf_config, from_hf, load_pretrained, read_state_dict,
                                            save_pretrained, to_hf)

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402  (after transformers: the test extra)

BASE = dict(vocab_size=53, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=24, decoder_ffn_dim=24, max_position_embeddings=40,
            dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, init_std=0.2)
TOL = 1e-10


pytestmark = pytest.mark.usefixtures("tp1")


def _hf_model(seed=0, **fields):
    """transformers' BART (fp64, eval) with every parameter random and distinct: the layer norms, the position
    rows, ``final_logits_bias`` and, untied, each token table of its own."""
    cfg = transformers.BartConfig(**{**BASE, **fields})
    hf = transformers.BartForConditionalGeneration(cfg).double().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * (0.3 if "norm" not in name else 0.1)
                    + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
        hf.final_logits_bias.copy_(torch.randn(hf.final_logits_bias.shape, generator=g, dtype=torch.float64))
    if not cfg.tie_word_embeddings:
        tables = [hf.model.shared.weight, hf.model.encoder.embed_tokens.weight, hf.model.decoder.embed_tokens.weight,
                  hf.lm_head.weight]
        assert len({t.data_ptr() for t in tables}) == 4 and not torch.equal(tables[1], tables[2])
    else:
        assert hf.lm_head.weight.data_ptr() == hf.model.shared.weight.data_ptr()
    return hf


def _batch(cfg, B=2, S=9, T=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    V = cfg.vocab_size
    specials = {cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id, cfg.decoder_start_token_id}
    low = max(specials) + 1
    src = torch.randint(low, V, (B, S), generator=g)
    src[-1, S - 2:] = cfg.pad_token_id
    tgt = torch.randint(low, V, (B, T), generator=g)
    return src, (src != cfg.pad_token_id).long(), tgt


def _ref_logprobs(hf, src, am, tgt):
    """transformers' log-probabilities; the decoder input comes from ``labels`` (its pad and decoder start ids)."""
    with torch.no_grad():
        return torch.log_softmax(hf(input_ids=src, attention_mask=am, labels=tgt).logits, -1)


def _our_logprobs(model, src, am, tgt):
    with torch.no_grad():
        out, _ = model(src, model.init_state(src.shape[0]), tgt, attention_mask=am, return_logits=True)
    return out.logits


def _check_both_ways(hf, tmp_path, files=None):
    """transformers' save -> our load gives its log-probabilities; our save -> transformers' load gives them too,
    with no missing or unexpected tensor and a config that says the same.  ``files``: edits the saved directory
    first (then ``hf`` must already compute what the edited files mean).  Returns our model."""
    d = tmp_path / "hf"
    hf.save_pretrained(str(d))
    if files is not None:
        files(d)
    src, am, tgt = _batch(hf.config)
    ref = _ref_logprobs(hf, src, am, tgt)
    ours = load_pretrained(str(d), dtype=torch.float64).eval()
    assert ours.cfg.tie_word_embeddings == hf.config.tie_word_embeddings
    err = (_our_logprobs(ours, src, am, tgt) - ref).abs().max().item()
    assert err < TOL, f"our load of transformers' file: max |log p diff| {err:.3e}"
    back = tmp_path / "ours"
    save_pretrained(ours, str(back))
    conf = json.loads((back / "config.json").read_text())
    assert conf["tie_word_embeddings"] == hf.config.tie_word_embeddings
    again, info = transformers.BartForConditionalGeneration.from_pretrained(str(back), dtype=torch.float64,
                                                                             output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    err = (_ref_logprobs(again.eval(), src, am, tgt) - ref).abs().max().item()
    assert err < TOL, f"transformers' load of our file: max |log p diff| {err:.3e}"
    return ours


# ------------------------------------------------------------------------------------------------- honoured

HONOURED = {
    "tied (BART)": {},
    "tie_word_embeddings false": dict(tie_word_embeddings=False),
    "scale_embedding": dict(scale_embedding=True),
    "scale_embedding untied": dict(scale_embedding=True, tie_word_embeddings=False),
    "activation_function relu": dict(activation_function="relu"),
    "activation_function gelu_new": dict(activation_function="gelu_new"),
    "activation_function silu": dict(activation_function="silu"),
    "activation_function quick_gelu": dict(activation_function="quick_gelu"),
    "d_model and heads (encoder 6, decoder 2)": dict(d_model=24, encoder_attention_heads=6, decoder_attention_heads=2),
    "layers and ffn dims per side": dict(encoder_layers=3, decoder_layers=1, encoder_ffn_dim=20, decoder_ffn_dim=28),
    "max_position_embeddings (the source fills it)": dict(max_position_embeddings=9),
    "vocab_size and special token ids": dict(vocab_size=61, pad_token_id=0, bos_token_id=2, eos_token_id=3,
                                             decoder_start_token_id=4, forced_eos_token_id=3),
}


@pytest.mark.parametrize("fields", list(HONOURED.values()), ids=list(HONOURED))
def test_honoured_field_equals_transformers_both_ways(fields, tmp_path):
    hf = _hf_model(**fields)
    ours = _check_both_ways(hf, tmp_path)
    for k, v in fields.items():
        assert getattr(ours.cfg, k) == v, k
    if fields.get("tie_word_embeddings") is False:
        names = set(ours.gather_full_state_dict())
        assert {"encoder_embed_tokens.weight", "decoder_embed_tokens.weight", "lm_head.weight"} <= names
        assert "shared.weight" not in names


def test_untied_file_of_transformers_4_reads_model_shared_for_both_stacks(tmp_path):
    """transformers 4.x kept one table for both stacks (model.shared) and wrote it alone beside an untied lm_head."""
    hf = _hf_model(tie_word_embeddings=False)
    with torch.no_grad():
        hf.model.encoder.embed_tokens.weight.copy_(hf.model.shared.weight)
        hf.model.decoder.embed_tokens.weight.copy_(hf.model.shared.weight)

    def drop_stack_tables(d):
        sd = load_file(str(d / "model.safetensors"))
        del sd["model.encoder.embed_tokens.weight"], sd["model.decoder.embed_tokens.weight"]
        save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})

    _check_both_ways(hf, tmp_path, drop_stack_tables)


def test_final_logits_bias_absent_is_zeros_and_fairseq_version_buffers_are_skipped(tmp_path):
    hf = _hf_model()
    with torch.no_grad():
        hf.final_logits_bias.zero_()

    def edit(d):
        sd = load_file(str(d / "model.safetensors"))
        assert "final_logits_bias" in sd
        del sd["final_logits_bias"]
        sd["model.encoder.version"], sd["model.decoder.version"] = torch.tensor([2.0]), torch.tensor([2.0])
        save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})

    _check_both_ways(hf, tmp_path, edit)


def test_legacy_config_keys_with_bart_values_load(tmp_path):
    """The keys older transformers wrote into BART's config.json, with the values of BART's layout, and
    BartConfig's aliases agreeing with their fields."""
    hf = _hf_model()

    def legacy(d):
        conf = json.loads((d / "config.json").read_text())
        conf.update(normalize_before=False, add_final_layer_norm=False, normalize_embedding=True,
                    static_position_embeddings=False, extra_pos_embeddings=2, add_bias_logits=False,
                    is_encoder_decoder=True, pruned_heads={}, num_hidden_layers=2, hidden_size=16,
                    num_attention_heads=4, output_past=True, num_beams=4, no_repeat_ngram_size=3)
        (d / "config.json").write_text(json.dumps(conf))

    _check_both_ways(hf, tmp_path, legacy)


def test_layerdrop_warns_and_evaluation_is_unchanged(tmp_path):
    hf = _hf_model(encoder_layerdrop=0.1, decoder_layerdrop=0.2)
    with pytest.warns(UserWarning, match="encoder_layerdrop"):
        _check_both_ways(hf, tmp_path)
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["encoder_layerdrop"] == 0.0


def test_every_parameter_free_activation_of_transformers_is_honoured_exactly():
    from transformers.activations import ACT2CLS, ACT2FN
    assert set(ACTIVATIONS) == set(ACTIVATION_FNS)
    x = torch.linspace(-12, 12, 4001, dtype=torch.float64)
    for name in ACT2CLS:
        theirs = ACT2FN[name]
        if name not in ACTIVATIONS:
            assert list(theirs.parameters()), f"{name} has no parameters: it should be honoured"
            continue
        err = (ACTIVATION_FNS[name](x) - theirs(x)).abs().max().item()
        assert err <= 1e-15, (name, err)


def test_untied_with_slots_round_trips_through_files(tmp_path):
    model = build_membart(MemBartConfig(**{**BASE, "tgt_len": 20}, num_slots=3, tie_word_embeddings=False)).double()
    full = model.gather_full_state_dict()
    assert not torch.equal(full["encoder_embed_tokens.weight"], full["lm_head.weight"])
    save_pretrained(model, str(tmp_path / "m"))
    sd = read_state_dict(str(tmp_path / "m"))
    assert torch.equal(sd["lm_head.weight"], full["lm_head.weight"])
    again = load_pretrained(str(tmp_path / "m"), dtype=torch.float64)
    assert again.cfg == model.cfg
    assert all(torch.equal(t, full[k]) for k, t in again.gather_full_state_dict().items())


# ------------------------------------------------------------------------------------------------- refused

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tied and an untied tiny BART saved by transformers (copied per test before editing)."""
    root = tmp_path_factory.mktemp("bart")
    for tie in (True, False):
        _hf_model(tie_word_embeddings=tie).save_pretrained(str(root / f"tie_{tie}"))
    return root


def _copy(saved, tmp_path, tie=True):
    d = tmp_path / "ckpt"
    shutil.copytree(saved / f"tie_{tie}", d)
    return d


def _edit_config(d, **changes):
    conf = json.loads((d / "config.json").read_text())
    conf.update(changes)
    (d / "config.json").write_text(json.dumps(conf))


def _edit_tensors(d, fn):
    sd = load_file(str(d / "model.safetensors"))
    fn(sd)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "model.safetensors"), metadata={"format": "pt"})


def _refused(d, exc, *words, **kw):
    with pytest.raises(exc) as info:
        load_pretrained(str(d), **kw)
    msg = str(info.value)
    assert "\n" not in msg, msg
    for w in words:
        assert w in msg, (w, msg)
    return msg


CONFIG_REFUSALS = {
    "normalize_before": (dict(normalize_before=True), "pre-LN"),
    "add_final_layer_norm": (dict(add_final_layer_norm=True), "layer norm after the last encoder / decoder layer"),
    "normalize_embedding": (dict(normalize_embedding=False), "layernorm_embedding"),
    "static_position_embeddings": (dict(static_position_embeddings=True), "learned positions"),
    "extra_pos_embeddings": (dict(extra_pos_embeddings=0), "offset"),
    "add_bias_logits": (dict(add_bias_logits=True), "final_logits_bias"),
    "is_encoder_decoder": (dict(is_encoder_decoder=False), "encoder-decoder"),
    "is_decoder": (dict(is_decoder=True), "BartForCausalLM"),
    "tie_encoder_decoder": (dict(tie_encoder_decoder=True), "separate"),
    "pruned_heads": (dict(pruned_heads={"0": [1]}), "every head"),
    "quantization_config": (dict(quantization_config={"quant_method": "bitsandbytes"}), "full-precision"),
    "activation_function": (dict(activation_function="prelu"), "prelu"),
    "model_type": (dict(model_type="mbart"), "mbart"),
    "encoder_layers": (dict(num_hidden_layers=3), "num_hidden_layers"),
    "eos_token_id": (dict(eos_token_id=[2, 3]), "[2, 3]"),
}


@pytest.mark.parametrize("field", list(CONFIG_REFUSALS))
def test_refused_config_field_names_field_and_file(field, saved, tmp_path):
    changes, why = CONFIG_REFUSALS[field]
    d = _copy(saved, tmp_path)
    _edit_config(d, **changes)
    _refused(d, ConfigError, f"'{field}'" if field != "eos_token_id" else "eos_token_id", str(d / "config.json"),
             why)


def _distinct(key):
    def fn(sd):
        sd[key] = sd["model.shared.weight"] + 0.5
    return fn


TENSOR_REFUSALS = {
    # (tied checkpoint?, edit, words the error line must hold)
    "untied lm_head in a tied checkpoint": (True, _distinct("lm_head.weight"),
                                            ["lm_head.weight", "tie_word_embeddings"]),
    "distinct encoder table in a tied checkpoint": (True, _distinct("model.encoder.embed_tokens.weight"),
                                                    ["model.encoder.embed_tokens.weight", "tie_word_embeddings"]),
    "untied checkpoint without lm_head": (False, lambda sd: sd.pop("lm_head.weight"),
                                          ["lm_head.weight", "tie_word_embeddings"]),
    "a final layer norm (mBART)": (True, lambda sd: sd.update({"model.encoder.layer_norm.weight": torch.ones(16)}),
                                   ["model.encoder.layer_norm.weight", "add_final_layer_norm"]),
    "a tensor no role reads": (True, lambda sd: sd.update({"model.encoder.extra.weight": torch.ones(3)}),
                               ["model.encoder.extra.weight", "no role"]),
    "a classification head": (True, lambda sd: sd.update({"model.classification_head.dense.weight": torch.ones(3)}),
                              ["classification_head", "task head"]),
    "a layer more than the config": (True, lambda sd: sd.update(
        {"model.decoder.layers.2.fc1.weight": torch.ones(24, 16)}), ["model.decoder.layers.2", "decoder_layers"]),
    "a missing tensor": (True, lambda sd: sd.pop("model.decoder.layernorm_embedding.weight"),
                         ["model.decoder.layernorm_embedding.weight", "missing"]),
    "positions without BART's offset": (True, lambda sd: sd.update(
        {"model.encoder.embed_positions.weight": sd["model.encoder.embed_positions.weight"][2:].clone()}),
        ["model.encoder.embed_positions.weight", "max_position_embeddings 40", "offset 2"]),
    "a token table of another vocabulary": (True, lambda sd: sd.update(
        {"model.shared.weight": torch.zeros(60, 16)}), ["model.shared.weight", "vocab_size 53"]),
    "an ffn of another width": (True, lambda sd: sd.update(
        {"model.encoder.layers.1.fc1.weight": torch.zeros(30, 16)}), ["model.encoder.layers.1.fc1.weight",
                                                                     "encoder_ffn_dim 24"]),
    "final_logits_bias of another vocabulary": (True, lambda sd: sd.update(
        {"final_logits_bias": torch.zeros(1, 60)}), ["final_logits_bias", "vocab_size"]),
}


@pytest.mark.parametrize("case", list(TENSOR_REFUSALS))
def test_refused_tensor_names_tensor_and_file(case, saved, tmp_path):
    tie, edit, words = TENSOR_REFUSALS[case]
    d = _copy(saved, tmp_path, tie)
    _edit_tensors(d, edit)
    _refused(d, WeightsError, str(d / "model.safetensors"), *words)


def test_strict_false_lets_only_the_memory_be_missing(saved, tmp_path):
    d = _copy(saved, tmp_path)
    load_pretrained(str(d), strict=False, num_slots=3)             # BART into a model with slots: the memory's init
    _edit_tensors(d, lambda sd: sd.pop("model.encoder.layers.0.fc2.bias"))
    _refused(d, WeightsError, "model.encoder.layers.0.fc2.bias", strict=False, num_slots=3)
    d2 = tmp_path / "extra"
    shutil.copytree(saved / "tie_True", d2)
    _edit_tensors(d2, lambda sd: sd.update({"model.encoder.extra.weight": torch.ones(3)}))
    _refused(d2, WeightsError, "model.encoder.extra.weight", strict=False, num_slots=3)


def test_tied_overrides_untied_and_back(saved, tmp_path):
    """The override the refusals suggest: an untied checkpoint refused as tied, and a tied one refused as untied."""
    _refused(_copy(saved, tmp_path, tie=False), WeightsError, "tie_word_embeddings", tie_word_embeddings=True)
    d = tmp_path / "t"
    shutil.copytree(saved / "tie_True", d)
    _refused(d, WeightsError, "lm_head.weight", tie_word_embeddings=False)


def test_init_from_holds_the_checkpoint_config_against_the_preset(saved, tmp_path):
    """``train.init_from`` builds the model from a preset and loads a checkpoint into it: the checkpoint's
    config.json must agree on every field that changes the numerics."""
    from pretrain.engine.family import MemBartFamily
    d = _copy(saved, tmp_path)
    cfg = MemBartConfig(**{**BASE, "tgt_len": 20}, num_slots=0)
    assert check_hf_config(str(d), cfg)
    assert not check_hf_config(str(d / "model.safetensors"), cfg)       # a bare weights file: its tensors decide
    family = MemBartFamily(SimpleNamespace(model=cfg))
    for field, value in (("scale_embedding", True), ("activation_function", "relu"), ("encoder_attention_heads", 2)):
        model = build_membart(MemBartConfig(**{**BASE, "tgt_len": 20, field: value}, num_slots=0))
        with pytest.raises(ConfigError, match=f"'{field}'.*config.json.*checkpoint has") as info:
            family.load_init(model, str(d))
        assert "\n" not in str(info.value)
    model = build_membart(cfg).double()
    family.load_init(model, str(d))                                     # agrees: loads
    hf = transformers.BartForConditionalGeneration.from_pretrained(str(d), dtype=torch.float64).eval()
    src, am, tgt = _batch(hf.config)
    assert (_our_logprobs(model.eval(), src, am, tgt) - _ref_logprobs(hf, src, am, tgt)).abs().max() < TOL


def test_from_hf_without_a_file_names_the_call():
    model = build_membart(MemBartConfig(**{**BASE, "tgt_len": 20}, num_slots=0))
    sd = to_hf(model.gather_full_state_dict(), model.cfg)
    sd["lm_head.weight"] = sd["model.shared.weight"] + 1
    with pytest.raises(WeightsError, match=r"^from_hf: lm_head.weight differs"):
        from_hf(sd, model.cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sd["lm_head.weight"] = sd["model.shared.weight"].clone()      # an equal copy (a torch .bin of a tied model)
        assert torch.equal(from_hf(sd, model.cfg)["shared.weight"], sd["model.shared.weight"])
