"""Memory models on the synthetic tasks of the RMT paper: generate a task, train the Recurrent Memory Transformer,
Transformer-XL and the no-memory model on it with the same data and token budget, report per-token answer
accuracy on the test split.

    python scripts/synthetic_tasks.py                                     # copy, L = 24, segments of 8
    python scripts/synthetic_tasks.py --task reverse --segment 12 --mem-tokens 6 --mem-len 6
    python scripts/synthetic_tasks.py --task retrieval --num-pairs 4 --segment 2 --mem-tokens 2 --mem-len 2
    python scripts/synthetic_tasks.py --task equations --segment 40 --mem-tokens 40 --mem-len 40
    python scripts/synthetic_tasks.py --models rmt,xl --seeds 1,2,3 --train-tokens 4e6 --out runs/copy24

The RMT paper's setting (Bulatov et al. 2022, §4 and appendix; its LM-RMT train_synthetic.py): every example is
one sequence split into segments of ``--segment`` tokens with the memory reset at the example's start, all
segments of a batch of examples in one graph and one update; RMT gets ``--mem-tokens`` memory tokens and
backpropagates through the whole example (``train.bptt_segments`` = segments per example; ``--bptt k`` unrolls k),
Transformer-XL a ``--mem-len`` cache, the baseline no memory.  Every model runs the same unroll, so every model
makes the same updates on the same batches; our Transformer-XL then also backpropagates through its cache inside
the unroll (the paper's does not: ``--xl-truncate`` stops it at every segment, at the price of one update per
segment).  Loss and accuracy count the answer tokens only (the tasks' answer masks, ``data_tools/synthetic.py``).
Accuracy is teacher-forced next-token accuracy on the answer tokens (the paper decodes greedily when the answer
is longer than a segment, which can only be lower).

Every model sees the same number of training tokens (``--train-tokens``; the optimizer steps follow from the
batch and the tokens a step reads), with the same model shape and optimizer.  Runs go through
``pretrain/train.py`` (the engine: ordered streams aligned on examples, memory reset per example, the final
evaluation on the test split), one run directory per model and seed under ``--out``; the summary is printed and
written to ``--out/summary.json``.
"""
if __name__ == "__main__" and not __package__:
    import os, sys
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = ("rmt", "xl", "none")
TASKS = ("copy", "reverse", "retrieval", "equations")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", default="copy", choices=TASKS)
    p.add_argument("--length", type=int, default=24, help="copy / reverse: sequence length L")
    p.add_argument("--num-symbols", type=int, default=8, help="copy / reverse: alphabet size")
    p.add_argument("--num-pairs", type=int, default=4, help="retrieval: key-value pairs")
    p.add_argument("--segment", type=int, default=8, help="segment length N (examples are padded to a multiple)")
    p.add_argument("--models", default="rmt,xl,none", help=f"comma list of {', '.join(MODELS)}")
    p.add_argument("--mem-tokens", type=int, default=8, help="RMT memory tokens K")
    p.add_argument("--mem-len", type=int, default=8, help="Transformer-XL memory length M")
    p.add_argument("--bptt", type=int, default=0,
                   help="segments unrolled with gradient through the memory (0 = every segment of an example)")
    p.add_argument("--xl-truncate", action="store_true",
                   help="Transformer-XL: no gradient through the cache (one segment per update, as in the paper)")
    p.add_argument("--train-tokens", type=float, default=2e6, help="training tokens per run (every model)")
    p.add_argument("--batch", type=int, default=32, help="examples per step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=50, help="warmup steps")
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--d-head", type=int, default=32)
    p.add_argument("--d-inner", type=int, default=256)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--seeds", default="1", help="comma list of training seeds")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the generated task")
    p.add_argument("--train-size", type=int, default=20000, help="training examples")
    p.add_argument("--test-size", type=int, default=1000, help="test examples")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per run")
    p.add_argument("--out", default="runs/synthetic", help="directory for the data, the runs and summary.json")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    return p


def fail(msg: str) -> int:
    print(f"synthetic_tasks.py: {msg}", file=sys.stderr)
    return 2


def task_args(args) -> list:
    if args.task in ("copy", "reverse"):
        return ["--length", str(args.length), "--num-symbols", str(args.num_symbols)]
    if args.task == "retrieval":
        return ["--num-pairs", str(args.num_pairs)]
    return []


def make_data(args, data_dir: str) -> str:
    """The task's splits under ``data_dir`` (generated once; the generator writes atomically)."""
    name = "_".join([args.task, *[a.lstrip("-") for a in task_args(args)], f"seg{args.segment}",
                     f"n{args.train_size}", f"s{args.data_seed}"])
    prefix = os.path.join(data_dir, name)
    if not os.path.exists(prefix + "_test.json"):
        os.makedirs(data_dir, exist_ok=True)
        cmd = [sys.executable, os.path.join(ROOT, "data_tools", "synthetic.py"), args.task, "--output-prefix",
               prefix, "--segment-multiple", str(args.segment), "--train-size", str(args.train_size),
               "--valid-size", "100", "--test-size", str(args.test_size), "--seed", str(args.data_seed),
               "--no-progress", *task_args(args)]
        print("$ " + " ".join(cmd), flush=True)
        if not args.dry_run:
            subprocess.run(cmd, check=True)
    return prefix


def example_segments(prefix: str, segment: int) -> int:
    with open(prefix + "_test.json") as f:
        meta = json.load(f)
    return meta["task"]["padded_len"] // segment


