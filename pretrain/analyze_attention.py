"""Attention utilisation: how much attention each relative distance receives, per layer and averaged, over
memory and segment (the analysis LaMemo's README leads with: XL vs LaMemo), for one or several exported models.

    python pretrain/analyze_attention.py --model runs/xl/export --model runs/lamemo/export --split valid \
        --max-steps 50 --output attention.json --plot attention.png

The split is read as evaluation streams with each model's training segment and memory lengths (``--tgt-len``
/ ``--mem-len`` override them) and the memory carried, as the ``train`` evaluation protocol does.  For every
attention layer (Transformer-XL, LaMemo; fast-weight layers have no attention probabilities and are skipped)
the current queries' attention probabilities over [memory ; segment] are accumulated by relative distance
d = (query position) - (key position) >= 0:

* ``mass[d]``: the share of all attention that goes to distance d (sums to 1 over d);
* ``mean_prob[d]``: the mean probability of a visible key at distance d (a key counts as visible when its
  probability is non-zero: masked keys have exactly 0);
* ``memory_share``: the share of attention on memory slots (keys before the segment).

The JSON holds every layer and the layer average of every model; the plot draws ``mean_prob`` against distance
(layer average, log scale) for every model in one figure, and the memory share per layer beside it.
"""
if __name__ == "__main__" and not __package__:
    import os, sys
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import json
import os
import sys
import time
from typing import Dict, List, Optional


