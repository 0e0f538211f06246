"""The fused CUDA kernels against the PyTorch references, on a GPU (skipped where there is none).

What is held (tests/kernel_checks.py gives the method): the chunkwise delta and sum rule (``csrc/fast_weight``)
and the relative attention (``csrc/rel_attention``) against their references in fp64 on fresh random inputs
of odd and even sizes, forward and every gradient (initial and final state included; o and lse), relative
error under 1e-5 for fp32 and 1e-2 for bf16 inputs, outputs and workspaces poisoned with NaN before each
run, inputs unmodified; results repeat bit for bit where no atomics are involved (a moving result would be
a race); the public ops choose the kernels under ``impl="auto"`` and fall back where they must; whole models
(when megatron-core is installed) give the same losses and gradients with and without the kernels.

Needs only torch and this repository's ``pretrain/ops`` and ``csrc`` (the GPU machines have no DeepSpeed or
megatron-core; the model tests skip there).  The kernels are built on first use (``pretrain/ops/kernels.py``);
a build failure fails these tests.
"""
import logging

import pytest
import torch

import kernel_checks as kc

from pretrain.ops import kernels

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device: the fused kernels run on a GPU (their sources are "
                                       "compile-checked by test_kernels_build.py and run on the CPU emulator by "
                                       "test_kernels_emulated.py)")
CUDA = torch.device("cuda")
DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(scope="module")
def ext():
    mod = kernels.load()
    assert not mod.info()["emulated"]
    prev = mod.set_poison(True)
    yield mod
    mod.set_poison(prev)


FW_SHAPES = [  # B, H, T, Dk, Dv, chunk
    (2, 3, 77, 16, 16, 64),
    (1, 2, 200, 64, 64, 64),
    (2, 2, 333, 128, 128, 64),
    (1, 1, 129, 256, 256, 64),
    (2, 1, 95, 33, 47, 32),
    (1, 2, 150, 96, 40, 32),
    (1, 1, 1, 16, 16, 64),
    (3, 4, 1024, 64, 64, 64),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", FW_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("rule", ["delta", "sum"])
def test_fast_weight(ext, rule, shape, dtype):
    kc.check_fast_weight(rule, *shape[:5], dtype, shape[5], CUDA, ext=ext, seed=sum(shape))


@pytest.mark.parametrize("rule", ["delta", "sum"])
def test_fast_weight_no_initial_state(ext, rule):
    kc.check_fast_weight(rule, 2, 2, 130, 64, 32, torch.float32, 64, CUDA, ext=ext, init=False)


@pytest.mark.parametrize("rule", ["delta", "sum"])
def test_fast_weight_segments(ext, rule):
    kc.check_fast_weight_segments(rule, CUDA, ext=ext)


def test_fast_weight_is_deterministic(ext):
    """No atomics in the fast-weight kernels: two runs give the same bits (a difference would be a race)."""
    from pretrain.ops.fast_weight import fused
    g = torch.Generator(device="cuda").manual_seed(0)
    B, H, T, D = 2, 4, 700, 64
    q, v = (torch.randn(B, H, T, D, device=CUDA, generator=g) for _ in range(2))
    k = torch.nn.functional.normalize(torch.randn(B, H, T, D, device=CUDA, generator=g), dim=-1)
    beta = torch.rand(B, H, T, device=CUDA, generator=g)
    s0 = torch.randn(B, H, D, D, device=CUDA, generator=g)
    go = torch.randn(B, H, T, D, device=CUDA, generator=g)
    runs = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v, beta, s0)]
        o, s = fused.delta_rule(*leaves[:4], initial_state=leaves[4], ext=ext)
        ((o * go).sum() + s.sum()).backward()
        runs.append([o, s] + [t.grad for t in leaves])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_fast_weight_dispatch(ext, caplog, monkeypatch):
    """impl='auto' runs the kernel on CUDA (the same bits as impl='fused'), and the chunk path where the kernel
    does not apply (in-segment resets, chunk sizes other than 32 / 64), saying so; impl='fused' refuses those."""
    import pretrain.ops.fast_weight as fw
    monkeypatch.setattr(fw, "_logged", set())
    q = torch.randn(1, 2, 90, 32, device=CUDA)
    k = torch.nn.functional.normalize(torch.randn(1, 2, 90, 32, device=CUDA), dim=-1)
    beta = torch.rand(1, 2, 90, device=CUDA)
    with caplog.at_level(logging.INFO, logger="pretrain.ops"):
        auto = fw.delta_rule(q, k, q, beta, impl="auto")
        reset = torch.zeros(1, 90, dtype=torch.bool, device=CUDA)
        reset[0, 40] = True
        fw.delta_rule(q, k, q, beta, reset=reset, impl="auto")
        fw.delta_rule(q, k, q, beta, impl="auto", chunk_size=16)
    fused = fw.delta_rule(q, k, q, beta, impl="fused")
    assert torch.equal(auto[0], fused[0]) and torch.equal(auto[1], fused[1])
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "delta_rule: fused implementation on cuda" in text
    assert "not fused: in-segment resets" in text and "not fused: chunk_size=16" in text
    with pytest.raises(RuntimeError, match="in-segment resets"):
        fw.delta_rule(q, k, q, beta, reset=reset, impl="fused")
    with kernels.disabled():
        chunk = fw.delta_rule(q, k, q, beta, impl="auto")
    kc.assert_close("auto under kernels.disabled() (chunk path)", chunk[0], fused[0], 1e-5)