def run_one(args, model: str, seed: int, prefix: str, segs: int, run_dir: str) -> dict:
    """Train one model through pretrain/train.py; returns its test accuracy, loss and timings."""
    bptt = 1 if model == "xl" and args.xl_truncate else (args.bptt or segs)
    tokens_per_step = args.batch * args.segment * bptt
    iters = max(1, int(args.train_tokens // tokens_per_step))
    mem = {"rmt": ["--model.mem_len", "0", "--model.rmt.num_mem_tokens", str(args.mem_tokens)],
           "xl": ["--model.mem_len", str(args.mem_len)],
           "none": ["--model.mem_len", "0"]}[model]
    cmd = [sys.executable, os.path.join(ROOT, "pretrain", "train.py"), "--data-path", prefix,
           "--model.attn_type", "0", "--model.n_layer", str(args.n_layer), "--model.d_model", str(args.d_model),
           "--model.n_head", str(args.n_head), "--model.d_head", str(args.d_head),
           "--model.d_inner", str(args.d_inner), "--model.dropout", str(args.dropout),
           "--model.tgt_len", str(args.segment), *mem, "--train.bptt_segments", str(bptt),
           "--train-iters", str(iters), "--micro-batch-size", str(args.batch), "--seed", str(seed),
           "--lr", str(args.lr), "--optim.warmup_iters", str(min(args.warmup, iters // 10)), "--clip-grad", "1.0",
           "--data.align", "document", "--data.reset_memory", "true", "--data.roll", "true",
           "--eval.final_splits", "[test]", "--eval.micro_batch", str(args.batch), "--log.interval",
           str(max(1, iters // 20)), "--log.progress", "false", "--log.tensorboard", "false",
           "--checkpoint.export", "false", "--train.threads", str(args.threads), "--save", run_dir]
    print("$ " + " ".join(cmd), flush=True)
    if args.dry_run:
        return {}
    t0 = time.time()
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), DS_ACCELERATOR="cpu", WANDB_MODE="offline")
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.time() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{model} seed {seed} failed (exit {r.returncode}):\n{r.stdout[-3000:]}{r.stderr[-3000:]}")
    recs = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    test = [x for x in recs if x.get("kind") == "eval" and x.get("split") == "test"][-1]
    train = [x for x in recs if x.get("kind") == "train"]
    return {"model": model, "seed": seed, "accuracy": test["accuracy"], "test_loss": test["loss"],
            "final_train_loss": train[-1]["loss"] if train else None, "iters": iters, "bptt_segments": bptt,
            "train_tokens": iters * tokens_per_step, "seconds": round(seconds, 1), "run_dir": run_dir}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    bad = [m for m in models if m not in MODELS]
    if bad or not models:
        return fail(f"--models: unknown {bad or 'empty'} (choose from {', '.join(MODELS)})")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s]
    except ValueError:
        return fail(f"--seeds: {args.seeds!r} is not a comma list of integers")
    for name in ("segment", "batch", "n_layer", "d_model", "n_head", "d_head", "d_inner", "train_size", "test_size"):
        if getattr(args, name) < 1:
            return fail(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if "rmt" in models and args.mem_tokens < 1:
        return fail(f"--mem-tokens must be >= 1 for rmt, got {args.mem_tokens}")
    if "xl" in models and args.mem_len < 1:
        return fail(f"--mem-len must be >= 1 for xl, got {args.mem_len}")
    if args.bptt < 0:
        return fail(f"--bptt must be >= 0, got {args.bptt}")
    try:
        prefix = make_data(args, os.path.join(args.out, "data"))
    except subprocess.CalledProcessError as e:
        return fail(f"generating the {args.task} task failed (exit {e.returncode}; the generator's message is "
                    f"above)")
    if os.path.exists(prefix + "_test.json"):
        segs = example_segments(prefix, args.segment)
    else:                                   # a dry run before the data exists
        segs = 1
        print("(dry run: the segments per example are known once the data exists; --bptt 0 shows as 1)")
    results = []
    for model in models:
        for seed in seeds:
            try:
                res = run_one(args, model, seed, prefix, segs, os.path.join(args.out, f"{model}_seed{seed}"))
            except RuntimeError as e:
                return fail(str(e))
            if res:
                results.append(res)
                print(f"{model:5s} seed {seed}: test accuracy {res['accuracy']:.4f} (loss {res['test_loss']:.4f}, "
                      f"{res['iters']} steps, {res['seconds']:.0f}s)", flush=True)
    if args.dry_run:
        return 0
    summary = {"task": args.task, "settings": vars(args), "segments_per_example": segs, "results": results}
    tmp = os.path.join(args.out, "summary.json.tmp")
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=2)
    os.replace(tmp, os.path.join(args.out, "summary.json"))
    print(f"\n{args.task}: segments of {args.segment}, {segs} per example; test per-token answer accuracy")
    print(f"{'model':6s} {'memory':>8s} {'seeds':>6s} {'accuracy (mean)':>16s} {'per seed':>24s}")
    for model in models:
        accs = [r["accuracy"] for r in results if r["model"] == model]
        mem = {"rmt": f"K={args.mem_tokens}", "xl": f"M={args.mem_len}", "none": "-"}[model]
        print(f"{model:6s} {mem:>8s} {len(accs):6d} {sum(accs) / len(accs):16.4f} "
              f"{' '.join(f'{a:.3f}' for a in accs):>24s}")
    print(f"wrote {os.path.join(args.out, 'summary.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
