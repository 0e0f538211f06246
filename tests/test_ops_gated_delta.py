"""Gated delta rule op (pretrain/ops/gated_delta) and the short causal convolution (pretrain/ops/short_conv).

The chunkwise path is held to the step-by-step reference on outputs, final state and every gradient (q, k, v,
g, beta, initial state) in fp64; both are held to flash-linear-attention's plain-PyTorch references (fla-core,
loaded by file path without Triton, run in fp64); and to the properties that define a carried, resettable
state: segments with the state carried equal one long segment (gradients included), a reset equals running
the documents separately.  The mapping of resets onto fla's variable-length kernel is checked on CPU with a
stand-in kernel of the same signature.
"""
import importlib.util
import logging
import os
import types

import pytest
import torch
import torch.nn.functional as F

import pretrain.ops.gated_delta as gd
from pretrain.ops.gated_delta import fla_backend, gated_delta_rule, naive
from pretrain.ops.short_conv import causal_conv1d

F64 = torch.float64
NAMES = ("q", "k", "v", "g", "beta", "initial_state")


def make(B=2, T=13, H=2, K=5, V=3, dtype=F64, init=True, seed=0):
    """q, k, v, g, beta, initial state: L2-normalised keys, g = logsigmoid(.) (decays in (0, 1)), beta in (0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=gen, dtype=F64)
    k = F.normalize(torch.randn(B, T, H, K, generator=gen, dtype=F64), dim=-1)
    v = torch.randn(B, T, H, V, generator=gen, dtype=F64)
    g = F.logsigmoid(torch.randn(B, T, H, generator=gen, dtype=F64) + 2)
    beta = torch.rand(B, T, H, generator=gen, dtype=F64) * 0.98 + 0.01
    s0 = torch.randn(B, H, K, V, generator=gen, dtype=F64) if init else None
    return [None if t is None else t.to(dtype) for t in (q, k, v, g, beta, s0)]


def resets(B, T, pattern):
    """None, or bool [B, T]: resets at 0, adjacent ones, at chunk boundaries and at the last position."""
    if pattern is None:
        return None
    r = torch.zeros(B, T, dtype=torch.bool)
    for t in (0, 2, 3, 5, 8, T - 1):
        if t < T:
            r[0, t] = True
    for t in (1, 4, 16, T // 2):
        if 0 < t < T:
            r[-1, t] = True
    return r


def random_loss(o, s, seed=1):
    """A random linear function of o and the final state."""
    gen = torch.Generator().manual_seed(seed)
    return ((o * torch.randn(o.shape, generator=gen, dtype=F64).to(o.dtype)).sum()
            + (s * torch.randn(s.shape, generator=gen, dtype=F64).to(s.dtype)).sum())


def outputs_and_grads(fn, inputs, seed=1):
    """fn(q, k, v, g, beta, s0) -> (o, s); returns o, s and the gradients of a random linear loss."""
    leaves = [None if t is None else t.detach().clone().requires_grad_(True) for t in inputs]
    o, s = fn(*leaves)
    random_loss(o, s, seed).backward()
    return o.detach(), s.detach(), [None if t is None else t.grad for t in leaves]


def ours(impl, reset=None, C=64, scale=0.7):
    return lambda q, k, v, g, beta, s0: gated_delta_rule(q, k, v, g, beta, initial_state=s0, scale=scale,
                                                         impl=impl, reset=reset, chunk_size=C)


def max_diff(a, b):
    """Largest absolute difference over o, final state and every gradient."""
    diffs = [(a[0] - b[0]).abs().max(), (a[1] - b[1]).abs().max()]
    diffs += [(x - y).abs().max() for x, y in zip(a[2], b[2]) if x is not None]
    return max(d.item() for d in diffs)


def assert_all_close(a, b, rtol, atol):
    torch.testing.assert_close(a[0], b[0], rtol=rtol, atol=atol, msg=lambda m: f"o: {m}")
    torch.testing.assert_close(a[1], b[1], rtol=rtol, atol=atol, msg=lambda m: f"final state: {m}")
    for name, x, y in zip(NAMES, a[2], b[2]):
        assert (x is None) == (y is None), name
        if x is not None:
            torch.testing.assert_close(x, y, rtol=rtol, atol=atol, msg=lambda m: f"grad {name}: {m}")


SHAPES = [  # T, K, V, C: T = 1, T < C, T not a multiple of C, T a multiple, K != V, K > C (the thin-product path)
    (1, 3, 2, 64),
    (5, 4, 3, 8),
    (13, 5, 3, 4),
    (16, 4, 6, 8),
    (23, 7, 5, 3),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-K{}-V{}-C{}".format(*s))
@pytest.mark.parametrize("init", [False, True], ids=["zero-state", "initial-state"])
@pytest.mark.parametrize("pattern", [None, "many"], ids=["no-reset", "resets"])
def test_chunk_equals_naive_fp64(shape, init, pattern):
    T, K, V, C = shape
    inputs = make(T=T, K=K, V=V, init=init, seed=T + K)
    r = resets(2, T, pattern)
    ref = outputs_and_grads(ours("naive", r), inputs)
    got = outputs_and_grads(ours("chunk", r, C), inputs)
    assert got[0].dtype == F64 and got[1].dtype == F64
    assert_all_close(got, ref, rtol=1e-11, atol=1e-11)


def test_chunk_sizes_agree_and_strong_decay():
    """Every chunk size gives the same result; strong decays (alpha down to e^-30) stay finite."""
    inputs = make(T=40, K=6, V=5, seed=3)
    inputs[3] = inputs[3] * torch.linspace(0.1, 30, 40, dtype=F64)[None, :, None]
    r = resets(2, 40, "many")
    ref = outputs_and_grads(ours("naive", r), inputs)
    for C in (1, 2, 7, 16, 40):
        got = outputs_and_grads(ours("chunk", r, C), inputs)
        assert all(torch.isfinite(x).all() for x in got[2])
        assert_all_close(got, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("impl", ["naive", "chunk"])
def test_segments_carried_equal_one_shot(impl):
    """Carrying final_state (not detached) through pieces of lengths 1, 3, 7, 1, 12 is the same computation as
    one segment: outputs, final state, and gradients into every piece's inputs and the first state."""
    pieces = [1, 3, 7, 1, 12]
    T = sum(pieces)
    inputs = make(T=T, K=5, V=4, seed=7)
    r = resets(2, T, "many")
    ref = outputs_and_grads(ours(impl, r, C=4), inputs)

    def segmented(q, k, v, g, beta, s):
        outs, t0 = [], 0
        for n in pieces:
            cut = lambda x: x[:, t0:t0 + n]
            o, s = gated_delta_rule(cut(q), cut(k), cut(v), cut(g), cut(beta), initial_state=s, scale=0.7,
                                    impl=impl, reset=r[:, t0:t0 + n], chunk_size=4)
            outs.append(o)
            t0 += n
        return torch.cat(outs, dim=1), s

    got = outputs_and_grads(segmented, inputs)
    assert_all_close(got, ref, rtol=1e-12, atol=1e-12)
    assert got[2][5].abs().max() > 0 and got[2][0][:, 0].abs().max() > 0


