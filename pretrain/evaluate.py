"""Evaluate an exported model on a split under a named protocol: perplexity or bits per character/byte.

    python pretrain/evaluate.py --model runs/lamemo/export --split test --protocol train
    python pretrain/evaluate.py --model runs/xl/export --split test --protocol xl \
        --tgt-len 64 --mem-len 640 --clamp-len 400 --same-length
    python pretrain/evaluate.py --model runs/fwm/export --split test --protocol sliding --tgt-len 256 --stride 32

Protocols (docs/evaluation.md): ``train`` (training segment and memory lengths, state carried; LaMemo, RMT),
``xl`` (Transformer-XL's: short target, long memory, clamp_len, same_length), ``carry`` (one stream over the
whole split, state carried), ``sliding`` (no memory, sliding window, each target scored once).  The
protocol, its settings and the number of scored tokens are printed with the result; ``--output`` also writes
them as JSON.  Runs in one process without DeepSpeed.
"""
if __name__ == "__main__" and not __package__:
    import os, sys
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import json
import os
import sys
import time


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="export directory (SAVE/export of a training run)")
    p.add_argument("--data-path", default=None,
                   help="dataset prefix or split=prefix list (default: the data the model was trained on)")
    p.add_argument("--split", default="test", choices=["train", "valid", "test"], help="split to score")
    p.add_argument("--protocol", default="train", choices=["train", "xl", "carry", "sliding"],
                   help="evaluation protocol")
    p.add_argument("--tgt-len", type=int, default=None, help="segment / window length (default: training's)")
    p.add_argument("--mem-len", type=int, default=None, help="memory length (default: training's)")
    p.add_argument("--clamp-len", type=int, default=None, help="clamp relative distances (default: training's)")
    p.add_argument("--same-length", action="store_true", default=None,
                   help="every query sees the same number of keys (xl protocol default: the export's eval config)")
    p.add_argument("--batch-size", type=int, default=1,
                   help="parallel streams (train/xl) or windows per batch (sliding); carry always uses 1")
    p.add_argument("--stride", type=int, default=None, help="sliding: targets scored per window (default tgt_len/2)")
    p.add_argument("--reset-memory", action="store_true", help="reset memory where a document starts")
    p.add_argument("--accuracy", action=argparse.BooleanOptionalAction, default=None,
                   help="report next-token accuracy on scored tokens (default: when the data marks answers)")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many segments per stream (0 = all)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = all cores)")
    p.add_argument("--output", default=None, help="also write the result as JSON here")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from pretrain.runtime import tune_cpu_allocator
    tune_cpu_allocator()
    import torch

    from data_tools.streams import EvalStream
    from pretrain.engine.data import load_data_info, summarize_loss
    from pretrain.engine.evaluation import sliding_eval, streamed_eval
    from pretrain.engine.export import load_exported, read_export

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        _, meta = read_export(args.model)
    except FileNotFoundError as e:
        print(f"evaluate.py: {e}", file=sys.stderr)
        return 2
    if args.data_path:
        data_path = args.data_path
    else:
        data_path = ",".join(f"{k}={v}" for k, v in meta["data"].items())
    try:
        data = load_data_info(data_path)
    except ValueError as e:
        print(f"evaluate.py: {e}", file=sys.stderr)
        return 2
    if not data.has(args.split):
        print(f"evaluate.py: no {args.split} split in {data_path} (have: {', '.join(data.prefixes)})",
              file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, cfg, tok, meta = load_exported(args.model, device=device, dropout=0.0, dropatt=0.0)
    if data.vocab_size > cfg.vocab_size:
        print(f"evaluate.py: the data's vocabulary ({data.vocab_size}) is larger than the model's "
              f"({cfg.vocab_size})", file=sys.stderr)
        return 2
    ev = meta.get("eval", {})
    xl = args.protocol == "xl"
    tgt = args.tgt_len or (ev.get("tgt_len") if xl else None) or cfg.tgt_len
    mem = args.mem_len if args.mem_len is not None else ((ev.get("mem_len") if xl else None) or cfg.mem_len)
    clamp = args.clamp_len if args.clamp_len is not None else ((ev.get("clamp_len") if xl else None) or cfg.clamp_len)
    same = args.same_length if args.same_length is not None else (bool(ev.get("same_length")) if xl else cfg.same_length)
    prefix = data.prefixes[args.split]
    forward = lambda t, s, y, **kw: model(t, s, y, **kw)
    t0 = time.time()

    def progress(done, total):
        if sys.stderr.isatty() and (done == total or done % max(1, total // 20) == 0):
            print(f"\r  {done}/{total} ({(time.time() - t0):.0f}s)", end="", file=sys.stderr, flush=True)

    if args.protocol == "sliding":
        stride = args.stride or max(1, tgt // 2)
        mask = data.meta.get("loss_mask")
        mask_prefix = os.path.join(os.path.dirname(os.path.abspath(prefix)), mask) if mask else None
        res = sliding_eval(forward, model, prefix, window=tgt, stride=stride, batch_size=args.batch_size,
                           device=device, loss_mask=mask_prefix, max_windows=args.max_steps, progress=progress)
        settings = {"window": tgt, "stride": stride, "memory": 0}
    else:
        streams = 1 if args.protocol == "carry" else args.batch_size
        stream = EvalStream(prefix, seq_len=tgt, num_streams=streams, pad_id=data.pad_id)
        res = streamed_eval(forward, model, stream, device=device, mem_len=mem, clamp_len=clamp, same_length=same,
                            reset_memory=args.reset_memory, max_steps=args.max_steps, progress=progress,
                            accuracy=args.accuracy if args.accuracy is not None else "loss_mask" in data.meta)
        settings = {"tgt_len": tgt, "mem_len": mem, "clamp_len": clamp, "same_length": same, "streams": streams}
    if sys.stderr.isatty():
        print(file=sys.stderr)
    result = {"model": os.path.abspath(args.model), "split": args.split, "data": prefix,
              "protocol": args.protocol, **settings, "scored_tokens": int(res["tokens"]),
              **summarize_loss(res["loss"], data.metric), "seconds": round(time.time() - t0, 2)}
    if "accuracy" in res:
        result["accuracy"] = res["accuracy"]
    metric = "bpc" if "bpc" in result else "ppl"
    acc = f" | accuracy {result['accuracy']:.4f}" if "accuracy" in result else ""
    print(f"{args.split} | protocol {args.protocol} ({', '.join(f'{k} {v}' for k, v in settings.items())}) | "
          f"{result['scored_tokens']} scored tokens | loss {result['loss']:.4f} | {metric} {result[metric]:.4f}{acc}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
