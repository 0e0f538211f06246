"""The trainer's per-step overhead: ``pretrain/train.py`` itself against the model's raw training step.

    python benchmarks/bench_overhead.py                       # none, xl, lamemo; 1 and 2 processes; ZeRO 0-3
    python benchmarks/bench_overhead.py --variants xl --nprocs 1 --stages 0 --rounds 3
    python benchmarks/bench_overhead.py --profile                # where a train.py step's time goes, by part
    python benchmarks/bench_overhead.py --interleaved            # Trainer step and raw step alternated, one process

Both sides run the same run configuration (the preset, ``--micro-batch-size``, the threads per process, dropout,
fp32, AdamW with its betas, eps, weight-decay groups and learning-rate schedule, gradient clipping at
``optim.clip_grad``) on the same model and shapes:

* **raw**: a loop around the model alone, ``model(tokens, state, targets)`` with the memory carried and detached,
  the mean loss's backward, ``torch.nn.utils.clip_grad_norm_`` (foreach) and ``torch.optim.AdamW(fused=True)``,
  on random tokens held in memory; for ``N`` processes, ``N`` independent copies at once, each with the same
  micro-batch and threads as one rank (so the machine is shared as in the launch; no gradient all-reduce);
* **train.py**: the real command (``python pretrain/train.py`` for one process, ``torchrun --nproc-per-node N``
  for more), on a synthetic byte corpus, ZeRO stage from ``ds_configs/zero{stage}_fp32.json``; its time per step
  is ``step_seconds`` of ``metrics.jsonl`` (wall clock between log lines, with evaluation and checkpoints left
  out), one log line every ``--log-every`` steps, the first ``--warmup`` steps dropped.

Each round runs every configuration once, in turn (A/B interleaved), and the figure is the median over rounds of
each run's median step.  ``overhead`` is ``train.py / raw - 1`` per step.  Prints a table and writes
``benchmarks/results/overhead.json``.  Never run it beside another benchmark: the cores are shared.
"""
if __name__ == "__main__" and not __package__:
    import os, sys
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable


def variant_flags(variant: str) -> list:
    from benchmarks.bench_model import override_flags, registry_variants
    return override_flags(registry_variants()[variant])


def run_args(args, variant: str, threads: int, iters: int) -> list:
    """The run-config flags both sides share."""
    return ["--config", args.preset, "--micro-batch-size", str(args.batch), "--train-iters", str(iters),
            "--train.threads", str(threads)] + variant_flags(variant)


# ------------------------------------------------------------------------------------------------ raw step
class RawStep:
    """The model's own training step under the run config ``cfg``: ``model(tokens, state, targets)`` with the
    memory carried and detached, the mean loss's backward, ``clip_grad_norm_`` (foreach) and fused AdamW with the
    run's hyper-parameters and weight-decay groups, on random tokens held in memory."""

    def __init__(self, cfg):
        import torch

        from pretrain.engine.ds_setup import param_groups
        from pretrain.model import build_model
        torch.manual_seed(cfg.train.seed)
        self.cfg = cfg
        self.model = build_model(cfg.model).train()
        o = cfg.optim
        self.opt = torch.optim.AdamW(param_groups(self.model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2),
                                     eps=o.eps, fused=True)
        b, n = cfg.train.micro_batch, cfg.model.tgt_len
        g = torch.Generator().manual_seed(0)
        self.tokens = torch.randint(32, 127, (b, 64 * n + 1), generator=g)
        self.state = self.model.init_state(b)
        self.i = 0

    def step(self) -> float:
        import torch
        n = self.cfg.model.tgt_len
        j = (self.i % 64) * n
        self.i += 1
        t0 = time.perf_counter()
        out, state = self.model(self.tokens[:, j:j + n], self.state, self.tokens[:, j + 1:j + n + 1])
        self.state = state.detach()
        out.nll.float().mean().backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.clip_grad, foreach=True)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0


def raw(argv) -> None:
    """The raw step alone under the run config ``argv`` (child process); prints the step times."""
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--warmup", type=int, required=True)
    ns, rest = p.parse_known_args(argv)
    from pretrain.runtime import tune_cpu_allocator
    tune_cpu_allocator()
    import torch

    from pretrain.engine.run_config import parse_args
    from pretrain.model import parallel
    cfg, _ = parse_args(rest)
    torch.set_num_threads(cfg.train.threads)
    parallel.initialize(1)
    r = RawStep(cfg)
    times = [r.step() for _ in range(ns.warmup + ns.steps)]
    print(json.dumps({"step_s": times[ns.warmup:]}))


