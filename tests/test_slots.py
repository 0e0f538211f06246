"""Memformer memory slots (pretrain/model/mechanisms/slots/): the properties the registry-driven matrix
(test_mixers.py: reference, leakage, documents inside a segment, generation, TP 2 = 1) does not state itself.

* slot attention: a slot of the write stream depends on no other slot, and the tokens never read the write
  stream (only m_0);
* the update gate and the biased normalisation: a closed gate keeps m_0 = LN((1 - r) M + b_mem) (LN(b_mem) for a
  fresh stream), an open one takes the written slots;
* the slots alone carry the past (a slot-only model has no positional memory), with gradients through the state;
* FLOPs as counted by torch's flop counter; bf16; config errors; presets."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from model_checks import check_bf16_against_fp32
from pretrain.config_base import ConfigError
from pretrain.model import ModelConfig, build_model, load_model_config
from pretrain.model.mixer import SegmentContext
from pretrain.model.mechanisms.slots.mixer import READ, START, STREAM

BASE = dict(n_layer=2, d_model=16, n_head=2, d_head=8, d_inner=24, vocab_size=31, dropout=0.0, tgt_len=4,
            mem_len=0, attn_type=50, slots=dict(num_slots=4))


pytestmark = pytest.mark.usefixtures("tp1")


def _model(**kw):
    torch.manual_seed(0)
    return build_model(ModelConfig(**{**BASE, **kw})).double().eval()


@pytest.mark.parametrize("pre_lnorm", [False, True], ids=["post-ln", "pre-ln"])
def test_slots_attend_to_themselves_and_tokens_never_read_the_write_stream(pre_lnorm):
    model = _model(pre_lnorm=pre_lnorm)
    mixer = model.stack.layers[0].mixer
    B, N, K, d = 2, 5, 4, 16
    ctx = SegmentContext(n=N, mem_len=0, clamp_len=-1, same_length=False, detach=True, training=False,
                         batch_size=B, valid=None, device=torch.device("cpu"), dtype=torch.float64)
    type(mixer).prepare(ctx, [mixer], model.stack.drop)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, N, d, generator=g, dtype=torch.float64)
    m = torch.randn(B, K, d, generator=g, dtype=torch.float64, requires_grad=True)
    m0 = torch.randn(B, K, d, generator=g, dtype=torch.float64)
    out = mixer(x, {}, {STREAM: m, START: m0, READ: m0}, ctx, model.stack.biases.as_dict())
    (to_tokens,) = torch.autograd.grad(out.x.sum(), m, retain_graph=True, allow_unused=True)
    assert to_tokens is None or not to_tokens.any(), "the tokens read the write stream"
    for i in range(K):
        (grad,) = torch.autograd.grad(out.rows[STREAM][:, i].sum(), m, retain_graph=True)
        norms = grad.abs().sum((0, 2))
        assert norms[i] > 1e-6 and all(norms[j] == 0 for j in range(K) if j != i), \
            f"slot {i} of the write stream reads other slots: {norms.tolist()}"


def test_update_gate_and_biased_normalisation():
    """A closed gate (a = 0) keeps m_0: LN(b_mem) from a fresh stream, LN(M + b_mem) after; an open gate
    (a = 1) takes the written slots, which depend on the segment."""
    model = _model()
    mem = model.stack.memories["slots"]
    tokens = torch.randint(0, 31, (3, 8), generator=torch.Generator().manual_seed(2))
    ln = lambda t: F.layer_norm(t, t.shape[-1:], mem.norm.weight, mem.norm.bias, 1e-5)
    with torch.no_grad():
        mem.gate_fc2.bias.fill_(-1e4)                                     # sigmoid(-1e4) == 0 in fp64
        _, st = model(tokens[:, :4], model.init_state(3))
        assert torch.allclose(st["slots.mem"], ln(mem.memory_bias).expand(3, -1, -1), atol=1e-12, rtol=0)
        _, st2 = model(tokens[:, 4:], st)
        assert torch.allclose(st2["slots.mem"], ln(st["slots.mem"] + mem.memory_bias), atol=1e-12, rtol=0)
        mem.gate_fc2.bias.fill_(1e4)
        _, open1 = model(tokens[:, :4], model.init_state(3))
        _, open2 = model(tokens[:, 4:], model.init_state(3))
    assert (open1["slots.mem"] - open2["slots.mem"]).abs().amax((1, 2)).min() > 1e-6, \
        "with the gate open the memory is what the segment wrote"


def test_the_slots_carry_the_past_with_gradients():
    """A slot-only model has no positional memory: the slots are all it remembers.  A different history changes
    the next segment's predictions, and with the state kept in the graph the next segment's loss reaches the
    embedding of a token seen only in the first segment."""
    model = _model(tie_weight=False)
    g = torch.Generator().manual_seed(3)
    a, b, nxt = (torch.randint(0, 20, (2, 4), generator=g) for _ in range(3))
    _, sa = model(a, model.init_state(2))
    _, sb = model(b, model.init_state(2))
    la, _ = model(nxt, sa, return_logits=True)
    lb, _ = model(nxt, sb, return_logits=True)
    assert (la.logits - lb.logits).abs().amax((1, 2)).min() > 1e-6
    first = torch.full((2, 4), 30)
    grads = {}
    for detach in (True, False):
        model.zero_grad()
        _, st = model(first, model.init_state(2), detach_state=detach)
        out, _ = model(nxt, st, nxt)
        out.nll.sum().backward()
        grads[detach] = model.embedding.tables[0].weight.grad[30].abs().sum().item()
    assert grads[True] == 0.0 and grads[False] > 0.0


@pytest.mark.parametrize("kw", [dict(), dict(n_layer=4, layers="xl,slots", mem_len=6),
                                dict(layers="slots,slots_read", pre_lnorm=True)],
                         ids=["slots", "xl-slots", "slots-read-preln"])
def test_flops_count_what_is_computed(kw):
    model = _model(**kw).float()
    B, N = 3, 4
    tokens = torch.arange(B * N).view(B, N) * 5 % 31
    with FlopCounterMode(display=False) as counter:
        model(tokens, model.init_state(B), tokens)
    assert model.flops(B, N) == pytest.approx(counter.get_total_flops(), rel=1e-9)


def test_bf16_parameters():
    ref = _model().float()
    model = _model().to(torch.bfloat16)
    tokens = torch.randint(0, 31, (2, 13), generator=torch.Generator().manual_seed(4))
    st, st_ref = check_bf16_against_fp32(model, ref, tokens, segments=3)
    assert st["slots.mem"].dtype == torch.bfloat16
    assert (st["slots.mem"].float() - st_ref["slots.mem"]).abs().max() < 0.1


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError) as e:
        ModelConfig(**{**BASE, "slots": dict(num_slots=0)}).validate()
    assert e.value.field == "slots.num_slots"
    with pytest.raises(ConfigError) as e:
        ModelConfig(**{**BASE, "mem_len": 4}).validate()              # slot layers read no positional memory
    assert e.value.field == "mem_len"
    with pytest.raises(ConfigError, match="at least one layer must write") as e:
        build_model(ModelConfig(**{**BASE, "attn_type": 51}))
    assert e.value.field == "layers"


def test_presets(monkeypatch):
    """The MemBART-sized presets: 6 / 12 writing slot layers then as many reading ones, 64 / 128 slots, the
    parameter counts their comments give (built on the meta device); the tiny ones run."""
    from pretrain.model import weights
    for name, writes, slots, params in (("slots_wt103_base", 6, 64, 171.66e6),
                                        ("slots_wt103_large", 12, 128, 544.47e6)):
        cfg = load_model_config(name)
        variants = [s.variant for s in cfg.layer_specs()]
        assert variants == ["slots"] * writes + ["read"] * writes and cfg.slots.num_slots == slots
        with monkeypatch.context() as mp_, torch.device("meta"):
            mp_.setattr(weights, "init_weights", lambda model, cfg: None)
            model = build_model(cfg)
        assert sum(p.numel() for p in model.parameters()) == pytest.approx(params, rel=1e-4), name
    for name in ("slots_tiny", "slots_xl_tiny"):
        cfg = load_model_config(name, overrides=dict(tgt_len=8))
        model = build_model(cfg)
        assert model.decode_policy == "segment"
        tokens = torch.randint(0, 256, (2, 17))
        state = model.init_state(2)
        for s in range(2):
            out, state = model(tokens[:, 8 * s:8 * s + 8], state, tokens[:, 8 * s + 1:8 * s + 9])
            assert out.nll.mean().item() == pytest.approx(torch.log(torch.tensor(256.0)).item(), abs=0.5)
        assert tuple(state["slots.mem"].shape) == (2, 64, 128)