@pytest.mark.parametrize("impl", ["naive", "chunk"])
def test_reset_equals_separate_documents(impl):
    """Row 0 holds documents [0, 4), [4, 5), [5, 11), [11, 17): its outputs equal the documents run one by one
    (the first from the initial state, the others from zero), its final state the last document's; row 1
    (no reset) is unaffected."""
    T = 17
    q, k, v, g, beta, s0 = make(T=T, seed=11)
    reset = torch.zeros(2, T, dtype=torch.bool)
    reset[0, [4, 5, 11]] = True
    o, s = gated_delta_rule(q, k, v, g, beta, initial_state=s0, impl=impl, reset=reset, chunk_size=4)
    plain_o, plain_s = gated_delta_rule(q, k, v, g, beta, initial_state=s0, impl=impl, chunk_size=4)
    bounds = [0, 4, 5, 11, T]
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        cut = lambda x: x[:1, a:b]
        o_d, s_d = gated_delta_rule(cut(q), cut(k), cut(v), cut(g), cut(beta),
                                    initial_state=s0[:1] if i == 0 else None, impl="naive")
        torch.testing.assert_close(o[:1, a:b], o_d, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s[:1], s_d, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(o[1:], plain_o[1:], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s[1:], plain_s[1:], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", ["naive", "chunk"])
def test_reset_cuts_gradient_to_earlier_inputs(impl):
    q, k, v, g, beta, s0 = [t.requires_grad_(True) for t in make(B=1, T=20, seed=2)]
    reset = torch.zeros(1, 20, dtype=torch.bool)
    reset[0, 9] = True
    o, s = gated_delta_rule(q, k, v, g, beta, initial_state=s0, impl=impl, reset=reset, chunk_size=8)
    (o[:, 9:].sum() + s.sum()).backward()
    assert s0.grad.abs().max() == 0
    for x in (q, k, v, g, beta):
        assert x.grad[:, :9].abs().max() == 0 and x.grad[:, 10:].abs().max() > 0


def test_dtypes_defaults_and_untouched_inputs():
    """bf16 inputs: o in bf16, state fp32, close to the fp32 run; default scale K^-1/2; inputs unmodified;
    output_final_state=False gives None."""
    inputs = make(T=20, K=8, V=6, dtype=torch.bfloat16, seed=5)
    inputs[5] = inputs[5].float()
    before = [t.clone() for t in inputs]
    o, s = gated_delta_rule(*inputs, impl="chunk", chunk_size=8, reset=resets(2, 20, "many"))
    o32, s32 = gated_delta_rule(*[t.float() for t in inputs], impl="naive", reset=resets(2, 20, "many"))
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    torch.testing.assert_close(o.float(), o32, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(s, s32, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(x, y) for x, y in zip(inputs, before))
    q, k, v, g, beta, s0 = make(T=6, K=4, seed=6)
    o1, none = gated_delta_rule(q, k, v, g, beta, s0, False, None, "chunk")
    o2, _ = gated_delta_rule(q, k, v, g, beta, s0, True, 0.5, "chunk")
    assert none is None
    torch.testing.assert_close(o1, o2, rtol=1e-13, atol=1e-13)


def test_auto_is_chunk_on_cpu_logs_once_and_fla_refuses(caplog):
    inputs = make(T=12, seed=9)
    gd._logged.clear()
    with caplog.at_level(logging.INFO, logger="pretrain.ops.gated_delta"):
        auto = gated_delta_rule(*inputs, chunk_size=8)
        gated_delta_rule(*inputs, chunk_size=8)
    chunk = gated_delta_rule(*inputs, impl="chunk", chunk_size=8)
    assert torch.equal(auto[0], chunk[0]) and torch.equal(auto[1], chunk[1])
    msgs = [rec.getMessage() for rec in caplog.records if rec.name == "pretrain.ops.gated_delta"]
    assert msgs == ["gated_delta_rule: chunk implementation on cpu (chunk_size 8)"]
    with pytest.raises(RuntimeError, match="impl='fla' cannot run"):
        gated_delta_rule(*inputs, impl="fla")


def test_bad_inputs_name_the_argument():
    q, k, v, g, beta, s0 = make(T=5)
    cases = [
        (dict(q=q[0]), ValueError, "q has shape"),
        (dict(k=k[..., :2]), ValueError, "k has shape"),
        (dict(v=v[:, :4]), ValueError, "v has shape"),
        (dict(g=g[..., None]), ValueError, "g has shape"),
        (dict(beta=beta[:, :, :1]), ValueError, "beta has shape"),
        (dict(initial_state=s0.transpose(-1, -2)), ValueError, "initial_state has shape"),
        (dict(reset=torch.zeros(2, 6, dtype=torch.bool)), ValueError, "reset has shape"),
        (dict(reset=torch.zeros(2, 5)), TypeError, "reset must be a bool"),
        (dict(q=q.long()), TypeError, "q must be a floating-point"),
        (dict(impl="cuda"), ValueError, "impl='cuda'"),
        (dict(chunk_size=0), ValueError, "chunk_size=0"),
    ]
    for change, exc, match in cases:
        kw = dict(q=q, k=k, v=v, g=g, beta=beta, initial_state=s0)
        kw.update(change)
        with pytest.raises(exc, match=match):
            gated_delta_rule(**kw)


# ---- the fla path's reset mapping (variable-length mode), with a stand-in kernel -----------------------------

def varlen_stand_in(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None):
    """fla's ``chunk_gated_delta_rule`` contract (with cu_seqlens: B = 1, one state per sequence), computed with
    our reference sequence by sequence."""
    if cu_seqlens is None:
        o, s = naive.gated_delta_rule(q, k, v, g, beta, initial_state=initial_state, scale=scale)
        return o, (s if output_final_state else None)
    assert q.shape[0] == 1
    outs, finals = [], []
    for n, (a, b) in enumerate(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())):
        cut = lambda x: x[:, a:b]
        h0 = None if initial_state is None else initial_state[n:n + 1]
        o, s = naive.gated_delta_rule(cut(q), cut(k), cut(v), cut(g), cut(beta), initial_state=h0, scale=scale)
        outs.append(o)
        finals.append(s)
    return torch.cat(outs, dim=1), (torch.cat(finals) if output_final_state else None)


@pytest.mark.parametrize("pattern", [None, "many"])
def test_fla_backend_reset_mapping(pattern):
    """Resets become sequences of fla's variable-length mode: the result (gradients of the initial state
    included) equals the chunk path's, with and without a reset at t = 0."""
    inputs = make(B=3, T=19, seed=8)
    r = resets(3, 19, pattern)
    if r is not None:
        r[1, 0] = True                                               # a row whose initial state is unused
    ref = outputs_and_grads(ours("chunk", r, C=4, scale=0.6), inputs)
    got = outputs_and_grads(lambda *x: fla_backend.gated_delta_rule(varlen_stand_in, *x[:5], x[5], True, 0.6, r),
                            inputs)
    assert_all_close(got, ref, rtol=1e-12, atol=1e-12)
    if r is not None:
        assert got[2][5][1].abs().max() == 0


# ---- independent reference: flash-linear-attention's plain-PyTorch functions (fla-core) ----------------------

FP64_SUBSTITUTIONS = [("torch.float32", "torch.float64"), ("dtype=torch.float,", "dtype=torch.float64,"),
                      (".float()", ".double()")]


def fla_gdn_reference(fp64):
    """fla-core's ``fla/ops/gated_delta_rule/naive.py``, loaded by path (the fla package's __init__ needs
    Triton), as is or (fp64=True) with its fp32 casts replaced by fp64 ones, so that it is compared to ours to
    rounding.  Skips when fla-core (or einops, its one dependency) is absent."""
    spec = importlib.util.find_spec("fla")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("fla-core not installed (pip install fla-core==0.6.0: without extras it brings no Triton; "
                    "the test extra has it)")
    pytest.importorskip("einops", reason="fla's reference file imports einops")
    path = os.path.join(list(spec.submodule_search_locations)[0], "ops", "gated_delta_rule", "naive.py")
    if not os.path.exists(path):
        pytest.skip("this fla-core has no ops/gated_delta_rule/naive.py")
    with open(path) as f:
        src = f.read()
    if fp64:
        for a, b in FP64_SUBSTITUTIONS:
            assert a in src, f"fla's reference changed: no {a!r} to replace"
            src = src.replace(a, b)
        assert "float32" not in src and "torch.float)" not in src and "torch.float," not in src
    mod = types.ModuleType("fla_gdn_reference_fp64" if fp64 else "fla_gdn_reference")
    exec(compile(src, path, "exec"), mod.__dict__)
    return mod


def fla_recurrent(ref, scale):
    # fla's recurrent reference takes (q, k, v, beta, g): beta before g
    return lambda q, k, v, g, beta, s0: ref.naive_recurrent_gated_delta_rule(
        q, k, v, beta, g, scale=scale, initial_state=s0, output_final_state=True)


def fla_chunk(ref, scale, C):
    return lambda q, k, v, g, beta, s0: ref.naive_chunk_gated_delta_rule(
        q, k, v, g, beta, chunk_size=C, scale=scale, initial_state=s0, output_final_state=True)


@pytest.mark.parametrize("T,C", [(1, 16), (11, 16), (21, 8), (32, 16)])
def test_matches_fla_references_fp64(T, C):
    """Ours (naive and chunk) against fla's recurrent and chunk references in fp64: outputs, final state and
    the gradients of q, k, v, g, beta and the initial state, to rounding."""
    ref = fla_gdn_reference(fp64=True)
    inputs = make(T=T, K=6, V=5, seed=20 + T)
    scale = 6 ** -0.5
    fla_rec = outputs_and_grads(fla_recurrent(ref, scale), inputs)
    fla_chk = outputs_and_grads(fla_chunk(ref, scale, C), inputs)
    assert fla_rec[0].dtype == F64 and fla_rec[2][5].dtype == F64
    for impl in ("naive", "chunk"):
        got = outputs_and_grads(ours(impl, C=C, scale=None), inputs)
        assert_all_close(got, fla_rec, rtol=1e-12, atol=1e-12)
        assert_all_close(got, fla_chk, rtol=1e-11, atol=1e-11)


def test_matches_fla_reference_fp32_unmodified():
    """fla's reference file as shipped (fp32 inside) agrees with ours in fp32 to fp32 rounding."""
    ref = fla_gdn_reference(fp64=False)
    inputs = make(T=19, K=6, V=5, dtype=torch.float32, seed=31)
    fla_rec = outputs_and_grads(fla_recurrent(ref, 0.4), inputs)
    got = outputs_and_grads(ours("chunk", C=8, scale=0.4), inputs)
    assert_all_close(got, fla_rec, rtol=1e-4, atol=1e-4)


# ---- short causal convolution -----------------------------------------------------------------------------------

def conv_inputs(B=2, T=9, D=3, W=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, D, generator=gen, dtype=F64)
    w = torch.randn(D, W, generator=gen, dtype=F64)
    b = torch.randn(D, generator=gen, dtype=F64)
    h0 = torch.randn(B, D, W - 1, generator=gen, dtype=F64)
    return x, w, b, h0


def conv_reference(x, w, b, h0, activation=None):
    """nn.Conv1d semantics (depthwise, padding W - 1, first T outputs) over [h0 ; x]."""
    T = x.shape[1]
    full = torch.cat([h0, x.transpose(1, 2)], dim=2)
    y = F.conv1d(full, w[:, None, :], b, groups=w.shape[0])[:, :, -T:]
    if activation:
        y = F.silu(y)
    return y.transpose(1, 2)


@pytest.mark.parametrize("activation", [None, "silu"])
def test_conv_equals_conv1d(activation):
    x, w, b, h0 = conv_inputs()
    y, s = causal_conv1d(x, w, b, h0, activation=activation)
    torch.testing.assert_close(y, conv_reference(x, w, b, h0, activation), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(s, x[:, -3:].transpose(1, 2), rtol=0, atol=0)
    y0, s0 = causal_conv1d(x, w, b, None, activation=activation)
    pad = F.conv1d(x.transpose(1, 2), w[:, None, :], b, padding=3, groups=3)[:, :, :9].transpose(1, 2)
    torch.testing.assert_close(y0, F.silu(pad) if activation else pad, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("with_reset", [False, True])
def test_conv_segments_carried_equal_one_shot(with_reset):
    """W = 4: pieces of 1, 2, 1, 5, 1, 3 tokens (most shorter than W - 1 = 3) with the state carried equal one
    segment: outputs, final state and gradients of x, weight, bias and the first initial state."""
    pieces = [1, 2, 1, 5, 1, 3]
    T = sum(pieces)
    inputs = conv_inputs(T=T, seed=1)
    r = None
    if with_reset:
        r = torch.zeros(2, T, dtype=torch.bool)
        r[0, [3, 4, 9]] = True
        r[1, [0, 12]] = True

    def run(fn):
        leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
        y, s = fn(*leaves)
        random_loss(y, s).backward()
        return y.detach(), s.detach(), [t.grad for t in leaves]

    def segmented(x, w, b, h):
        ys, t0 = [], 0
        for n in pieces:
            y, h = causal_conv1d(x[:, t0:t0 + n], w, b, h, activation="silu",
                                 reset=None if r is None else r[:, t0:t0 + n])
            ys.append(y)
            t0 += n
        return torch.cat(ys, dim=1), h

    ref = run(lambda x, w, b, h: causal_conv1d(x, w, b, h, activation="silu", reset=r))
    got = run(segmented)
    for a, c in zip(got[:2] + tuple(got[2]), ref[:2] + tuple(ref[2])):
        torch.testing.assert_close(a, c, rtol=1e-13, atol=1e-13)
    assert got[2][3].abs().max() > 0 or with_reset


def test_conv_short_segment_carries_state_and_gradient():
    """T = 1 and T = 2 < W - 1 = 3: the final state holds the older carried inputs, and the gradient w.r.t. the
    initial state (through y and the final state) matches finite differences."""
    x, w, b, h0 = conv_inputs(T=1, seed=2)
    _, s = causal_conv1d(x, w, b, h0)
    torch.testing.assert_close(s, torch.cat([h0[:, :, 1:], x.transpose(1, 2)], dim=2), rtol=0, atol=0)
    for T in (1, 2):
        x, w, b, h0 = [t.requires_grad_(True) for t in conv_inputs(T=T, seed=3)]
        fn = lambda x, w, b, h0: causal_conv1d(x, w, b, h0, activation="silu")
        assert torch.autograd.gradcheck(fn, (x, w, b, h0))
        r = torch.zeros(2, T, dtype=torch.bool)
        r[0, T - 1] = True
        assert torch.autograd.gradcheck(lambda x, w, b, h0: causal_conv1d(x, w, b, h0, reset=r), (x, w, b, h0))


def test_conv_reset_equals_separate_documents():
    """Row 0 holds documents [0, 5), [5, 6), [6, 11): outputs equal each run alone (the first from the initial
    state, the others from zeros); the final state holds the last document's inputs only (zeros before it
    when the document is shorter than W - 1); row 1 (no reset) is unaffected."""
    x, w, b, h0 = conv_inputs(T=11, W=5, seed=4)
    r = torch.zeros(2, 11, dtype=torch.bool)
    r[0, [5, 6]] = True
    y, s = causal_conv1d(x, w, b, h0, reset=r)
    y_plain, s_plain = causal_conv1d(x, w, b, h0)
    for i, (a, c) in enumerate([(0, 5), (5, 6), (6, 11)]):
        y_d, _ = causal_conv1d(x[:1, a:c], w, b, h0[:1] if i == 0 else None)
        torch.testing.assert_close(y[:1, a:c], y_d, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(s[:1], x[:1, -4:].transpose(1, 2), rtol=0, atol=0)
    torch.testing.assert_close(y[1:], y_plain[1:], rtol=0, atol=0)
    torch.testing.assert_close(s[1:], s_plain[1:], rtol=0, atol=0)
    r2 = torch.zeros(2, 11, dtype=torch.bool)
    r2[0, 9] = True                                                  # last document of 2 tokens < W - 1 = 4
    _, s2 = causal_conv1d(x, w, b, h0, reset=r2)
    torch.testing.assert_close(s2[0, :, :2], torch.zeros(3, 2, dtype=F64), rtol=0, atol=0)
    torch.testing.assert_close(s2[0, :, 2:], x[0, 9:].T, rtol=0, atol=0)


def test_conv_width_one_and_bad_inputs():
    x, w, b, h0 = conv_inputs(W=1)
    y, s = causal_conv1d(x, w, b, h0)
    assert s.shape == (2, 3, 0)
    torch.testing.assert_close(y, x * w[:, 0] + b, rtol=1e-14, atol=1e-14)
    x, w, b, h0 = conv_inputs()
    cases = [
        (dict(x=x[0]), ValueError, "x has shape"),
        (dict(weight=w.T), ValueError, "weight has shape"),
        (dict(bias=b[:2]), ValueError, "bias has shape"),
        (dict(initial_state=h0[..., :2]), ValueError, "initial_state has shape"),
        (dict(reset=torch.zeros(2, 8, dtype=torch.bool)), ValueError, "reset has shape"),
        (dict(activation="relu"), ValueError, "activation='relu'"),
        (dict(x=x.long()), TypeError, "x must be a floating-point"),
    ]
    for change, exc, match in cases:
        kw = dict(x=x, weight=w, bias=b, initial_state=h0)
        kw.update(change)
        with pytest.raises(exc, match=match):
            causal_conv1d(**kw)