def interleaved(args, variant: str) -> dict:
    """One process: a ``Trainer`` (ZeRO-0, the train.py settings) and the raw step of the same configuration, their
    steps alternated (so that the machine's drift hits both alike); median ms of each and their ratio."""
    from pretrain.runtime import tune_cpu_allocator
    tune_cpu_allocator()
    from pretrain.engine.run_config import parse_args
    from pretrain.engine.trainer import Trainer
    workdir = tempfile.mkdtemp(prefix="bench_overhead_")
    try:
        data = make_corpus(workdir)
        argv = run_args(args, variant, args.threads, 10 ** 6) + [
            "--data-path", data, "--log.progress", "false", "--log.tensorboard", "false",
            "--checkpoint.export", "false", "--eval.interval", "0", "--eval.final_splits", "[]"]
        cfg, _ = parse_args(argv)
        tr = Trainer(cfg, os.path.join(ROOT, "ds_configs", "zero0_fp32.json"))
        rs = RawStep(cfg)
        a, b = [], []
        for i in range(args.warmup + args.steps):
            t0 = time.perf_counter()
            tr.train_step()
            ta = time.perf_counter() - t0
            tb = rs.step()
            if i >= args.warmup:
                a.append(ta)
                b.append(tb)
        tr.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    ma, mb = statistics.median(a), statistics.median(b)
    ratios = sorted(x / y for x, y in zip(a, b))
    return {"variant": variant, "train_step_ms": 1000 * ma, "raw_ms": 1000 * mb, "overhead": ma / mb - 1,
            "overhead_of_pairs_median": ratios[len(ratios) // 2] - 1}


# ------------------------------------------------------------------------------------------------ train.py
def make_corpus(workdir: str) -> str:
    from benchmarks.bench_train import make_corpus as mk
    path = os.path.join(workdir, "corpus")
    mk(path + "_train", 2_000_000)
    mk(path + "_valid", 20_000)
    return path


def run_train(args, data: str, variant: str, nproc: int, stage: int, workdir: str, root: str = ROOT) -> list:
    """Step seconds of one ``train.py`` run of the checkout ``root``, one per log window after the warm-up."""
    from pretrain.engine import dist
    save = tempfile.mkdtemp(dir=workdir)
    threads = max(1, args.threads // nproc)
    iters = args.warmup + args.steps
    flags = run_args(args, variant, threads, iters) + [
        "--data-path", data, "--save", save, "--log.interval", str(args.log_every), "--log.progress", "false",
        "--log.tensorboard", "false", "--checkpoint.export", "false", "--checkpoint.interval", "0",
        "--eval.interval", "0", "--eval.final_splits", "[]", "--ds_config",
        os.path.join(root, "ds_configs", f"zero{stage}_fp32.json")]
    script = os.path.join(root, "pretrain", "train.py")
    if nproc == 1:
        cmd = [PY, script] + flags
    else:
        cmd = [PY, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
               str(dist.free_port()), script] + flags
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=root)
    r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=args.timeout)
    if r.returncode != 0:
        raise SystemExit(f"train.py failed ({' '.join(cmd)}):\n{r.stdout[-3000:]}{r.stderr[-3000:]}")
    recs = [json.loads(line) for line in open(os.path.join(save, "metrics.jsonl"))]
    recs = [x for x in recs if x.get("kind") == "train" and x["step"] > args.warmup]
    shutil.rmtree(save, ignore_errors=True)
    return [x["step_seconds"] for x in recs]


def run_raw(args, variant: str, nproc: int) -> list:
    """Step seconds of the raw step: ``nproc`` independent copies at once (as the ranks of a ``train.py`` launch
    share the machine), each with its share of the threads; the times of every copy together."""
    threads = max(1, args.threads // nproc)
    cmd = [PY, os.path.abspath(__file__), "--raw", "--steps", str(args.steps), "--warmup", str(args.warmup)] + \
        run_args(args, variant, threads, args.warmup + args.steps)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=ROOT)
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(nproc)]
    times = []
    for pr in procs:
        out, err = pr.communicate(timeout=args.timeout)
        if pr.returncode != 0:
            raise SystemExit(f"raw step failed:\n{out[-3000:]}{err[-3000:]}")
        times += json.loads(out.strip().splitlines()[-1])["step_s"]
    return times


