"""The fused kernels' sources run on the CPU block emulator (csrc/common/emulate.h), against the references.

The emulator compiles the same kernel source as C++ and runs every CUDA thread of a block as a fiber, with
__syncthreads() as the switching point and shared memory filled with NaN at the start of each block.  It
checks the kernels' indexing, bounds, algebra and barrier structure on any machine; it cannot see races
that a GPU's scheduling would expose, nor speed (test_kernels_cuda.py runs the real build on a GPU).  The
module also checks the mixers' wiring of the fused attention (frames, masks, biases) on a whole model, with
the kernel forced on for CPU tensors.

The first run builds the emulated module with the C++ compiler (about a minute of CPU, cached in
TORCH_EXTENSIONS_DIR).  Sizes are small: each emulated block runs 256 fibers.
"""
import logging
import shutil

import pytest
import torch

import kernel_checks as kc

from pretrain.ops import kernels

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def ext():
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler to build the kernel emulator")
    mod = kernels.load_emulator()
    assert mod.info()["emulated"]
    prev = mod.set_poison(True)
    yield mod
    mod.set_poison(prev)


@pytest.mark.parametrize("rule", ["delta", "sum"])
@pytest.mark.parametrize("B,H,T,Dk,Dv,C,dtype", [
    (1, 2, 45, 17, 23, 32, torch.float32),     # odd sizes, a partial last chunk
    (2, 1, 70, 40, 33, 32, torch.float32),     # Dk and Dv over one tile, two value blocks
    (1, 1, 64, 16, 16, 64, torch.float32),     # whole chunks of 64
    (1, 1, 1, 16, 16, 64, torch.float32),      # one position
    (1, 2, 100, 48, 40, 32, torch.bfloat16),
])
def test_fast_weight_emulated(ext, rule, B, H, T, Dk, Dv, C, dtype):
    kc.check_fast_weight(rule, B, H, T, Dk, Dv, dtype, C, CPU, ext=ext)


def test_fast_weight_emulated_head_256(ext):
    """The largest head sizes (Dk = Dv = 256): eight key tiles, eight value blocks."""
    kc.check_fast_weight("delta", 1, 1, 40, 256, 256, torch.float32, 32, CPU, ext=ext)


def test_fast_weight_emulated_no_initial_state(ext):
    kc.check_fast_weight("delta", 1, 2, 50, 20, 36, torch.float32, 32, CPU, ext=ext, init=False)


@pytest.mark.parametrize("rule", ["delta", "sum"])
def test_fast_weight_emulated_segments(ext, rule):
    kc.check_fast_weight_segments(rule, CPU, ext=ext)


@pytest.mark.parametrize("name", ["xl", "xl_valid_same_length", "xl_documents", "lookahead", "lookahead_full"])
@pytest.mark.parametrize("D,N,M,dtype", [(24, 37, 29, torch.float32), (64, 40, 33, torch.bfloat16),
                                         (100, 33, 40, torch.float32)])
def test_rel_attention_emulated(ext, name, D, N, M, dtype):
    case = {**kc.xl_cases(D, N, M), **kc.lookahead_cases(D, N, M)}[name]
    kc.check_rel_attention(case, dtype, CPU, ext=ext)


def test_rel_attention_emulated_no_memory_and_empty_rows(ext):
    """No memory (M = 0), and a window frame in which some queries see no key (o = 0, lse = -inf)."""
    kc.check_rel_attention(kc.xl_case(2, 1, 45, 0, 32), torch.float32, CPU, ext=ext)
    empty = dict(H=1, B=2, R=20, C=20, P=40, D=16, frame=dict(r_offset=19, q_start=-3, order="past",
                                                              key_start=torch.tensor([0, 5])))
    kc.check_rel_attention(empty, torch.float32, CPU, ext=ext)


def test_binding_rejects_bad_input(ext):
    """The binding's checks name what is wrong (here: a head size the attention kernel does not take) and
    raise a Python error before any kernel runs."""
    q = torch.zeros(1, 1, 4, 200)
    with pytest.raises(RuntimeError, match="head size 200"):
        ext.rel_attention_forward(q, q, q, q, torch.zeros(1, 5, 200), None, None, None, 3, 0, 1, 0)