def _int_at_least(low: int, what: str):
    """An argparse ``type``: an integer >= ``low`` (``what`` names it in the error)."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {v}")
        return v
    return parse


positive_int = _int_at_least(1, "a positive integer")
non_negative_int = _int_at_least(0, "an integer >= 0")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", action="append", required=True,
                   help="export directory (SAVE/export of a training run); repeat to compare models")
    p.add_argument("--label", action="append", default=None,
                   help="name of each --model in the plot and JSON (default: its run directory's name)")
    p.add_argument("--data-path", default=None, help="dataset prefix (default: the data the model was trained on)")
    p.add_argument("--split", default="valid", choices=["train", "valid", "test"])
    p.add_argument("--tgt-len", type=positive_int, default=None, help="segment length (default: training's)")
    p.add_argument("--mem-len", type=non_negative_int, default=None, help="memory length (default: training's)")
    p.add_argument("--batch-size", type=positive_int, default=4, help="parallel evaluation streams")
    p.add_argument("--max-steps", type=non_negative_int, default=50,
                   help="segments per stream to analyse (0 = the whole split)")
    p.add_argument("--output", default=None, help="write the profiles as JSON here")
    p.add_argument("--plot", default=None, help="write the figure (PNG) here")
    return p


class AttentionProfile:
    """Accumulates attention probabilities by relative distance, per layer (see the module docstring).

    ``record(layer, probs, mem_len)``: probs [H, B, n, mem_len + n] of the current queries; the distance of
    query i to key j is mem_len + i - j."""

    def __init__(self):
        self.mass: Dict[int, "torch.Tensor"] = {}
        self.visible: Dict[int, "torch.Tensor"] = {}
        self.queries: Dict[int, float] = {}
        self.memory: Dict[int, float] = {}

    def record(self, layer: int, probs, mem_len: int) -> None:
        import torch
        H, B, n, K = probs.shape
        p = probs.double().sum((0, 1))                                       # [n, K]
        seen = (probs > 0).double().sum((0, 1))                              # [n, K]
        i = torch.arange(n, device=p.device)[:, None]
        j = torch.arange(K, device=p.device)[None, :]
        d = mem_len + i - j                                                  # [n, K]
        ok = d >= 0
        size = max(K, len(self.mass.get(layer, ())))
        mass = torch.zeros(size, dtype=torch.float64).index_add_(0, d[ok].cpu(), p[ok].cpu())
        vis = torch.zeros(size, dtype=torch.float64).index_add_(0, d[ok].cpu(), seen[ok].cpu())
        for store, new in ((self.mass, mass), (self.visible, vis)):
            old = store.get(layer)
            if old is not None:
                new[:len(old)] += old
            store[layer] = new
        self.queries[layer] = self.queries.get(layer, 0.0) + H * B * n
        self.memory[layer] = self.memory.get(layer, 0.0) + float(p[:, :mem_len].sum())

    def summary(self) -> Dict[str, object]:
        layers = []
        for layer in sorted(self.mass):
            q = self.queries[layer]
            mass = (self.mass[layer] / q)
            mean_prob = self.mass[layer] / self.visible[layer].clamp(min=1)
            layers.append({"layer": layer, "mass": mass.tolist(), "mean_prob": mean_prob.tolist(),
                           "memory_share": self.memory[layer] / q, "queries": q})
        if not layers:
            return {"layers": [], "mean": None}
        width = max(len(l["mass"]) for l in layers)

        def avg(key):
            return [sum(l[key][d] for l in layers if d < len(l[key])) / len(layers) for d in range(width)]
        return {"layers": layers, "mean": {"mass": avg("mass"), "mean_prob": avg("mean_prob"),
                                          "memory_share": sum(l["memory_share"] for l in layers) / len(layers)}}


def analyse(model, stream, *, device, mem_len: Optional[int], max_steps: int) -> Dict[str, object]:
    """Run the evaluation stream through ``model`` with the memory carried and profile its attention."""
    import torch
    prof = AttentionProfile()
    model.stack.recorder = prof.record
    try:
        state = model.init_state(stream.num_streams, mem_len=mem_len, device=device)
        steps = len(stream) if max_steps <= 0 else min(max_steps, len(stream))
        with torch.no_grad():
            for step in range(steps):
                mb = stream.get(step)
                _, state = model(torch.from_numpy(mb.tokens).to(device), state)
    finally:
        model.stack.recorder = None
    return {"steps": steps, **prof.summary()}


def plot(results: List[Dict[str, object]], path: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [2, 1]})
    for r in results:
        mean = r["mean"]
        if mean is None:
            continue
        xs = list(range(len(mean["mean_prob"])))
        ax.plot(xs, mean["mean_prob"], label=f"{r['label']} (memory {r['mem_len']}, segment {r['tgt_len']})")
        shares = [l["memory_share"] for l in r["layers"]]
        bx.plot([l["layer"] for l in r["layers"]], shares, marker="o", label=r["label"])
    ax.set_yscale("log")
    ax.set_xlabel("relative distance (tokens)")
    ax.set_ylabel("mean attention probability (layer average)")
    ax.set_title("attention by distance")
    ax.legend(fontsize=8)
    layers = sorted({l["layer"] for r in results for l in r["layers"]})
    bx.set_xticks(layers)
    bx.set_xlabel("layer")
    bx.set_ylabel("attention on the memory")
    bx.set_title("memory share per layer")
    bx.legend(fontsize=8)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.label and len(args.label) != len(args.model):
        print(f"analyze_attention.py: {len(args.label)} --label for {len(args.model)} --model", file=sys.stderr)
        return 2
    from pretrain.runtime import tune_cpu_allocator
    tune_cpu_allocator()
    import torch

    from data_tools.streams import EvalStream
    from pretrain.engine.data import load_data_info
    from pretrain.engine.export import load_exported, read_export

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = []
    for i, path in enumerate(args.model):
        try:
            _, meta = read_export(path)
            data_path = args.data_path or ",".join(f"{k}={v}" for k, v in meta["data"].items())
            data = load_data_info(data_path)
            if not data.has(args.split):
                raise ValueError(f"no {args.split} split in {data_path} (have: {', '.join(data.prefixes)})")
            model, cfg, _, _ = load_exported(path, device=device, dropout=0.0, dropatt=0.0)
        except (FileNotFoundError, ValueError) as e:       # ExportError is a ValueError
            print(f"analyze_attention.py: {e}", file=sys.stderr)
            return 2
        tgt = args.tgt_len or cfg.tgt_len
        mem = cfg.mem_len if args.mem_len is None else args.mem_len
        label = args.label[i] if args.label else os.path.basename(os.path.dirname(os.path.abspath(path)))
        t0 = time.time()
        stream = EvalStream(data.prefixes[args.split], seq_len=tgt, num_streams=args.batch_size, pad_id=data.pad_id)
        res = analyse(model, stream, device=device, mem_len=mem, max_steps=args.max_steps)
        res.update({"label": label, "model": os.path.abspath(path), "split": args.split, "tgt_len": tgt,
                    "mem_len": mem, "layer_types": [s.code for s in cfg.layer_specs()],
                    "seconds": round(time.time() - t0, 2)})
        results.append(res)
        share = res["mean"]["memory_share"] if res["mean"] else float("nan")
        print(f"{label}: {res['steps']} segments x {args.batch_size} streams, {len(res['layers'])} attention layers, "
              f"attention on the memory {share:.3f} (layer average)")
    if args.output:
        tmp = args.output + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"models": results}, f)
        os.replace(tmp, args.output)
        print(f"wrote {args.output}")
    if args.plot:
        print(f"wrote {plot(results, args.plot)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
