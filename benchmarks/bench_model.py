"""Training speed and peak memory of each attention / memory variant on CPU, against a no-memory baseline.

    python benchmarks/bench_model.py                       # tiny and small presets, table + JSON
    python benchmarks/bench_model.py --sizes tiny --variants none,xl,lamemo --rounds 8

One training step = forward, backward and an AdamW step on one segment (batch x tgt_len tokens), with
the memory carried from step to step.  Variants of one size are timed in the same process, interleaved in
rounds (each round runs a few steps of every variant), so that load from other processes on the machine
hits them alike; the table gives the median and best step time and the ratio to the "none" baseline (the
same layers, attn_type 0 with mem_len 0).  Peak memory is measured in a fresh subprocess per variant
(the largest RSS at the end of a forward pass, when all activations are alive, or after an optimizer
step; the increment over the RSS once the libraries are loaded is given too).
"""
if __name__ == "__main__" and not __package__:
    import os, sys
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

from benchmarks.common import finish

SIZES = {"tiny": "xl_tiny", "small": "xl_small"}       # the layer shapes come from these presets


def registry_variants():
    """Model overrides of each variant, from the mechanism registry: 'none' (XL layers without memory, the
    baseline), every attn_type by its alias (else mechanism name + code; codes that repeat another code's
    settings, and codes that cannot make a model alone, are left out), the benchmark variants of the stack-level
    memories (``bench_configs``: RMT with 8 or 16 memory tokens, RMT + XL), the hybrid of hybrid_tiny (three
    delta-rule layers to one XL layer) and that of slots_xl_tiny (XL layers alternating with Memformer slot
    layers)."""
    from pretrain.model import registry
    out = {"none": dict(attn_type=0, mem_len=0)}
    for mech in registry.mechanisms("stack").values():
        out.update({name: dict(kw) for name, kw in mech.bench_configs.items()})
    for mech in registry.mechanisms("mixer").values():
        names = {code: alias for alias, code in mech.aliases.items()}
        seen = []
        for code in sorted(mech.variants, key=lambda c: (c not in names, c)):
            var = mech.variants[code]
            key = (var.name, dict(var.settings))
            if key in seen or var.settings.get("standalone", True) is False:
                continue
            seen.append(key)
            kw = dict(attn_type=code)
            if not var.settings.get("memory"):
                kw["mem_len"] = 0
            out[names.get(code, f"{mech.name}{code}")] = kw
    out["hybrid"] = dict(layers="delta*3,xl")
    out["slots_xl"] = dict(layers="xl,slots")
    return out


VARIANTS = registry_variants()                         # model overrides of each variant


def override_flags(kw: dict, prefix: str = "model") -> list:
    """Command-line flags of a variant's overrides: ``--model.k v``, nested sections as dotted names
    (``{"rmt": {"num_mem_tokens": 8}}`` -> ``--model.rmt.num_mem_tokens 8``)."""
    out = []
    for k, v in kw.items():
        out += override_flags(v, f"{prefix}.{k}") if isinstance(v, dict) else [f"--{prefix}.{k}", str(v)]
    return out


OVERRIDES = {}                                         # every variant: e.g. dropout from --dropout


