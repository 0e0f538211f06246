"""The fused CUDA kernels against the PyTorch paths and the libraries that bound them, in one run.

    python benchmarks/kernels.py --out $OUT/kernels.json          # on a GPU machine (scripts/gpu_check.sh)
    python benchmarks/kernels.py --quick --out /tmp/kernels.json  # a tiny smoke run, also on CPU

Needs only torch (and, for the comparison rows, fla-core with Triton; for the end-to-end rows megatron-core),
so that it runs on the GPU machines' image.  Parts:

1. **Delta rule**, forward + backward (gradients of q, k, v, beta and the initial state, from a random linear
   function of the output and the final state), bf16 inputs, fp32 state, B x T = ``--tokens`` per call,
   ``--heads`` heads, head size ``--head-sizes``, T in ``--lengths``:
   ``fused`` (csrc/fast_weight), ``chunk`` (our chunkwise PyTorch path), ``fla`` (fla-core's Triton
   ``chunk_delta_rule``, when it imports).  FLOPs: the forward multiply-adds of the chunkwise algorithm
   (C = 64: K K^T, Q K^T, the UT transform, W' and U', the state reads and writes), times 3 for forward +
   backward, the same count for every implementation, so the TFLOP/s column compares times.
2. **Relative attention** over [memory ; segment] with M = N, forward + backward (o and the log-sum-exp):
   ``fused`` (csrc/rel_attention), ``reference`` (the PyTorch path of the XL/LaMemo mixers; skipped when its
   score matrices would exceed ``--ref-mem-gb``), and ``sdpa``: torch's scaled_dot_product_attention (flash
   backend on CUDA) on the same shapes *without* relative positions, the speed bound.  FLOPs: 2 per
   multiply-add over the visible pairs (q.k, q.r, p.v; sdpa: q.k, p.v), times 3.5 for forward + backward
   (FlashAttention-2's convention).  Peak memory of one forward + backward (above what was allocated before).
3. **End to end**: training tokens/s (forward, backward, AdamW) of ``--e2e-presets`` in bf16 with and without
   the fused kernels (``pretrain.ops.kernels.set_enabled``), timing the model's own training step (not the
   DeepSpeed engine: the GPU image has no DeepSpeed); the paths that ran are recorded from the logs.

Timing: CUDA events around each call after ``--warmup`` calls, median of ``--reps`` (on CPU, a wall clock).
The bf16 matrix-product peak is measured at the start (an 8192^3 product on random data).  Prints a table
per part and writes JSON (device name, versions, every row) to ``--out`` (a temporary name, then a rename).
A part that fails is recorded with its error and the run goes on; ``--budget-s`` bounds the whole run.
"""
if __name__ == "__main__" and not __package__:
    import os, sys
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import contextlib
import logging
import math
import platform
import statistics
import sys
import time
import traceback

import warnings

import torch
import torch.nn.functional as F

from benchmarks.common import write_report
from pretrain.ops import kernels

warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")


class Budget:
    def __init__(self, seconds):
        self.end = time.monotonic() + seconds

    def left(self):
        return self.end - time.monotonic()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, warmup, reps):
    """Median and min milliseconds of ``fn()`` over ``reps`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), min(times)


def peak_memory_mib(fn, device):
    """Peak memory of one ``fn()`` above what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20


def matmul_peak(device, n, reps):
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    med, _ = timed(lambda: a @ b, device, 3, reps)
    return 2 * n ** 3 / (med * 1e-3) / 1e12


def measure_kernel(row, make_fn, flops, tokens, args, device, peak, budget, rows):
    """Time the call ``make_fn()`` builds (``timed``, ``args.warmup`` and ``args.reps`` calls) into ``row``: median
    and best ms, TFLOP/s at ``flops`` per call, ``tokens`` per second, peak memory and, with ``peak`` (TFLOP/s),
    the fraction of it; or why not (``skipped`` when under 5 s of the time budget are left, ``error`` when the call
    raises).  The row goes to ``rows`` either way."""
    if budget.left() < 5:
        row["skipped"] = "time budget"
        rows.append(row)
        return
    try:
        fn = make_fn()
        med, best = timed(fn, device, args.warmup, args.reps)
        row.update(ms=med, best_ms=best, tflops=flops / (med * 1e-3) / 1e12,
                   tokens_per_s=tokens / (med * 1e-3), mem_mib=peak_memory_mib(fn, device))
        if peak:
            row["frac_of_peak"] = row["tflops"] / peak
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    rows.append(row)
    free(device)


# ----------------------------------------------------------------------------------------------------------
# 1. delta rule

