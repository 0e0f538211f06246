"""MemBART (pretrain/model/membart*.py): equality with Hugging Face's BART (memory off), weights in Hugging Face's
and MemBART's formats, generation against ``transformers.generate``, the memory path against a plain fp64
re-implementation of MemBART's equations over the Hugging Face-format weights, and the memory's properties."""
import json
import math
import os

import pytest
import torch

from pretrain.config_base import ConfigError
from pretrain.model.membart import STATE_KEY, build_membart
from pretrain.model.membart_config import (MemBartConfig, from_hf_config, is_membart_preset, load_membart_config,
                                           to_hf_config)
from pretrain.model.membart_weights import (WeightsError, from_hf, load_hf_weights, load_pretrained, read_state_dict,
                                            save_pretrained, to_hf)

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=53, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=24, decoder_ffn_dim=24, max_position_embeddings=40,
            dropout=0.0, tgt_len=20, init_std=0.2)
PAD, EOS = 1, 2


pytestmark = pytest.mark.usefixtures("tp1")


def _model(**kw):
    cfg = MemBartConfig(**{**TINY, **kw})
    return build_membart(cfg).double().eval()


def _hf(model):
    """transformers' BartForConditionalGeneration with ``model``'s weights (fp64)."""
    conf = {k: v for k, v in to_hf_config(model.cfg, membart=False).items() if k != "architectures"}
    hf = transformers.BartForConditionalGeneration(transformers.BartConfig(**conf)).double().eval()
    missing, unexpected = hf.load_state_dict(to_hf(model.gather_full_state_dict(), model.cfg), strict=False)
    assert not unexpected and set(missing) <= {"model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight",
                                               "lm_head.weight"}, (missing, unexpected)
    return hf


