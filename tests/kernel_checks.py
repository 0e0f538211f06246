"""Checks of the fused kernels against the PyTorch references, shared by ``test_kernels_cuda.py`` (the CUDA
build, on a GPU) and ``test_kernels_emulated.py`` (the same kernel sources on the CPU block emulator); the random
fast-weight inputs also by ``test_ops_fast_weight.py``.

Method: fresh random inputs for every case, rounded to the kernel's dtype; the reference runs in fp64 on
those rounded values upcast (the fast-weight chunk path, itself held to the step-by-step reference by
``test_ops_fast_weight.py``; the relative-attention reference of ``pretrain/ops/rel_attention/naive.py``); the
error of an output or gradient is ||out - ref|| / ||ref|| and must stay under 1e-5 for fp32 and 1e-2 for bf16
inputs; a NaN or inf anywhere fails.  The kernel module's outputs and workspaces are filled with NaN when
allocated (``set_poison``), so that an element no kernel writes fails the check.  The loss is a random
linear function of every output (the final state and the log-sum-exp included), so every gradient path is
exercised; the inputs must come back unmodified.
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch

from pretrain.ops.fast_weight import chunk as fw_chunk
from pretrain.ops.fast_weight import fused as fw_fused
from pretrain.ops.rel_attention import fused as ra_fused
from pretrain.ops.rel_attention import naive as ra_naive

F64 = torch.float64
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().to(F64), ref.detach().to(F64)
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))


def assert_close(name: str, out: torch.Tensor, ref: torch.Tensor, tol: float, finite_mask=None):
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    o, r = out.detach().to(F64), ref.detach().to(F64)
    if finite_mask is not None:
        assert torch.equal(torch.isinf(o) & ~finite_mask, torch.isinf(r) & ~finite_mask), \
            f"{name}: -inf where the reference has none (or the reverse)"
        o, r = o[finite_mask], r[finite_mask]
    assert torch.isfinite(o).all(), f"{name}: {int((~torch.isfinite(o)).sum())} non-finite elements " \
                                    f"(unwritten by the kernel?)"
    err = rel_err(o, r)
    assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"
    return err


def _random(shape, gen, device, scale=1.0):
    return (torch.randn(shape, generator=gen, dtype=F64) * scale).to(device)


def _leaves(tensors, dtypes, device):
    return [None if t is None else t.to(device=device, dtype=dt).clone().requires_grad_(True)
            for t, dt in zip(tensors, dtypes)]


# ----------------------------------------------------------------------------------------------------------
# fast weights

def fast_weight_inputs(gen: torch.Generator, B: int, H: int, T: int, Dk: int, Dv: int, init: bool = True):
    """Random fp64 q [B, H, T, Dk], k (L2-normalised: the delta rule's intended regime), v [B, H, T, Dv],
    beta [B, H, T] in (0, 1) and the initial state [B, H, Dk, Dv] (None unless ``init``), drawn from ``gen`` in
    that order."""
    q = torch.randn(B, H, T, Dk, generator=gen, dtype=F64)
    k = torch.nn.functional.normalize(torch.randn(B, H, T, Dk, generator=gen, dtype=F64), dim=-1)
    v = torch.randn(B, H, T, Dv, generator=gen, dtype=F64)
    beta = torch.rand(B, H, T, generator=gen, dtype=F64) * 0.98 + 0.01
    s0 = torch.randn(B, H, Dk, Dv, generator=gen, dtype=F64) if init else None
    return q, k, v, beta, s0


def check_fast_weight(rule: str, B: int, H: int, T: int, Dk: int, Dv: int, dtype: torch.dtype, chunk_size: int,
                      device, ext=None, init: bool = True, seed: int = 0, scale: float = 0.7) -> Dict[str, float]:
    """The fused delta / sum rule against the chunk path in fp64: o, final state and every gradient."""
    g = torch.Generator().manual_seed(seed)
    q, k, v, beta, s0 = fast_weight_inputs(g, B, H, T, Dk, Dv, init)
    go = torch.randn(B, H, T, Dv, generator=g, dtype=F64).to(device)
    gs = torch.randn(B, H, Dk, Dv, generator=g, dtype=F64).to(device)
    q, k, v, beta = (t.to(dtype).to(F64) for t in (q, k, v, beta))  # the values the kernel sees
    if rule == "sum":
        beta = None
    base = (q, k, v, beta, s0)

    ref = _leaves(base, [F64] * 5, device)
    fn = fw_chunk.delta_rule if rule == "delta" else (lambda q_, k_, v_, b_, **kw: fw_chunk.sum_rule(q_, k_, v_, **kw))
    o_r, s_r = fn(*ref[:4], scale=scale, initial_state=ref[4], chunk_size=64)
    ((o_r * go).sum() + (s_r * gs).sum()).backward()

    mine = _leaves(base, [dtype, dtype, dtype, dtype, torch.float32], device)
    before = [None if t is None else t.detach().clone() for t in mine]
    if rule == "delta":
        o, s = fw_fused.delta_rule(*mine[:4], scale=scale, initial_state=mine[4], chunk_size=chunk_size, ext=ext)
    else:
        o, s = fw_fused.sum_rule(*mine[:3], scale=scale, initial_state=mine[4], chunk_size=chunk_size, ext=ext)
    assert o.dtype == dtype and s.dtype == torch.float32
    ((o.to(F64) * go).sum() + (s.to(F64) * gs).sum()).backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    for name, t, t0 in zip("q k v beta initial_state".split(), mine, before):
        if t is not None:
            assert torch.equal(t.detach(), t0), f"{name} was modified in place"
    tol = TOL[dtype]
    errs = {"o": assert_close("o", o, o_r, tol), "final_state": assert_close("final_state", s, s_r, tol)}
    for name, a, b in zip("q k v beta initial_state".split(), mine, ref):
        if a is not None:
            errs["d" + name] = assert_close("grad " + name, a.grad, b.grad, tol)
    return errs


def check_fast_weight_segments(rule: str, device, ext=None, T1: int = 45, T2: int = 38, Dk: int = 24, Dv: int = 20,
                               chunk_size: int = 32, seed: int = 3):
    """Two segments with the state carried (not detached) equal one long segment: outputs, final state and
    the gradients of the first segment's inputs, which reach them only through the carried state."""
    g = torch.Generator().manual_seed(seed)
    B, H, T = 2, 2, T1 + T2
    q = torch.randn(B, H, T, Dk, generator=g, dtype=F64)
    k = torch.nn.functional.normalize(torch.randn(B, H, T, Dk, generator=g, dtype=F64), dim=-1)
    v = torch.randn(B, H, T, Dv, generator=g, dtype=F64)
    beta = torch.rand(B, H, T, generator=g, dtype=F64) * 0.98 + 0.01
    go = torch.randn(B, H, T, Dv, generator=g, dtype=F64).to(device)

    def run(split):
        leaves = _leaves((q, k, v, beta), [torch.float32] * 4, device)
        lq, lk, lv, lb = leaves
        kw = dict(chunk_size=chunk_size, ext=ext)
        call = (lambda a, b_, c, d, **x: fw_fused.delta_rule(a, b_, c, d, **x)) if rule == "delta" else \
            (lambda a, b_, c, d, **x: fw_fused.sum_rule(a, b_, c, **x))
        if split:
            o1, s1 = call(lq[:, :, :T1], lk[:, :, :T1], lv[:, :, :T1], lb[:, :, :T1], **kw)
            o2, s2 = call(lq[:, :, T1:], lk[:, :, T1:], lv[:, :, T1:], lb[:, :, T1:], initial_state=s1, **kw)
            o, s = torch.cat([o1, o2], 2), s2
        else:
            o, s = call(lq, lk, lv, lb, **kw)
        ((o.to(F64) * go).sum() + s.to(F64).square().sum()).backward()
        return o, s, [t.grad for t in (leaves if rule == "delta" else leaves[:3])]

    o_a, s_a, g_a = run(False)
    o_b, s_b, g_b = run(True)
    assert_close("o", o_b, o_a, 1e-5)
    assert_close("final_state", s_b, s_a, 1e-5)
    for name, a, b in zip("q k v beta".split(), g_b, g_a):
        assert_close("grad " + name + " (first segment through the state)", a[:, :, :T1], b[:, :, :T1], 1e-5)
        assert_close("grad " + name, a, b, 1e-5)


# ----------------------------------------------------------------------------------------------------------
# relative attention

def xl_case(H: int, B: int, N: int, M: int, D: int, valid=None, same_length=False, docs=False) -> dict:
    """Transformer-XL current queries over [memory (M) ; segment (N)] (positions.causal_mask, the document
    mask): sizes and frame arguments; r has the K + 1 rows of positions.causal_distances."""
    K = M + N
    frame = dict(r_offset=N - 1, q_start=M, order="past", window=M if same_length else 0)
    if valid is not None and M:
        frame["key_start"] = M - torch.as_tensor(valid)
    if docs:
        doc = torch.zeros(B, N, dtype=torch.long)
        doc[:, N // 3:] += 1
        doc[-1, (2 * N) // 3:] += 1
        frame["q_doc"], frame["k_doc"] = doc, torch.cat([torch.zeros(B, M, dtype=torch.long), doc], 1)
    return dict(H=H, B=B, R=N, C=K, P=K + 1, D=D, frame=frame)


def lookahead_case(H: int, B: int, N: int, M: int, D: int, full: bool, valid=None) -> dict:
    """LaMemo's memory queries over the window keys (positions.lookahead_mask, lookahead_distances)."""
    W = min(M, N)
    lo = M - W + 1
    frame = dict(r_offset=M - 1 if full else M - W, q_start=-lo, order="none" if full else "future")
    if full:
        frame["key_start"] = W - torch.as_tensor(valid if valid is not None else [M] * B).clamp(1, N)
    return dict(H=H, B=B, R=M, C=W, P=(M + W) if full else (M + 1), D=D, frame=frame)


def check_rel_attention(case: dict, dtype: torch.dtype, device, ext=None, seed: int = 0) -> Dict[str, float]:
    """The fused relative attention against the reference in fp64: o, lse and the gradients of q, k, v, r and
    both biases (the loss weighs o and lse)."""
    g = torch.Generator().manual_seed(seed)
    H, B, R, C, P, D = (case[x] for x in "H B R C P D".split())
    qscale = 1.0 / math.sqrt(D)
    base = [torch.randn(H, B, R, D, generator=g, dtype=F64) * qscale, torch.randn(H, B, C, D, generator=g, dtype=F64),
            torch.randn(H, B, C, D, generator=g, dtype=F64), torch.randn(H, P, D, generator=g, dtype=F64),
            torch.randn(H, D, generator=g, dtype=F64) * qscale, torch.randn(H, D, generator=g, dtype=F64) * qscale]
    base = [t.to(dtype).to(F64) for t in base]
    go = torch.randn(H, B, R, D, generator=g, dtype=F64).to(device)
    gl = torch.randn(H, B, R, generator=g, dtype=F64).to(device)
    frame = {k_: (t.to(device) if isinstance(t, torch.Tensor) else t) for k_, t in case["frame"].items()}

    ref = _leaves(base, [F64] * 6, device)
    o_r, l_r = ra_naive.rel_attention(*ref, **frame)
    seen = torch.isfinite(l_r)
    ((o_r * go).sum() + (l_r[seen] * gl[seen]).sum()).backward()

    mine = _leaves(base, [dtype] * 6, device)
    before = [t.detach().clone() for t in mine]
    o, lse = ra_fused.rel_attention(*mine, ext=ext, **frame)
    assert o.dtype == dtype and lse.dtype == torch.float32
    ((o.to(F64) * go).sum() + (lse.to(F64)[seen] * gl[seen]).sum()).backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    for name, t, t0 in zip("q k v r u w".split(), mine, before):
        assert torch.equal(t.detach(), t0), f"{name} was modified in place"
    tol = TOL[dtype]
    errs = {"o": assert_close("o", o, o_r, tol), "lse": assert_close("lse", lse, l_r, tol, finite_mask=seen)}
    for name, a, b in zip("q k v r u w".split(), mine, ref):
        errs["d" + name] = assert_close("grad " + name, a.grad, b.grad, tol)
    return errs


def xl_cases(D: int, N: int, M: int) -> Dict[str, dict]:
    """The XL frames every kernel check covers: plain, partial memories + same_length, documents."""
    B = 2
    valid = [M, max(M // 3, 1) if M else 0]
    return {"xl": xl_case(2, B, N, M, D),
            "xl_valid_same_length": xl_case(2, B, N, M, D, valid=valid, same_length=M > 0),
            "xl_documents": xl_case(2, B, N, M, D, valid=valid, docs=True)}


def lookahead_cases(D: int, N: int, M: int) -> Dict[str, dict]:
    return {"lookahead": lookahead_case(2, 2, N, M, D, full=False),
            "lookahead_full": lookahead_case(2, 2, N, M, D, full=True, valid=[M, max(M // 4, 0)])}


def model_config(d_head: int, vocab_size: int, N: int, M: int, **fields) -> dict:
    """The config of the whole-model checks: 2 layers of 2 heads of ``d_head`` (d_model 2 d_head, d_inner
    3 d_head), no dropout, segments of ``N`` tokens, a memory of ``M``, seed 5; ``fields``: the mechanism's
    (attn_type, fast_weight ...)."""
    return dict(n_layer=2, d_model=2 * d_head, n_head=2, d_head=d_head, d_inner=3 * d_head, vocab_size=vocab_size,
                dropout=0.0, tgt_len=N, mem_len=M, seed=5, **fields)


def model_inputs(vocab_size: int, N: int, seed: int, doc_starts=(), B: int = 2):
    """Tokens [B, 3N + 1] int64 (three segments of ``N`` and the last target) drawn from a generator seeded
    ``seed``, and the resets [B, 3N] bool, True at each (row, position) of ``doc_starts`` (None without any)."""
    tokens = torch.randint(0, vocab_size, (B, 3 * N + 1), generator=torch.Generator().manual_seed(seed))
    reset = None
    if doc_starts:
        reset = torch.zeros(B, 3 * N, dtype=torch.bool)
        for row, position in doc_starts:
            reset[row, position] = True
    return tokens, reset


def model_run(cfg_kw: dict, tokens: torch.Tensor, N: int, M: int, reset: Optional[torch.Tensor] = None,
              same_length: bool = False, device=None, dtype=torch.float32):
    """Build the model of ``cfg_kw`` and run it in training mode over the segments of ``tokens`` (the state
    carried with gradients); returns (nll [B, T], final state, {parameter: gradient})."""
    from pretrain.model import ModelConfig, build_model
    model = build_model(ModelConfig(**cfg_kw)).to(device=device, dtype=dtype)
    model.train()
    tokens = tokens.to(device)
    state = model.init_state(tokens.shape[0], mem_len=M, device=device)
    total, outs = 0.0, []
    for s in range(0, tokens.shape[1] - 1, N):
        out, state = model(tokens[:, s:s + N], state, tokens[:, s + 1:s + N + 1], detach_state=False,
                           same_length=same_length,
                           reset=None if reset is None else reset[:, s:s + N].to(device))
        outs.append(out.nll)
        total = total + out.nll.sum()
    total.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return torch.cat(outs, 1).detach(), state, grads