# ----------------------------------------------------------------------------------------------------------
# the mixers' wiring, on a whole model, with the fused kernels forced on for CPU tensors

@pytest.fixture
def fused_on_cpu(ext, monkeypatch):
    """Make the mixers and the ops take their fused paths on CPU tensors, running the emulated kernels."""
    from pretrain.model.mechanisms.xl import mixer as xl
    from pretrain.ops.fast_weight import fused as fw_fused
    from pretrain.ops.rel_attention import fused as ra_fused

    def attention_path(mixer, q, ctx):     # xl.attention_path without its device test
        fused = kernels.enabled() and not ctx.mask_edits and not (mixer.training and mixer.attn.dropatt > 0)
        return "fused" if fused else "reference"

    class Counting:
        """The emulated module, counting the kernel calls (the test asserts the fused path ran)."""
        calls = {}

        def __getattr__(self, name):
            fn = getattr(ext, name)

            def call(*a, **k):
                Counting.calls[name] = Counting.calls.get(name, 0) + 1
                return fn(*a, **k)
            return call

    counting = Counting()
    monkeypatch.setattr(kernels, "load", lambda verbose=None: counting)
    monkeypatch.setattr(ra_fused, "unsupported", lambda *a, **k: None)
    monkeypatch.setattr(fw_fused, "unsupported", lambda *a, **k: None)
    monkeypatch.setattr(xl, "attention_path", attention_path)
    import pretrain.model.mechanisms.lamemo.mixer as lamemo
    monkeypatch.setattr(lamemo, "attention_path", attention_path)
    return Counting.calls


@pytest.mark.parametrize("attn_type,same_length,docs", [(0, False, False), (0, True, True), (3, False, True),
                                                        (31, False, False), (32, False, False), (33, False, True)])
def test_model_fused_attention_equals_reference(fused_on_cpu, monkeypatch, attn_type, same_length, docs):
    """A small XL / LaMemo model over three segments (state carried with gradients): the loss per token, the
    state and every parameter gradient with the fused attention (emulated) equal the reference path's."""
    from pretrain.model import parallel
    from pretrain.model.mechanisms.xl import mixer as xl
    parallel.initialize(1)
    N, M = 20, 24
    cfg = kc.model_config(16, 37, N, M, attn_type=attn_type)
    tokens, reset = kc.model_inputs(37, N, seed=1, doc_starts=[(0, 27), (1, 45), (1, 50)] if docs else ())
    nll_f, st_f, g_f = kc.model_run(cfg, tokens, N, M, reset, same_length)
    per_layer = 1 if attn_type == 0 else 2                 # XL: the current queries; LaMemo: + the memory's
    assert fused_on_cpu.get("rel_attention_forward") == per_layer * cfg["n_layer"] * 3, fused_on_cpu
    assert fused_on_cpu.get("rel_attention_backward", 0) > 0
    monkeypatch.setattr(xl, "attention_path", lambda *a: "reference")
    import pretrain.model.mechanisms.lamemo.mixer as lamemo
    monkeypatch.setattr(lamemo, "attention_path", lambda *a: "reference")
    nll_r, st_r, g_r = kc.model_run(cfg, tokens, N, M, reset, same_length)
    kc.assert_close("nll", nll_f, nll_r, 1e-5)
    for key in st_r.keys():
        if st_r[key].is_floating_point():
            kc.assert_close(f"state {key}", st_f[key], st_r[key], 1e-5)
    assert g_f.keys() == g_r.keys()
    for name in g_r:
        kc.assert_close(f"grad {name}", g_f[name], g_r[name], 2e-5)


