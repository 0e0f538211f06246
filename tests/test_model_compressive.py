"""The Compressive Transformer layers (pretrain/model/mechanisms/compressive/) beyond the registry-driven matrix
(test_mixers.py and test_model_tp.py run its registered configs and hybrids against the fp64 reference, for
leakage, resets, save/load, documents inside a segment, generation and TP 2 = 1):

* the FIFO bookkeeping: which positions end up in the memory, the pending buffer and which compressed block,
  against a hand-checked case and a plain list model over random segmentations and document starts;
* the evaluation options and uneven segment lengths against the reference;
* the attention-reconstruction loss: its value and gradient against the reference, that it trains the
  compressor only (no gradient anywhere else, no parameter frozen: the K/V projections keep training), that the
  LM loss never trains the compressor, and that evaluation and pooling have none;
* the GRU gate's identity start, ``memory_layers`` and config errors, the FLOP count, the presets, exact resume
  through the engine, activation checkpointing and bf16 with the reconstruction loss, the attention recorder.
"""
import random

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import copy_task
from pretrain.config_base import ConfigError
from pretrain.model import ModelConfig, build_model, load_model_config, weights
from pretrain.model.mechanisms.compressive.mixer import evict, last_start, push
from pretrain.model.reference import ReferenceLM
from test_model_reference import BASE, compare

CONV = dict(attn_type=60, compressive=dict(cmem_len=3, cmem_ratio=2))


pytestmark = pytest.mark.usefixtures("tp1")


# ----------------------------------------------------------------------------------------------------------
# FIFO bookkeeping

def _run_fifo(rows, M, c, C):
    """Drive ``evict`` / ``push`` over segments.  ``rows``: per row a list of (positions, start) with the same
    segment lengths across rows (position ids are the hidden states: [B, N, d = c], every feature = the id);
    ``start``: index of a document start inside the segment or -1.  Each compressed slot holds the c ids of its
    block (feature 0 of each position).  Returns per row (mem ids, pending ids, cmem blocks)."""
    B, d = len(rows), c
    mem, valid = torch.zeros(B, M, d), torch.zeros(B, dtype=torch.long)
    pend, npend = torch.zeros(B, c - 1, d), torch.zeros(B, dtype=torch.long)
    cmem, cvalid = torch.zeros(B, C, d), torch.zeros(B, dtype=torch.long)
    for s in range(len(rows[0])):
        x = torch.tensor([r[s][0] for r in rows], dtype=torch.float32)[..., None].expand(-1, -1, d)
        N = x.shape[1]
        reset = torch.zeros(B, N, dtype=torch.bool)
        for b, r in enumerate(rows):
            if r[s][1] >= 0:
                reset[b, r[s][1]] = True
        start = last_start(reset if reset.any() else None, B, x.device)
        ev = evict(pend, npend, mem, valid, x, start, c)
        K = ev.blocks.shape[1] // c
        comp = ev.blocks.view(B, K, c, d)[..., 0]                       # [B, K, c]: the ids of each block
        cmem, cvalid = push(cmem, cvalid, comp, ev.count, start)
        pend, npend = ev.pending, ev.pending_valid
        mem = torch.cat([mem, x], 1)[:, -M:] if M else mem
        valid = torch.where(start >= 0, N - start, valid + N).clamp(max=M)
    out = []
    for b in range(B):
        ids = lambda t, n: [int(v) for v in t[t.shape[0] - n:, 0]] if n else []
        out.append((ids(mem[b], int(valid[b])), ids(pend[b], int(npend[b])),
                    [[int(v) for v in blk] for blk in cmem[b, C - int(cvalid[b]):]]))
    # empty slots hold zeros (canonical states)
    assert all(float(pend[b, :c - 1 - int(npend[b])].abs().sum()) == 0 for b in range(B))
    assert all(float(cmem[b, :C - int(cvalid[b])].abs().sum()) == 0 for b in range(B))
    return out


def _list_fifo(segments, M, c, C):
    """The same bookkeeping on Python lists, straight from the definition (paper §3.1 with a queue of whole
    blocks): the memory keeps the last M positions, what leaves it joins the queue, whole blocks of c go to the
    compressed memory (last C kept), a document start empties everything."""
    mem, pend, cmem = [], [], []
    for pos, start in segments:
        if start >= 0:
            mem, pend, cmem, pos = [], [], [], pos[start:]
        seq = mem + pos
        mem = seq[len(seq) - min(M, len(seq)):]
        queue = pend + seq[:len(seq) - len(mem)]
        nb = len(queue) // c
        cmem = (cmem + [queue[j * c:(j + 1) * c] for j in range(nb)])
        cmem = cmem[len(cmem) - min(C, len(cmem)):]
        pend = queue[nb * c:]
    return mem, pend, cmem