def _batch(B=3, S=9, T=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(3, TINY["vocab_size"], (B, S), generator=g)
    src[-1, S - 3:] = PAD                                       # a padded row
    tgt = torch.randint(3, TINY["vocab_size"], (B, T), generator=g)
    return src, (src != PAD).long(), tgt


# ------------------------------------------------------------------------------------------------- BART parity

def test_memory_off_equals_transformers_bart_fp64():
    model = _model(num_slots=0)
    hf = _hf(model)
    src, am, tgt = _batch()
    out, _ = model(src, model.init_state(3), tgt, attention_mask=am, return_logits=True)
    ref = hf(input_ids=src, attention_mask=am, decoder_input_ids=model.shift_right(tgt))
    ref_lp = torch.log_softmax(ref.logits.detach(), -1)
    assert (out.logits - ref_lp).abs().max().item() < 1e-12
    ref_nll = -ref_lp.gather(-1, tgt[..., None]).squeeze(-1)
    assert (out.nll.double() - ref_nll).abs().max().item() < 1e-5      # the vocab-parallel loss runs in fp32
    # the decoder reads the encoder's token states exactly as BART does
    enc, _ = model.encode(src, model.init_state(3), attention_mask=am)
    ref_enc = hf.model.encoder(input_ids=src, attention_mask=am).last_hidden_state
    assert (enc.hidden - ref_enc).abs().max().item() < 1e-12


def test_ignored_targets_score_zero_and_shift_right():
    model = _model(num_slots=4)
    src, am, tgt = _batch()
    tgt[:, -2:] = -100
    out, _ = model(src, model.init_state(3), tgt, attention_mask=am)
    assert (out.nll[:, -2:] == 0).all() and (out.nll[:, :-2] > 0).all()
    dec = model.shift_right(tgt)
    assert (dec[:, 0] == model.cfg.decoder_start_token_id).all()
    assert torch.equal(dec[:, 1:-1], tgt[:, :-2]) and (dec[:, -1] == PAD).all()


# ------------------------------------------------------------------------------------------------- weights

@pytest.mark.parametrize("slots", [0, 4])
def test_hf_format_round_trip_exact(slots, tmp_path):
    model = _model(num_slots=slots)
    full = model.gather_full_state_dict()
    hf_sd = to_hf(full, model.cfg)
    if slots:
        assert hf_sd["model.encoder.memory_bias"].shape == (1, slots, 16)
        assert "model.encoder.layers.1.self_attn.mem_k_proj.weight" in hf_sd
        assert "model.encoder.layers.0.mem_final_layer_norm.bias" in hf_sd
        assert "model.encoder.memory_gate_net.dense2.weight" in hf_sd
    else:   # through transformers' own model and its state dict (all tied copies present there)
        hf_sd = {k: v.clone() for k, v in _hf(model).state_dict().items()}
    back = from_hf(hf_sd, model.cfg)
    assert set(back) == set(full) and all(torch.equal(back[k], full[k]) for k in full)
    other = _model(num_slots=slots, seed=99)
    assert not torch.equal(other.gather_full_state_dict()["shared.weight"], full["shared.weight"])
    load_hf_weights(other, hf_sd)
    assert all(torch.equal(t, full[k]) for k, t in other.gather_full_state_dict().items())
    for safe in (True, False):          # files: safetensors and torch .bin, with config.json
        path = tmp_path / f"export-{safe}"
        save_pretrained(model, str(path), safe=safe)
        assert sorted(os.listdir(path)) == ["config.json", "model.safetensors" if safe else "pytorch_model.bin"]
        conf = json.loads((path / "config.json").read_text())
        assert conf.get("memory_len", 0) == slots and conf["d_model"] == 16
        again = load_pretrained(str(path)).double()
        assert again.cfg == model.cfg
        assert all(torch.equal(t, full[k]) for k, t in again.gather_full_state_dict().items())


def test_weights_errors_name_the_problem(tmp_path):
    bart, membart = _model(num_slots=0), _model(num_slots=4)
    bart_sd = to_hf(bart.gather_full_state_dict(), bart.cfg)
    mem_sd = to_hf(membart.gather_full_state_dict(), membart.cfg)
    with pytest.raises(WeightsError, match="plain BART checkpoint"):
        from_hf(bart_sd, membart.cfg)
    with pytest.raises(WeightsError, match="MemBART checkpoint: set num_slots"):
        from_hf(mem_sd, bart.cfg)
    # a BART checkpoint initialises a MemBART model with strict=False: the memory keeps its init
    fresh = _model(num_slots=4)
    before = fresh.gather_full_state_dict()
    load_hf_weights(fresh, bart_sd, strict=False)
    after = fresh.gather_full_state_dict()
    assert torch.equal(after["encoder.memory_bias"], before["encoder.memory_bias"])
    assert torch.equal(after["shared.weight"], bart.gather_full_state_dict()["shared.weight"])
    with pytest.raises(WeightsError, match="cannot be written as plain BART"):
        to_hf(membart.gather_full_state_dict(), membart.cfg, membart=False)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError, match="bad.safetensors: cannot read weights"):
        read_state_dict(str(bad))
    with pytest.raises(WeightsError, match="no model.safetensors"):
        read_state_dict(str(tmp_path))


# ------------------------------------------------------------------------------------------------- config

def test_config_presets_and_hf_configs():
    base = load_membart_config("membart_base")
    assert (base.d_model, base.encoder_layers, base.num_slots, base.init_std) == (768, 6, 64, 0.01)
    large = load_membart_config("membart_large")
    assert (large.d_model, large.encoder_layers, large.num_slots, large.encoder_attention_heads) == (1024, 12, 128, 16)
    assert is_membart_preset("membart_tiny") and not is_membart_preset("xl_tiny")
    with pytest.raises(ConfigError, match="not a MemBART preset"):
        load_membart_config("xl_tiny")
    from pretrain.model import load_model_config
    with pytest.raises(ConfigError, match="model.arch.*load_membart_config"):
        load_model_config("membart_tiny")
    with pytest.raises(ConfigError, match="model.num_slots"):
        load_membart_config("membart_tiny", {"num_slots": -1})
    with pytest.raises(ConfigError, match="encoder_attention_heads"):
        MemBartConfig(d_model=10, encoder_attention_heads=4).validate()
    assert from_hf_config(to_hf_config(base)) == base and from_hf_config(to_hf_config(large)) == large
    plain = from_hf_config(transformers.BartConfig().to_dict())
    assert plain.num_slots == 0 and plain.d_model == 1024
    with pytest.raises(ConfigError, match="pre-LN"):
        from_hf_config({"model_type": "bart", "normalize_before": True})
    with pytest.raises(ConfigError, match="model_type"):
        from_hf_config({"model_type": "t5"})


