"""Quality at equal steps on real text: train several memory variants with identical settings, evaluate each on
the validation split with the state carried, print a table, write JSON and one plot of the loss curves.

    python benchmarks/quality.py --variants none,xl,delta,linear,hybrid --steps 3000
    python benchmarks/quality.py --variants xl,delta,delta_favor,delta_dpfp,linear,performer,dpfp_sum \
        --corpus corpora/tinyshakespeare/input.txt.xz --preset xl_tiny --steps 3000 --seeds 1,2

The corpus (default: Tiny Shakespeare, shipped in the repository) is turned into byte-level Megatron files with a
90/10 train/valid split by ``data_tools/preprocess.py`` (cached in the work directory).  Every variant is a run of
``pretrain/train.py`` in one process (the preset's shapes; the variant's overrides from the mechanism registry,
see ``benchmarks/bench_model.py``; ``--set`` adds overrides to every variant, ``--variant NAME=OVERRIDES`` adds a
custom one), the same seed, steps, batch, schedule and dropout; then ``pretrain/evaluate.py`` scores the whole
validation split with the training segment and memory lengths, the state carried from segment to segment (the
``train`` protocol), and reports bits per character.  Variants run one after another (never in parallel: timings
and the machine's two cores).
"""
if __name__ == "__main__" and not __package__:
    import os, sys
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import json
import lzma
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from typing import Dict, List

from benchmarks.common import write_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def registry_overrides() -> Dict[str, List[str]]:
    from benchmarks.bench_model import override_flags, registry_variants
    return {name: override_flags(kw) for name, kw in registry_variants().items()}


def prepare_corpus(corpus: str, work: str) -> str:
    """Byte-level train/valid files of ``corpus`` (.xz or plain text) under ``work``; cached."""
    prefix = os.path.join(work, "data", "corpus")
    if os.path.exists(prefix + "_valid.idx"):
        return prefix
    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    text_path = os.path.join(work, "data", "input.txt")
    opener = lzma.open if corpus.endswith(".xz") else open
    with opener(corpus, "rb") as src, open(text_path + ".tmp", "wb") as dst:
        shutil.copyfileobj(src, dst)
    os.replace(text_path + ".tmp", text_path)
    subprocess.run([sys.executable, os.path.join(ROOT, "data_tools", "preprocess.py"), "--input", text_path,
                    "--input-format", "text", "--tokenizer", "bytes", "--split", "90,10", "--output-prefix", prefix,
                    "--no-progress"], check=True)
    return prefix


