"""Plot loss curves of one or several runs from their ``metrics.jsonl`` (PNG).

    python pretrain/plot.py runs/lamemo runs/xl -o curves.png [--smooth 0.9] [--metric loss]

Each argument is a run directory (holding metrics.jsonl) or a metrics.jsonl file.  Training records are
drawn as lines (optionally smoothed with an exponential moving average), evaluation records as markers
on the same axes, one colour per run.
"""
if __name__ == "__main__" and not __package__:
    import os, sys
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import json
import os
import sys
from typing import Dict, List, Tuple


def read_metrics(path: str) -> Tuple[List[dict], List[dict]]:
    """(training records, evaluation records) of a run directory or metrics.jsonl file."""
    f = os.path.join(path, "metrics.jsonl") if os.path.isdir(path) else path
    if not os.path.isfile(f):
        raise FileNotFoundError(f"{f}: no metrics file (is {path} a run directory written with --save?)")
    train, evals = [], []
    with open(f) as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{f}:{lineno}: invalid JSON ({e.msg})") from None
            (evals if rec.get("kind") == "eval" else train).append(rec)
    return train, evals


def ema(values: List[float], beta: float) -> List[float]:
    if beta <= 0:
        return list(values)
    out, avg = [], None
    for v in values:
        avg = v if avg is None else beta * avg + (1 - beta) * v
        out.append(avg)
    return out


def plot_runs(paths: List[str], output: str, metric: str = "loss", smooth: float = 0.0,
              labels: List[str] = None) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    plotted = 0
    for i, path in enumerate(paths):
        train, evals = read_metrics(path)
        name = (labels[i] if labels and i < len(labels) else None) or os.path.basename(os.path.normpath(path))
        c = colors[i % len(colors)]
        pts = [(r["step"], r[metric]) for r in train if r.get(metric) is not None]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ema(list(ys), smooth), color=c, label=f"{name} train")
            plotted += 1
        by_split: Dict[str, List[Tuple[int, float]]] = {}
        for r in evals:
            if r.get(metric) is not None:
                by_split.setdefault(r.get("split", "valid"), []).append((r["step"], r[metric]))
        markers = {"valid": "o--", "test": "s:", "train": "^-."}
        for split, pts in by_split.items():
            xs, ys = zip(*pts)
            ax.plot(xs, ys, markers.get(split, "d--"), color=c, alpha=0.8, label=f"{name} {split}")
            plotted += 1
    if not plotted:
        raise ValueError(f"no '{metric}' values in {', '.join(paths)}")
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = output + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, output)
    return output


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories (with metrics.jsonl) or metrics.jsonl files")
    p.add_argument("-o", "--output", default="loss_curves.png", help="PNG file to write")
    p.add_argument("--metric", default="loss", help="record field to plot (loss, ppl, bpc, lr, grad_norm, ...)")
    p.add_argument("--smooth", type=float, default=0.0, help="EMA factor for training curves (0 = none)")
    p.add_argument("--labels", nargs="*", default=None, help="legend names, one per run")
    args = p.parse_args(argv)
    try:
        out = plot_runs(args.runs, args.output, args.metric, args.smooth, args.labels)
    except (FileNotFoundError, ValueError) as e:
        print(f"plot: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