# ------------------------------------------------------------------------------------------------- generation

GEN_CASES = [dict(num_beams=1), dict(num_beams=3), dict(num_beams=3, early_stopping=True),
             dict(num_beams=4, length_penalty=2.0, min_length=5), dict(num_beams=3, early_stopping="never",
                                                                       length_penalty=1.5),
             dict(num_beams=2, num_return_sequences=2, forced_bos_token_id=0), dict(num_beams=3, length_penalty=-1.0)]


def test_greedy_and_beam_search_equal_transformers_generate():
    from transformers.modeling_outputs import BaseModelOutput
    model = _model(num_slots=0)
    hf = _hf(model)
    with torch.no_grad():      # EOS made likely enough that hypotheses end at different lengths
        model.final_logits_bias[EOS] = 0.8
        hf.final_logits_bias[0, EOS] = 0.8
    src, am, _ = _batch()
    enc, _ = model.encode(src, model.init_state(3), attention_mask=am)
    lengths = set()
    for kw in GEN_CASES:
        ours = model.generate(enc, max_length=12, **kw)
        theirs = hf.generate(encoder_outputs=BaseModelOutput(last_hidden_state=enc.hidden), attention_mask=am,
                             decoder_start_token_id=2, max_length=12, do_sample=False, no_repeat_ngram_size=0,
                             forced_eos_token_id=EOS, eos_token_id=EOS, pad_token_id=PAD, bos_token_id=0, **kw)
        assert torch.equal(ours, theirs), kw
        assert (ours[:, 0] == 2).all()
        lengths |= {int((r != PAD).sum()) for r in ours}
    assert len(lengths) >= 3, f"the cases should end at several lengths, got {lengths}"


def test_sampling_top_k_top_p_and_seed():
    model = _model(num_slots=4)
    src, am, _ = _batch()
    enc, _ = model.encode(src, model.init_state(3), attention_mask=am)
    gen = lambda **kw: model.generate(enc, max_length=9, do_sample=True, forced_eos_token_id=None,
                                      generator=torch.Generator().manual_seed(5), **kw)
    a, b = gen(top_k=5), gen(top_k=5)
    assert torch.equal(a, b), "the same generator seed must give the same samples"
    assert not torch.equal(gen(temperature=3.0), gen(top_k=1)), "sampling must depend on its settings"
    # top_k = 1 and a tiny top_p are greedy decoding
    greedy = model.generate(enc, max_length=9, forced_eos_token_id=None)
    assert torch.equal(gen(top_k=1), greedy) and torch.equal(gen(top_p=1e-6), greedy)
    # every sampled token lies in the top-k set of its step (teacher-forced check of the prefix)
    seq = gen(top_k=3)
    h = model.decode(seq[:, :-1], enc)
    lp = model.log_probs(h)
    top3 = lp.topk(3, -1).indices
    live = torch.ones_like(seq[:, 1:], dtype=torch.bool)
    live[:, 1:] = (seq[:, 1:-1] != EOS).cumprod(1).bool()
    assert ((top3 == seq[:, 1:, None]).any(-1) | ~live).all()
    many = model.generate(enc, max_length=6, do_sample=True, num_return_sequences=2,
                          generator=torch.Generator().manual_seed(1))
    assert many.shape[0] == 6
    with pytest.raises(ValueError, match="top_p"):
        model.generate(enc, do_sample=True, top_p=0.0)
    with pytest.raises(ValueError, match="num_return_sequences"):
        model.generate(enc, num_return_sequences=2)