def run_variant(name: str, overrides: List[str], args, data: str, seed: int) -> Dict[str, object]:
    run_dir = os.path.join(args.work, "runs", f"{name}-s{seed}")
    shutil.rmtree(run_dir, ignore_errors=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    cmd = [sys.executable, os.path.join(ROOT, "pretrain", "train.py"), "--config", args.preset, "--data-path", data,
           "--save", run_dir, "--train-iters", str(args.steps), "--micro-batch-size", str(args.batch),
           "--seed", str(seed), "--lr", str(args.lr), "--lr-warmup-iters", str(args.warmup),
           "--eval-interval", str(args.eval_interval), "--eval-iters", str(args.eval_iters),
           "--log-interval", str(max(1, args.steps // 50)), "--train.threads", str(args.threads),
           "--log.tensorboard", "false", "--eval.final_splits", "[]"] + args.set + overrides
    t0 = time.time()
    log_path = run_dir + ".log"
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "w") as log:
        r = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        raise RuntimeError(f"{name}: training failed (exit {r.returncode}), see {log_path}")
    train_s = time.time() - t0
    metrics = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl")) if line.strip()]
    rates = [m["tokens_per_s"] for m in metrics if m.get("kind") == "train" and "tokens_per_s" in m]
    out = os.path.join(run_dir, "valid_eval.json")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "pretrain", "evaluate.py"), "--model",
                        os.path.join(run_dir, "export"), "--split", "valid", "--protocol", "train",
                        "--batch-size", str(args.eval_batch), "--threads", str(args.threads), "--output", out],
                       cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{name}: evaluation failed: {r.stderr[-2000:]}")
    ev = json.load(open(out))
    return {"variant": name, "seed": seed, "overrides": overrides, "run_dir": run_dir,
            "valid_bpc": ev.get("bpc"), "valid_loss": ev["loss"], "scored_tokens": ev["scored_tokens"],
            "eval_settings": {k: ev.get(k) for k in ("protocol", "tgt_len", "mem_len", "streams")},
            "train_tokens_per_s": statistics.median(rates) if rates else None, "train_seconds": train_s}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="none,xl,delta,linear,hybrid", help="comma list of registry variants")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=OVERRIDES",
                   help="a custom variant: NAME='--model.x 1 --model.y 2' (repeatable)")
    p.add_argument("--set", action="append", default=[], metavar="OPTION",
                   help="an extra train.py option for every variant, e.g. --set=--model.dropout --set=0.1")
    p.add_argument("--corpus", default=os.path.join(ROOT, "corpora", "tinyshakespeare", "input.txt.xz"))
    p.add_argument("--preset", default="xl_tiny", help="model and training preset (the layer shapes)")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=16, help="micro-batch (rows)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--seeds", default="1", help="comma list of seeds")
    p.add_argument("--eval-interval", type=int, default=500)
    p.add_argument("--eval-iters", type=int, default=50)
    p.add_argument("--eval-batch", type=int, default=4, help="evaluation streams of the final scoring")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default=os.path.join(ROOT, "runs", "quality"))
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "quality.json"))
    p.add_argument("--plot", default=None, help="PNG of the loss curves (default: next to --out)")
    args = p.parse_args(argv)
    known = registry_overrides()
    variants = {}
    for name in [v for v in args.variants.split(",") if v]:
        if name not in known:
            p.error(f"--variants: unknown {name!r} (known: {', '.join(known)})")
        variants[name] = known[name]
    for spec in args.variant:
        name, _, rest = spec.partition("=")
        if not name or not rest:
            p.error(f"--variant: expected NAME=OVERRIDES, got {spec!r}")
        variants[name] = rest.split()
    if not os.path.isfile(args.corpus):
        p.error(f"--corpus: {args.corpus}: no such file")
    os.makedirs(args.work, exist_ok=True)
    data = prepare_corpus(args.corpus, args.work)
    results = []
    seeds = [int(s) for s in args.seeds.split(",") if s]
    total, done, t0 = len(variants) * len(seeds), 0, time.time()
    for seed in seeds:
        for name, overrides in variants.items():
            res = run_variant(name, overrides, args, data, seed)
            results.append(res)
            done += 1
            eta = (time.time() - t0) / done * (total - done)
            print(f"[{done}/{total}] {name} seed {seed}: valid bpc {res['valid_bpc']:.4f}, "
                  f"{res['train_tokens_per_s']:,.0f} tokens/s, {res['train_seconds']:.0f}s  (ETA {eta / 60:.0f} min)",
                  flush=True)
    lines = ["| variant | valid bpc (mean over seeds) | per seed | train tokens/s |", "|---|---|---|---|"]
    for name in variants:
        rs = [r for r in results if r["variant"] == name]
        bpcs = [r["valid_bpc"] for r in rs]
        lines.append(f"| {name} | {statistics.mean(bpcs):.4f} | {', '.join(f'{b:.4f}' for b in bpcs)} | "
                     f"{statistics.median(r['train_tokens_per_s'] for r in rs):,.0f} |")
    table = "\n".join(lines)
    report = {"machine": {"cpus": os.cpu_count(), "threads": args.threads, "python": platform.python_version(),
                          "processor": platform.processor()},
              "settings": {k: v for k, v in vars(args).items()}, "results": results, "table": table}
    write_report(args.out, report)
    plot_path = args.plot or os.path.splitext(args.out)[0] + ".png"
    from pretrain.plot import plot_runs
    first = [r for r in results if r["seed"] == seeds[0]]
    plot_runs([r["run_dir"] for r in first], plot_path, labels=[r["variant"] for r in first], smooth=0.9)
    print(table)
    print(f"wrote {args.out} and {plot_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
