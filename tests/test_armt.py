"""ARMT (``pretrain/model/mechanisms/armt/``; Rodkin et al. 2024): the specifics beyond the registry-driven
matrix (test_mixers.py runs its test configs against the fp64 reference, for leakage, resets, checkpointing,
documents inside a segment and generation):

* config errors name the field in one line (RMT and ARMT at once, heads not dividing d_model ...);
* at initialisation (W_mv = 0) the model equals the same model without ARMT: the memory is empty and the
  tokens never see their segment's memory tokens (no Transformer-XL cache here);
* segmented runs with the state carried equal the fp64 reference (options the matrix does not cover: no gamma
  correction, several heads, pre-LN; backpropagation through the state);
* a reset row, and a document starting inside a segment, equal running the documents separately;
* gradients reach the first segment's tokens through A, z (and not when the state is detached);
* a recall sanity check of the associative memory as the layer hooks use it;
* the state is replicated under tensor parallelism (no head dimension), checkpointable, and refused by RMT.
"""
import io

import pytest
import torch

from pretrain.config_base import ConfigError
from pretrain.model import MemoryState, ModelConfig, build_model, load_model_config
from test_model_reference import BASE as REF_BASE, compare

BASE = dict(n_layer=2, d_model=32, n_head=2, d_head=16, d_inner=48, vocab_size=31, dropout=0.0, tgt_len=4)
ARMT = dict(num_mem_tokens=2, d_mem=8)


pytestmark = pytest.mark.usefixtures("tp1")


def _model(**kw):
    torch.manual_seed(0)
    return build_model(ModelConfig(**{**BASE, **kw})).double().eval()


@pytest.mark.parametrize("kw,field", [
    (dict(armt=dict(num_mem_tokens=2), rmt=dict(num_mem_tokens=2)), "armt.num_mem_tokens"),
    (dict(armt=dict(num_mem_tokens=2, heads=3, d_mem=6)), "armt.heads"),
    (dict(armt=dict(num_mem_tokens=2, d_mem=6, heads=4)), "armt.d_mem"),
    (dict(armt=dict(num_mem_tokens=-1)), "armt.num_mem_tokens"),
    (dict(armt=dict(num_mem_tokens=2, nu=0)), "armt.nu"),
    (dict(armt=dict(num_mem_tokens=2, value_init="ones")), "armt.value_init"),
])
def test_config_errors_name_the_field(kw, field):
    with pytest.raises(ConfigError) as e:
        ModelConfig(**{**BASE, **kw}).validate()
    assert e.value.field == field and "\n" not in str(e.value)


def test_presets_validate():
    for name in ("armt_tiny", "armt_gpt2_babilong"):
        cfg = load_model_config(name)
        assert cfg.armt.num_mem_tokens > 0 and cfg.rmt.num_mem_tokens == 0


def test_at_init_the_model_is_the_plain_transformer():
    """W_mv = 0: every write stores 0, every read is 0; the tokens' outputs equal the model without ARMT."""
    plain = _model(attn_type=0, mem_len=0)
    armt = _model(attn_type=0, mem_len=0, armt=ARMT)
    full = plain.gather_full_state_dict()
    own = armt.gather_full_state_dict()
    assert set(full) < set(own) and all(k.startswith("stack.memories.armt.") for k in set(own) - set(full))
    armt.load_full_state_dict({**own, **full})
    assert torch.count_nonzero(armt.stack.memories["armt"].W_mv) == 0
    tokens = torch.randint(0, 31, (2, 12), generator=torch.Generator().manual_seed(1))
    s_p, s_a = plain.init_state(2), armt.init_state(2)
    for s in range(0, 12, 4):
        op, s_p = plain(tokens[:, s:s + 4], s_p, return_logits=True)
        oa, s_a = armt(tokens[:, s:s + 4], s_a, return_logits=True)
        assert (op.logits - oa.logits).abs().max().item() < 1e-12
    assert all(torch.count_nonzero(s_a[f"armt.A{l}"]) == 0 for l in range(2))
    assert all(torch.count_nonzero(s_a[f"armt.z{l}"]) > 0 for l in range(2))      # z is written (no beta)


@pytest.mark.parametrize("armt,extra", [
    (dict(num_mem_tokens=2, d_mem=8, value_init="weight", correction=False), {}),
    (dict(num_mem_tokens=3, d_mem=8, value_init="weight", heads=2), dict(pre_lnorm=True, untie_r=True)),
    (dict(num_mem_tokens=2, d_mem=8, value_init="weight", normalize=True, nu=1), dict(attn_type=1)),
], ids=["no-correction", "h2-preln", "normalize-shaw"])
def test_segments_match_the_reference(armt, extra):
    kw = {**REF_BASE, "attn_type": 0, "tgt_len": 4, "mem_len": 0, **extra, "armt": armt}
    compare(ModelConfig(**kw), [3, 5, 2, 4], 0, detach=False)
    compare(ModelConfig(**{**kw, "mem_len": 5}), 4, 5, detach=True)