def test_model_fused_fast_weight_equals_chunk(fused_on_cpu):
    """A delta-rule model (attn_type 24) with impl='fused' (emulated) equals impl='chunk': loss per token,
    state and gradients, state carried over three segments."""
    from pretrain.model import parallel
    parallel.initialize(1)
    tokens, _ = kc.model_inputs(37, 20, seed=2)
    res = {}
    for impl in ("fused", "chunk"):
        cfg = kc.model_config(16, 37, 20, 0, attn_type=24, fast_weight={"impl": impl, "chunk_size": 32})
        res[impl] = kc.model_run(cfg, tokens, 20, 0)
        if impl == "fused":
            assert fused_on_cpu == {"fast_weight_forward": 6, "fast_weight_backward": 6}, fused_on_cpu
    (nf, sf, gf), (nr, sr, gr) = res["fused"], res["chunk"]
    kc.assert_close("nll", nf, nr, 1e-5)
    for key in sr.keys():
        if sr[key].is_floating_point():
            kc.assert_close(f"state {key}", sf[key], sr[key], 1e-5)
    for name in gr:
        kc.assert_close(f"grad {name}", gf[name], gr[name], 2e-5)


def test_ops_log_the_path(caplog, monkeypatch):
    """On CPU the public ops take the reference / chunk path under impl='auto' and log it; impl='fused'
    refuses CPU tensors, saying why."""
    import pretrain.ops.fast_weight as fw_ops
    import pretrain.ops.rel_attention as ra_ops
    monkeypatch.setattr(fw_ops, "_logged", set())
    monkeypatch.setattr(ra_ops, "_logged", set())
    q = torch.randn(1, 1, 5, 4)
    z = torch.zeros(1, 4)
    r = torch.randn(1, 6, 4)
    with caplog.at_level(logging.INFO, logger="pretrain.ops"):
        fw_ops.delta_rule(q, q, q, torch.rand(1, 1, 5), impl="auto")
        ra_ops.rel_attention(q, q, q, r, z, z, r_offset=4, q_start=0, impl="auto")
    messages = [rec.getMessage() for rec in caplog.records]
    assert "delta_rule: chunk implementation on cpu (chunk_size 64)" in messages
    assert "rel_attention: reference implementation on cpu" in messages
    with pytest.raises(RuntimeError, match="runs on CUDA"):
        fw_ops.delta_rule(q, q, q, torch.rand(1, 1, 5), impl="fused")
    with pytest.raises(RuntimeError, match="runs on CUDA"):
        ra_ops.rel_attention(q, q, q, r, z, z, r_offset=4, q_start=0, impl="fused")


def test_benchmark_runs_its_fused_rows(fused_on_cpu, monkeypatch, tmp_path):
    """benchmarks/kernels.py --quick with the fused kernels emulated on CPU: every fused row runs without an
    error, and the end-to-end LaMemo rows run the fused attention exactly when the kernels are enabled (the
    benchmark's calls are checked before a GPU machine runs them; no timing is asserted).  (The delta-rule
    model's impl='auto' takes the fused kernel on CUDA tensors only, so on CPU its rows run the chunk path.)"""
    import json
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import kernels as bench
    finally:
        sys.path.pop(0)
    monkeypatch.setattr(kernels, "unavailable_reason", lambda device=None: None)
    out = tmp_path / "k.json"
    bench.main(["--quick", "--device", "cpu", "--out", str(out), "--e2e-presets", "lamemo_tiny", "delta_tiny"])
    rows = json.loads(out.read_text())["rows"]
    errors = [r for r in rows if "error" in r]
    assert not errors, errors
    fused = [r for r in rows if r.get("impl") == "fused"]
    assert {r["part"] for r in fused} == {"delta_rule", "rel_attention"} and all(r["ms"] > 0 for r in fused)
    e2e = {(r["preset"], r["fused"]): r for r in rows if r["part"] == "e2e"}
    assert set(e2e) == {(p, f) for p in ("lamemo_tiny", "delta_tiny") for f in (True, False)}
    assert "rel_attention: fused implementation on cpu" in e2e[("lamemo_tiny", True)]["paths"], e2e
    assert not any("rel_attention" in p for p in e2e[("lamemo_tiny", False)]["paths"]), e2e