def delta_rule_flops(B, H, T, Dk, Dv, C=64):
    """Forward multiply-adds x 2 of the chunkwise delta rule (module docstring), per call."""
    n = math.ceil(T / C)
    per_chunk = 6 * C * C * Dk + 4 * C * C * Dv + 6 * C * Dk * Dv + C ** 3 / 3
    return B * H * n * per_chunk


def delta_rule_call(impl, B, H, T, D, device, seed=0):
    from pretrain.ops.fast_weight import delta_rule
    g = torch.Generator(device=device).manual_seed(seed)
    dt = torch.bfloat16
    q = torch.randn(B, H, T, D, device=device, generator=g).to(dt)
    k = F.normalize(torch.randn(B, H, T, D, device=device, generator=g), dim=-1).to(dt)
    v = torch.randn(B, H, T, D, device=device, generator=g).to(dt)
    beta = torch.rand(B, H, T, device=device, generator=g).to(dt)
    s0 = torch.randn(B, H, D, D, device=device, generator=g) * 0.1
    go = torch.randn(B, H, T, D, device=device, generator=g).to(dt)
    gs = torch.randn(B, H, D, D, device=device, generator=g)
    if impl == "fla":
        from fla.ops.delta_rule import chunk_delta_rule
        q, k, v, go = (t.transpose(1, 2).contiguous() for t in (q, k, v, go))   # fla: [B, T, H, D]
        beta = beta.transpose(1, 2).contiguous()
        leaves = [t.requires_grad_(True) for t in (q, k, v, beta, s0)]

        def run():
            o, s = chunk_delta_rule(q, k, v, beta, scale=1.0, initial_state=s0, output_final_state=True)
            torch.autograd.grad([o, s], leaves, [go, gs])
        return run
    leaves = [t.requires_grad_(True) for t in (q, k, v, beta, s0)]

    def run():
        o, s = delta_rule(q, k, v, beta, initial_state=s0, output_final_state=True, impl=impl, chunk_size=64)
        torch.autograd.grad([o, s], leaves, [go, gs])
    return run


def fla_reason(device):
    if device.type != "cuda":
        return "fla's Triton kernels need CUDA"
    try:
        import triton  # noqa: F401
        from fla.ops.delta_rule import chunk_delta_rule  # noqa: F401
    except Exception as e:           # ImportError, or Triton failing to find a driver
        return f"fla-core not importable ({type(e).__name__}: {e})"
    return None


