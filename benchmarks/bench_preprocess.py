"""Whole-command preprocessing throughput with the GPT-2 tokenizer, beside tokenize-only loops.

Builds a JSON-lines corpus of real text (tinyshakespeare cut into documents of about 2 KB at paragraph
breaks, plus the WikiText-2 valid and test articles, replicated to about 50 MB / 8,300 documents) in a
temporary directory, then measures in the same run:

* ``preprocess.py`` as a user runs it (progress bar on, ``--append-eod``), GPT-2 vocab.json + merges.txt:
  1 worker pinned to one core (``taskset -c 0``, ``RAYON_NUM_THREADS=1``) and 2 workers on two cores;
  best and median wall time of ``--repeats`` runs, including interpreter start-up;
* the fixed cost of the command (start-up, imports, tokenizer load: the same command on a one-line input);
* the same command with the reference backend (``--tokenizer-backend tokenizers``, about 100x slower per
  byte) on the first ``--slow-mb`` MB, 1 and 2 workers: how the worker processes scale once the tokenizer,
  not the fixed start-up cost, dominates;
* tokenize-only loops over the same documents, in this process pinned to one core: our tokenizer
  (gigatoken), tiktoken (``encode_ordinary``) and Hugging Face ``tokenizers`` (on the first 5 MB: it is
  about 100x slower);
* correctness: the written ids equal tiktoken's (all documents) and ``tokenizers``'
  ByteLevelBPETokenizer(vocab, merges) ids (first 5 MB) plus EOD, and 2 workers write the same bytes as 1.

Prints a table and writes JSON (``--out``).

    python benchmarks/bench_preprocess.py --out bench_preprocess.json
"""
if __name__ == "__main__" and not __package__:
    import os, sys  # noqa: E401
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import os

os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from data_tools.indexed import IndexedDataset
from data_tools.inputs import split_articles
from data_tools.tokenization import GPT2Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREPROCESS = os.path.join(ROOT, "data_tools", "preprocess.py")
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Reference figures for this kind of corpus (50 MB, 8,364 documents), one core, measured elsewhere.
MEGATRON_STANDARD_MBS = 1.7   # Megatron-LM tools/preprocess_data.py
MEGATRON_FAST_MBS = 6.7       # Megatron-LM tools/preprocess_data_fast.py (gigatoken), whole command
TARGET_MBS = 2 * MEGATRON_FAST_MBS


def build_corpus(data_dir: str, path: str, size_mb: float, shakespeare_doc_chars: int = 2150) -> list:
    """Write the benchmark JSONL; return its documents (one replica)."""
    text = open(os.path.join(data_dir, "tinyshakespeare", "input.txt"), encoding="utf-8").read()
    docs, cur, n = [], [], 0
    for para in text.split("\n\n"):
        cur.append(para)
        n += len(para) + 2
        if n >= shakespeare_doc_chars:
            docs.append("\n\n".join(cur) + "\n")
            cur, n = [], 0
    if cur:
        docs.append("\n\n".join(cur) + "\n")
    for split in ("valid", "test"):
        docs += split_articles(open(os.path.join(data_dir, "wikitext-2", f"{split}.txt"), encoding="utf-8").read())
    lines = "".join(json.dumps({"text": d}) + "\n" for d in docs)
    copies = max(1, round(size_mb * 1e6 / len(lines.encode())))
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(copies):
            f.write(lines)
    return docs * copies


def machine() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    from importlib.metadata import version
    return {"cpu": model, "cores": len(os.sched_getaffinity(0)), "python": platform.python_version(),
            "numpy": np.__version__, "gigatoken": version("gigatoken"),
            "platform": platform.platform(), "loadavg": os.getloadavg()}


def run_command(args: list, cores: str, repeats: int) -> dict:
    pin = ["taskset", "-c", cores] if shutil.which("taskset") else []
    walls, stderr = [], ""
    for _ in range(repeats):
        t = time.perf_counter()
        r = subprocess.run(pin + [sys.executable, PREPROCESS] + args, capture_output=True, text=True)
        walls.append(time.perf_counter() - t)
        if r.returncode != 0:
            raise SystemExit(f"preprocess failed:\n{r.stderr}")
        stderr = r.stderr
    return {"best_s": min(walls), "median_s": statistics.median(walls), "walls_s": walls, "pinned": cores if pin else None,
            "log": stderr.strip().splitlines()[-1]}