def test_fifo_hand_checked_case():
    """c = 3, M = 4, C = 3, segments of 2, 5, 1, 4, 3, 6, 5, 3, 1 positions (ids 1..30); row 0 starts a
    document at position 24 (third position of the seventh segment), row 1 never does.  Worked by hand:

    seg 1 (1-2):  mem 1 2
    seg 2 (3-7):  1 2 3 leave -> block [1 2 3]; mem 4-7
    seg 3 (8):    4 leaves -> pending 4; mem 5-8
    seg 4 (9-12): 5 6 7 8 leave -> block [4 5 6], pending 7 8
    seg 5 (13-15): 9 10 11 leave -> block [7 8 9], pending 10 11; cmem [1..3] [4..6] [7..9]
    seg 6 (16-21): 12..17 leave -> blocks [10 11 12] [13 14 15], pending 16 17; cmem keeps the last 3
    row 0, seg 7 (22-26, start at 24): everything dropped; mem 24 25 26
           seg 8 (27-29): 24 25 leave -> pending 24 25;  seg 9 (30): 26 leaves -> block [24 25 26]
    row 1, seg 7: 18..22 leave -> blocks [16 17 18] [19 20 21], pending 22
           seg 8: 23 24 25 leave -> block [22 23 24], pending 25;  seg 9: 26 leaves -> pending 25 26"""
    lengths = [2, 5, 1, 4, 3, 6, 5, 3, 1]
    ids, t = [], 1
    for n in lengths:
        ids.append(list(range(t, t + n)))
        t += n
    row0 = [(p, 2 if s == 6 else -1) for s, p in enumerate(ids)]
    row1 = [(p, -1) for p in ids]
    got = _run_fifo([row0, row1], M=4, c=3, C=3)
    assert got[0] == ([27, 28, 29, 30], [], [[24, 25, 26]])
    assert got[1] == ([27, 28, 29, 30], [25, 26], [[16, 17, 18], [19, 20, 21], [22, 23, 24]])
    # after six segments (before the document start), both rows: cmem [7..9] [10..12] [13..15], pending 16 17
    six = _run_fifo([row1[:6]], M=4, c=3, C=3)[0]
    assert six == ([18, 19, 20, 21], [16, 17], [[7, 8, 9], [10, 11, 12], [13, 14, 15]])
    for rows in (row0, row1, row1[:6]):
        assert _list_fifo(rows, 4, 3, 3) == _run_fifo([rows], M=4, c=3, C=3)[0]


@pytest.mark.parametrize("M,c,C", [(5, 2, 3), (4, 3, 4), (3, 4, 2), (0, 3, 5), (6, 1, 3)])
def test_fifo_matches_the_list_model_for_random_segmentations(M, c, C):
    """Random segment lengths (shared by the rows, as in a batch) and random document starts per row; the
    blocks never depend on how the stream was cut (pending positions wait for a whole block)."""
    rng = random.Random(M * 100 + c * 10 + C)
    B, t = 3, 1
    rows = [[] for _ in range(B)]
    for _ in range(14):
        n = rng.randint(1, 7)
        for r in rows:
            r.append((list(range(t, t + n)), rng.randrange(1, n) if n > 1 and rng.random() < 0.15 else -1))
        t += n
    got = _run_fifo(rows, M, c, C)
    for b in range(B):
        assert got[b] == _list_fifo(rows[b], M, c, C)
    # one long segment without starts equals any cutting of it
    whole = [(list(range(1, t)), -1)]
    assert _run_fifo([whole], M, c, C)[0] == _list_fifo(whole, M, c, C) == _list_fifo(
        [(p, -1) for p, _ in rows[0]], M, c, C)


# ----------------------------------------------------------------------------------------------------------
# against the reference

