"""Gated DeltaNet (attn_type 70, pretrain/model/mechanisms/gated_deltanet): what the registry-driven matrix
(tests/test_mixers.py, test_model_tp.py: reference, recurrence, resets, TP 2 = TP 1, state checkpointing,
generation) does not check.

* segments shorter than the convolution's W - 1 carry its inputs (and the matrix S) exactly: segment by segment
  equals one pass, outputs, final state and the gradients with respect to the input, the parameters and the
  initial state;
* a document starting inside a segment equals that document run on its own (outputs and the state passed on);
* one layer equals an independent computation written as fla's ``GatedDeltaNet`` layer computes it (grouped
  ``conv1d`` with the carried inputs prepended, the paper's orientation of S, torch's ``rms_norm``);
* initialisation (fla / Mamba2), config errors naming their fields, the tiny presets run, the 1.3B preset's size.
"""

import pytest
import torch
import torch.nn.functional as F

from model_checks import run_tiny_preset
from pretrain.config_base import ConfigError
from pretrain.model import ModelConfig, build_model, load_model_config
from pretrain.model.mixer import SegmentContext

BASE = dict(n_layer=2, d_model=32, n_head=2, d_head=8, d_inner=24, vocab_size=31, dropout=0.0, tgt_len=8,
            mem_len=0, attn_type=70)


pytestmark = pytest.mark.usefixtures("tp1")


def _mixer(**kw):
    torch.manual_seed(0)
    cfg = ModelConfig(**{**BASE, **kw})
    model = build_model(cfg).double()
    mixer = model.stack.layers[0].mixer
    with torch.no_grad():                    # larger than the init so that every part of the layer matters
        for name in ("q_conv", "k_conv", "v_conv"):
            if hasattr(mixer, name):
                getattr(mixer, name).normal_(0, 0.5)
        mixer.proj.weight.normal_(0, 0.3)
        mixer.o_norm.uniform_(0.5, 1.5)
    return mixer


def _ctx(B, N, reset=None, detach=False):
    return SegmentContext(n=N, mem_len=0, clamp_len=-1, same_length=False, detach=detach, training=False,
                          batch_size=B, valid=None, device=torch.device("cpu"), dtype=torch.float64, reset=reset)


def _random_state(mixer, B, scale=0.5):
    g = torch.Generator().manual_seed(4)
    return {k: (torch.randn(e.init.shape, generator=g, dtype=torch.float64) * scale).requires_grad_(True)
            for k, e in mixer.initial_state(B, 0, torch.device("cpu"), torch.float64).items()}


def _run(mixer, x, state, lengths, reset=None):
    outs, st, s = [], dict(state), 0
    for n in lengths:
        r = None if reset is None else reset[:, s:s + n]
        out = mixer(x[:, s:s + n], st, {}, _ctx(x.shape[0], n, r), {})
        outs.append(out.x)
        st = out.state
        s += n
    return torch.cat(outs, 1), st


@pytest.mark.parametrize("impl", ["chunk", "naive"])
def test_short_segments_carry_the_convolution_exactly_with_gradients(impl):
    """W = 4: segments of 1 and 2 tokens (< W - 1 = 3) must pass the older carried inputs on; one pass and
    the pieces agree in outputs, final states and every gradient (input, parameters, initial state)."""
    mixer = _mixer(gated_deltanet=dict(impl=impl, chunk_size=4))
    assert mixer.W - 1 == 3
    B, T = 2, 9
    x0 = torch.randn(B, T, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    results = []
    for lengths in ([T], [1, 2, 1, 1, 2, 2], [2, 1, 3, 1, 2]):
        mixer.zero_grad()
        x = x0.clone().requires_grad_(True)
        s0 = _random_state(mixer, B)
        y, st = _run(mixer, x, s0, lengths)
        loss = (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)).sum() + \
            sum((t * t).sum() for t in st.values())
        loss.backward()
        grads = {n: p.grad.clone() for n, p in mixer.named_parameters() if p.grad is not None}
        results.append((y.detach(), {k: t.detach() for k, t in st.items()}, x.grad, grads,
                        {k: t.grad for k, t in s0.items()}))
    y1, st1, gx1, gp1, gs1 = results[0]
    assert set(gs1) == {"S", "conv"} and all(g.abs().max() > 0 for g in gs1.values())
    assert gp1["q_conv"].abs().max() > 0 and gp1["A_log"].abs().max() > 0
    for y, st, gx, gp, gs in results[1:]:
        assert (y - y1).abs().max() < 1e-12
        assert all((st[k] - st1[k]).abs().max() < 1e-12 for k in st1)
        assert (gx - gx1).abs().max() < 1e-11
        assert set(gp) == set(gp1) and all((gp[n] - gp1[n]).abs().max() < 1e-11 for n in gp1), \
            [n for n in gp1 if (gp[n] - gp1[n]).abs().max() >= 1e-11]
        assert all((gs[k] - gs1[k]).abs().max() < 1e-11 for k in gs1)


