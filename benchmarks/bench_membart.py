"""MemBART training speed and peak memory: tokens/s and the largest memory of one optimizer step over a rollout.

    python benchmarks/bench_membart.py                              # tiny and base shapes, table + JSON
    python benchmarks/bench_membart.py --sizes tiny --rounds 2      # a quick look
    python benchmarks/bench_membart.py --device cuda --sizes base --batch 8

One step = a rollout of ``--horizon`` time steps (MemBART's ``time_horizon``, 5 by default) of ``--batch`` rows:
every step encodes a source of ``tgt_len + 2`` tokens with the memory carried from the step before, decodes a
target of the same length, and the loss ``sum_t w_t nll_t`` (``w_t = 2^t / sum_s 2^s``, MemBART's weights) is
backpropagated through the whole rollout, then an AdamW step, through the engine's memory slots and batch class.
tokens/s counts source tokens (``batch x horizon x (tgt_len + 2)``).  Variants: ``bptt`` (plain backpropagation
through the rollout), ``mrbp`` (memory replay backpropagation, ``train.mrbp``: the rollout forward without a graph,
then one step at a time recomputed and backpropagated, last first: one step's activations instead of the
rollout's, about one more forward pass), ``nomem`` (plain BPTT with ``num_slots 0``: BART's cost, the memory's
overhead by difference).  Peak memory: on CUDA ``max_memory_allocated``; on
CPU the largest RSS of a fresh subprocess per variant (at the end of the rollout's forward, when every activation
is alive, or after the optimizer step).  Timings on a shared machine are not results: take figures on a quiet one.
"""
if __name__ == "__main__" and not __package__:
    import os, sys  # noqa: E401
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

from benchmarks.common import write_report

SIZES = {"tiny": "membart_tiny", "base": "membart_base"}
VARIANTS = ("bptt", "mrbp", "nomem")