@pytest.mark.parametrize("extra", [
    CONV,
    dict(attn_type=60, pre_lnorm=True, untie_r=True, compressive=dict(cmem_len=2, cmem_ratio=3, gru_gating=True)),
    dict(attn_type=60, compressive=dict(cmem_len=4, cmem_ratio=2, compression="max")),
], ids=["conv", "preln-untied-gru", "max"])
def test_eval_options_and_uneven_segments_match_reference(extra):
    """clamp_len, same_length (over the frame: every query sees C + M slots), uneven segment lengths and
    decoding-style segments of one token, with memories partly filled and partial blocks pending."""
    cfg = ModelConfig(tgt_len=4, mem_len=5, **{**BASE, **extra})
    compare(cfg, 4, 5, clamp=3)
    compare(cfg, 4, 5, same=True)
    compare(cfg, [2, 5, 3, 1, 6, 7], 5)
    compare(cfg, 1, 4, segs=9)
    compare(cfg, [3, 6, 2], 5, detach=False)


def _aux_setup(extra=CONV, seed=0):
    cfg = ModelConfig(tgt_len=4, mem_len=5, **{**BASE, **extra})
    torch.manual_seed(seed)
    model = build_model(cfg).double().train()
    full = {k: v.clone().requires_grad_(True) for k, v in model.gather_full_state_dict().items()}
    tok = torch.randint(0, cfg.vocab_size, (2, 4 * 4 + 1))
    return cfg, model, ReferenceLM(cfg, full), full, tok


@pytest.mark.parametrize("detach", [True, False], ids=["detached", "bptt"])
@pytest.mark.parametrize("pre_lnorm", [False, True], ids=["post-ln", "pre-ln"])
def test_reconstruction_loss_matches_reference_and_trains_only_the_compressor(detach, pre_lnorm):
    cfg, model, ref, full, tok = _aux_setup({**CONV, "pre_lnorm": pre_lnorm})
    state, mem = model.init_state(2), None
    aux, ref_aux = 0.0, 0.0
    values = []
    for s in range(4):
        x, y = tok[:, 4 * s:4 * s + 4], tok[:, 4 * s + 1:4 * s + 5]
        out, state = model(x, state, y, detach_state=detach)
        _, _, mem = ref.segment(x, y, mem, 5)
        assert out.aux_loss is not None and ref.aux_loss is not None
        assert abs(out.aux_loss.item() - ref.aux_loss.item()) <= 1e-12 + 1e-9 * abs(ref.aux_loss.item()), s
        values.append(out.aux_loss.item())
        aux, ref_aux = aux + out.aux_loss, ref_aux + ref.aux_loss
    assert values[0] == 0.0 and all(v > 0 for v in values[1:]), "compression fires from the second segment"
    aux.backward()
    ref_aux.backward()
    grads = weights.gather_full(model, grads=True)
    for name, g in grads.items():
        if ".compressor." in name:
            r = full[name].grad
            assert g.abs().max() > 0 and torch.allclose(g, r, rtol=1e-8, atol=1e-14 * r.abs().max()), name
        else:
            assert g.abs().max() == 0, f"the reconstruction loss reached {name}"


def test_lm_loss_never_trains_the_compressor_and_no_parameter_is_frozen():
    """One training step with compression: the LM loss gives the compressor no gradient (also through the
    state), the reconstruction loss does; after AdamW steps on LM + reconstruction every parameter still
    requires grad and the K/V projections (used by the reconstruction loss) keep changing, step after step."""
    cfg = ModelConfig(tgt_len=4, mem_len=5, **{**BASE, **CONV})
    torch.manual_seed(1)
    model = build_model(cfg).train()
    tok = torch.randint(0, cfg.vocab_size, (2, 41))
    for detach in (True, False):
        model.zero_grad()
        state = model.init_state(2)
        loss = 0.0
        for s in range(3):
            out, state = model(tok[:, 4 * s:4 * s + 4], state, tok[:, 4 * s + 1:4 * s + 5], detach_state=detach)
            loss = loss + out.nll.mean()
        loss.backward()
        for layer in model.stack.layers:
            c = layer.mixer.compressor
            assert c.weight.grad is None or c.weight.grad.abs().max() == 0, "the LM loss reached the compressor"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    state = model.init_state(2)
    hd = cfg.n_head * cfg.d_head
    for step in range(4):
        opt.zero_grad()
        out, state = model(tok[:, 4 * step:4 * step + 4], state, tok[:, 4 * step + 1:4 * step + 5])
        (out.nll.mean() + out.aux_loss).backward()
        kv = [layer.mixer.attn.qkv.weight[hd:].detach().clone() for layer in model.stack.layers]
        if step >= 1:                                  # compression fires from the second segment on
            for layer in model.stack.layers:
                assert layer.mixer.compressor.weight.grad.abs().max() > 0
        opt.step()
        assert all(p.requires_grad for p in model.parameters()), "a parameter was frozen"
        for layer, before in zip(model.stack.layers, kv):
            assert not torch.equal(layer.mixer.attn.qkv.weight[hd:], before), f"K/V frozen after step {step}"


