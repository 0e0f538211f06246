"""What the memory buys: the loss of exported models when they may use at most c tokens of history.

    python pretrain/evaluate_memory.py --model runs/xl/export --model runs/fwm/export --split valid
    python pretrain/evaluate_memory.py --model runs/rmt/export --split valid --contexts 0,64,128,256,all \
        --output memory.json --plot memory.png

Protocol (one for every mechanism; ``pretrain/engine/context.py``, docs/evaluation.md "Effective context"):
the split is read in segments of the model's ``tgt_len``; with history c (a multiple of ``tgt_len``) every
segment is scored from a fresh state after reading the c tokens before it in ``tgt_len`` segments (state
carried between them, not scored); c = 0 resets the state before every segment, c = all carries it over the
whole stream (``evaluate.py --protocol carry``).  Printed: bpc (ppl for word/subword data) for every model and
history, the loss by position in the segment with the state carried (all) and reset (0), and for a group of
two or more models the relative effective context length (RECL) of Dai et al. 2019 (Transformer-XL, §4.3 and
the appendix "Details about RECL") for every ``--recl-r``.  ``--output`` writes all of it as JSON, ``--plot``
a PNG of the metric against the history length.  Runs in one process without DeepSpeed.
"""
if __name__ == "__main__":
    import os, signal, sys  # noqa: E401
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    if not __package__:
        sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import json
import math
import os
import sys
import time
from typing import List, Optional

from data_tools.cli import CommandError, CommandParser, check_output_folder, fail, int_at_least, run_interruptible

PROG = "evaluate_memory.py"
FIELDS = ("protocol", "split", "data", "metric", "contexts", "models", "recl", "seconds")


def _ratio(text: str) -> List[float]:
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be numbers in (0, 1], comma-separated, got {text!r}")
    if not vals or any(not 0 < v <= 1 for v in vals):
        raise argparse.ArgumentTypeError(f"must be numbers in (0, 1], comma-separated, got {text!r}")
    return vals