# ------------------------------------------------------------------------------------------------ profile
PARTS = [  # (label, file suffix, function): where a train.py step spends its time, by cProfile's cumulative time
    ("data stream (next batch)", "data_tools/streams.py", "__iter__"),
    ("batch to tensors", "pretrain/engine/family.py", "make_batch"),
    ("forward (DeepSpeed engine + model)", "deepspeed/runtime/engine.py", "forward"),
    ("  of which the model", "pretrain/model/lm.py", "forward"),
    ("backward (DeepSpeed engine + autograd)", "deepspeed/runtime/engine.py", "backward"),
    ("  of which autograd", "torch/autograd/__init__.py", "backward"),
    ("optimizer step (DeepSpeed engine)", "deepspeed/runtime/engine.py", "step"),
    ("  of which GuardedAdamW / AdamW", "torch/optim/optimizer.py", "wrapper"),
    ("memory slots (begin, commit, end)", "pretrain/engine/memory_slots.py", None),
    ("loss all-reduce and flags", "pretrain/engine/dist.py", None),
]


def profile(args, variant: str) -> dict:
    """cProfile of ``--steps`` steps of one in-process Trainer (one process, ZeRO-0, the train.py settings), by
    part, in ms per step; ``trainer's own`` is the step less forward, backward and optimizer step."""
    import cProfile
    import pstats

    from pretrain.runtime import tune_cpu_allocator
    tune_cpu_allocator()
    from pretrain.engine.run_config import parse_args
    from pretrain.engine.trainer import Trainer
    workdir = tempfile.mkdtemp(prefix="bench_overhead_")
    try:
        data = make_corpus(workdir)
        argv = run_args(args, variant, args.threads, args.warmup + args.steps) + [
            "--data-path", data, "--log.progress", "false", "--log.tensorboard", "false",
            "--checkpoint.export", "false", "--eval.interval", "0", "--eval.final_splits", "[]"]
        cfg, _ = parse_args(argv)
        tr = Trainer(cfg, os.path.join(ROOT, "ds_configs", "zero0_fp32.json"))
        for _ in range(args.warmup):
            tr.train_step()
        pr = cProfile.Profile()
        t0 = time.perf_counter()
        pr.enable()
        for _ in range(args.steps):
            tr.train_step()
        pr.disable()
        step_ms = 1000 * (time.perf_counter() - t0) / args.steps
        tr.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    stats = pstats.Stats(pr).stats
    out = {"step (profiled)": step_ms}
    for label, suffix, fn in PARTS:
        if fn is None:   # every function of the file, own time
            t = sum(v[2] for (f, _, name), v in stats.items() if f.endswith(suffix))
        else:
            t = max((v[3] for (f, _, name), v in stats.items() if f.endswith(suffix) and name == fn), default=0.0)
        out[label] = 1000 * t / args.steps
    out["trainer's own (step less forward, backward, optimizer step)"] = step_ms - sum(
        out[k] for k in ("forward (DeepSpeed engine + model)", "backward (DeepSpeed engine + autograd)",
                         "optimizer step (DeepSpeed engine)"))
    return out


def configurations(args):
    """(variant, nproc, stage) of every train.py run: ZeRO-0 for every variant and process count, ZeRO 1-3 for
    ``--zero-variants`` at the largest process count."""
    out = []
    for v in args.variants.split(","):
        for n in map(int, args.nprocs.split(",")):
            out.append((v, n, 0))
    top = max(map(int, args.nprocs.split(",")))
    for v in args.zero_variants.split(","):
        for s in map(int, args.stages.split(",")):
            if s:
                out.append((v, top, s))
    return out


