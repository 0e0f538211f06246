"""Chunkwise fast-weight ops against the step-wise reference: forward + backward tokens/s on CPU.

    python benchmarks/bench_ops_fast_weight.py                      # T 128..2048, Dk = Dv 32 and 64, both rules
    python benchmarks/bench_ops_fast_weight.py --quick              # a tiny smoke run (seconds)

One call = ``delta_rule`` / ``sum_rule`` forward on q, k, v (beta) of shape [B, H, T, D] with an initial state,
then backward of a fixed random linear function of the output and the final state (gradients to every input
and the state), fp32.  Variants of one configuration are timed in the same process, interleaved in rounds
(each round calls every variant once) so that load from other processes hits them alike:

* ``naive``: the step-by-step reference (one Python step per token, the baseline);
* ``chunk``: the chunkwise-parallel path (``--chunk-size``);
* ``chunk+reset``: the same with document resets inside the segment (``--reset-every`` tokens apart on
  average), the masked path used when documents are packed.

Tokens/s counts B x T tokens per call (all heads).  The table gives the median (and best) and the speed-up
of each variant over ``naive`` in the same run.  Prints a table and writes JSON (``--out``).
"""
if __name__ == "__main__" and not __package__:
    import os, sys
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import os
import platform
import statistics
import sys
import time

import torch

from benchmarks.common import finish

VARIANTS = ("naive", "chunk", "chunk+reset")


def make_call(rule, variant, B, H, T, D, chunk_size, reset_every, seed):
    """A closure running one forward + backward of ``variant`` on fixed random inputs."""
    from pretrain.ops.fast_weight import delta_rule, sum_rule
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g)
    k = torch.nn.functional.normalize(torch.randn(B, H, T, D, generator=g), dim=-1)   # delta rule's regime
    v = torch.randn(B, H, T, D, generator=g)
    beta = torch.rand(B, H, T, generator=g)
    s0 = torch.randn(B, H, D, D, generator=g) * 0.1
    go, gs = torch.randn(B, H, T, D, generator=g), torch.randn(B, H, D, D, generator=g)
    reset = None
    if variant == "chunk+reset":
        reset = torch.rand(B, T, generator=g) < 1.0 / reset_every
    impl = "naive" if variant == "naive" else "chunk"
    leaves = [t.requires_grad_(True) for t in (q, k, v, beta, s0)]

    def call():
        for t in leaves:
            t.grad = None
        if rule == "delta":
            o, s = delta_rule(q, k, v, beta, initial_state=s0, reset=reset, impl=impl, chunk_size=chunk_size)
        else:
            o, s = sum_rule(q, k, v, initial_state=s0, reset=reset, impl=impl, chunk_size=chunk_size)
        ((o * go).sum() + (s * gs).sum()).backward()
    return call


def bench_config(rule, D, T, args):
    calls = {v: make_call(rule, v, args.batch, args.heads, T, D, args.chunk_size, args.reset_every, seed=T + D)
             for v in args.variants}
    for call in calls.values():
        for _ in range(args.warmup):
            call()
    times = {v: [] for v in calls}
    for _ in range(args.rounds):
        for v, call in calls.items():
            t = time.perf_counter()
            call()
            times[v].append(time.perf_counter() - t)
    tokens = args.batch * T
    res = {}
    for v, ts in times.items():
        med, best = statistics.median(ts), min(ts)
        res[v] = {"calls": len(ts), "median_s": med, "best_s": best, "tokens_per_s_median": tokens / med,
                  "tokens_per_s_best": tokens / best}
    base = res.get("naive")
    if base:
        for r in res.values():
            r["speedup_vs_naive_median"] = base["median_s"] / r["median_s"]
    return res


def table(results) -> str:
    lines = [f"{'rule':6s} {'D':>4s} {'T':>5s} {'variant':12s} {'tok/s med':>11s} {'tok/s best':>11s} "
             f"{'ms/call':>9s} {'vs naive':>9s}"]
    for r in results:
        for v, x in r["variants"].items():
            ratio = f"{x['speedup_vs_naive_median']:.1f}x" if "speedup_vs_naive_median" in x else "-"
            lines.append(f"{r['rule']:6s} {r['D']:4d} {r['T']:5d} {v:12s} {x['tokens_per_s_median']:11,.0f} "
                         f"{x['tokens_per_s_best']:11,.0f} {x['median_s'] * 1e3:9.1f} {ratio:>9s}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rules", default="delta,sum", help="comma list of delta,sum")
    ap.add_argument("--lengths", default="128,256,512,1024,2048", help="comma list of segment lengths T")
    ap.add_argument("--dims", default="32,64", help="comma list of head sizes (Dk = Dv)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {list(VARIANTS)}")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--chunk-size", type=int, default=64)
    ap.add_argument("--reset-every", type=float, default=200.0,
                    help="mean distance between document resets of chunk+reset (tokens)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5, help="timed calls per variant (interleaved)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: T 16,32, D 8, batch 2, heads 2, chunk 8, 2 rounds (checks the script, not speed)")
    ap.add_argument("--out", default="benchmarks/results/bench_ops_fast_weight.json", help="JSON output path")
    args = ap.parse_args(argv)
    if args.quick:
        args.lengths, args.dims, args.batch, args.heads, args.chunk_size = "16,32", "8", 2, 2, 8
        args.rounds, args.warmup, args.reset_every = 2, 0, 10.0
    try:
        rules = [r for r in args.rules.split(",") if r]
        lengths = [int(x) for x in args.lengths.split(",") if x]
        dims = [int(x) for x in args.dims.split(",") if x]
    except ValueError as e:
        ap.error(f"--lengths/--dims: {e}")
    args.variants = [v for v in args.variants.split(",") if v]
    for name, listed, allowed in (("--rules", rules, ("delta", "sum")), ("--variants", args.variants, VARIANTS)):
        bad = [x for x in listed if x not in allowed]
        if bad or not listed:
            ap.error(f"{name}: unknown or empty {bad}, expected a comma list of {list(allowed)}")
    if min(lengths + dims) < 1 or args.batch < 1 or args.heads < 1 or args.chunk_size < 1 or args.rounds < 1:
        ap.error("--lengths, --dims, --batch, --heads, --chunk-size and --rounds must be >= 1")
    torch.set_num_threads(args.threads)
    report = {"machine": {"cpus": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
                          "python": platform.python_version(), "processor": platform.processor()},
              "settings": vars(args), "dtype": "float32", "results": []}
    configs = [(r, d, t) for r in rules for d in dims for t in lengths]
    start = time.time()
    for i, (rule, D, T) in enumerate(configs):
        res = bench_config(rule, D, T, args)
        report["results"].append({"rule": rule, "D": D, "T": T, "variants": res})
        eta = (time.time() - start) / (i + 1) * (len(configs) - i - 1)
        rates = "  ".join(f"{v} {x['tokens_per_s_median']:,.0f}" for v, x in res.items())
        print(f"[{i + 1}/{len(configs)}] {rule} D={D} T={T}  tokens/s: {rates}  ETA {eta:.0f}s", flush=True)
    return finish(args.out, report, table(report["results"]))


if __name__ == "__main__":
    sys.exit(main())