@pytest.mark.parametrize("extra,train", [
    (CONV, False),
    (dict(attn_type=60, compressive=dict(cmem_ratio=2, compression="max")), True),
    (dict(attn_type=60, compressive=dict(cmem_ratio=2, compression="mean")), True),
    (dict(attn_type=60, compressive=dict(cmem_ratio=2, reconstruction_loss_weight=0.0)), True),
    (dict(attn_type=61), True),
], ids=["eval", "max", "mean", "weight0", "xl-variant"])
def test_no_auxiliary_loss_in_evaluation_or_without_a_trained_compressor(extra, train):
    cfg = ModelConfig(tgt_len=4, mem_len=5, **{**BASE, **extra})
    model = build_model(cfg).train(train)
    state = model.init_state(2)
    tok = torch.randint(0, cfg.vocab_size, (2, 12))
    for s in range(3):
        out, state = model(tok[:, 4 * s:4 * s + 4], state, tok[:, 4 * s:4 * s + 4])
        assert out.aux_loss is None


def test_reconstruction_weight_and_layer_average():
    """aux = weight x the mean over the compressing layers (layers without compression add nothing)."""
    tok = torch.randint(0, 37, (2, 12), generator=torch.Generator().manual_seed(2))
    res = {}
    for name, kw in {"w1": dict(), "w3": dict(reconstruction_loss_weight=3.0),
                     "top": dict(memory_layers=[1], other_layers="local")}.items():
        cfg = ModelConfig(tgt_len=4, mem_len=5, **{**BASE, "attn_type": 60,
                                                   "compressive": dict(cmem_len=3, cmem_ratio=2, **kw)})
        torch.manual_seed(0)
        model = build_model(cfg).double().train()
        state = model.init_state(2)
        for s in range(3):
            out, state = model(tok[:, 4 * s:4 * s + 4], state)
        res[name] = out.aux_loss.item()
        res[name + "_n"] = sum(1 for l in model.stack.layers if l.mixer.compressed)
    assert res["w1"] > 0 and res["w3"] == pytest.approx(3 * res["w1"], rel=1e-12)
    assert (res["w1_n"], res["top_n"]) == (2, 1)


# ----------------------------------------------------------------------------------------------------------
# gating, config, cost, presets

def test_gru_gate_starts_close_to_the_identity():
    cfg = ModelConfig(tgt_len=4, mem_len=5, pre_lnorm=True, **{**BASE, "attn_type": 60,
                                                                 "compressive": dict(gru_gating=True)})
    model = build_model(cfg)
    for layer in model.stack.layers:
        for gate in (layer.mixer.attn_gate, layer.mixer.ffn_gate):
            assert torch.equal(gate.b_z, torch.full_like(gate.b_z, 2.0))
            x, y = torch.randn(3, 16), torch.randn(3, 16)
            z = torch.sigmoid(y @ gate.w_y[16:32].T + x @ gate.w_x[16:].T + gate.b_z)
            assert (z.mean() - torch.sigmoid(torch.tensor(2.0))).abs() < 0.05
    # with a large gate bias every gated block passes its stream through: the stack's output is its input
    cfg.compressive.gate_bias = 40.0
    model = build_model(cfg).double().eval()
    seen = {}
    model.stack.register_forward_hook(lambda m, args, out: seen.update(inp=args[0], out=out[0]))
    tok = torch.randint(0, 37, (2, 4))
    state = model.init_state(2)
    for _ in range(3):
        _, state = model(tok, state)
        assert (seen["out"] - seen["inp"]).abs().max() < 1e-12