# ------------------------------------------------------------------------------------------------- memory

def _reference_step(W, cfg, src, am, mem, reset, dec_in):
    """MemBART's equations (arXiv 2209.07634; qywu/memformers' encoder) over Hugging Face-format weights ``W``,
    written out with plain fp64 torch ops: returns (log-probs [B, T, V], M_{t+1} [B, K, d])."""
    g = lambda n: W["model." + n] if "model." + n in W else W[n]
    lin = lambda x, n: x @ g(n + ".weight").T + g(n + ".bias")
    ln = lambda x, n: torch.nn.functional.layer_norm(x, x.shape[-1:], g(n + ".weight"), g(n + ".bias"))
    H, d = cfg.encoder_attention_heads, cfg.d_model
    dh = d // H
    B, S = src.shape
    K = cfg.num_slots

    def heads(x):
        return x.view(B, -1, H, dh).transpose(1, 2)

    def attn(q, k, v, mask):
        s = heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(dh) + mask
        return (s.softmax(-1) @ heads(v)).transpose(1, 2).reshape(B, -1, d)

    pos = lambda n, L: g(n)[2:2 + L]
    x = ln(g("shared.weight")[src] + pos("encoder.embed_positions.weight", S), "encoder.layernorm_embedding")
    m0 = ln((1 - reset.double())[:, None, None] * mem + g("encoder.memory_bias"), "encoder.memory_layer_norm")
    m = m0
    NEG = -1e30
    key_ok = torch.cat([torch.ones(B, K, dtype=torch.bool), am.bool()], 1)
    mask = torch.where(key_ok[:, None, None, :], 0.0, NEG).double().expand(B, 1, K + S, K + S).clone()
    eye = torch.eye(K, dtype=torch.bool)
    mask[:, :, :K, :K] = torch.where(eye, mask[:, :, :K, :K], torch.full_like(mask[:, :, :K, :K], NEG))
    for i in range(cfg.encoder_layers):
        p = f"encoder.layers.{i}."
        c_q = torch.cat([lin(m, p + "self_attn.mem_q_proj"), lin(x, p + "self_attn.q_proj")], 1)
        c_k = torch.cat([lin(m, p + "self_attn.mem_k_proj"), lin(x, p + "self_attn.k_proj")], 1)
        c_v = torch.cat([lin(m, p + "self_attn.mem_v_proj"), lin(x, p + "self_attn.v_proj")], 1)
        a = attn(c_q, c_k, c_v, mask)
        x = ln(x + lin(a[:, K:], p + "self_attn.out_proj"), p + "self_attn_layer_norm")
        x = ln(x + lin(torch.nn.functional.gelu(lin(x, p + "fc1")), p + "fc2"), p + "final_layer_norm")
        m = ln(m + lin(a[:, :K], p + "self_attn.mem_out_proj"), p + "mem_self_attn_layer_norm")
        m = ln(m + lin(torch.nn.functional.gelu(lin(m, p + "mem_fc1")), p + "mem_fc2"), p + "mem_final_layer_norm")
    gate = torch.sigmoid(lin(torch.nn.functional.gelu(lin(m, "encoder.memory_gate_net.dense")),
                             "encoder.memory_gate_net.dense2"))
    new_mem = gate * m + (1 - gate) * m0
    enc = torch.cat([new_mem, x], 1)
    T = dec_in.shape[1]
    y = ln(g("shared.weight")[dec_in] + pos("decoder.embed_positions.weight", T), "decoder.layernorm_embedding")
    causal = torch.triu(torch.full((T, T), NEG, dtype=torch.float64), 1)
    cross = torch.where(key_ok[:, None, None, :], 0.0, NEG).double()
    for i in range(cfg.decoder_layers):
        p = f"decoder.layers.{i}."
        a = attn(lin(y, p + "self_attn.q_proj"), lin(y, p + "self_attn.k_proj"), lin(y, p + "self_attn.v_proj"),
                 causal)
        y = ln(y + lin(a, p + "self_attn.out_proj"), p + "self_attn_layer_norm")
        a = attn(lin(y, p + "encoder_attn.q_proj"), lin(enc, p + "encoder_attn.k_proj"),
                 lin(enc, p + "encoder_attn.v_proj"), cross)
        y = ln(y + lin(a, p + "encoder_attn.out_proj"), p + "encoder_attn_layer_norm")
        y = ln(y + lin(torch.nn.functional.gelu(lin(y, p + "fc1")), p + "fc2"), p + "final_layer_norm")
    logits = y @ g("shared.weight").T + W["final_logits_bias"]
    return logits.log_softmax(-1), new_mem