RA_SIZES = [(37, 29), (128, 128), (200, 0), (64, 300)]  # N, M


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("D", [32, 41, 64, 128])
@pytest.mark.parametrize("N,M", RA_SIZES)
@pytest.mark.parametrize("name", ["xl", "xl_valid_same_length", "xl_documents"])
def test_rel_attention_xl(ext, name, N, M, D, dtype):
    kc.check_rel_attention(kc.xl_cases(D, N, M)[name], dtype, CUDA, ext=ext, seed=N + M + D)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("N,M", [(64, 96), (96, 64), (33, 33)])
@pytest.mark.parametrize("name", ["lookahead", "lookahead_full"])
def test_rel_attention_lookahead(ext, name, N, M, dtype):
    kc.check_rel_attention(kc.lookahead_cases(64, N, M)[name], dtype, CUDA, ext=ext, seed=N * M)


def test_rel_attention_empty_rows(ext):
    empty = dict(H=2, B=2, R=70, C=70, P=140, D=32, frame=dict(r_offset=69, q_start=-5, order="past",
                                                               key_start=torch.tensor([0, 9])))
    kc.check_rel_attention(empty, torch.float32, CUDA, ext=ext)


def test_rel_attention_forward_is_deterministic(ext):
    """The forward pass and dq, dk, dv repeat bit for bit (only dr is accumulated with atomics)."""
    from pretrain.ops.rel_attention import fused
    g = torch.Generator(device="cuda").manual_seed(0)
    H, B, N, M, D = 4, 2, 300, 200, 64
    K = M + N
    q = torch.randn(H, B, N, D, device=CUDA, generator=g) / 8
    k, v = (torch.randn(H, B, K, D, device=CUDA, generator=g) for _ in range(2))
    r = torch.randn(H, K + 1, D, device=CUDA, generator=g)
    u, w = (torch.randn(H, D, device=CUDA, generator=g) / 8 for _ in range(2))
    go = torch.randn(H, B, N, D, device=CUDA, generator=g)
    runs = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v, r, u, w)]
        o, lse = fused.rel_attention(*leaves, r_offset=N - 1, q_start=M, order="past", ext=ext)
        ((o * go).sum() + lse.sum()).backward()
        runs.append([o, lse, leaves[0].grad, leaves[1].grad, leaves[2].grad, leaves[3].grad])
    for i, (a, b) in enumerate(zip(*runs)):
        if i == 5:      # dr: fp32 atomics, the order of additions varies
            kc.assert_close("dr across runs", a, b, 1e-6)
        else:
            assert torch.equal(a, b), f"output {i} differs between two runs"


def test_rel_attention_dispatch(ext, caplog, monkeypatch):
    import pretrain.ops.rel_attention as ra
    monkeypatch.setattr(ra, "_logged", set())
    q = torch.randn(2, 1, 20, 16, device=CUDA)
    k = torch.randn(2, 1, 30, 16, device=CUDA)
    r = torch.randn(2, 31, 16, device=CUDA)
    u = torch.zeros(2, 16, device=CUDA)
    kw = dict(r_offset=19, q_start=10, order="past")
    with caplog.at_level(logging.INFO, logger="pretrain.ops"):
        auto = ra.rel_attention(q, k, k, r, u, u, impl="auto", **kw)
    fused = ra.rel_attention(q, k, k, r, u, u, impl="fused", **kw)
    assert torch.equal(auto[0], fused[0])
    assert any("rel_attention: fused implementation on cuda" in rec.getMessage() for rec in caplog.records)
    with pytest.raises(RuntimeError, match="head size 200"):
        z = torch.zeros(2, 200, device=CUDA)
        ra.rel_attention(torch.zeros(2, 1, 4, 200, device=CUDA), torch.zeros(2, 1, 4, 200, device=CUDA),
                         torch.zeros(2, 1, 4, 200, device=CUDA), torch.zeros(2, 5, 200, device=CUDA), z, z,
                         r_offset=3, q_start=0, impl="fused")


# ----------------------------------------------------------------------------------------------------------
# whole models (need megatron-core, absent on the GPU machines' image unless brought as wheels)

@pytest.mark.parametrize("attn_type,same_length,docs", [(0, False, False), (0, True, True), (3, False, True),
                                                        (33, False, True)])
def test_model_attention_fused_equals_reference(ext, attn_type, same_length, docs):
    pytest.importorskip("megatron.core", reason="megatron-core is not installed (the model needs it)")
    from pretrain.model import parallel
    parallel.initialize(1)
    N, M = 48, 40
    cfg = kc.model_config(32, 61, N, M, attn_type=attn_type)
    tokens, reset = kc.model_inputs(61, N, seed=1, doc_starts=[(0, 70), (1, 100)] if docs else ())
    fused = kc.model_run(cfg, tokens, N, M, reset, same_length, device=CUDA)
    with kernels.disabled():
        ref = kc.model_run(cfg, tokens, N, M, reset, same_length, device=CUDA)
    kc.assert_close("nll", fused[0], ref[0], 1e-5)
    for name in ref[2]:
        kc.assert_close(f"grad {name}", fused[2][name], ref[2][name], 5e-5)


def test_model_fast_weight_fused_equals_chunk(ext):
    pytest.importorskip("megatron.core", reason="megatron-core is not installed (the model needs it)")
    from pretrain.model import parallel
    parallel.initialize(1)
    tokens, _ = kc.model_inputs(61, 48, seed=2)
    res = {}
    for impl in ("fused", "chunk"):
        cfg = kc.model_config(32, 61, 48, 0, attn_type=24, fast_weight={"impl": impl})
        res[impl] = kc.model_run(cfg, tokens, 48, 0, device=CUDA)
    kc.assert_close("nll", res["fused"][0], res["chunk"][0], 1e-5)
    for name in res["chunk"][2]:
        kc.assert_close(f"grad {name}", res["fused"][2][name], res["chunk"][2][name], 5e-5)
