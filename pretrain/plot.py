"""Plot loss curves of one or several runs from their ``metrics.jsonl`` (PNG).

    python pretrain/plot.py runs/lamemo runs/xl -o curves.png [--smooth 0.9] [--metric loss]

Each argument is a run directory (holding metrics.jsonl) or a metrics.jsonl file.  Training records are
drawn as lines (optionally smoothed with an exponential moving average), evaluation records as markers
on the same axes, one colour per run.
"""
if __name__ == "__main__":
    import os, signal, sys  # noqa: E401
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C while starting up: end at once (nothing written yet)
    if not __package__:
        sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import json
import os
import sys
from typing import Dict, List, Optional, Tuple

from data_tools.cli import CommandError, CommandParser, bounded, check_output_folder, fail, interrupted

PROG = "plot.py"


def read_metrics(path: str) -> Tuple[List[dict], List[dict]]:
    """(training records, evaluation records) of a run directory or metrics.jsonl file.
    ``FileNotFoundError`` / ``ValueError`` naming the file (and line) when it is missing or malformed."""
    f = os.path.join(path, "metrics.jsonl") if os.path.isdir(path) else path
    if not os.path.isfile(f):
        raise FileNotFoundError(f"{f}: no metrics file (is {path} a run directory written with --save?)")
    train, evals = [], []
    with open(f, encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{f}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("step"), (int, float)):
                raise ValueError(f"{f}:{lineno}: not a metrics record (a JSON object with a 'step')")
            (evals if rec.get("kind") == "eval" else train).append(rec)
    return train, evals


def ema(values: List[float], beta: float) -> List[float]:
    """Exponential moving average with factor ``beta`` in [0, 1) (0 = the values themselves), started at the
    first value."""
    if beta <= 0:
        return list(values)
    out, avg = [], None
    for v in values:
        avg = v if avg is None else beta * avg + (1 - beta) * v
        out.append(avg)
    return out


def plot_runs(paths: List[str], output: str, metric: str = "loss", smooth: float = 0.0,
              labels: Optional[List[str]] = None, title: Optional[str] = None) -> str:
    """Draw ``metric`` of every run in ``paths`` on one set of axes (training records as lines, smoothed by
    ``smooth``; evaluation records as markers), one colour per run, named by ``labels`` (default: the
    folder names); write the PNG to ``output`` atomically and return its path.  ``ValueError`` when no run
    has the metric."""
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
        pts = [(r["step"], r[metric]) for r in train if isinstance(r.get(metric), (int, float))]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ema(list(ys), smooth), color=c, label=f"{name} train")
            plotted += 1
        by_split: Dict[str, List[Tuple[int, float]]] = {}
        for r in evals:
            if isinstance(r.get(metric), (int, float)):
                by_split.setdefault(r.get("split", "valid"), []).append((r["step"], r[metric]))
        markers = {"valid": "o--", "test": "s:", "train": "^-."}
        for split, pts in by_split.items():
            xs, ys = zip(*pts)
            ax.plot(xs, ys, markers.get(split, "d--"), color=c, alpha=0.8, label=f"{name} {split}")
            plotted += 1
    if not plotted:
        raise ValueError(f"no '{metric}' values in {', '.join(paths)}")
    ax.set_xlabel("step")
    ax.set_ylabel({"loss": "loss (nats per token)", "bpc": "bits per character"}.get(metric, metric))
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, output)


def save_figure(fig, output: str) -> str:
    """Write the matplotlib figure ``fig`` as a PNG (120 dpi) to ``output`` atomically (``staged_file``: the
    folders it needs are made, and removed again with the temporary file when saving fails), close it, and
    return ``output``."""
    import matplotlib.pyplot as plt

    from data_tools.cli import staged_file
    try:
        with staged_file(output, ".png") as tmp:
            fig.savefig(tmp, dpi=120)
    finally:
        plt.close(fig)
    return output


def main(argv=None) -> int:
    """The command: exit status 0, 2 on bad input (one line on stderr naming the flag or file)."""
    p = CommandParser(prog=PROG, description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories (with metrics.jsonl) or metrics.jsonl files")
    p.add_argument("-o", "--output", default="loss_curves.png", help="PNG file to write")
    p.add_argument("--metric", default="loss", help="record field to plot (loss, ppl, bpc, lr, grad_norm, ...)")
    p.add_argument("--smooth", type=bounded(float, 0, 1, high_open=True, hint="0 = none"), default=0.0,
                   help="EMA factor for training curves, in [0, 1) (0 = none)")
    p.add_argument("--labels", nargs="*", default=None, help="legend names, one per run")
    p.add_argument("--title", default=None, help="title above the plot")
    args = p.parse_args(argv)
    if args.labels is not None and len(args.labels) != len(args.runs):
        return fail(PROG, f"--labels: {len(args.labels)} names for {len(args.runs)} runs; give one per run")
    try:
        check_output_folder(args.output, "--output")
        out = plot_runs(args.runs, args.output, args.metric, args.smooth, args.labels, args.title)
    except (FileNotFoundError, ValueError, CommandError) as e:
        return fail(PROG, e)
    except KeyboardInterrupt:
        return interrupted(PROG)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