def _positive(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = -1.0
    if not v > 0 or not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return v


def _contexts(text: str) -> list:
    out = []
    for v in text.split(","):
        v = v.strip()
        if v == "all":
            out.append("all")
            continue
        try:
            n = int(v)
        except ValueError:
            n = -1
        if n < 0:
            raise argparse.ArgumentTypeError(f"must be token counts >= 0 or 'all', comma-separated, got {text!r}")
        out.append(n)
    if not out:
        raise argparse.ArgumentTypeError("needs at least one history length")
    nums = sorted(set(c for c in out if c != "all"))
    return nums + (["all"] if "all" in out else [])


def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(prog=PROG, description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", action="append", required=True,
                   help="export directory (SAVE/export of a training run); repeat for a group of models")
    p.add_argument("--name", action="append", default=None, help="a name per --model for the table (default: "
                                                                    "the run folder)")
    p.add_argument("--data-path", default=None,
                   help="dataset prefix or split=prefix list (default: the data the models were trained on)")
    p.add_argument("--split", default="valid", choices=["train", "valid", "test"], help="split to score")
    p.add_argument("--contexts", type=_contexts, default=None,
                   help="history lengths in tokens, multiples of every model's tgt_len, and 'all' (default: 0, "
                        "tgt_len, 2 tgt_len, 4 tgt_len, ... up to max(8 tgt_len, 2 mem_len) within the stream, "
                        "and all)")
    p.add_argument("--recl-r", type=_ratio, default=[0.1, 0.5, 1.0],
                   help="RECL: fractions of the hardest tokens compared (Dai et al.'s r)")
    p.add_argument("--recl-threshold", type=_positive, default=0.01,
                   help="RECL: the least relative perplexity reduction that counts as a gain")
    p.add_argument("--max-segments", type=int_at_least(0, "0 = all"), default=0,
                   help="score only the first segments of the split (0 = all; the carried pass then equals "
                        "evaluate.py --protocol carry --max-steps)")
    p.add_argument("--batch-size", type=int_at_least(1), default=8, help="segments scored in parallel")
    p.add_argument("--threads", type=int_at_least(0, "0 = all cores"), default=0,
                   help="torch CPU threads (0 = all cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress output")
    p.add_argument("--output", default=None, help="also write everything as JSON here")
    p.add_argument("--plot", default=None, help="also draw the metric against the history length (PNG)")
    return p


def main(argv=None) -> int:
    """The command: prints the tables; exit status 0, 2 on bad input (one line on stderr naming the flag or
    file), 130 when interrupted."""
    return run_interruptible(PROG, _run, build_parser().parse_args(argv), what="no result written")


def _name(path: str) -> str:
    path = os.path.normpath(os.path.abspath(path))
    base = os.path.basename(path)
    return os.path.basename(os.path.dirname(path)) if base == "export" else base


def _run(args) -> int:
    import warnings
    warnings.filterwarnings("ignore", category=UserWarning, module="megatron")
    from pretrain.runtime import tune_cpu_allocator
    tune_cpu_allocator()
    import numpy as np
    import torch

    from data_tools.indexed import IndexedDatasetError
    from data_tools.progress import Progress
    from data_tools.streams import EvalStream
    from data_tools.tokenization import TokenizerError
    from pretrain.config_base import ConfigError
    from pretrain.engine.context import PROTOCOL, context_losses, recl, summarize
    from pretrain.engine.data import load_data_info, summarize_loss
    from pretrain.engine.export import ExportError, load_exported, read_export

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.name is not None and len(args.name) != len(args.model):
        return fail(PROG, f"--name: {len(args.name)} names for {len(args.model)} models; give one per --model")
    try:
        for flag, path in (("--output", args.output), ("--plot", args.plot)):
            if path:
                check_output_folder(path, flag)
    except CommandError as e:
        return fail(PROG, e)
    # every model's export and data, checked before any model loads
    infos = []
    for path in args.model:
        try:
            cfg_dict, meta = read_export(path)
        except ExportError as e:
            return fail(PROG, f"--model {e}")
        data_path = args.data_path or ",".join(f"{k}={v}" for k, v in (meta.get("data") or {}).items())
        try:
            data = load_data_info(data_path)
        except (ConfigError, ValueError) as e:
            where = f"--data-path {data_path}" if args.data_path else f"--model {path}: the data it was trained on"
            return fail(PROG, f"{where}: {str(e).split(': ', 1)[-1]}" + ("" if args.data_path else
                                                                       " (give the dataset with --data-path)"))
        if not data.has(args.split):
            return fail(PROG, f"--split {args.split}: no {args.split} split in {data_path} (have: "
                              f"{', '.join(data.prefixes)})")
        infos.append((path, cfg_dict, meta, data))
    _, _, _, data0 = infos[0]
    for path, _, _, data in infos[1:]:
        if data.tokenizer != data0.tokenizer:
            return fail(PROG, f"--model {path}: its data's tokenizer differs from --model {infos[0][0]}'s; a "
                              f"group is compared on the same tokens (give one dataset with --data-path)")
    prefix = data0.prefixes[args.split]
    names = list(args.name) if args.name else [_name(p) for p in args.model]
    first = list(names)
    for i, n in enumerate(first):
        if first.count(n) > 1:
            names[i] = f"{n}#{i + 1}"
    try:
        stream_probe = EvalStream(prefix, seq_len=1, num_streams=1, pad_id=data0.pad_id)
    except (IndexedDatasetError, TokenizerError, ValueError) as e:
        return fail(PROG, str(e) if os.path.basename(prefix) in str(e) else f"{prefix}: {e}")
    targets = stream_probe.num_targets
    tgts = [int(c.get("tgt_len", 0) or 0) for _, c, _, _ in infos]
    mems = [int(c.get("mem_len", 0) or 0) for _, c, _, _ in infos]
    step = 1
    for t in tgts:
        step = step * t // math.gcd(step, t)
    if args.contexts is None:
        limit = max(8 * step, 2 * max(mems))
        contexts, m = [0], 1
        while m * step <= limit and m * step < targets:
            contexts.append(m * step)
            m *= 2
        contexts.append("all")
    else:
        contexts = args.contexts
        for c in contexts:
            if c == "all":
                continue
            if c >= targets:
                return fail(PROG, f"--contexts {c}: longer than the {args.split} stream ({targets} targets); "
                                  f"use all for the whole stream")
            if c % step:
                return fail(PROG, f"--contexts {c}: not a multiple of the segment length (tgt_len "
                                  f"{', '.join(map(str, sorted(set(tgts))))}: use multiples of {step})")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.time()
    models, per_token, masks = [], {}, []
    for (path, _, meta, data), name in zip(infos, names):
        try:
            model, cfg, _, meta = load_exported(path, device=device, dropout=0.0, dropatt=0.0)
        except ExportError as e:
            return fail(PROG, f"--model {e}")
        if data0.vocab_size > cfg.vocab_size:
            return fail(PROG, f"--model {path}: the data's vocabulary ({data0.vocab_size} ids) is larger than the "
                              f"model's ({cfg.vocab_size}): evaluate on data made with the model's tokenizer")
        stream = EvalStream(prefix, seq_len=cfg.tgt_len, num_streams=1, pad_id=data0.pad_id)
        bar = None

        def progress(done, total):
            nonlocal bar
            if bar is None:
                bar = Progress(PROG, f"{name}, {args.split}", total, unit="segments", enabled=not args.no_progress)
            bar.update(done - bar.done)
        try:
            losses = context_losses(lambda t, s, y, **kw: model(t, s, y, **kw), model, stream, contexts,
                                    device=device, batch_size=args.batch_size,
                                    max_segments=args.max_segments, progress=progress)
        except (IndexedDatasetError, TokenizerError, ValueError) as e:
            return fail(PROG, str(e) if os.path.basename(prefix) in str(e) else f"{prefix}: {e}")
        finally:
            if bar is not None:
                bar.close()
        rows = []
        for c in contexts:
            s = summarize(losses[c])
            rows.append({"context": c, **summarize_loss(s["loss"], data0.metric), "scored_tokens": s["tokens"],
                         "by_position": s["by_position"]})
        per_token[name] = {c: losses[c]["nll"].reshape(-1)[:targets] for c in contexts if c != "all"}
        masks.append(losses[contexts[0]]["mask"].reshape(-1)[:targets])
        models.append({"name": name, "model": os.path.abspath(path), "tgt_len": cfg.tgt_len, "mem_len": cfg.mem_len,
                       "attn_type": cfg.attn_type, "decode_policy": getattr(model, "decode_policy", None),
                       "results": rows})
        del model
    numeric = [c for c in contexts if c != "all"]
    recl_out = None
    if len(models) > 1 and len(numeric) > 1:
        common = min(len(m) for m in masks)  # --max-segments with different tgt_len: the tokens all scored
        per_token = {n: {c: v[:common] for c, v in d.items()} for n, d in per_token.items()}
        mask = masks[0][:common]
        recl_out = {"threshold": args.recl_threshold, "unit": "relative perplexity reduction per step (Dai et al. "
                    "2019: g = (exp f(c,c) - exp f(c,c')) / exp f(c,c))", "contexts": numeric,
                    "by_r": {str(r): recl(per_token, numeric, r=r, threshold=args.recl_threshold, mask=mask)
                             for r in args.recl_r}}
    metric = data0.metric
    result = {"protocol": PROTOCOL, "split": args.split, "data": prefix, "metric": metric,
              "scored_tokens": models[0]["results"][0]["scored_tokens"], "contexts": contexts, "models": models,
              "recl": recl_out, "seconds": round(time.time() - t0, 2)}
    _print(result)
    if args.output:
        from data_tools.cli import staged_file
        with staged_file(args.output) as tmp, open(tmp, "w") as f:
            json.dump(result, f, indent=2)
    if args.plot:
        try:
            plot_contexts(result, args.plot)
        except ImportError:
            print(f"{PROG}: no plot: matplotlib is not installed", file=sys.stderr)
            return 0
        print(f"wrote {args.plot}")
    return 0


def _print(result: dict) -> None:
    metric, contexts = result["metric"], result["contexts"]
    print(f"{result['split']} | {result['scored_tokens']} scored tokens | {metric} by history length")
    print(f"protocol: {result['protocol']}")
    w = max(8, *(len(m["name"]) for m in result["models"]))
    print(f"{'model':<{w}} " + " ".join(f"{str(c):>8}" for c in contexts))
    for m in result["models"]:
        print(f"{m['name']:<{w}} " + " ".join(f"{r[metric]:>8.4f}" for r in m["results"]))
    first = "all" if "all" in contexts else contexts[-1]
    for m in result["models"]:
        by = {r["context"]: r for r in m["results"]}
        lines = [(f"carried ({first})", by[first]["by_position"])]
        if contexts[0] != first:
            lines.append((f"reset ({contexts[0]})", by[contexts[0]]["by_position"]))
        conv = (lambda x: x / math.log(2)) if metric == "bpc" else (lambda x: x)
        unit = metric if metric == "bpc" else "loss"
        print(f"{m['name']}: {unit} by position in the segment (0 .. {m['tgt_len'] - 1})")
        for label, vals in lines:
            print(f"  {label:<14} " + " ".join("   -" if v is None else f"{conv(v):.3f}" for v in vals))
    if result["recl"]:
        rc = result["recl"]
        print(f"RECL in tokens of history (Dai et al. 2019 §4.3 and appendix; r: fraction of the hardest tokens; "
              f"a step counts when it reduces the relative perplexity by >= {rc['threshold']})")
        for r, per in rc["by_r"].items():
            print(f"  r = {r}: " + ", ".join(f"{n} {'>=' if v['lower_bound'] else ''}{v['recl']}"
                                               for n, v in per.items()))


def plot_contexts(result: dict, output: str) -> str:
    """The metric against the history length, one line per model ("all" as a dashed level); atomic PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pretrain.plot import save_figure

    metric = result["metric"]
    fig, ax = plt.subplots(figsize=(8, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, m in enumerate(result["models"]):
        c = colors[i % len(colors)]
        pts = [(r["context"], r[metric]) for r in m["results"] if r["context"] != "all"]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, "o-", color=c, label=m["name"])
        for r in m["results"]:
            if r["context"] == "all":
                ax.axhline(r[metric], color=c, ls="--", alpha=0.7, label=f"{m['name']} (all)")
    ax.set_xlabel("history length (tokens before the segment)")
    ax.set_ylabel({"bpc": "bits per character", "ppl": "perplexity"}.get(metric, metric))
    ax.set_title(f"{result['split']}: {metric} by history length")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, output)


if __name__ == "__main__":
    sys.exit(main())