def test_memory_layers_resolve_into_the_layer_pattern():
    cfg = ModelConfig(**{**BASE, "n_layer": 4, "attn_type": 60, "mem_len": 4,
                         "compressive": dict(memory_layers=[2, -1], other_layers="local")})
    assert [s.code for s in cfg.layer_specs()] == [62, 62, 60, 60]
    cfg = ModelConfig(**{**BASE, "n_layer": 4, "layers": "xl,compressive", "mem_len": 4,
                         "compressive": dict(memory_layers=[3])})
    assert [s.code for s in cfg.layer_specs()] == [0, 61, 0, 60]
    model = build_model(cfg)
    assert model.stack.signature == "xl,compressive:61,xl,compressive:60"
    assert sorted(k for k in model.init_state(1).keys() if k.startswith("layers.3.")) == [
        "layers.3.cmem", "layers.3.cmem_valid", "layers.3.mem", "layers.3.pending", "layers.3.pending_valid"]


@pytest.mark.parametrize("section,field", [
    (dict(memory_layers=[4]), "compressive.memory_layers[0]"),
    (dict(memory_layers=[0]), "compressive.memory_layers[0]"),            # layer 0 is XL, not 60
    (dict(compression="avg"), "compressive.compression"),
    (dict(cmem_ratio=0), "compressive.cmem_ratio"),
    (dict(cmem_len=0), "compressive.cmem_len"),
    (dict(other_layers="none"), "compressive.other_layers"),
])
def test_bad_compressive_config_names_the_field(section, field):
    with pytest.raises(ConfigError) as e:
        load_model_config("compressive_tiny", {"layers": "xl,compressive", "compressive": section})
    assert f"'model.{field}'" in str(e.value) and "compressive_tiny.yaml" in str(e.value)


@pytest.mark.parametrize("extra", [
    dict(attn_type=60, compressive=dict(cmem_ratio=3, gru_gating=True)),
    dict(attn_type=60, compressive=dict(cmem_ratio=2, compression="max", memory_layers=[1], other_layers="local")),
    dict(attn_type=61, compressive=dict(gru_gating=True)),
], ids=["conv-gru", "max-local", "xl-gru"])
def test_flops_count_what_is_computed(extra):
    cfg = ModelConfig(**{**BASE, "tgt_len": 4, "mem_len": 6, "dropout": 0.0, **extra})
    model = build_model(cfg).eval()
    B, N = 3, 5
    tokens = torch.arange(B * N).view(B, N) % 37
    with FlopCounterMode(display=False) as counter:
        model(tokens, model.init_state(B), tokens)
    assert model.flops(B, N, cfg.mem_len) == pytest.approx(counter.get_total_flops(), rel=1e-9)


def test_presets():
    tiny = load_model_config("compressive_tiny")
    budget, same_mem = load_model_config("xl_tiny_mem80"), load_model_config("xl_tiny")
    C = tiny.compressive.slots(tiny.mem_len)
    assert [s.code for s in tiny.layer_specs()] == [60] * tiny.n_layer
    assert budget.mem_len == tiny.mem_len + C, "the XL baseline with the same number of memory slots"
    assert same_mem.mem_len == tiny.mem_len and same_mem.attn_type == 0
    for name in ("n_layer", "d_model", "n_head", "d_head", "d_inner", "tgt_len", "vocab_size"):
        assert getattr(tiny, name) == getattr(budget, name) == getattr(same_mem, name), name
    # the comparison of docs/results.md runs the registry variants on xl_tiny: the same models as these presets
    variant = load_model_config("xl_tiny", {"attn_type": 60})
    assert variant.compressive.cmem_len is None and variant.compressive.slots(variant.mem_len) == C
    variant.compressive.cmem_len = C                        # the default, resolved
    assert variant == tiny
    assert load_model_config("xl_tiny", {"mem_len": 80}) == budget
    luc = load_model_config("compressive_lucidrains")
    assert [s.code for s in luc.layer_specs()] == [62] * 5 + [60] * 7
    assert luc.compressive.slots(luc.mem_len) == luc.mem_len // 4 and luc.compressive.gru_gating
    for name in ("compressive_enwik8", "compressive_wt103"):
        cfg = load_model_config(name)
        assert all(s.code == 60 for s in cfg.layer_specs())


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_training_resumes_exactly(tmp_path):
    """Through the engine (one process, ZeRO-0): a run stopped at step 3 and resumed gives the losses and the
    final memory states (memory, compressed memory, pending positions and their counts) of a run that never
    stopped."""
    import test_engine_train as eng
    data = copy_task(tmp_path / "copy", train_size=2000, eval_size=50)
    tiny = list(eng.TINY)
    tiny[tiny.index("--model.mem_len") + 1] = "8"                    # 2 segments: compression fires early
    extra = ["--data-path", data, "--model.attn_type", "60", "--model.compressive.cmem_len", "3",
             "--model.compressive.cmem_ratio", "3", "--model.compressive.gru_gating", "true", "--model.dropout",
             "0.1", "--data.reset_memory", "true", "--train-iters", "6"] + tiny
    results = eng.driver(tmp_path, 1, "resume", "0", extra)
    eng.check_resume(results, [0])
    memory = results[0]["0"]["full"]["memory"][0]
    assert any(k.endswith("cmem_valid") and v > 0 for k, v in memory.items()), "compression never fired"