class Runner:
    def __init__(self, size, variant, batch, horizon, device, seed=0):
        from pretrain.model import parallel
        from pretrain.model.membart.model import build_membart
        from pretrain.model.membart.config import load_membart_config
        parallel.initialize(1)
        over = {"dropout": 0.0}
        if variant == "nomem":
            over["num_slots"] = 0
        self.cfg = load_membart_config(SIZES[size], over)
        self.model = build_membart(self.cfg, device=device).train()
        self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-5)
        self.batch, self.horizon, self.device, self.variant = batch, horizon, device, variant
        from pretrain.engine.batch import Seq2SeqBatch, rollout_weights
        from pretrain.engine.memory_slots import MemorySlots
        g = torch.Generator().manual_seed(seed)
        L = self.cfg.max_source_len
        shape = (batch, horizon * L)
        self.rollout = Seq2SeqBatch(
            tokens=torch.randint(3, self.cfg.vocab_size, shape, generator=g).to(device),
            targets=torch.randint(3, self.cfg.vocab_size, shape, generator=g).to(device),
            loss_mask=torch.ones(shape, device=device), reset=torch.zeros(batch, dtype=torch.bool, device=device),
            source_mask=torch.ones(shape, dtype=torch.bool, device=device),
            step_resets=torch.zeros(batch, horizon, dtype=torch.bool, device=device),
            step_in_episode=torch.zeros(batch, horizon, dtype=torch.long, device=device),
            step_weights=rollout_weights(horizon))
        self.slots = MemorySlots(self.model, 1, batch, device, bptt_segments=horizon)
        self.times, self.losses = [], []

    @property
    def tokens_per_step(self) -> int:
        return self.batch * self.horizon * self.cfg.max_source_len

    def step(self, probe=None) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        count = self.rollout.num_scored()
        loss_fn = lambda seg, out: seg.masked_nll_sum(out.nll) / count  # noqa: E731
        if self.variant == "mrbp":          # one step's activations at a time (pretrain/engine/memory_slots.py)
            replay = self.slots.replay_forward(0, self.rollout, self.model)
            loss = sum(float(loss_fn(seg, out)) for seg, out in replay.outs)
            if probe:
                probe()
            replay.backward(loss_fn, lambda value, last: (value.backward(), 1.0)[1])
        else:                               # plain BPTT: the whole rollout's graph alive at once
            outs = self.slots.unroll(0, self.rollout, self.model)
            total = sum(loss_fn(seg, out) for seg, out in outs)
            if probe:
                probe()
            total.backward()
            loss = float(total)
        self.slots.commit(0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.losses.append(loss)
        return time.perf_counter() - t


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def memory_probe(size, variant, args) -> dict:
    device = torch.device(args.device)
    before = rss_mb()
    r = Runner(size, variant, args.batch, args.horizon, device)
    peak = [rss_mb()]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        r.step(probe=lambda: peak.append(rss_mb()))
        peak.append(rss_mb())
    out = {"rss_before_mb": before, "peak_rss_mb": max(peak)}
    if device.type == "cuda":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return out


def measure_memory(size, variant, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-probe", size, variant, "--batch", str(args.batch),
           "--horizon", str(args.horizon), "--device", args.device, "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(f"memory probe {size}/{variant} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="tiny,base", help=f"comma list of {sorted(SIZES)}")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {list(VARIANTS)}")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--horizon", type=int, default=5, help="time steps per rollout (MemBART's time_horizon)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=2, help="steps per variant per round")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--out", default="benchmarks/results/bench_membart.json", help="JSON output path")
    ap.add_argument("--memory-probe", nargs=2, metavar=("SIZE", "VARIANT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    for name, listed, known in (("--sizes", args.sizes, SIZES), ("--variants", args.variants, VARIANTS)):
        bad = [x for x in listed.split(",") if x not in known]
        if bad:
            ap.error(f"{name}: unknown {bad}")
    if args.memory_probe:
        print(json.dumps(memory_probe(*args.memory_probe, args)))
        return 0
    device = torch.device(args.device)
    report = {"machine": {"cpus": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
                          "python": platform.python_version(), "device": str(device),
                          "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None},
              "settings": {k: v for k, v in vars(args).items() if k != "memory_probe"}, "sizes": {}}
    for size in args.sizes.split(","):
        variants = args.variants.split(",")
        runners = {v: Runner(size, v, args.batch, args.horizon, device, seed=1) for v in variants}
        cfg = runners[variants[0]].cfg
        print(f"[{size}] d {cfg.d_model}, {cfg.encoder_layers}+{cfg.decoder_layers} layers, slots {cfg.num_slots}, "
              f"step {cfg.max_source_len} tokens x horizon {args.horizon}, batch {args.batch}, {device}", flush=True)
        for r in runners.values():
            for _ in range(args.warmup):
                r.step()
        for rnd in range(args.rounds):
            for r in runners.values():
                for _ in range(args.steps):
                    r.times.append(r.step())
            print(f"[{size}] round {rnd + 1}/{args.rounds}: " + "  ".join(
                f"{v} {r.tokens_per_step / statistics.median(r.times):,.0f} tok/s" for v, r in runners.items()),
                flush=True)
        results = {}
        for v, r in runners.items():
            med = statistics.median(r.times)
            results[v] = {"tokens_per_step": r.tokens_per_step, "median_step_s": med, "best_step_s": min(r.times),
                          "tokens_per_s_median": r.tokens_per_step / med, "final_loss": r.losses[-1],
                          "forward_gflop_per_step": args.horizon * r.model.flops(args.batch) / 1e9}
        del runners
        if not args.no_memory:
            for v in variants:
                results[v].update(measure_memory(size, v, args))
        report["sizes"][size] = results
        print(f"{'variant':8s} {'tok/s med':>10s} {'ms/step':>9s} {'GFLOP fwd':>10s} {'peak MB':>9s}")
        for v, res in results.items():
            peak = res.get("peak_cuda_mb", res.get("peak_rss_mb"))
            print(f"{v:8s} {res['tokens_per_s_median']:10,.0f} {res['median_step_s'] * 1e3:9.1f} "
                  f"{res['forward_gflop_per_step']:10.2f} {'-' if peak is None else f'{peak:9.0f}'}")
    write_report(args.out, report)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
