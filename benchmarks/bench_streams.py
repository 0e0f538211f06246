"""Ordered-stream throughput against plain memmap slice loops reading the same bytes.

Writes a synthetic uint16 corpus (random tokens, random document lengths, a companion loss mask) to a
temporary directory, then times, for data-parallel rank 0 of a realistic layout:

* ``memmap slices``: a loop of ``np.memmap`` row slices at the stream's positions, cast to int64 and split
  into inputs and targets (what a hand-written loader does);
* ``ndarray slices``: the same loop over a plain ndarray view of the memmap into a preallocated int64 buffer
  (the fastest plain-numpy way to read those bytes);
* ``OrderedStream`` without and with ``roll`` and with the loss mask, and ``EvalStream``.

All read the same number of token bytes per micro-batch; the page cache is warmed first.  Prints a table and
writes JSON (``--out``).

    python benchmarks/bench_streams.py --out bench_streams.json
"""
if __name__ == "__main__" and not __package__:
    import os, sys
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import numpy as np

from data_tools.indexed import IndexedDatasetWriter
from data_tools.streams import EvalStream, OrderedStream


def write_corpus(prefix: str, num_tokens: int, mean_doc: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    chunk = 1 << 23
    with IndexedDatasetWriter(prefix, dtype=np.uint16) as w, \
            IndexedDatasetWriter(prefix + ".mask", dtype=np.uint8) as m:
        done = 0
        while done < num_tokens:
            n = min(chunk, num_tokens - done)
            lengths = rng.geometric(1.0 / mean_doc, size=2 * n // mean_doc + 16)
            cut = np.searchsorted(np.cumsum(lengths), n)
            lengths = lengths[:cut + 1]
            lengths[-1] = n - lengths[:-1].sum()
            lengths = lengths[lengths > 0]
            w.add_documents(rng.integers(0, 50000, size=n, dtype=np.uint16), lengths)
            m.add_documents((rng.random(n) < 0.9).astype(np.uint8), lengths)
            done += n


def warm(path: str) -> None:
    with open(path, "rb") as f:
        while f.read(1 << 26):
            pass


def timed(fn, steps: int, repeats: int) -> list:
    fn(min(steps, 5))  # first touch
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(steps)
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=50_000_000)
    ap.add_argument("--mean-doc", type=int, default=1000, help="mean document length (geometric)")
    ap.add_argument("--dp", type=int, default=2)
    ap.add_argument("--grad-accum", type=int, default=2)
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=1000, help="optimizer steps timed per variant")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dir", default=None, help="where to write the corpus (default: a temporary directory)")
    ap.add_argument("--out", default=None, help="JSON results")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        prefix = os.path.join(tmp, "corpus")
        t0 = time.perf_counter()
        write_corpus(prefix, args.tokens, args.mean_doc, seed=0)
        write_s = time.perf_counter() - t0
        warm(prefix + ".bin")
        warm(prefix + ".mask.bin")
        G, B, N = args.grad_accum, args.micro_batch, args.seq_len

        t0 = time.perf_counter()
        stream = OrderedStream(prefix, 0, args.dp, B, G, N, loss_mask=None)
        init_ms = (time.perf_counter() - t0) * 1e3
        rolled = OrderedStream(prefix, 0, args.dp, B, G, N, roll=True, seed=1, loss_mask=None)
        masked = OrderedStream(prefix, 0, args.dp, B, G, N, loss_mask=prefix + ".mask")
        evals = EvalStream(prefix, N, num_streams=B, dp_rank=0, dp_size=args.dp * G, loss_mask=None)
        steps = min(args.steps, stream.steps_per_epoch)
        mm = np.memmap(prefix + ".bin", np.uint16, "r")
        view = np.asarray(mm)
        starts = [stream.begin[stream.stripe(g, 0):stream.stripe(g, 0) + B] for g in range(G)]

        def memmap_loop(n):
            for t in range(n):
                for g in range(G):
                    rows = np.stack([np.asarray(mm[a:a + N + 1], dtype=np.int64) for a in (starts[g] + t * N)])
                    tokens, targets = rows[:, :-1], rows[:, 1:]

        buf = np.empty((B, N + 1), np.int64)

        def ndarray_loop(n):
            for t in range(n):
                for g in range(G):
                    for i, a in enumerate((starts[g] + t * N).tolist()):
                        buf[i] = view[a:a + N + 1]
                    tokens, targets = buf[:, :-1].copy(), buf[:, 1:].copy()

        def stream_loop(s):
            def run(n):
                for t in range(n):
                    for g in range(G):
                        s.get(t, g)
            return run

        def eval_loop(n):
            for t in range(n * G):  # the same number of micro-batches as the training variants
                evals.get(t % evals.num_steps)

        variants = [("memmap slices (baseline)", memmap_loop), ("ndarray slices (baseline)", ndarray_loop),
                    ("OrderedStream", stream_loop(stream)), ("OrderedStream roll", stream_loop(rolled)),
                    ("OrderedStream + loss mask", stream_loop(masked)), ("EvalStream", eval_loop)]
        results = []
        for name, fn in variants:
            times = timed(fn, steps, args.repeats)
            med = statistics.median(times)
            mbs = steps * G / med
            results.append({"name": name, "seconds": times, "micro_batches_per_s": mbs,
                            "tokens_per_s": mbs * B * N, "us_per_micro_batch": 1e6 / mbs})
        base = results[0]["micro_batches_per_s"]
        fast = results[1]["micro_batches_per_s"]
        for r in results:
            r["vs_memmap_slices"] = r["micro_batches_per_s"] / base
            r["vs_ndarray_slices"] = r["micro_batches_per_s"] / fast

    info = {"machine": {"platform": platform.platform(), "python": platform.python_version(),
                        "numpy": np.__version__, "cpus": os.cpu_count()},
            "config": {"tokens": args.tokens, "mean_doc": args.mean_doc, "dp": args.dp, "grad_accum": G,
                       "micro_batch": B, "seq_len": N, "steps": steps, "repeats": args.repeats},
            "corpus_write_s": write_s, "stream_init_ms": init_ms, "results": results}
    print(f"corpus: {args.tokens:,} uint16 tokens written in {write_s:.1f} s; OrderedStream init {init_ms:.0f} ms; "
          f"layout dp {args.dp} x G {G} x B {B}, N {N}; {steps} steps x {G} micro-batches timed, "
          f"median of {args.repeats}")
    print(f"{'variant':28s} {'micro-batches/s':>16s} {'tokens/s':>14s} {'us/mb':>8s} {'vs memmap':>10s} "
          f"{'vs ndarray':>11s}")
    for r in results:
        print(f"{r['name']:28s} {r['micro_batches_per_s']:16,.0f} {r['tokens_per_s']:14,.0f} "
              f"{r['us_per_micro_batch']:8.1f} {r['vs_memmap_slices']:10.2f} {r['vs_ndarray_slices']:11.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(info, f, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