def write_json(args, suffix: str, payload: dict) -> None:
    """``payload`` with the settings, to ``--out`` with ``suffix`` before its extension."""
    out = args.out.replace(".json", f"{suffix}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"settings": {k: v for k, v in vars(args).items() if k != "out"}, **payload}, f, indent=1)
    print(f"wrote {out}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--raw":
        return raw(argv[1:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="xl_tiny")
    p.add_argument("--variants", default="none,xl,lamemo")
    p.add_argument("--nprocs", default="1,2")
    p.add_argument("--stages", default="0,1,2,3")
    p.add_argument("--zero-variants", default="xl", help="variants also run under ZeRO 1-3")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=2, help="threads in all (split over the processes)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--timeout", type=int, default=900)
    p.add_argument("--compare-root", default=None,
                   help="also time train.py of this other checkout (e.g. the commit before a change) in every round")
    p.add_argument("--interleaved", action="store_true",
                   help="instead: Trainer.train_step and the raw step alternated in one process, per variant")
    p.add_argument("--profile", action="store_true",
                   help="instead: where one process's train.py step spends its time, per variant (cProfile)")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "overhead.json"))
    args = p.parse_args(argv)
    if args.steps % args.log_every or args.warmup % args.log_every:
        p.error("--steps and --warmup must be multiples of --log-every")
    if args.interleaved:
        import torch
        torch.set_num_threads(args.threads)
        rows = [interleaved(args, v) for v in args.variants.split(",")]
        print("| variant | Trainer.train_step (ms, median) | raw step (ms, median) | overhead | overhead (median of "
              "pairs) |\n|---|---|---|---|---|")
        for x in rows:
            print(f"| {x['variant']} | {x['train_step_ms']:.1f} | {x['raw_ms']:.1f} | {100 * x['overhead']:+.1f}% | "
                  f"{100 * x['overhead_of_pairs_median']:+.1f}% |")
        write_json(args, "_interleaved", {"rows": rows})
        return
    if args.profile:
        import torch
        torch.set_num_threads(args.threads)
        prof = {v: profile(args, v) for v in args.variants.split(",")}
        names = args.variants.split(",")
        print("| part (ms per step) | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
        for k in prof[names[0]]:
            print(f"| {k} | " + " | ".join(f"{prof[v][k]:.1f}" for v in names) + " |")
        write_json(args, "_profile", {"profile": prof})
        return
    workdir = tempfile.mkdtemp(prefix="bench_overhead_")
    try:
        data = make_corpus(workdir)
        confs = configurations(args)
        raws = sorted({(v, n) for v, n, _ in confs})
        meas = {("raw", v, n): [] for v, n in raws}
        meas.update({("train", v, n, s): [] for v, n, s in confs})
        meas.update({("other", v, n, s): [] for v, n, s in confs})
        for rnd in range(args.rounds):
            for v, n in raws:
                meas[("raw", v, n)].append(statistics.median(run_raw(args, v, n)))
                print(f"round {rnd + 1}: raw {v} x {n}: {1000 * meas[('raw', v, n)][-1]:.1f} ms", flush=True)
            for v, n, s in confs:
                meas[("train", v, n, s)].append(statistics.median(run_train(args, data, v, n, s, workdir)))
                print(f"round {rnd + 1}: train.py {v} {n} proc ZeRO-{s}: "
                      f"{1000 * meas[('train', v, n, s)][-1]:.1f} ms", flush=True)
                if args.compare_root:
                    meas[("other", v, n, s)].append(statistics.median(
                        run_train(args, data, v, n, s, workdir, os.path.abspath(args.compare_root))))
                    print(f"round {rnd + 1}: {args.compare_root} train.py {v} {n} proc ZeRO-{s}: "
                          f"{1000 * meas[('other', v, n, s)][-1]:.1f} ms", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    rows = []
    for v, n, s in confs:
        t = max(1, args.threads // n)
        r = statistics.median(meas[("raw", v, n)])
        tr = statistics.median(meas[("train", v, n, s)])
        rows.append({"variant": v, "nproc": n, "threads_per_proc": t, "zero": s, "raw_ms": 1000 * r,
                     "train_ms": 1000 * tr, "overhead_ms": 1000 * (tr - r), "overhead": tr / r - 1,
                     "raw_rounds_ms": [1000 * x for x in meas[("raw", v, n)]],
                     "train_rounds_ms": [1000 * x for x in meas[("train", v, n, s)]]})
        if args.compare_root:
            o = statistics.median(meas[("other", v, n, s)])
            rows[-1].update(compare_ms=1000 * o, compare_overhead=o / r - 1,
                            compare_rounds_ms=[1000 * x for x in meas[("other", v, n, s)]])
    cmp = " compared checkout (ms) | its overhead |" if args.compare_root else ""
    lines = ["| variant | processes x threads | ZeRO | raw step (ms) | train.py step (ms) | overhead (ms) | overhead |"
             + cmp, "|---|---|---|---|---|---|---|" + ("---|---|" if cmp else "")]
    for x in rows:
        extra = f" {x['compare_ms']:.1f} | {100 * x['compare_overhead']:+.1f}% |" if cmp else ""
        lines.append(f"| {x['variant']} | {x['nproc']} x {x['threads_per_proc']} | {x['zero']} | {x['raw_ms']:.1f} | "
                     f"{x['train_ms']:.1f} | {x['overhead_ms']:+.1f} | {100 * x['overhead']:+.1f}% |" + extra)
    print("\n".join(lines))
    import torch
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                               "torch": torch.__version__, "python": platform.python_version()},
                   "settings": {k: v for k, v in vars(args).items() if k != "out"},
                   "command": "python benchmarks/bench_overhead.py " + " ".join(argv), "rows": rows}, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