def test_a_document_start_equals_running_the_document_alone():
    mixer = _mixer(gated_deltanet=dict(chunk_size=4))
    B, T = 3, 11
    x = torch.randn(B, T, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    s0 = {k: t.detach() for k, t in _random_state(mixer, B).items()}
    starts = [2, 7, 10]                       # inside the first of two segments (5 + 6 tokens), in the second, last
    reset = torch.zeros(B, T, dtype=torch.bool)
    for b, p in enumerate(starts):
        reset[b, p] = True
    y, st = _run(mixer, x, s0, [5, 6], reset)
    plain, _ = _run(mixer, x, s0, [5, 6])
    fresh = {k: torch.zeros_like(t[:1]) for k, t in s0.items()}
    for b, p in enumerate(starts):
        assert (y[b, :p] - plain[b, :p]).abs().max() < 1e-12, "tokens before the start keep their context"
        alone, st_alone = _run(mixer, x[b:b + 1, p:], fresh, [T - p])
        assert (y[b, p:] - alone[0]).abs().max() < 1e-12, "the new document sees the old one"
        for k in st:
            assert (st[k][b] - st_alone[k][0]).abs().max() < 1e-12, f"state {k} keeps the old document"


def _independent_layer(mixer, x, S0, conv0):
    """One GDN layer (post-LN, no dropout) computed as fla's GatedDeltaNet does, from the mixer's parameters:
    separate projections, grouped conv1d over [carried inputs ; segment], l2 norm, the recurrence in the paper's
    orientation (S in R^{V x K}), RMSNorm * SiLU gate, o_proj, then the residual and LayerNorm."""
    H, K, V, W = mixer.n_head, mixer.K, mixer.V, mixer.W
    B, T, _ = x.shape
    Wq, Wk, Wv, Wr, Wa, Wb = mixer.proj.weight.split((H * K, H * K, H * V, H * V, H, H), 0)
    conv_w = {"q": mixer.q_conv.reshape(H * K, 1, W), "k": mixer.k_conv.reshape(H * K, 1, W),
              "v": mixer.v_conv.reshape(H * V, 1, W)}
    # carried inputs per projection, [B, channels, W - 1] (our state keeps q_h, k_h, v_h per head)
    c = conv0.split((K, K, V), 2)
    past = {n: t.reshape(B, -1, W - 1) for n, t in zip("qkv", c)}
    feats = {}
    for n, w in (("q", Wq), ("k", Wk), ("v", Wv)):
        u = (x @ w.T).transpose(1, 2)                                     # [B, D, T]
        u = F.conv1d(torch.cat([past[n], u], 2), conv_w[n], groups=u.shape[1])
        feats[n] = F.silu(u).transpose(1, 2)
    q, k = (t / torch.sqrt(t.pow(2).sum(-1, keepdim=True) + 1e-6)        # fla's l2norm
            for t in (feats["q"].reshape(B, T, H, K), feats["k"].reshape(B, T, H, K)))
    v = feats["v"].reshape(B, T, H, V)
    beta = torch.sigmoid(x @ Wb.T)
    alpha = torch.exp(-mixer.A_log.exp() * F.softplus(x @ Wa.T + mixer.dt_bias))
    S = S0.transpose(-1, -2).clone()                                      # [B, H, V, K]
    outs = []
    for t in range(T):
        kt = k[:, t]
        S = alpha[:, t, :, None, None] * (S - beta[:, t, :, None, None] * (S @ kt[..., None]) @ kt[..., None, :])
        S = S + beta[:, t, :, None, None] * v[:, t, :, :, None] @ kt[..., None, :]
        outs.append((S @ q[:, t, :, :, None])[..., 0] * K ** -0.5)
    o = torch.stack(outs, 1)
    o = F.rms_norm(o, (V,), eps=mixer.sec.norm_eps) * mixer.o_norm * F.silu((x @ Wr.T).reshape(B, T, H, V))
    h = x + o.reshape(B, T, H * V) @ mixer.out.weight.T
    return F.layer_norm(h, (h.shape[-1],), mixer.norm.weight, mixer.norm.bias, 1e-5)


def test_the_layer_equals_an_independent_computation():
    mixer = _mixer(gated_deltanet=dict(expand_v=1.5, conv_size=3))
    assert (mixer.K, mixer.V, mixer.W) == (8, 12, 3)
    B, T = 2, 7
    x = torch.randn(B, T, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    st = {k: t.detach() for k, t in _random_state(mixer, B).items()}
    with torch.no_grad():
        y, _ = _run(mixer, x, st, [3, 4])
        ref = _independent_layer(mixer, x, st["S"], st["conv"])
    assert (y - ref).abs().max() < 1e-12


def test_without_short_convolutions_and_with_negative_eigenvalues():
    mixer = _mixer(gated_deltanet=dict(use_short_conv=False, allow_neg_eigval=True))
    assert set(mixer.initial_state(1, 0, torch.device("cpu"), torch.float64)) == {"S"}
    assert not hasattr(mixer, "q_conv")
    x = torch.randn(2, 6, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    s0 = {k: t.detach() for k, t in _random_state(mixer, 2).items()}
    whole, st = _run(mixer, x, s0, [6])
    pieces, st2 = _run(mixer, x, s0, [1, 3, 2])
    assert (whole - pieces).abs().max() < 1e-12 and (st["S"] - st2["S"]).abs().max() < 1e-12


def test_initialisation_follows_fla():
    cfg = ModelConfig(**{**BASE, "n_head": 64, "d_head": 2})
    mixer = build_model(cfg).stack.layers[0].mixer
    A = mixer.A_log.detach().exp()
    dt = F.softplus(mixer.dt_bias.detach())
    assert A.min() > 0 and A.max() < 16 and A.std() > 2                  # U(0, 16)
    assert dt.min() >= 1e-3 - 1e-7 and dt.max() <= 0.1 + 1e-7              # log-uniform in [0.001, 0.1]
    assert torch.equal(mixer.o_norm.detach(), torch.ones_like(mixer.o_norm))
    other = build_model(cfg).stack.layers[1].mixer
    assert not torch.equal(other.A_log, mixer.A_log)                       # drawn per parameter name


@pytest.mark.parametrize("section,field", [
    (dict(expand_v=0), "gated_deltanet.expand_v"),
    (dict(head_dim=3, expand_v=0.5), "gated_deltanet.expand_v"),
    (dict(conv_size=0), "gated_deltanet.conv_size"),
    (dict(norm_eps=0.0), "gated_deltanet.norm_eps"),
    (dict(impl="triton"), "gated_deltanet.impl"),
    (dict(chunk_size=0), "gated_deltanet.chunk_size"),
    (dict(head_dim=0), "gated_deltanet.head_dim"),
])
def test_config_errors_name_the_field(section, field):
    with pytest.raises(ConfigError) as e:
        ModelConfig(**{**BASE, "gated_deltanet": section}).validate()
    assert e.value.field == field and "\n" not in str(e.value)


def test_value_width_must_be_an_integer_for_the_model_head_width():
    with pytest.raises(ConfigError) as e:
        build_model(ModelConfig(**{**BASE, "d_head": 5, "gated_deltanet": dict(expand_v=1.5)}))
    assert e.value.field == "gated_deltanet.expand_v"


@pytest.mark.parametrize("name", ["gdn_tiny", "gdn_hybrid_tiny"])
def test_tiny_presets_run(name):
    cfg, model, losses = run_tiny_preset(name)
    assert all(torch.isfinite(nll).all() for nll in losses)
    assert model.stack.carries(cfg.mem_len)["layers.0"] == "all"


def test_the_1_3b_preset_size(monkeypatch):
    """The shapes of gdn_1.3b (meta device): per layer the mixer has 6 d^2 parameters as fla's layer (q, k:
    0.75 d^2 each; v, gate, output: 1.5 d^2 each), plus the small per-head vectors."""
    from pretrain.model import weights
    monkeypatch.setattr(weights, "init_weights", lambda model, cfg: None)
    cfg = load_model_config("gdn_1.3b")
    with torch.device("meta"):
        model = build_model(cfg)
    mixer = model.stack.layers[0].mixer
    d = cfg.d_model
    big = mixer.proj.weight.numel() + mixer.out.weight.numel() - 2 * 6 * d
    assert big == 6 * d * d
    total = sum(p.numel() for p in model.parameters())
    assert total == pytest.approx(1.57e9, rel=0.01), total


def test_state_not_carried_starts_every_segment_from_zero():
    torch.manual_seed(0)
    cfg = ModelConfig(**{**BASE, "gated_deltanet": dict(carry_state=False)})
    model = build_model(cfg).double().eval()
    assert set(model.stack.carries(0).values()) == {"nothing"} and model.decode_policy_for(0) == "window"
    tokens = torch.randint(0, 31, (2, 8), generator=torch.Generator().manual_seed(1))
    _, state = model(tokens[:, :4], model.init_state(2), return_logits=True)
    second, _ = model(tokens[:, 4:], state, return_logits=True)
    fresh, _ = model(tokens[:, 4:], model.init_state(2), return_logits=True)
    assert torch.equal(second.logits, fresh.logits)


def test_bf16_parameters_keep_an_fp32_state():
    torch.manual_seed(0)
    model = build_model(ModelConfig(**BASE)).to(torch.bfloat16)
    tokens = torch.randint(0, 31, (2, 9), generator=torch.Generator().manual_seed(1))
    state = model.init_state(2)
    for s in (0, 4):
        out, state = model(tokens[:, s:s + 4], state, tokens[:, s + 1:s + 5])
        assert torch.isfinite(out.nll).all()
    assert state["layers.0.S"].dtype == torch.float32 and state["layers.0.conv"].dtype == torch.float32
    out.nll.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