def test_memory_path_equals_reference_over_steps_fp64():
    model = _model(num_slots=5)
    W = to_hf(model.gather_full_state_dict(), model.cfg)
    state = model.init_state(3)
    mem = torch.zeros(3, 5, 16, dtype=torch.float64)
    resets = [torch.tensor([False, False, False]), torch.tensor([False, True, False]), torch.tensor([True, False, False])]
    for step, reset in enumerate(resets):
        src, am, tgt = _batch(seed=step)
        out, state = model(src, state, tgt, attention_mask=am, reset=reset, return_logits=True)
        ref_lp, mem = _reference_step(W, model.cfg, src, am, mem, reset, model.shift_right(tgt))
        assert (out.logits - ref_lp).abs().max().item() < 1e-12, f"step {step}"
        assert (state[STATE_KEY] - mem).abs().max().item() < 1e-12, f"memory after step {step}"
        assert torch.equal(out.encoder.memory, state[STATE_KEY]) and torch.equal(out.encoder.hidden[:, :5], state[STATE_KEY])


def test_carried_memory_changes_output_and_resets_start_from_ln_bias():
    model = _model(num_slots=4)
    src1, am1, _ = _batch(seed=1)
    src2, am2, tgt2 = _batch(seed=2)
    _, state = model.encode(src1, model.init_state(3), attention_mask=am1)
    assert state[STATE_KEY].abs().sum() > 0
    carried, _ = model(src2, state, tgt2, attention_mask=am2)
    fresh, fresh_state = model(src2, model.init_state(3), tgt2, attention_mask=am2)
    assert (carried.nll - fresh.nll).abs().min() > 0, "the memory of step 1 must change every row's loss at step 2"
    # rows reset through the flag, or through reset_state, compute exactly what a fresh memory computes
    reset = torch.tensor([True, False, True])
    flagged, flagged_state = model(src2, state, tgt2, attention_mask=am2, reset=reset)
    cleared, cleared_state = model(src2, model.reset_state(state, reset), tgt2, attention_mask=am2)
    for out, st in ((flagged, flagged_state), (cleared, cleared_state)):
        assert torch.equal(out.nll[reset], fresh.nll[reset]) and torch.equal(out.nll[~reset], carried.nll[~reset])
        assert torch.equal(st[STATE_KEY][reset], fresh_state[STATE_KEY][reset])
    # a fresh row's m_0 is LN(b_mem): with zero layers of change the gate mixes m_L with exactly that
    enc = model.encoder
    m0 = enc.memory_layer_norm(enc.memory_bias)
    zero = model.init_state(1)
    x = model.encoder.memory_layer_norm(zero[STATE_KEY][0] + enc.memory_bias)
    assert torch.equal(x, m0)