def test_activation_checkpointing_replays_the_reconstruction_loss():
    """With the reconstruction loss in the training loss and dropout on: the same loss and gradients (the
    compressor's included) with and without recomputation."""
    kw = dict(BASE, tgt_len=4, mem_len=5, attn_type=60, dropout=0.2, dropatt=0.1,
              compressive=dict(cmem_len=3, cmem_ratio=2, gru_gating=True))
    tok = torch.randint(0, 37, (2, 13), generator=torch.Generator().manual_seed(0))
    res = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = build_model(ModelConfig(**kw, checkpoint_activations=ckpt)).double().train()
        torch.manual_seed(7)
        state, loss = model.init_state(2), 0.0
        for s in range(3):
            out, state = model(tok[:, 4 * s:4 * s + 4], state, tok[:, 4 * s + 1:4 * s + 5])
            loss = loss + out.nll.sum() + out.aux_loss
        loss.backward()
        res.append((loss.item(), {k: p.grad.clone() for k, p in model.named_parameters()}))
    assert res[0][0] == res[1][0]
    for k, g in res[0][1].items():
        assert torch.allclose(g, res[1][1][k], atol=1e-12, rtol=0), k
    assert res[0][1]["stack.layers.0.mixer.compressor.weight"].abs().max() > 0


def test_bf16_parameters_keep_the_reconstruction_loss_in_fp32():
    cfg = ModelConfig(**dict(BASE, tgt_len=4, mem_len=5, dropout=0.0, **CONV))
    model = build_model(cfg).to(torch.bfloat16).train()
    tok = torch.randint(0, 37, (2, 13), generator=torch.Generator().manual_seed(1))
    state = model.init_state(2)
    for s in range(3):
        out, state = model(tok[:, 4 * s:4 * s + 4], state, tok[:, 4 * s + 1:4 * s + 5])
        (out.nll.mean() + out.aux_loss).backward()
        assert out.aux_loss.dtype == torch.float32 and torch.isfinite(out.aux_loss)
    assert state["layers.0.cmem"].dtype == torch.bfloat16 and int(state["layers.0.cmem_valid"][0]) == 3
    assert model.stack.layers[0].mixer.compressor.weight.grad.dtype == torch.bfloat16


def test_attention_recorder_sees_the_whole_frame():
    """The attention-utilisation hook gets the probabilities over [cmem ; mem ; segment] with the frame length
    C + M before the segment: with uniform attention (zero projections and biases) and both memories full,
    query i sees C + M + i + 1 keys with probability 1 / (C + M + i + 1) each."""
    import numpy as np
    from pretrain.analyze_attention import AttentionProfile
    C, M, N, B = 3, 4, 4, 2
    cfg = ModelConfig(**{**BASE, "tgt_len": N, "mem_len": M, "attn_type": 60,
                         "compressive": dict(cmem_len=C, cmem_ratio=2)})
    model = build_model(cfg).double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".attn." in name or "biases" in name:
                p.zero_()
    tokens = torch.randint(0, 37, (B, 4 * N))
    state = model.init_state(B)
    for s in range(3):
        _, state = model(tokens[:, s * N:(s + 1) * N], state)
    assert int(state["layers.0.cmem_valid"][0]) == C and int(state["valid"][0]) == M
    prof = AttentionProfile()
    model.stack.recorder = prof.record
    model(tokens[:, 3 * N:], state)
    model.stack.recorder = None
    F_ = C + M
    share = sum(F_ / (F_ + i + 1) for i in range(N)) / N
    mean_prob = [np.mean([1 / (F_ + i + 1) for i in range(N) if d <= F_ + i]) for d in range(F_ + N)]
    for layer in prof.summary()["layers"]:
        assert np.allclose(layer["mean_prob"], mean_prob, atol=1e-12)
        assert abs(layer["memory_share"] - share) < 1e-12
