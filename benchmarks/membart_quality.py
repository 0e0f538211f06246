"""MemBART on real text: denoising loss with the memory carried from step to step against the memory reset before
every step, at equal steps.

    python benchmarks/membart_quality.py --steps 2000                      # Tiny Shakespeare bytes, membart_tiny
    python benchmarks/membart_quality.py --steps 20 --max-bytes 50000 --batch 2     # a quick look

The corpus (default: Tiny Shakespeare, shipped in the repository; ``--corpus corpora/wikitext-2/valid.txt.xz`` works
too) becomes byte-level Megatron files with a 90/10 train/valid split (``benchmarks/quality.py``'s preparation,
cached in the work directory).  Two runs of ``pretrain/train.py`` with the same preset, seed, steps, batch, rollout,
schedule and noise: ``carried`` (the memory moves on from time step to time step inside a document, reset at its
start, gradients through the rollout of ``--horizon`` steps with MemBART's weights) and ``reset`` (the same, with
``seq2seq.reset_every_step``: every step starts from the fresh memory ``LN(b_mem)``, in training and evaluation).
Each is scored at the end on the validation split (every time step once, the noise drawn from the seed, so both
runs see the same sources) under its own memory rule; the table gives the mean NLL per target token (nats, BOS and
EOS included), the same for the first step of a document (where the two rules agree) and the later ones (where only
the carried memory knows the text before), and training tokens/s.  Runs go one after another.
"""
if __name__ == "__main__" and not __package__:
    import os, sys  # noqa: E401
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

from benchmarks.common import finish

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = {"carried": [], "reset": ["--seq2seq.reset_every_step", "true"]}


def prepare(args) -> str:
    from benchmarks.quality import prepare_corpus
    corpus = args.corpus
    if args.max_bytes:
        cut = os.path.join(args.work, f"corpus-{args.max_bytes}.txt")
        if not os.path.exists(cut):
            opener = lzma.open if corpus.endswith(".xz") else open
            with opener(corpus, "rb") as f:
                data = f.read(args.max_bytes)
            with open(cut + ".tmp", "wb") as f:
                f.write(data)
            os.replace(cut + ".tmp", cut)
        corpus = cut
    return prepare_corpus(corpus, os.path.join(args.work, os.path.basename(corpus) + ".d"))


def run(name: str, extra: List[str], args, data: str) -> Dict[str, object]:
    run_dir = os.path.join(args.work, "runs", name)
    shutil.rmtree(run_dir, ignore_errors=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    cmd = [sys.executable, os.path.join(ROOT, "pretrain", "train.py"), "--config", args.preset, "--data-path", data,
           "--save", run_dir, "--train-iters", str(args.steps), "--micro-batch-size", str(args.batch),
           "--train.bptt_segments", str(args.horizon), "--seed", str(args.seed), "--lr", str(args.lr),
           "--lr-warmup-iters", str(args.warmup), "--log-interval", str(max(1, args.steps // 50)),
           "--train.threads", str(args.threads), "--log.tensorboard", "false", "--log.progress", "false",
           "--eval.final_splits", "[valid]", "--checkpoint.export", "false"] + args.set + extra
    log_path = run_dir + ".log"
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    t0 = time.time()
    with open(log_path, "w") as log:
        r = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        raise RuntimeError(f"{name}: training failed (exit {r.returncode}), see {log_path}")
    recs = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl")) if line.strip()]
    evals = [x for x in recs if x.get("kind") == "eval"]
    if not evals:
        raise RuntimeError(f"{name}: no evaluation in {run_dir}/metrics.jsonl (see {log_path})")
    ev = evals[-1]
    steps = ev.get("per_step", {})
    first = steps.get("0", {})
    later_tokens = sum(v["tokens"] for k, v in steps.items() if k != "0")
    later = sum(v["loss"] * v["tokens"] for k, v in steps.items() if k != "0") / later_tokens if later_tokens else None
    rates = [x["tokens_per_s"] for x in recs if x.get("kind") == "train" and "tokens_per_s" in x]
    return {"variant": name, "run_dir": run_dir, "valid_loss": ev["loss"], "valid_tokens": ev["tokens"],
            "first_step_loss": first.get("loss"), "later_steps_loss": later, "eval_step": ev["step"],
            "train_tokens_per_s": statistics.median(rates) if rates else None, "seconds": time.time() - t0}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default=os.path.join(ROOT, "corpora", "tinyshakespeare", "input.txt.xz"))
    p.add_argument("--max-bytes", type=int, default=0, help="use the corpus's first bytes only (0: all)")
    p.add_argument("--preset", default="membart_tiny")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=8, help="micro-batch (rows)")
    p.add_argument("--horizon", type=int, default=5, help="time steps per rollout (MemBART's time_horizon)")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--set", action="append", default=[], metavar="OPTION",
                   help="an extra train.py option for both runs, e.g. --set=--model.num_slots --set=32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default=os.path.join(ROOT, "runs", "membart_quality"))
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "membart_quality.json"))
    args = p.parse_args(argv)
    if not os.path.isfile(args.corpus):
        p.error(f"--corpus: {args.corpus}: no such file")
    if args.steps < 1 or args.horizon < 1 or args.batch < 1:
        p.error("--steps, --horizon and --batch must be >= 1")
    os.makedirs(args.work, exist_ok=True)
    data = prepare(args)
    results = []
    for name, extra in VARIANTS.items():
        res = run(name, extra, args, data)
        results.append(res)
        print(f"{name}: valid loss {res['valid_loss']:.4f} nats/token ({res['seconds']:.0f}s)", flush=True)
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    lines = ["| memory | valid loss (nats/target token) | first step of a document | later steps | "
             "train tokens/s |", "|---|---|---|---|---|"]
    for r in results:
        rate = "-" if r["train_tokens_per_s"] is None else f"{r['train_tokens_per_s']:,.0f}"
        lines.append(f"| {r['variant']} | {fmt(r['valid_loss'])} | {fmt(r['first_step_loss'])} | "
                     f"{fmt(r['later_steps_loss'])} | {rate} |")
    table = "\n".join(lines)
    report = {"machine": {"cpus": os.cpu_count(), "threads": args.threads, "python": platform.python_version()},
              "settings": vars(args), "results": results, "table": table}
    return finish(args.out, report, table)


if __name__ == "__main__":
    sys.exit(main())