def test_no_slot_reads_another_slot_jacobian():
    """Within an encoder layer slot s attends to itself and the tokens only, and the gate and norms act per slot:
    with one encoder layer the new memory's slot s depends on the old memory's slot s alone (block-diagonal
    Jacobian); the tokens, which read every slot, do depend on all of them."""
    model = _model(num_slots=4, encoder_layers=1)
    src, am, _ = _batch(B=1)
    mem0 = torch.randn(1, 4, 16, dtype=torch.float64)

    def new_mem(mem):
        st = model.init_state(1).replace(**{STATE_KEY: mem})
        enc, _ = model.encode(src, st, attention_mask=am, detach_state=False)
        return enc.memory, enc.hidden[:, 4:]

    J = torch.autograd.functional.jacobian(lambda t: new_mem(t)[0], mem0)      # [1, 4, 16, 1, 4, 16]
    J = J.abs().sum((0, 2, 3, 5))                                              # [slot out, slot in]
    assert (J.diagonal() > 0).all()
    assert (J - torch.diag(J.diagonal())).abs().max().item() == 0.0
    Jt = torch.autograd.functional.jacobian(lambda t: new_mem(t)[1], mem0).abs().sum((0, 1, 2, 3, 5))
    assert (Jt > 0).all(), "every slot is read by the tokens"
    # the joint mask itself: slot rows see only their own slot column (and every non-pad token)
    mask = model._encoder_mask(am.bool(), 4, torch.float64)[0]
    assert torch.equal(mask[:4, :4] == 0, torch.eye(4, dtype=torch.bool)) and (mask[4:, :4] == 0).all()


def test_backprop_through_steps_and_into_the_memory():
    """``detach_state=False`` keeps the memory in the graph (BPTT through a rollout); a state tensor that requires
    grad receives d loss / d M_t (what memory replay backpropagation needs)."""
    model = _model(num_slots=4)
    src1, am1, _ = _batch(seed=1)
    src2, am2, tgt2 = _batch(seed=2)
    m0 = model.init_state(3)[STATE_KEY].clone().requires_grad_(True)
    st0 = model.init_state(3).replace(**{STATE_KEY: m0})
    _, st1 = model.encode(src1, st0, attention_mask=am1, detach_state=False)
    out, st2 = model(src2, st1, tgt2, attention_mask=am2, detach_state=False)
    assert st2[STATE_KEY].requires_grad
    out.nll.sum().backward()
    assert m0.grad is not None and m0.grad.abs().sum() > 0
    _, detached = model.encode(src1, model.init_state(3), attention_mask=am1)
    assert not detached[STATE_KEY].requires_grad


def test_activation_checkpointing_same_gradients():
    grads = []
    for ckpt in (False, True):
        model = _model(num_slots=4, checkpoint_activations=ckpt, dropout=0.1, attention_dropout=0.1,
                       activation_dropout=0.1).train()
        torch.manual_seed(3)
        src, am, tgt = _batch()
        out, _ = model(src, model.init_state(3), tgt, attention_mask=am)
        out.nll.sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.allclose(grads[0][k], grads[1][k], atol=1e-12) for k in grads[0])


def test_state_checks_and_flops():
    model = _model(num_slots=4)
    src, am, tgt = _batch()
    with pytest.raises(ValueError, match="3 rows, the batch has 2"):
        model(src[:2], model.init_state(3), tgt[:2])
    with pytest.raises(ValueError, match="reset must be bool"):
        model(src, model.init_state(3), tgt, reset=torch.zeros(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="mem_len"):
        model.init_state(3, mem_len=5)
    with pytest.raises(ValueError, match="targets"):
        model(src, model.init_state(3))
    st = model.init_state(3)
    assert st.state_dict()["tensors"][STATE_KEY].shape == (3, 4, 16)
    # the analytic count against torch's flop counter on the running model
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc:
        with torch.no_grad():
            model(src, st, tgt, attention_mask=am)
    counted = fc.get_total_flops()
    ours = model.flops(3, tgt_len=tgt.shape[1], source_len=src.shape[1])
    assert abs(ours - counted) / counted < 0.02, (ours, counted)
