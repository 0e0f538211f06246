"""Training throughput and MFU of the whole engine, per memory variant and ZeRO stage.

    python benchmarks/bench_train.py                                  # 2 CPU processes (gloo), table + JSON
    python benchmarks/bench_train.py --nproc 8 --preset xl_small      # on a GPU machine: NCCL, one per GPU
    python benchmarks/bench_train.py --variants none,xl,lamemo --stages 0,2,3 --tp 2

Each configuration is a full training run through ``pretrain.engine.trainer.Trainer`` (DeepSpeed engine, ordered
streams, one memory state per accumulation slot, metrics) on a synthetic byte-level corpus, timed after a warm-up.
All configurations run inside one launch (one process group), so they share the machine's conditions; the
``vs none`` column is the ratio to the no-memory model (same layers, ``mem_len 0``) at the same ZeRO stage and
precision, measured in the same launch.  MFU counts what the model computes (``model.flops``) against the
device peak (datasheet dense rate on GPUs, the measured fp32 GEMM rate on CPUs).
"""
if __name__ == "__main__" and not __package__:
    import os, sys
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import gc
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _variants():
    """Command-line overrides of each variant: bench_model's registry-driven variants (every attn_type by its
    alias, 'none' the no-memory baseline, the stack-level memories' variants such as 'rmt8', 'hybrid' three
    delta-rule layers to one XL layer)."""
    from benchmarks.bench_model import override_flags, registry_variants
    return {name: override_flags(kw) for name, kw in registry_variants().items()}


VARIANTS = _variants()


def make_corpus(path: str, tokens: int, seed: int = 0) -> str:
    """A byte-level dataset (random text-like bytes in 1000-byte documents) with its metadata."""
    import numpy as np

    from data_tools.indexed import IndexedDatasetWriter
    from data_tools.metadata import write_metadata
    from data_tools.tokenization import ByteTokenizer
    rng = np.random.default_rng(seed)
    data = rng.integers(32, 127, size=tokens, dtype=np.uint16)
    with IndexedDatasetWriter(path, np.uint16) as w:
        w.add_documents(data, np.full(tokens // 1000, 1000))
    spec = ByteTokenizer().save(path)
    write_metadata(path, {"format": "MMIDIDX", "dtype": "uint16", "vocab_size": 256, "eod_id": None,
                          "pad_id": None, "tokenizer": spec, "documents": tokens // 1000,
                          "sequences": tokens // 1000, "tokens": tokens // 1000 * 1000, "producer": "benchmark"})
    return path


def worker(args) -> None:
    from pretrain.runtime import tune_cpu_allocator
    tune_cpu_allocator()
    import torch
    import torch.distributed as dist

    from pretrain.engine.run_config import parse_args
    from pretrain.engine.trainer import Trainer
    results = []
    for stage in args.stages.split(","):
        for variant in args.variants.split(","):
            ds = os.path.join(ROOT, "ds_configs", f"zero{stage}_{args.precision}.json")
            argv = ["--config", args.preset, "--data-path", args.data, "--train-iters",
                    str(args.warmup + args.steps), "--micro-batch-size", str(args.batch),
                    "--tensor-model-parallel-size", str(args.tp), "--log.progress", "false",
                    "--log.interval", str(10 ** 6), "--checkpoint.export", "false", "--eval.final_splits", "[]",
                    "--log.tensorboard", "false", "--train.threads", str(args.threads)] + VARIANTS[variant]
            cfg, _ = parse_args(argv)
            tr = Trainer(cfg, ds)
            tr.train()
            times = [h["seconds"] for h in tr.history[args.warmup:]]
            med = statistics.median(times)
            import resource
            rec = {"stage": int(stage), "variant": variant, "precision": args.precision, "tp": tr.tp_size,
                   "dp": tr.dp_size, "tokens_per_step": tr.tokens_per_step, "step_s_median": med,
                   "step_s_best": min(times), "tokens_per_s": tr.tokens_per_step / med,
                   "tflops_per_device": tr.flops_per_step / med / 1e12,
                   "mfu": tr.flops_per_step / med / 1e12 / tr.peak, "peak_tflops": tr.peak,
                   "peak_source": tr.peak_src,
                   "peak_mem_gb": (torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available()
                                   else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6),
                   "params_m": sum(p.numel() for p in tr.model.parameters()) * tr.tp_size / 1e6}
            results.append(rec)
            tr.close()
            del tr
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
    if dist.get_rank() == 0:
        with open(args.result, "w") as f:
            json.dump(results, f)
    from pretrain.engine.dist import teardown
    teardown()


def table(results) -> str:
    base = {(r["stage"], r["precision"]): r for r in results if r["variant"] == "none"}
    lines = ["| ZeRO | variant | tokens/s | step (ms, median / best) | TFLOP/s per device | MFU | vs none | peak mem (GB) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        b = base.get((r["stage"], r["precision"]))
        ratio = f"{r['tokens_per_s'] / b['tokens_per_s']:.2f}" if b else "-"
        lines.append(f"| {r['stage']} | {r['variant']} | {r['tokens_per_s']:,.0f} | "
                     f"{1000 * r['step_s_median']:.1f} / {1000 * r['step_s_best']:.1f} | "
                     f"{r['tflops_per_device']:.4f} | {100 * r['mfu']:.1f}% | {ratio} | {r['peak_mem_gb']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="xl_tiny", help="model preset (its layer shapes; variants override attn_type "
                                                      "and mem_len)")
    p.add_argument("--variants", default="none,xl,lamemo", help=f"comma list of {sorted(VARIANTS)}")
    p.add_argument("--stages", default="0,1,2,3", help="ZeRO stages")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--nproc", type=int, default=2, help="processes (GPUs)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    p.add_argument("--batch", type=int, default=16, help="micro-batch per data-parallel rank")
    p.add_argument("--threads", type=int, default=0, help="CPU threads per process (0 = cores / processes)")
    p.add_argument("--warmup", type=int, default=5, help="steps not timed")
    p.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    p.add_argument("--tokens", type=int, default=4_000_000, help="size of the synthetic corpus")
    p.add_argument("--out", default="benchmarks/results/bench_train.json", help="JSON output")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    import torch
    with tempfile.TemporaryDirectory() as tmp:
        data = make_corpus(os.path.join(tmp, "bytes"), args.tokens)
        result = os.path.join(tmp, "result.json")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = dict(os.environ, WANDB_MODE="offline")
        if not torch.cuda.is_available():
            env["DS_ACCELERATOR"] = "cpu"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc),
               "--master_port", str(port), os.path.abspath(__file__), "--worker", "--data", data, "--result", result]
        for k in ("preset", "variants", "stages", "precision", "tp", "batch", "threads", "warmup", "steps"):
            cmd += [f"--{k}", str(getattr(args, k))]
        t0 = time.time()
        r = subprocess.run(cmd, cwd=ROOT, env=env)
        if r.returncode != 0:
            print(f"bench_train: the benchmark run failed (exit {r.returncode})", file=sys.stderr)
            return r.returncode
        results = json.load(open(result))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else \
        f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    out = {"device": device, "torch": torch.__version__, "args": vars(args), "seconds": time.time() - t0,
           "results": results}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(f"\n{device}; {args.nproc} processes, tensor-parallel {args.tp}, preset {args.preset}, micro-batch "
          f"{args.batch}, {args.precision}, {args.steps} timed steps after {args.warmup}\n")
    print(table(results))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
