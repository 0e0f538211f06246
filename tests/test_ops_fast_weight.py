"""Fast-weight ops (pretrain/ops/fast_weight) and feature maps (pretrain/ops/feature_maps).

The chunkwise path is held to the step-by-step reference on outputs, final state and every gradient
(q, k, v, beta, initial state) in fp64; the reference itself is checked against flash-linear-attention's
plain-PyTorch references (fla-core, loaded file by file, without Triton) and against the properties that
define a carried, resettable state: two segments with the state carried equal one long segment (gradients
included), a reset equals a fresh start.
"""
import importlib.util
import logging
import math
import os

import pytest
import torch

import pretrain.ops.fast_weight as fw
from kernel_checks import fast_weight_inputs
from pretrain.ops import feature_maps as fm
from pretrain.ops.fast_weight import delta_rule, key_sum, naive, sum_rule

F64 = torch.float64


def make(B=2, H=3, T=13, Dk=5, Dv=3, dtype=F64, init=True, seed=0):
    """q, k, v, beta, initial state: L2-normalised keys (the delta rule's intended regime), beta in (0, 1)."""
    inputs = fast_weight_inputs(torch.Generator().manual_seed(seed), B, H, T, Dk, Dv, init)
    return [None if t is None else t.to(dtype) for t in inputs]