def timed_loop(fn, docs: list) -> float:
    t = time.perf_counter()
    for d in docs:
        fn(d)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=os.path.join(ROOT, "..", "shared", "data"),
                    help="folder with tinyshakespeare/, wikitext-2/, tokenizers/gpt2/ (default: ../shared/data)")
    ap.add_argument("--size-mb", type=float, default=50, help="corpus size (default: 50)")
    ap.add_argument("--repeats", type=int, default=5, help="runs per whole-command variant (default: 5)")
    ap.add_argument("--slow-mb", type=float, default=8,
                    help="size of the corpus for the reference-backend runs; 0 skips them (default: 8)")
    ap.add_argument("--out", default=None, help="write the results as JSON here (default: print only)")
    args = ap.parse_args()
    gpt2 = os.path.join(args.data_dir, "tokenizers", "gpt2")
    for f in ("vocab.json", "merges.txt", "gpt2.tiktoken"):
        if not os.path.isfile(os.path.join(gpt2, f)):
            raise SystemExit(f"{os.path.join(gpt2, f)}: missing (give --data-dir)")
    vocab, merges = os.path.join(gpt2, "vocab.json"), os.path.join(gpt2, "merges.txt")
    mach = machine()
    tmp = tempfile.mkdtemp(prefix="bench_preprocess_")
    try:
        corpus = os.path.join(tmp, "corpus.jsonl")
        docs = build_corpus(args.data_dir, corpus, args.size_mb)
        nbytes, ndocs = os.path.getsize(corpus), len(docs)
        text_bytes = sum(len(d.encode()) for d in docs)
        tok_args = ["--tokenizer", "gpt2", "--vocab-file", vocab, "--merge-file", merges, "--append-eod"]
        one_core, two_cores = "0", "0,1" if len(os.sched_getaffinity(0)) > 1 else "0"

        # Fixed cost: the same command on a one-document input.
        tiny = os.path.join(tmp, "tiny.jsonl")
        with open(tiny, "w") as f:
            f.write(json.dumps({"text": "hello world"}) + "\n")
        fixed = run_command(["--input", tiny, *tok_args, "--output-prefix", os.path.join(tmp, "tiny")], one_core,
                            args.repeats)
        whole = {}
        for w, cores in ((1, one_core), (2, two_cores)):
            whole[w] = run_command(["--input", corpus, *tok_args, "--workers", str(w),
                                    "--output-prefix", os.path.join(tmp, f"out{w}")], cores, args.repeats)
        slow = {}
        if args.slow_mb > 0:
            small = os.path.join(tmp, "small.jsonl")
            with open(corpus, "rb") as src, open(small, "wb") as dst:
                dst.writelines(line for line, _ in zip(src, range(int(ndocs * args.slow_mb * 1e6 / nbytes))))
            for w, cores in ((1, one_core), (2, two_cores)):
                slow[w] = run_command(["--input", small, *tok_args, "--tokenizer-backend", "tokenizers", "--workers",
                                       str(w), "--output-prefix", os.path.join(tmp, f"slow{w}")], cores, 1)
            slow["bytes"] = os.path.getsize(small)
        same_bytes = all(open(os.path.join(tmp, f"out1{e}"), "rb").read() == open(os.path.join(tmp, f"out2{e}"), "rb").read()
                         for e in (".bin", ".idx"))

        # Tokenize-only loops in this process, pinned to one core.
        affinity = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {min(affinity)})
        loops = {}
        t = time.perf_counter()
        ours = GPT2Tokenizer(vocab, merges)
        load_s = time.perf_counter() - t
        loops["gigatoken (ours)"] = (timed_loop(ours.encode_ids, docs), text_bytes, ndocs)
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe
        enc = tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, special_tokens={"<|endoftext|>": 50256},
                                mergeable_ranks=load_tiktoken_bpe(os.path.join(gpt2, "gpt2.tiktoken")))
        loops["tiktoken encode_ordinary"] = (timed_loop(enc.encode_ordinary, docs), text_bytes, ndocs)
        import tokenizers
        hf = tokenizers.ByteLevelBPETokenizer(vocab, merges)
        subset, size = [], 0
        for d in docs:
            if size > 5e6:
                break
            subset.append(d)
            size += len(d.encode())
        loops["HF tokenizers (first 5 MB)"] = (timed_loop(hf.encode, subset), size, len(subset))
        os.sched_setaffinity(0, affinity)

        # Correctness of what the command wrote.
        ds = IndexedDataset(os.path.join(tmp, "out1"))
        tik_equal = ds.num_documents == ndocs and all(
            np.array_equal(ds.document(i)[:-1], enc.encode_ordinary(d)) and ds.document(i)[-1] == 50256
            for i, d in enumerate(docs))
        hf_equal = all(np.array_equal(ds.document(i)[:-1], hf.encode(d).ids) for i, d in enumerate(subset))
        tokens = ds.num_tokens
        del ds

        imports = subprocess.run([sys.executable, "-X", "importtime", PREPROCESS, "--help"], capture_output=True,
                                 text=True).stderr
        modules = [line.rsplit("|", 1)[-1].strip() for line in imports.splitlines() if line.startswith("import time:")]
        import_us = sum(int(line.split("|")[1]) for line in imports.splitlines()  # top-level imports only
                        if line.startswith("import time:") and line.split("|")[1].strip().isdigit()
                        and not line.rsplit("|", 1)[-1].startswith(" " * 2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    load_after = os.getloadavg()

    rows = []
    for w in (1, 2):
        r = whole[w]
        rows.append({"variant": f"preprocess.py --workers {w} (cores {r['pinned']})", "seconds": r["best_s"],
                     "median_s": r["median_s"], "MB/s": nbytes / 1e6 / r["best_s"], "docs/s": ndocs / r["best_s"]})
    for w in (1, 2) if slow else ():
        rows.append({"variant": f"reference backend, --workers {w} ({slow['bytes'] / 1e6:.0f} MB)",
                     "seconds": slow[w]["best_s"], "median_s": None, "MB/s": slow["bytes"] / 1e6 / slow[w]["best_s"],
                     "docs/s": None})
    for name, (secs, b, n) in loops.items():
        rows.append({"variant": f"tokenize only: {name}", "seconds": secs, "median_s": None,
                     "MB/s": b / 1e6 / secs, "docs/s": n / secs})
    one, two = whole[1]["best_s"], whole[2]["best_s"]
    in_run = {w: nbytes / 1e6 / max(whole[w]["best_s"] - fixed["best_s"], 1e-9) for w in (1, 2)}
    result = {
        "machine": mach, "corpus": {"bytes": nbytes, "text_bytes": text_bytes, "documents": ndocs,
                                         "tokens": tokens},
        "command": " ".join(["python", "benchmarks/bench_preprocess.py"] + sys.argv[1:]),
        "rows": rows, "fixed_cost_s": fixed["best_s"], "tokenizer_load_s": load_s,
        "import_time_s": import_us / 1e6, "torch_imported": any(m == "torch" for m in modules),
        "speedup_2_workers": one / two, "in_run_MBs": in_run,
        "speedup_2_workers_reference_backend": slow[1]["best_s"] / slow[2]["best_s"] if slow else None,
        "vs_megatron_fast": nbytes / 1e6 / one / MEGATRON_FAST_MBS, "target_MBs": TARGET_MBS,
        "meets_target_1_worker": nbytes / 1e6 / one >= TARGET_MBS,
        "ids_equal_tiktoken_all": bool(tik_equal), "ids_equal_hf_subset": bool(hf_equal),
        "workers_same_bytes": bool(same_bytes), "logs": {w: whole[w]["log"] for w in whole},
        "loadavg_after": load_after,
    }
    print(f"corpus: {nbytes / 1e6:.1f} MB JSONL, {ndocs:,} documents, {tokens:,} tokens; machine: "
          f"{result['machine']['cpu']}, {result['machine']['cores']} cores, load average "
          f"{result['machine']['loadavg'][0]:.1f} before, {load_after[0]:.1f} after")
    print(f"{'variant':<52} {'seconds':>8} {'median':>8} {'MB/s':>8} {'docs/s':>9}")
    for r in rows:
        med = f"{r['median_s']:.3f}" if r["median_s"] is not None else "-"
        docs_s = f"{r['docs/s']:,.0f}" if r["docs/s"] is not None else "-"
        print(f"{r['variant']:<52} {r['seconds']:>8.3f} {med:>8} {r['MB/s']:>8.1f} {docs_s:>9}")
    print(f"fixed cost of the command (start-up, imports, tokenizer load; one-line input): {fixed['best_s']:.3f} s; "
          f"imports {import_us / 1e6:.3f} s; tokenizer load {load_s:.3f} s; torch imported: {result['torch_imported']}")
    print(f"1 worker: {nbytes / 1e6 / one:.1f} MB/s = {result['vs_megatron_fast']:.1f}x Megatron's fastest path "
          f"({MEGATRON_FAST_MBS} MB/s; target {TARGET_MBS:.1f}); 2 workers: {result['speedup_2_workers']:.2f}x 1 worker; "
          f"without the fixed cost: {in_run[1]:.1f} / {in_run[2]:.1f} MB/s")
    if slow:
        print(f"reference backend: 2 workers {result['speedup_2_workers_reference_backend']:.2f}x 1 worker")
    print(f"ids equal to tiktoken (all documents): {tik_equal}; to HF ByteLevelBPETokenizer (first 5 MB): {hf_equal}; "
          f"2 workers write the same bytes: {same_bytes}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