def test_reset_and_documents_equal_separate_runs():
    model = _model(attn_type=0, mem_len=0, armt={**ARMT, "value_init": "weight"})
    g = torch.Generator().manual_seed(2)
    hist, seg = torch.randint(0, 31, (2, 8), generator=g), torch.randint(0, 31, (2, 6), generator=g)
    state = model.init_state(2)
    for s in (0, 4):
        _, state = model(hist[:, s:s + 4], state)
    kept, _ = model(seg, state, return_logits=True)
    fresh, st_fresh = model(seg, model.init_state(2), return_logits=True)
    assert (kept.logits - fresh.logits).abs().max() > 1e-9, "sanity: the carried memory matters"
    # per-row reset: row 0 as a new stream, row 1 unchanged
    out, st = model(seg, model.reset_state(state, torch.tensor([True, False])), return_logits=True)
    assert torch.equal(out.logits[0], fresh.logits[0]) and torch.equal(out.logits[1], kept.logits[1])
    assert torch.equal(st["armt.A0"][0], st_fresh["armt.A0"][0])
    # a document starting at position 3 of row 1: from there on as if run alone, and its state carried on
    reset = torch.zeros(2, 6, dtype=torch.bool)
    reset[1, 3] = True
    out, st = model(seg, state, return_logits=True, reset=reset)
    alone, st_alone = model(seg[1:, 3:], model.init_state(1), return_logits=True)
    assert torch.equal(out.logits[1, :3], kept.logits[1, :3])
    assert (out.logits[1, 3:] - alone.logits[0]).abs().max() < 1e-10
    for l in range(2):
        assert (st[f"armt.A{l}"][1] - st_alone[f"armt.A{l}"][0]).abs().max() < 1e-12
        assert (st[f"armt.z{l}"][1] - st_alone[f"armt.z{l}"][0]).abs().max() < 1e-12


def test_gradients_reach_the_first_segment_through_the_memory():
    """No XL cache: the only path from segment 1's tokens to segment 2's loss is (A, z)."""
    model = _model(attn_type=0, mem_len=0, tie_weight=False, armt={**ARMT, "value_init": "weight"})
    first, second = torch.full((2, 4), 30), torch.randint(0, 20, (2, 4), generator=torch.Generator().manual_seed(3))
    grads = {}
    for detach in (True, False):
        model.zero_grad()
        _, st = model(first, model.init_state(2), detach_state=detach)
        assert st["armt.A0"].requires_grad != detach and st["armt.z1"].requires_grad != detach
        out, _ = model(second, st, second)
        out.nll.sum().backward()
        grads[detach] = model.embedding.tables[0].weight.grad[30].abs().sum().item()
        mem = model.stack.memories["armt"]
        assert mem.W_mq.grad is not None and mem.W_mq.grad.abs().sum() > 0
    assert grads[True] == 0.0 and grads[False] > 0.0


def test_state_layout_checkpoint_and_tp():
    model = _model(attn_type=0, mem_len=3, armt={**ARMT, "heads": 2, "value_init": "weight"})
    st = model.init_state(2)
    assert st["armt.A0"].shape == (2, 2, 2 * 3 * 4, 16) and st["armt.z1"].shape == (2, 2, 24)
    assert st["armt.A0"].dtype == torch.float64 and st.head_dims["armt.A0"] is None     # replicated under TP
    assert all(not getattr(p, "tensor_model_parallel", False) for p in model.stack.memories["armt"].parameters())
    _, st = model(torch.randint(0, 31, (2, 4)), st)
    buf = io.BytesIO()
    torch.save(st.state_dict(), buf)
    buf.seek(0)
    assert MemoryState.from_state_dict(torch.load(buf)).equal(st)
    assert model.stack.signature == "xl+armt"
    assert model.stack.flops(2, 4, 3) > _model(attn_type=0, mem_len=3).stack.flops(2, 4, 3)


def test_recall_of_written_pairs():
    """The layer hooks as a key-value store: with W_mk = W_mq (queries equal keys), W_mv = identity and
    beta ~ 1, a read with a memory token's own hidden state returns (approximately) its value."""
    model = _model(attn_type=0, mem_len=0, armt=dict(num_mem_tokens=4, d_mem=32, nu=1, normalize=True))
    mem = model.stack.memories["armt"]
    with torch.no_grad():
        mem.W_mk.copy_(torch.eye(32).expand(2, 32, 32))
        mem.W_mq.copy_(mem.W_mk)
        mem.W_mv.copy_(torch.eye(32).expand(2, 32, 32))
        mem.b_mb.fill_(20.0)
    st = model.init_state(1)
    entries = {k[len("armt."):]: v for k, v in st.tensors.items() if k.startswith("armt.")}
    keys = torch.zeros(1, 4, 32, dtype=torch.float64)
    for i in range(4):                                  # orthogonal (disjoint-support) keys
        keys[0, i, 8 * i:8 * i + 8] = torch.randn(8, generator=torch.Generator().manual_seed(i)).abs().double()
    x = torch.cat([torch.zeros(1, 1, 32, dtype=torch.float64), keys], 1)
    _, new = mem.layer_out(0, x, entries, None)
    entries = {**entries, **new, "fresh": torch.zeros(1, dtype=torch.bool)}
    read = mem.layer_in(0, keys, entries, None) - keys
    assert (read - keys).abs().max().item() < 1e-3


def test_tiny_preset_runs():
    """armt_tiny as the engine builds it (shortened segments): finite losses near log(256) at initialisation,
    with the state carried."""
    cfg = load_model_config("armt_tiny", overrides=dict(tgt_len=8))
    model = build_model(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(4))
    state = model.init_state(2)
    for s in range(2):
        out, state = model(tokens[:, 8 * s:8 * s + 8], state, tokens[:, 8 * s + 1:8 * s + 9])
        assert torch.isfinite(out.nll).all()
        assert out.nll.mean().item() == pytest.approx(torch.log(torch.tensor(256.0)).item(), abs=0.5)
    assert state["armt.A0"].dtype == torch.float32 and not state["armt.fresh"].any()
