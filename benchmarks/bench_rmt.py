"""Training speed and peak memory of the Recurrent Memory Transformer beside Transformer-XL, and the cost of
backpropagation through k segments.

    python benchmarks/bench_rmt.py                                   # the tiny byte-level model, table + JSON
    python benchmarks/bench_rmt.py --runs xl@1,rmt8@1,rmt8@4 --rounds 8 --batch 16 --threads 2

A run is ``variant@k``: the model overrides of a registry benchmark variant (bench_model.py's: ``none``, ``xl``,
``rmt8`` / ``rmt16`` = 8 / 16 memory tokens without the XL cache, ``rmt8_xl`` = 8 memory tokens and the XL
cache) on the layers of ``--preset`` (default xl_tiny: 4 layers, d 128, byte-level, segment 64, memory 64), and
k segments per training step: the state carried with gradients through the k segments (detached after the
last, as the engine's ``train.bptt_segments``), the loss of all k backpropagated at once, then an AdamW step.
Tokens per step = batch x segment x k (memory positions are not counted: they predict nothing).

Runs are timed in one process, interleaved in rounds (each round runs a few steps of every run), so that load
from other processes hits them alike; the table gives the median and best tokens/s and the ratio to the first
run.  Peak memory: the largest RSS of a fresh subprocess per run at the end of a forward pass (all activations
alive) or after an optimizer step, and its increase over the RSS once the libraries are loaded.

For scale (the task's reference, not measured here): the original RMT code (LM-RMT, fp32, 2 threads) trains this
4-layer d 128 byte-level model with 8 memory tokens at about 10.2k tokens/s (segment 64, batch 16), and
RMT + XL (memory 64) at about 7.9k tokens/s.
"""
if __name__ == "__main__" and not __package__:
    import os, sys
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import statistics
import sys
import time

import torch

from benchmarks.bench_model import (VARIANTS, add_timing_flags, machine_info, peak_rss_columns, print_peak_rss,
                                    run_memory_probe, time_in_rounds)
from benchmarks.common import finish

REFERENCE = {"rmt8@1": 10.2e3, "rmt8_xl@1": 7.9e3}   # the original code's tokens/s on the same model (see above)


def parse_run(text: str):
    """``variant@k`` -> (variant, k); ValueError naming the entry on a bad one."""
    name, _, k = text.partition("@")
    if name not in VARIANTS:
        raise ValueError(f"{text!r}: unknown variant {name!r} (known: {', '.join(VARIANTS)})")
    if not k.isdigit() or int(k) < 1:
        raise ValueError(f"{text!r}: the segments per step after '@' must be an integer >= 1")
    return name, int(k)


class Runner:
    """One run: model, optimizer, the carried state and a token stream; ``step`` trains on k segments."""

    def __init__(self, preset: str, variant: str, k: int, batch: int, threads: int, seed: int):
        from pretrain.model import build_model, load_model_config, parallel
        torch.set_num_threads(threads)
        parallel.initialize(1)
        # a variant without memory tokens has none, whatever the preset says
        self.cfg = load_model_config(preset, {"rmt": {"num_mem_tokens": 0}, **VARIANTS[variant], "dropout": 0.0})
        self.model = build_model(self.cfg).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=True)
        self.k, self.batch = k, batch
        self.state = self.model.init_state(batch)
        g = torch.Generator().manual_seed(seed)
        self.tokens = torch.randint(0, self.cfg.vocab_size, (batch, 64 * self.cfg.tgt_len + 1), generator=g)
        self.pos = 0
        self.times, self.losses = [], []

    @property
    def tokens_per_step(self) -> int:
        return self.batch * self.cfg.tgt_len * self.k

    def step(self, probe=None) -> float:
        n = self.cfg.tgt_len
        if self.pos + self.k * n + 1 > self.tokens.shape[1]:
            self.pos = 0
        t = time.perf_counter()
        loss, st = 0.0, self.state
        for j in range(self.k):
            x = self.tokens[:, self.pos:self.pos + n]
            y = self.tokens[:, self.pos + 1:self.pos + n + 1]
            self.pos += n
            out, st = self.model(x, st, y, detach_state=(j == self.k - 1))
            loss = loss + out.nll.mean()
        if probe:
            probe()                                    # every activation of the k segments is alive here
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.state = st
        dt = time.perf_counter() - t
        self.losses.append(loss.item() / self.k)
        return dt