def build(size: str, variant: str, threads: int):
    from pretrain.model import build_model, load_model_config, parallel
    torch.set_num_threads(threads)
    parallel.initialize(1)
    cfg = load_model_config(SIZES[size], {**VARIANTS[variant], **OVERRIDES})
    model = build_model(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    return cfg, model, opt


class Runner:
    """One variant: model, optimizer, carried state and a token stream."""

    def __init__(self, size, variant, batch, threads, seed):
        self.cfg, self.model, self.opt = build(size, variant, threads)
        self.batch = batch
        self.state = self.model.init_state(batch)
        g = torch.Generator().manual_seed(seed)
        self.tokens = torch.randint(0, self.cfg.vocab_size, (batch, 64 * self.cfg.tgt_len + 1), generator=g)
        self.pos = 0
        self.times = []
        self.losses = []

    @property
    def tokens_per_step(self) -> int:
        return self.batch * self.cfg.tgt_len

    def step(self, probe=None) -> float:
        n = self.cfg.tgt_len
        if self.pos + n + 1 > self.tokens.shape[1]:
            self.pos = 0
        x = self.tokens[:, self.pos:self.pos + n]
        y = self.tokens[:, self.pos + 1:self.pos + n + 1]
        self.pos += n
        t = time.perf_counter()
        out, self.state = self.model(x, self.state, y)
        loss = out.nll.mean()
        if probe:
            probe()                                    # activations are all alive here
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t
        self.losses.append(loss.item())
        return dt


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def print_peak_rss(make_runner, steps):
    """The memory probe, run in a subprocess: print as JSON the RSS once the libraries are loaded and the
    largest RSS seen at the end of a forward pass (all activations alive) or after an optimizer step, over
    ``steps`` steps of the runner ``make_runner()`` builds (MB)."""
    from pretrain.model import lm, parallel  # noqa: F401  (import cost is not the model's)
    parallel.initialize(1)
    before = rss_mb()
    r = make_runner()
    peak = [rss_mb()]
    for _ in range(steps):
        r.step(probe=lambda: peak.append(rss_mb()))
        peak.append(rss_mb())
    print(json.dumps({"rss_before_mb": before, "peak_rss_mb": max(peak)}))


def run_memory_probe(script, flags, what):
    """Run ``script`` with ``flags`` (its ``--memory-probe`` call) in a fresh process and return the JSON it
    printed last; ``RuntimeError`` naming ``what`` with the end of its stderr when it fails."""
    out = subprocess.run([sys.executable, os.path.abspath(script), *flags], capture_output=True, text=True,
                         timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"memory probe {what} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory_probe(size, variant, batch, threads, steps):
    """Run in a subprocess: ``print_peak_rss`` of the variant."""
    print_peak_rss(lambda: Runner(size, variant, batch, threads, seed=0), steps)


def measure_memory(size, variant, args):
    return run_memory_probe(__file__, ["--memory-probe", size, variant, "--batch", str(args.batch),
                                       *(["--dropout", str(args.dropout)] if args.dropout is not None else []),
                                       "--threads", str(args.threads)], f"{size}/{variant}")


def time_in_rounds(runners, args, label=""):
    """Warm every runner up (``args.warmup`` steps), then time ``args.rounds`` rounds of ``args.steps`` steps of
    every runner in turn, so that load from other processes hits them alike; the step times go to
    ``runner.times``, and every round prints ``label``, the median tokens/s so far of each and an ETA."""
    for r in runners.values():                         # warm-up (allocator, first-call costs)
        for _ in range(args.warmup):
            r.step()
    start = time.time()
    for rnd in range(args.rounds):
        for r in runners.values():
            for _ in range(args.steps):
                r.times.append(r.step())
        done = rnd + 1
        eta = (time.time() - start) / done * (args.rounds - done)
        rates = "  ".join(f"{n} {r.tokens_per_step / statistics.median(r.times):,.0f}" for n, r in runners.items())
        print(f"{label}round {done}/{args.rounds}  tokens/s (median so far): {rates}  ETA {eta:.0f}s", flush=True)


def add_timing_flags(ap, unit: str, steps: int, warmup: int, out: str) -> None:
    """The flags of a benchmark timed by ``time_in_rounds`` with a peak-RSS probe and a JSON report: --batch,
    --threads, --rounds, --steps (per ``unit`` per round), --warmup, --no-memory, --out."""
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=steps, help=f"steps per {unit} per round")
    ap.add_argument("--warmup", type=int, default=warmup)
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-RSS subprocesses")
    ap.add_argument("--out", default=out, help="JSON output path")


def peak_rss_columns(result: dict) -> tuple:
    """(peak RSS, its increment over the RSS once the libraries are loaded) of a result as table cells (MB),
    "-" when it was not measured."""
    rss = f"{result['peak_rss_mb']:.0f}" if "peak_rss_mb" in result else "-"
    inc = f"+{result['peak_rss_mb'] - result['rss_before_mb']:.0f}" if "peak_rss_mb" in result else "-"
    return rss, inc


def machine_info(args) -> dict:
    """The machine a report was measured on."""
    return {"cpus": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
            "python": platform.python_version(), "processor": platform.processor()}


def bench_size(size, variants, args):
    from pretrain.model import load_model_config
    runners = {v: Runner(size, v, args.batch, args.threads, seed=1) for v in variants}
    cfg = load_model_config(SIZES[size])
    print(f"[{size}] {cfg.n_layer} layers, d {cfg.d_model}, {cfg.n_head} heads x {cfg.d_head}, FFN {cfg.d_inner}, "
          f"vocab {cfg.vocab_size}, segment {cfg.tgt_len}, memory {cfg.mem_len}, batch {args.batch}, "
          f"{args.threads} threads", flush=True)
    time_in_rounds(runners, args, f"[{size}] ")
    results = {}
    for v, r in runners.items():
        tokens = r.tokens_per_step
        med, best = statistics.median(r.times), min(r.times)
        results[v] = {"overrides": VARIANTS[v], "mem_len": r.cfg.mem_len, "tokens_per_step": tokens,
                      "steps": len(r.times),
                      "median_step_s": med, "best_step_s": best, "tokens_per_s_median": tokens / med,
                      "tokens_per_s_best": tokens / best, "forward_gflop_per_step": r.model.flops(args.batch,
                      r.cfg.tgt_len, r.cfg.mem_len) / 1e9, "final_loss": r.losses[-1]}
    base = results.get("none")
    for v, res in results.items():
        if base:
            res["speed_vs_none_median"] = res["tokens_per_s_median"] / base["tokens_per_s_median"]
            res["speed_vs_none_best"] = res["tokens_per_s_best"] / base["tokens_per_s_best"]
        if not args.no_memory:
            res.update(measure_memory(size, v, args))
    del runners
    return cfg, results


def table(size, cfg, results) -> str:
    lines = [f"{size}: {cfg.n_layer}L d{cfg.d_model} {cfg.n_head}x{cfg.d_head} FFN {cfg.d_inner} "
             f"N={cfg.tgt_len} M={cfg.mem_len}",
             f"{'variant':12s} {'M':>4s} {'tok/s med':>10s} {'tok/s best':>10s} {'vs none':>8s} {'ms/step':>8s} "
             f"{'GFLOP fwd':>9s} {'peak RSS MB':>11s} {'(+model)':>9s}"]
    for v, r in results.items():
        ratio = f"{r['speed_vs_none_median']:.2f}" if "speed_vs_none_median" in r else "-"
        rss, inc = peak_rss_columns(r)
        lines.append(f"{v:12s} {r['mem_len']:4d} {r['tokens_per_s_median']:10,.0f} {r['tokens_per_s_best']:10,.0f} "
                     f"{ratio:>8s} {r['median_step_s'] * 1e3:8.1f} {r['forward_gflop_per_step']:9.2f} {rss:>11s} "
                     f"{inc:>9s}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="tiny,small", help=f"comma list of {sorted(SIZES)}")
    ap.add_argument("--variants", default="none,xl,shaw,absolute,lamemo,lamemo31,lamemo32,lamemo33,linear,"
                                          "performer,dpfp_sum,delta,delta_favor,delta_dpfp,delta_norm,hybrid,"
                                          "slots,slots_xl,compressive,rmt8,rmt8_xl",
                    help=f"comma list of {list(VARIANTS)} ('none' is the baseline)")
    ap.add_argument("--small-variants", default="none,xl,lamemo,delta,linear,hybrid,slots,slots_xl,compressive,rmt8",
                    help="variants for the small size")
    add_timing_flags(ap, "variant", steps=4, warmup=3, out="benchmarks/results/bench_model.json")
    ap.add_argument("--dropout", type=float, default=0.0,
                    help="dropout of every variant (default 0.0, the original Transformer-XL code's default)")
    ap.add_argument("--memory-probe", nargs=2, metavar=("SIZE", "VARIANT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    from pretrain.runtime import tune_cpu_allocator
    tune_cpu_allocator()
    if args.dropout is not None:
        OVERRIDES["dropout"] = args.dropout
    if args.memory_probe:
        memory_probe(*args.memory_probe, args.batch, args.threads, steps=3)
        return 0
    sizes = [s for s in args.sizes.split(",") if s]
    for name, listed in (("--sizes", sizes), ("--variants", args.variants.split(",")),
                         ("--small-variants", args.small_variants.split(","))):
        bad = [x for x in listed if x not in (SIZES if name == "--sizes" else VARIANTS)]
        if bad:
            ap.error(f"{name}: unknown {bad}")
    report = {"machine": machine_info(args),
              "settings": {k: v for k, v in vars(args).items() if k != "memory_probe"},
              "optimizer": "torch.optim.AdamW(fused=True)", "sizes": {}}
    texts = []
    for size in sizes:
        variants = (args.variants if size == "tiny" else args.small_variants).split(",")
        cfg, results = bench_size(size, variants, args)
        report["sizes"][size] = {"preset": SIZES[size], "results": results}
        texts.append(table(size, cfg, results))
    return finish(args.out, report, "\n\n".join(texts))


if __name__ == "__main__":
    sys.exit(main())
