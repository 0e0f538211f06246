"""Backpropagation through k segments: plain unrolled BPTT against memory replay backpropagation (MRBP), time and
peak memory per micro-batch, for k = 1, 2, 4, 8.

    python benchmarks/bench_mrbp.py                                   # xl, delta, slots on the tiny shapes
    python benchmarks/bench_mrbp.py --variants xl --ks 1,2,4,8,16 --batch 16

One step = the k segments of a micro-batch forward and backward through the engine's ``MemorySlots`` (``unroll``
and a backward of the summed loss, or ``replay_forward`` and ``Replay.backward``), an AdamW step, the state carried
to the next step: what ``pretrain/train.py`` does with ``--train.bptt_segments k`` without and with
``--train.mrbp true``, minus DeepSpeed.  Each (variant, k, mode) runs in a fresh process; the peak memory is the
process's peak resident set (VmHWM) minus its resident set after the model and data were built, so it measures
the activations (and the optimizer state, the same in both modes).  The time is the median step after a
warm-up.  Variants come from the mechanism registry (``benchmarks/bench_model.py``); their state is carried with
gradients inside the unroll (XL with ``detach_state`` off between segments, fast weights, slots).
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

from benchmarks.common import finish


def status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def probe(variant: str, k: int, mode: str, args) -> dict:
    """Run in a subprocess: time and peak memory of one configuration."""
    import torch
    torch.set_num_threads(args.threads)
    from benchmarks.bench_model import SIZES, VARIANTS
    from pretrain.engine.batch import Batch
    from pretrain.engine.memory_slots import MemorySlots
    from pretrain.model import build_model, load_model_config, parallel
    from pretrain.runtime import tune_cpu_allocator
    tune_cpu_allocator()
    parallel.initialize(1)
    cfg = load_model_config(SIZES[args.size], {**VARIANTS[variant], "dropout": args.dropout})
    model = build_model(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    N = cfg.tgt_len
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, (args.steps + args.warmup) * k * N + 1), generator=g)
    slots = MemorySlots(model, 1, args.batch, torch.device("cpu"), bptt_segments=k)
    base = status_kb("VmRSS")
    times = []
    for step in range(args.warmup + args.steps):
        lo = step * k * N
        import types
        mb = types.SimpleNamespace(tokens=tokens[:, lo:lo + k * N], targets=tokens[:, lo + 1:lo + k * N + 1],
                                   loss_mask=torch.ones(args.batch, k * N), reset=torch.zeros(args.batch, dtype=torch.bool))
        b = Batch.from_micro_batch(mb, torch.device("cpu"))
        count = b.num_scored()
        t0 = time.perf_counter()
        if mode == "bptt":
            outs = slots.unroll(0, b, model)
            sum(seg.masked_nll_sum(out.nll) for seg, out in outs).div(count).backward()
        else:
            replay = slots.replay_forward(0, b, model)
            replay.backward(lambda seg, out: seg.masked_nll_sum(out.nll) / count,
                            lambda loss, last: (loss.backward(), 1.0)[1])
        opt.step()
        opt.zero_grad(set_to_none=True)
        slots.commit(0)
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    return {"variant": variant, "k": k, "mode": mode, "step_s": statistics.median(times),
            "tokens_per_s": args.batch * k * N / statistics.median(times),
            "peak_mb": (status_kb("VmHWM") - base) / 1024.0, "segment": N, "batch": args.batch}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="xl,delta,slots")
    p.add_argument("--ks", default="1,2,4,8")
    p.add_argument("--size", default="tiny", choices=["tiny", "small"])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--out", default="benchmarks/results/bench_mrbp.json")
    p.add_argument("--probe", nargs=3, metavar=("VARIANT", "K", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.probe:
        v, k, mode = args.probe
        print(json.dumps(probe(v, int(k), mode, args)))
        return 0
    results = []
    configs = [(v, int(k), m) for v in args.variants.split(",") for k in args.ks.split(",") for m in ("bptt", "mrbp")]
    t0 = time.time()
    for i, (v, k, m) in enumerate(configs):
        cmd = [sys.executable, os.path.abspath(__file__), "--probe", v, str(k), m, "--size", args.size, "--batch",
               str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads",
               str(args.threads), "--dropout", str(args.dropout)]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        if r.returncode != 0:
            raise RuntimeError(f"{v} k={k} {m} failed:\n{r.stderr[-2000:]}")
        res = json.loads(r.stdout.strip().splitlines()[-1])
        results.append(res)
        eta = (time.time() - t0) / (i + 1) * (len(configs) - i - 1)
        print(f"[{i + 1}/{len(configs)}] {v} k={k} {m}: {res['tokens_per_s']:,.0f} tokens/s, peak +{res['peak_mb']:.0f} MB"
              f"  (ETA {eta:.0f}s)", flush=True)
    lines = ["| variant | k | BPTT tokens/s | MRBP tokens/s | MRBP time / BPTT | BPTT peak MB | MRBP peak MB |",
             "|---|---|---|---|---|---|---|"]
    for v in args.variants.split(","):
        for k in args.ks.split(","):
            a = next(r for r in results if r["variant"] == v and r["k"] == int(k) and r["mode"] == "bptt")
            b = next(r for r in results if r["variant"] == v and r["k"] == int(k) and r["mode"] == "mrbp")
            lines.append(f"| {v} | {k} | {a['tokens_per_s']:,.0f} | {b['tokens_per_s']:,.0f} | "
                         f"{b['step_s'] / a['step_s']:.2f} | {a['peak_mb']:.0f} | {b['peak_mb']:.0f} |")
    table = "\n".join(lines)
    report = {"machine": {"cpus": os.cpu_count(), "threads": args.threads, "processor": platform.processor(),
                          "python": platform.python_version()},
              "settings": {k: v for k, v in vars(args).items() if k != "probe"}, "results": results, "table": table}
    return finish(args.out, report, table)


if __name__ == "__main__":
    sys.exit(main())