def resets(B, T, pattern):
    """None, or a bool [B, T] with a reset at t=0, several in one chunk (adjacent ones included), one at a
    chunk boundary and one at the last position."""
    if pattern is None:
        return None
    r = torch.zeros(B, T, dtype=torch.bool)
    if pattern == "many":
        for t in (0, 2, 3, 5, 8, T - 1):
            if t < T:
                r[0, t] = True
        for t in (1, 4, 16, T // 2):
            if t < T:
                r[-1, t] = True
    elif pattern == "one":
        r[-1, T // 2] = True
    return r


def run(rule, impl, q, k, v, beta, s0, reset=None, C=64, scale=0.7, final=True):
    if rule == "delta":
        return delta_rule(q, k, v, beta, scale=scale, initial_state=s0, output_final_state=final, reset=reset,
                          impl=impl, chunk_size=C)
    return sum_rule(q, k, v, scale=scale, initial_state=s0, output_final_state=final, reset=reset, impl=impl,
                    chunk_size=C)


def random_loss(o, s, seed=1):
    """A random linear function of o and the final state, with the same (bf16-representable) coefficients
    whatever their dtypes."""
    g = torch.Generator().manual_seed(seed)
    bf16 = lambda x: x.to(torch.bfloat16).to(F64)
    go = bf16(torch.randn(o.shape, generator=g, dtype=F64)).to(o.dtype)
    gs = bf16(torch.randn(s.shape, generator=g, dtype=F64)).to(s.dtype)
    return (o * go).sum() + (s * gs).sum()


def outputs_and_grads(rule, impl, inputs, reset=None, C=64, seed=1):
    """Outputs, final state and the gradients of a random linear function of both w.r.t. every input."""
    leaves = [None if t is None else t.detach().clone().requires_grad_(True) for t in inputs]
    q, k, v, beta, s0 = leaves
    o, s = run(rule, impl, q, k, v, beta, s0, reset, C)
    random_loss(o, s, seed).backward()
    grads = [None if t is None else t.grad for t in leaves]
    if rule == "sum":
        grads[3] = None
    return o.detach(), s.detach(), grads


def assert_all_close(a, b, rtol, atol):
    oa, sa, ga = a
    ob, sb, gb = b
    torch.testing.assert_close(oa, ob, rtol=rtol, atol=atol)
    torch.testing.assert_close(sa, sb, rtol=rtol, atol=atol)
    for name, x, y in zip(("q", "k", "v", "beta", "initial_state"), ga, gb):
        assert (x is None) == (y is None), name
        if x is not None:
            torch.testing.assert_close(x, y, rtol=rtol, atol=atol, msg=lambda m: f"grad {name}: {m}")


SHAPES = [  # T, Dk, Dv, C: odd and even sizes, T not a multiple of C, Dk != Dv, Dk > C (the thin-product path)
    (1, 1, 1, 64),
    (10, 3, 4, 1),
    (13, 5, 3, 4),
    (37, 6, 9, 16),
    (70, 8, 8, 64),
    (29, 20, 7, 4),
]


@pytest.mark.parametrize("rule", ["delta", "sum"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-Dk{}-Dv{}-C{}".format(*s))
@pytest.mark.parametrize("init", [False, True], ids=["zero-state", "initial-state"])
@pytest.mark.parametrize("pattern", [None, "one", "many"], ids=["no-reset", "one-reset", "many-resets"])
def test_chunk_equals_naive_fp64(rule, shape, init, pattern):
    T, Dk, Dv, C = shape
    inputs = make(T=T, Dk=Dk, Dv=Dv, init=init, seed=T + Dk)
    r = resets(2, T, pattern)
    ref = outputs_and_grads(rule, "naive", inputs, r)
    got = outputs_and_grads(rule, "chunk", inputs, r, C=C)
    assert got[0].dtype == F64 and got[1].dtype == F64
    assert_all_close(got, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("rule", ["delta", "sum"])
def test_chunk_sizes_agree(rule):
    """Every chunk size gives the same result (chunk boundaries cut documents anywhere)."""
    inputs = make(B=2, H=2, T=50, Dk=6, Dv=5, seed=3)
    r = resets(2, 50, "many")
    ref = outputs_and_grads(rule, "chunk", inputs, r, C=50)
    for C in (1, 2, 3, 7, 16, 64):
        assert_all_close(outputs_and_grads(rule, "chunk", inputs, r, C=C), ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("rule", ["delta", "sum"])
def test_bf16_inputs(rule):
    """bf16 inputs: arithmetic in fp32, o in bf16, final state in fp32, gradients in the inputs' dtypes; the
    chunked path agrees with the reference run on the same (bf16-representable) values in fp32."""
    inputs = make(T=40, Dk=8, Dv=6, dtype=torch.bfloat16, seed=5)
    inputs[4] = inputs[4].float()                                    # the state is fp32
    got = outputs_and_grads(rule, "chunk", inputs, resets(2, 40, "many"), C=16)
    ref = outputs_and_grads(rule, "naive", [t.float() for t in inputs], resets(2, 40, "many"))
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.float32
    assert [g.dtype for g in got[2] if g is not None][:3] == [torch.bfloat16] * 3
    assert got[2][4].dtype == torch.float32
    close = lambda x, y, tol: torch.testing.assert_close(x.float(), y, rtol=tol, atol=tol * y.abs().max().item())
    close(got[0], ref[0], 1e-2)                                      # bf16 rounding of o (8 bits)
    close(got[1], ref[1], 1e-5)                                      # the state stays fp32
    for x, y in zip(got[2], ref[2]):
        if x is not None:
            close(x, y, 1e-2)


@pytest.mark.parametrize("rule", ["delta", "sum"])
@pytest.mark.parametrize("impl", ["naive", "chunk"])
def test_fp32_inputs_fp32_results(rule, impl):
    inputs = make(T=9, dtype=torch.float32)
    o, s = run(rule, impl, *inputs, C=4)
    assert o.dtype == torch.float32 and s.dtype == torch.float32


@pytest.mark.parametrize("rule", ["delta", "sum"])
@pytest.mark.parametrize("impl", ["naive", "chunk"])
def test_two_segments_carried_equal_one(rule, impl):
    """Carrying final_state (not detached) into the next segment is the same computation as one segment of
    double length: outputs, final state, and gradients into both segments' inputs and the first state."""
    T = 23
    whole = make(T=2 * T, Dk=5, Dv=4, seed=7)
    r = resets(2, 2 * T, "many")
    ref = outputs_and_grads(rule, impl, whole, r, C=8)

    leaves = [t.detach().clone().requires_grad_(True) for t in whole]
    q, k, v, beta, s0 = leaves
    half = lambda x, i: x[:, :, i * T:(i + 1) * T]
    o1, s1 = run(rule, impl, half(q, 0), half(k, 0), half(v, 0), half(beta, 0), s0, r[:, :T], C=8)
    o2, s2 = run(rule, impl, half(q, 1), half(k, 1), half(v, 1), half(beta, 1), s1, r[:, T:], C=8)
    o = torch.cat([o1, o2], dim=2)
    random_loss(o, s2).backward()
    grads = [t.grad for t in leaves]
    if rule == "sum":
        grads[3] = None
    assert_all_close((o.detach(), s2.detach(), grads), ref, rtol=1e-10, atol=1e-10)
    assert leaves[0].grad[:, :, :T].abs().max() > 0                  # the first segment does get gradients


@pytest.mark.parametrize("rule", ["delta", "sum"])
@pytest.mark.parametrize("impl", ["naive", "chunk"])
@pytest.mark.parametrize("t", [0, 6, 11])
def test_reset_equals_fresh_start(rule, impl, t):
    """A reset at t: tokens from t on equal a run of the part from t on a zero state, tokens before t are
    unaffected, and the final state is the fresh run's; the rows without a reset are unaffected too."""
    T = 17
    q, k, v, beta, s0 = make(T=T, seed=11)
    reset = torch.zeros(2, T, dtype=torch.bool)
    reset[0, t] = True
    o, s = run(rule, impl, q, k, v, beta, s0, reset, C=4)
    o_plain, s_plain = run(rule, impl, q, k, v, beta, s0, None, C=4)
    cut = lambda x, a, b: x[:1, :, a:b]
    o_after, s_after = run(rule, impl, cut(q, t, T), cut(k, t, T), cut(v, t, T), cut(beta, t, T), None, C=4)
    torch.testing.assert_close(o[:1, :, t:], o_after, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s[:1], s_after, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(o[:, :, :t], o_plain[:, :, :t], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(o[1:], o_plain[1:], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s[1:], s_plain[1:], rtol=1e-12, atol=1e-12)


def test_reset_cuts_gradient_to_earlier_inputs():
    """Nothing after a reset depends on what came before it: no gradient from later outputs reaches the
    initial state or earlier tokens."""
    q, k, v, beta, s0 = [t.requires_grad_(True) for t in make(B=1, T=20, seed=2)]
    reset = torch.zeros(1, 20, dtype=torch.bool)
    reset[0, 9] = True
    o, s = delta_rule(q, k, v, beta, initial_state=s0, reset=reset, chunk_size=8)
    (o[:, :, 9:].sum() + s.sum()).backward()
    assert s0.grad.abs().max() == 0
    for x in (q, k, v):
        assert x.grad[:, :, :9].abs().max() == 0 and x.grad[:, :, 9:].abs().max() > 0


@pytest.mark.parametrize("rule", ["delta", "sum"])
@pytest.mark.parametrize("impl", ["naive", "chunk"])
def test_inputs_untouched_and_optional_state(rule, impl):
    inputs = [t.requires_grad_(True) for t in make(T=21, seed=4)]
    reset = resets(2, 21, "many")
    before = [t.detach().clone() for t in inputs] + [reset.clone()]
    o, s = run(rule, impl, *inputs, reset, C=8, final=False)
    assert s is None
    o.sum().backward()
    for x, y in zip(inputs + [reset], before):
        assert torch.equal(x.detach(), y)
    assert inputs[4].grad is not None and inputs[4].grad.abs().max() > 0   # the initial state gets a gradient


def test_auto_is_chunk_and_logs_once(caplog):
    inputs = make(T=30, seed=9)
    r = resets(2, 30, "many")
    fw._logged.clear()
    with caplog.at_level(logging.INFO, logger="pretrain.ops.fast_weight"):
        auto = run("delta", "auto", *inputs, r, C=8)
        run("delta", "auto", *inputs, r, C=8)
    chunk = run("delta", "chunk", *inputs, r, C=8)
    assert torch.equal(auto[0], chunk[0]) and torch.equal(auto[1], chunk[1])
    msgs = [rec.getMessage() for rec in caplog.records if rec.name == "pretrain.ops.fast_weight"]
    assert msgs == ["delta_rule: chunk implementation on cpu (chunk_size 8)"]


@pytest.mark.parametrize("pattern", [None, "many"])
def test_key_sum(pattern):
    q, k, v, beta, s0 = [t.requires_grad_(True) for t in make(T=33, Dk=6, seed=12)]
    z0 = s0[..., 0].detach().clone().requires_grad_(True)
    r = resets(2, 33, pattern)
    z, zT = key_sum(k, initial=z0, reset=r)
    zr, zrT = naive.key_sum(k, initial=z0, reset=r)
    torch.testing.assert_close(z, zr, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(zT, zrT, rtol=1e-12, atol=1e-12)
    gz = torch.randn_like(z)
    gk, gz0 = torch.autograd.grad((z * gz).sum(), (k, z0))
    gkr, gz0r = torch.autograd.grad((zr * gz).sum(), (k, z0))
    torch.testing.assert_close(gk, gkr, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gz0, gz0r, rtol=1e-12, atol=1e-12)


def test_key_sum_long_fp32_keeps_digits():
    """fp32 keys over a long segment with resets: within fp32 rounding of the exact (fp64) sums."""
    g = torch.Generator().manual_seed(0)
    k = fm.sum_normalise(torch.rand(1, 2, 8192, 4, generator=g)) * 100
    r = torch.zeros(1, 8192, dtype=torch.bool)
    r[0, 6000] = True
    z, _ = key_sum(k, reset=r)
    zr, _ = naive.key_sum(k.double(), reset=r)
    assert z.dtype == torch.float32
    torch.testing.assert_close(z.double(), zr, rtol=1e-6, atol=0)


def test_bad_inputs_name_the_argument():
    q, k, v, beta, s0 = make(T=5)
    with pytest.raises(ValueError, match="beta has shape"):
        delta_rule(q, k, v, beta[..., None])
    with pytest.raises(ValueError, match="initial_state has shape"):
        delta_rule(q, k, v, beta, initial_state=s0.transpose(-1, -2))
    with pytest.raises(ValueError, match="v has shape"):
        sum_rule(q, k, v[:, :, :4])
    with pytest.raises(ValueError, match="k has shape"):
        sum_rule(q, k[..., :2], v)
    with pytest.raises(TypeError, match="reset must be a bool"):
        sum_rule(q, k, v, reset=torch.zeros(2, 5))
    with pytest.raises(ValueError, match="reset has shape"):
        sum_rule(q, k, v, reset=torch.zeros(2, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="impl='cuda'"):
        delta_rule(q, k, v, beta, impl="cuda")
    with pytest.raises(ValueError, match="chunk_size=0"):
        delta_rule(q, k, v, beta, chunk_size=0)
    with pytest.raises(TypeError, match="q must be a floating-point"):
        sum_rule(q.long(), k, v)
    with pytest.raises(ValueError, match="initial has shape"):
        key_sum(k, initial=s0)


# ---- independent reference: flash-linear-attention's plain PyTorch functions (fla-core) -----------------------

def fla_reference(relpath):
    """Load one plain-PyTorch file of fla-core (``fla/ops/...``) without importing the fla package (whose
    __init__ pulls Triton kernels); skip when fla-core (or its one dependency, einops) is absent."""
    spec = importlib.util.find_spec("fla")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("fla-core not installed (pip install fla-core==0.6.0: without extras it brings no Triton; "
                    "the test extra has it)")
    pytest.importorskip("einops", reason="fla's reference files import einops")
    path = os.path.join(list(spec.submodule_search_locations)[0], *relpath.split("/"))
    if not os.path.exists(path):
        pytest.skip(f"this fla-core has no {relpath}")
    mod_spec = importlib.util.spec_from_file_location("fla_ref_" + relpath.replace("/", "_")[:-3], path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod


def test_delta_rule_matches_fla_recurrence():
    """fla's ``delta_rule_recurrence`` (fp32 inside; S_t = S_{t-1} (I - b k k^T) + b v k^T, o = S q with q
    scaled by Dk^-1/2 and no key normalisation) stores S as [.., Dk, Dv], our W: same layout, scale Dk^-1/2."""
    ref = fla_reference("ops/delta_rule/naive.py")
    q, k, v, beta, s0 = [t.float().requires_grad_(True) for t in make(T=37, Dk=6, Dv=5, seed=13)]
    o_f, s_f = ref.delta_rule_recurrence(q, k, v, beta, initial_state=s0, output_final_state=True)
    g_f = torch.autograd.grad(o_f.sum() + (s_f * s_f).sum(), (q, k, v, beta, s0))
    for impl in ("naive", "chunk"):
        o, s = delta_rule(q, k, v, beta, scale=6 ** -0.5, initial_state=s0, impl=impl, chunk_size=16)
        torch.testing.assert_close(o, o_f, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(s, s_f, rtol=1e-5, atol=1e-5)
        g = torch.autograd.grad(o.sum() + (s * s).sum(), (q, k, v, beta, s0))
        for x, y in zip(g, g_f):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)


def test_delta_rule_matches_fla_chunkwise_fp64():
    """fla's ``delta_rule_chunkwise`` (the WY/UT form in the input dtype: T a multiple of the chunk, zero
    initial state) agrees with ours in fp64 to rounding, gradients included."""
    ref = fla_reference("ops/delta_rule/naive.py")
    q, k, v, beta = [t.requires_grad_(True) for t in make(T=48, Dk=8, Dv=6, init=False, seed=14)[:4]]
    o_f, s_f = ref.delta_rule_chunkwise(q, k, v, beta, chunk_size=16)
    g_f = torch.autograd.grad((o_f * o_f).sum() + s_f.sum(), (q, k, v, beta))
    o, s = delta_rule(q, k, v, beta, scale=8 ** -0.5, impl="naive")
    torch.testing.assert_close(o, o_f, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s, s_f, rtol=1e-10, atol=1e-10)
    g = torch.autograd.grad((o * o).sum() + s.sum(), (q, k, v, beta))
    for x, y in zip(g, g_f):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10)


def test_sum_rule_and_key_sum_match_fla_linear_attention():
    """fla's ``naive_recurrent_linear_attn`` ([B, T, H, K] layout, fp32) without and with its normalisation
    o / (scale q . z_t), z_t = z_0 + sum k, which is our sum_rule divided by key_sum's z_t . q_t."""
    ref = fla_reference("ops/linear_attn/naive.py")
    q, k, v, _, s0 = [t.float() for t in make(T=29, Dk=5, Dv=4, seed=15)]
    q, k = q.abs() + 0.1, k.abs() + 0.1                              # positive features, as after a feature map
    z0 = torch.rand(2, 3, 5)
    bthd = lambda x: x.transpose(1, 2)
    scale = 0.37
    o_f, s_f = ref.naive_recurrent_linear_attn(bthd(q), bthd(k), bthd(v), scale=scale, initial_state=s0,
                                                 output_final_state=True)
    o, s = sum_rule(q, k, v, scale=scale, initial_state=s0)
    torch.testing.assert_close(o, bthd(o_f), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s, s_f, rtol=1e-5, atol=1e-5)
    on_f, (_, z_f) = ref.naive_recurrent_linear_attn(bthd(q), bthd(k), bthd(v), scale=scale,
                                                       initial_state=(s0, z0[:, None]), output_final_state=True,
                                                       normalize=True)
    z, zT = key_sum(k, initial=z0)
    torch.testing.assert_close(o / (scale * (z * q).sum(-1, keepdim=True) + 1e-10), bthd(on_f),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(zT, z_f[:, 0], rtol=1e-6, atol=1e-6)


# ---- feature maps ---------------------------------------------------------------------------------------------

def test_feature_map_shapes_and_widths():
    x = torch.randn(2, 3, 7, 5)
    proj = fm.draw_favor_projection(5, 6, generator=torch.Generator().manual_seed(0))
    assert fm.elu_plus_one(x).shape[-1] == fm.feature_dim("elu_plus_one", 5) == 5
    assert fm.dpfp(x, nu=3).shape == (2, 3, 7, 30) and fm.feature_dim("dpfp", 5, nu=3) == 30
    assert fm.favor_plus(x, proj).shape == (2, 3, 7, 12) and fm.feature_dim("favor_plus", 5, m=6) == 12
    assert fm.favor_plus(x[0, 0, 0], proj).shape == (12,)             # any leading dims, none included
    assert (fm.elu_plus_one(x) > 0).all() and (fm.favor_plus(x, proj) > 0).all()
    with pytest.raises(ValueError, match="unknown feature map"):
        fm.feature_dim("relu", 5)
    with pytest.raises(ValueError, match="nu=0"):
        fm.dpfp(x, nu=0)
    with pytest.raises(ValueError, match="proj has shape"):
        fm.favor_plus(x, proj.T)


def test_dpfp_written_out():
    x = torch.tensor([1.0, -2.0, 3.0])
    # x~ = [relu(x); relu(-x)] = [1, 0, 3, 0, 2, 0]; roll by 1: [0, 1, 0, 3, 0, 2]; roll by 2: [2, 0, 1, 0, 3, 0]
    expected = torch.tensor([0, 0, 0, 0, 0, 0,
                             2, 0, 3, 0, 6, 0], dtype=torch.float32)
    torch.testing.assert_close(fm.dpfp(x, nu=2), expected)
    torch.testing.assert_close(fm.elu_plus_one(torch.tensor([-1.0, 0.0, 2.0])),
                               torch.tensor([math.exp(-1.0), 1.0, 3.0]))


def test_favor_projection_reproducible_and_orthogonal():
    a = fm.draw_favor_projection(4, 10, generator=torch.Generator().manual_seed(3), dtype=F64)
    b = fm.draw_favor_projection(4, 10, generator=torch.Generator().manual_seed(3), dtype=F64)
    c = fm.draw_favor_projection(4, 10, generator=torch.Generator().manual_seed(4), dtype=F64)
    assert a.shape == (4, 10) and torch.equal(a, b) and not torch.equal(a, c)
    for block in (a[:, 0:4], a[:, 4:8], a[:, 8:10]):                  # columns orthogonal within a block
        gram = block.T @ block
        torch.testing.assert_close(gram, torch.diag(torch.diagonal(gram)), atol=1e-12, rtol=0)


def test_favor_plus_approximates_softmax_kernel():
    """E_W[phi(x) . phi(y)] = exp(x . y): averaged over independent draws (fixed seed), small inputs.  (At this
    tolerance, features with fixed lengths sqrt(d), or a projection with orthogonal rows instead of columns,
    are biased enough to fail: 21% and 7% off.)"""
    d, m, draws = 4, 16, 1000
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, d, generator=g, dtype=F64) * 0.4
    y = torch.randn(6, d, generator=g, dtype=F64) * 0.4
    est = torch.zeros(6, 6, dtype=F64)
    for _ in range(draws):
        w = fm.draw_favor_projection(d, m, generator=g, dtype=F64)
        est += fm.favor_plus(x, w, eps=0.0) @ fm.favor_plus(y, w, eps=0.0).T
    est /= draws
    exact = torch.exp(x @ y.T)
    torch.testing.assert_close(est, exact, rtol=0.05, atol=0)
    # and the tolerance is tight enough to tell a different kernel apart
    assert (est - torch.exp(2 * x @ y.T)).abs().max() > 0.05


def test_sum_normalise():
    x = fm.dpfp(torch.randn(3, 4, 6), nu=2)
    s = fm.sum_normalise(x)
    torch.testing.assert_close(s.sum(-1), torch.ones(3, 4))
    assert torch.isnan(fm.sum_normalise(fm.dpfp(torch.zeros(2)))).all()
    assert torch.equal(fm.sum_normalise(fm.dpfp(torch.zeros(2)), eps=1e-6), torch.zeros(4))