def memory_probe(preset, run, batch, threads, steps):
    """Run in a subprocess: ``print_peak_rss`` of the run."""
    print_peak_rss(lambda: Runner(preset, *parse_run(run), batch, threads, seed=0), steps)


def measure_memory(run, args):
    return run_memory_probe(__file__, ["--memory-probe", run, "--preset", args.preset, "--batch", str(args.batch),
                                       "--threads", str(args.threads)], run)


def table(results, first) -> str:
    lines = [f"{'run':12s} {'K':>3s} {'M':>4s} {'k':>2s} {'tok/s med':>10s} {'tok/s best':>10s} "
             f"{'vs ' + first:>12s} {'ms/step':>8s} {'peak RSS MB':>11s} {'(+model)':>9s} {'ref tok/s':>9s}"]
    for run, r in results.items():
        rss, inc = peak_rss_columns(r)
        ref = f"{REFERENCE[run]:,.0f}" if run in REFERENCE else "-"
        lines.append(f"{run:12s} {r['mem_tokens']:3d} {r['mem_len']:4d} {r['k']:2d} {r['tokens_per_s_median']:10,.0f} "
                     f"{r['tokens_per_s_best']:10,.0f} {r['vs_first_median']:12.2f} {r['median_step_s'] * 1e3:8.1f} "
                     f"{rss:>11s} {inc:>9s} {ref:>9s}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="xl@1,rmt8@1,rmt16@1,rmt8_xl@1,none@1,rmt8@2,rmt8@3,rmt8@4,xl@2,xl@4",
                    help="comma list of variant@k (k: segments per step with gradients through the memory)")
    ap.add_argument("--preset", default="xl_tiny", help="the layer shapes (a preset name)")
    add_timing_flags(ap, "run", steps=3, warmup=2, out="benchmarks/results/bench_rmt.json")
    ap.add_argument("--memory-probe", metavar="RUN", help=argparse.SUPPRESS)
    return ap


def main(argv=None):
    ap = build_parser()
    args = ap.parse_args(argv)
    from pretrain.runtime import tune_cpu_allocator
    tune_cpu_allocator()
    if args.memory_probe:
        memory_probe(args.preset, args.memory_probe, args.batch, args.threads, steps=2)
        return 0
    names = [r for r in args.runs.split(",") if r]
    try:
        runs = [parse_run(r) for r in names]
    except ValueError as e:
        ap.error(f"--runs: {e}")
    if not runs:
        ap.error("--runs: empty")
    runners = {name: Runner(args.preset, v, k, args.batch, args.threads, seed=1) for name, (v, k) in zip(names, runs)}
    cfg = next(iter(runners.values())).cfg
    print(f"{args.preset}: {cfg.n_layer} layers, d {cfg.d_model}, {cfg.n_head} heads x {cfg.d_head}, FFN "
          f"{cfg.d_inner}, segment {cfg.tgt_len}, batch {args.batch}, {args.threads} threads", flush=True)
    time_in_rounds(runners, args)
    results = {}
    for name, r in runners.items():
        med, best = statistics.median(r.times), min(r.times)
        results[name] = {"variant": name.split("@")[0], "k": r.k, "overrides": VARIANTS[name.split("@")[0]],
                         "mem_len": r.cfg.mem_len, "mem_tokens": r.cfg.rmt.num_mem_tokens,
                         "tokens_per_step": r.tokens_per_step, "steps": len(r.times), "median_step_s": med,
                         "best_step_s": best, "tokens_per_s_median": r.tokens_per_step / med,
                         "tokens_per_s_best": r.tokens_per_step / best, "final_loss": r.losses[-1]}
    base = results[names[0]]
    for name, res in results.items():
        res["vs_first_median"] = res["tokens_per_s_median"] / base["tokens_per_s_median"]
        if name in REFERENCE:
            res["reference_tokens_per_s"] = REFERENCE[name]
            res["vs_reference_median"] = res["tokens_per_s_median"] / REFERENCE[name]
        if not args.no_memory:
            res.update(measure_memory(name, args))
    del runners
    report = {"machine": machine_info(args),
              "settings": {k: v for k, v in vars(args).items() if k != "memory_probe"},
              "model": {"preset": args.preset, "n_layer": cfg.n_layer, "d_model": cfg.d_model, "segment": cfg.tgt_len},
              "optimizer": "torch.optim.AdamW(fused=True)", "results": results}
    return finish(args.out, report, table(results, names[0]))


if __name__ == "__main__":
    sys.exit(main())