def part_delta_rule(args, device, peak, budget, rows, notes):
    impls = ["fused", "chunk", "fla"]
    why = {"fused": kernels.unavailable_reason(device), "chunk": None, "fla": fla_reason(device)}
    for name, reason in why.items():
        if reason:
            notes.append(f"delta rule {name}: not run ({reason})")
    for D in args.head_sizes:
        for T in args.lengths:
            B = max(1, args.tokens // T)
            flops = 3 * delta_rule_flops(B, args.heads, T, D, D)
            for impl in impls:
                row = dict(part="delta_rule", impl=impl, B=B, H=args.heads, T=T, D=D)
                if why[impl]:
                    continue
                measure_kernel(row, lambda: delta_rule_call(impl, B, args.heads, T, D, device), flops, B * T, args,
                               device, peak, budget, rows)


# ----------------------------------------------------------------------------------------------------------
# 2. relative attention

def rel_attention_call(impl, B, H, N, M, D, device, seed=0):
    from pretrain.ops.rel_attention import rel_attention
    g = torch.Generator(device=device).manual_seed(seed)
    dt = torch.bfloat16
    K = M + N
    q = (torch.randn(H, B, N, D, device=device, generator=g) / math.sqrt(D)).to(dt)
    k, v = (torch.randn(H, B, K, D, device=device, generator=g).to(dt) for _ in range(2))
    go = torch.randn(H, B, N, D, device=device, generator=g).to(dt)
    if impl == "sdpa":
        from torch.nn.attention.bias import causal_lower_right
        q, k, v, go = (t.transpose(0, 1).contiguous() for t in (q, k, v, go))      # [B, H, L, D]
        mask = causal_lower_right(N, K)
        leaves = [t.requires_grad_(True) for t in (q, k, v)]
        ctx = contextlib.nullcontext
        if device.type == "cuda":
            from torch.nn.attention import SDPBackend, sdpa_kernel
            ctx = lambda: sdpa_kernel([SDPBackend.FLASH_ATTENTION])  # noqa: E731

        def run():
            with ctx():
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
            torch.autograd.grad([o], leaves, [go])
        return run
    r = torch.randn(H, K + 1, D, device=device, generator=g).to(dt)
    u, w = ((torch.randn(H, D, device=device, generator=g) / math.sqrt(D)).to(dt) for _ in range(2))
    gl = torch.randn(H, B, N, device=device, generator=g)
    leaves = [t.requires_grad_(True) for t in (q, k, v, r, u, w)]

    def run():
        o, lse = rel_attention(q, k, v, r, u, w, r_offset=N - 1, q_start=M, order="past", impl=impl)
        torch.autograd.grad([o, lse], leaves, [go, gl])
    return run


def part_rel_attention(args, device, peak, budget, rows, notes):
    why = {"fused": kernels.unavailable_reason(device), "reference": None, "sdpa": None}
    if why["fused"]:
        notes.append(f"relative attention fused: not run ({why['fused']})")
    for D in args.attn_head_sizes:
        for N in args.attn_lengths:
            M = N
            B = max(1, args.attn_tokens // N)
            H = args.heads
            pairs = N * M + N * (N + 1) // 2
            for impl in ("fused", "reference", "sdpa"):
                row = dict(part="rel_attention", impl=impl, B=B, H=H, N=N, M=M, D=D)
                if why[impl]:
                    continue
                ref_gb = 6 * 4 * H * B * N * (M + N) / 1e9
                if impl == "reference" and ref_gb > args.ref_mem_gb:
                    row["skipped"] = f"score matrices ~{ref_gb:.0f} GB > --ref-mem-gb {args.ref_mem_gb}"
                    rows.append(row)
                    continue
                flops = 3.5 * 2 * B * H * pairs * D * (2 if impl == "sdpa" else 3)
                measure_kernel(row, lambda: rel_attention_call(impl, B, H, N, M, D, device), flops, B * N, args,
                               device, peak, budget, rows)


# ----------------------------------------------------------------------------------------------------------
# 3. end to end

class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages = set()

    def emit(self, record):
        msg = record.getMessage()
        if "implementation on" in msg or "attention:" in msg:
            self.messages.add(msg)


def _reset_path_logs():
    """Forget which paths were logged, so that each run logs its own."""
    import pretrain.ops.fast_weight as fw
    import pretrain.ops.rel_attention as ra
    fw._logged.clear()
    ra._logged.clear()
    try:
        from pretrain.model.modules import rel_attention
        rel_attention._paths_logged.clear()
    except ImportError:
        pass


def part_e2e(args, device, budget, rows, notes):
    try:
        from pretrain.model import build_model, load_model_config, parallel
        import megatron.core  # noqa: F401
    except ImportError as e:
        notes.append(f"end to end: not run (the model needs megatron-core: {e}); bring its wheel, see "
                     f"docs/kernels.md")
        return
    parallel.initialize(1)
    cap = _Capture()
    logging.getLogger("pretrain").addHandler(cap)
    logging.getLogger("pretrain").setLevel(logging.INFO)
    try:
        for preset in args.e2e_presets:
            for fused in (True, False):
                row = dict(part="e2e", preset=preset, fused=fused, B=args.e2e_batch, dtype="bf16")
                if budget.left() < 20:
                    row["skipped"] = "time budget"
                    rows.append(row)
                    continue
                prev = kernels.set_enabled(fused)
                _reset_path_logs()
                cap.messages.clear()
                try:
                    cfg = load_model_config(preset)
                    model = build_model(cfg).to(device=device, dtype=torch.bfloat16).train()
                    opt = torch.optim.AdamW(model.parameters(), lr=1e-4,
                                            **({"fused": True} if device.type == "cuda" else {}))
                    B, N = args.e2e_batch, cfg.tgt_len
                    g = torch.Generator().manual_seed(0)
                    tokens = torch.randint(0, cfg.vocab_size, (B, N + 1), generator=g).to(device)
                    state = [model.init_state(B)]

                    def step():
                        out, state[0] = model(tokens[:, :N], state[0], tokens[:, 1:])
                        out.nll.mean().backward()
                        opt.step()
                        opt.zero_grad(set_to_none=True)
                    med, best = timed(step, device, args.warmup, args.e2e_reps)
                    row.update(N=N, M=cfg.mem_len, ms=med, best_ms=best, tokens_per_s=B * N / (med * 1e-3),
                               params_m=sum(p.numel() for p in model.parameters()) / 1e6,
                               paths=sorted(cap.messages), mem_mib=peak_memory_mib(step, device))
                    del model, opt, state
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                    traceback.print_exc()
                finally:
                    kernels.set_enabled(prev)
                rows.append(row)
                free(device)
    finally:
        logging.getLogger("pretrain").removeHandler(cap)


# ----------------------------------------------------------------------------------------------------------

def free(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def print_table(rows, part, keys):
    sel = [r for r in rows if r["part"] == part]
    if not sel:
        return
    print(f"\n{part}")
    head = keys + ["ms", "TFLOP/s", "% peak", "tokens/s", "MiB", "note"]
    print("  ".join(f"{h:>10}" for h in head))
    for r in sel:
        note = r.get("skipped") or r.get("error") or ""
        if part == "e2e" and r.get("paths"):
            note = "; ".join(r["paths"])
        cells = [str(r.get(k, "")) for k in keys] + [
            fmt(r.get("ms"), ".2f"), fmt(r.get("tflops"), ".2f"),
            fmt(None if r.get("frac_of_peak") is None else 100 * r["frac_of_peak"], ".1f"),
            fmt(r.get("tokens_per_s"), ",.0f"), fmt(r.get("mem_mib"), ",.0f"), note[:90]]
        print("  ".join(f"{c:>10}" for c in cells))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run; also on CPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    p.add_argument("--head-sizes", type=int, nargs="+", default=[64, 128])
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--tokens", type=int, default=32768, help="B x T per delta-rule call")
    p.add_argument("--attn-lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    p.add_argument("--attn-head-sizes", type=int, nargs="+", default=[64, 128])
    p.add_argument("--attn-tokens", type=int, default=16384, help="B x N per attention call")
    p.add_argument("--ref-mem-gb", type=float, default=40.0, help="skip the attention reference above this")
    p.add_argument("--e2e-presets", nargs="+", default=["lamemo_enwik8_base", "fastweight_wt103_small"])
    p.add_argument("--e2e-batch", type=int, default=16)
    p.add_argument("--e2e-reps", type=int, default=5)
    p.add_argument("--skip", nargs="*", default=[], choices=["delta_rule", "rel_attention", "e2e"])
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--peak-size", type=int, default=8192)
    p.add_argument("--budget-s", type=float, default=300.0, help="stop starting new measurements after this")
    args = p.parse_args(argv)
    if args.quick:
        args.lengths, args.head_sizes, args.heads, args.tokens = [64, 128], [16], 2, 256
        args.attn_lengths, args.attn_head_sizes, args.attn_tokens = [32, 64], [16], 128
        args.e2e_presets, args.e2e_batch, args.e2e_reps = ["lamemo_tiny", "delta_tiny"], 2, 2
        args.warmup, args.reps, args.peak_size = 1, 2, 256
    device = torch.device(args.device)
    budget = Budget(args.budget_s)
    info = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
                torch=torch.__version__, cuda=torch.version.cuda, python=platform.python_version(),
                date=time.strftime("%Y-%m-%d %H:%M:%S"), argv=sys.argv[1:], quick=args.quick)
    rows, notes = [], []
    t0 = time.monotonic()
    peak = None
    if device.type == "cuda":
        try:
            peak = matmul_peak(device, args.peak_size, args.reps)
        except Exception as e:
            notes.append(f"matmul peak not measured: {e}")
    else:
        notes.append("no bf16 matmul peak on CPU (the % peak column is for GPUs)")
    info["peak_bf16_matmul_tflops"] = peak
    print(f"device: {info['device']}  torch {info['torch']} (CUDA {info['cuda']})  "
          f"bf16 matmul peak {fmt(peak, '.1f')} TFLOP/s ({args.peak_size}^3, random data)")
    for name, fn in (("delta_rule", lambda: part_delta_rule(args, device, peak, budget, rows, notes)),
                     ("rel_attention", lambda: part_rel_attention(args, device, peak, budget, rows, notes)),
                     ("e2e", lambda: part_e2e(args, device, budget, rows, notes))):
        if name in args.skip:
            continue
        try:
            fn()
        except Exception as e:
            notes.append(f"{name}: failed ({type(e).__name__}: {e})")
            traceback.print_exc()
    info["seconds"] = time.monotonic() - t0
    print_table(rows, "delta_rule", ["impl", "B", "H", "T", "D"])
    print_table(rows, "rel_attention", ["impl", "B", "H", "N", "M", "D"])
    print_table(rows, "e2e", ["preset", "fused", "B", "N"])
    for n in notes:
        print("note:", n)
    out = dict(info, rows=rows, notes=notes)
    write_report(args.out, out, indent=1)
    print(f"wrote {args.out} ({info['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
