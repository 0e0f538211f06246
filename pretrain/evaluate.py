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
if __name__ == "__main__":
    import os, signal, sys  # noqa: E401
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C while starting up: end at once (nothing written yet)
    if not __package__:
        sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import json
import os
import sys
import time

from data_tools.cli import CommandParser, bounded, check_output_folder, fail, int_at_least, run_interruptible

PROG = "evaluate.py"


def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(prog=PROG, description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="export directory (SAVE/export of a training run)")
    p.add_argument("--data-path", default=None,
                   help="dataset prefix or split=prefix list (default: the data the model was trained on)")
    p.add_argument("--split", default="test", choices=["train", "valid", "test"], help="split to score")
    p.add_argument("--protocol", default="train", choices=["train", "xl", "carry", "sliding"],
                   help="evaluation protocol")
    p.add_argument("--tgt-len", type=int_at_least(1), default=None,
                   help="segment / window length (default: training's)")
    p.add_argument("--mem-len", type=int_at_least(0, "0 = no memory"), default=None,
                   help="memory length (default: training's)")
    p.add_argument("--clamp-len", type=bounded(int), default=None,
                   help="clamp relative distances (<= 0: no clamp; default: training's)")
    p.add_argument("--same-length", action="store_true", default=None,
                   help="every query sees the same number of keys (xl protocol default: the export's eval config)")
    p.add_argument("--batch-size", type=int_at_least(1), default=1,
                   help="parallel streams (train/xl) or windows per batch (sliding); carry always uses 1")
    p.add_argument("--stride", type=int_at_least(1), default=None,
                   help="sliding: targets scored per window, at most the window (default tgt_len/2)")
    p.add_argument("--reset-memory", action="store_true", help="reset memory where a document starts")
    p.add_argument("--accuracy", action=argparse.BooleanOptionalAction, default=None,
                   help="report next-token accuracy on scored tokens (default: when the data marks answers)")
    p.add_argument("--max-steps", type=int_at_least(0, "0 = all"), default=0,
                   help="stop after this many segments per stream (0 = all)")
    p.add_argument("--threads", type=int_at_least(0, "0 = all cores"), default=0,
                   help="torch CPU threads (0 = all cores)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress output (a bar on a terminal, else a line every 30 s with rate and ETA)")
    p.add_argument("--output", default=None, help="also write the result as JSON here")
    return p


def main(argv=None) -> int:
    """The command: prints the result line; exit status 0, 2 on bad input (one line on stderr naming the
    flag or file), 130 when interrupted."""
    return run_interruptible(PROG, _evaluate, build_parser().parse_args(argv), what="no result written")


def _evaluate(args) -> int:
    import warnings
    warnings.filterwarnings("ignore", category=UserWarning, module="megatron")  # optional fused kernels absent
    from pretrain.runtime import tune_cpu_allocator
    tune_cpu_allocator()
    import torch

    from data_tools.cli import CommandError
    from data_tools.indexed import IndexedDatasetError
    from data_tools.progress import Progress
    from data_tools.streams import EvalStream
    from data_tools.tokenization import TokenizerError
    from pretrain.config_base import ConfigError
    from pretrain.engine.data import load_data_info, summarize_loss
    from pretrain.engine.evaluation import sliding_eval, streamed_eval
    from pretrain.engine.export import ExportError, check_overrides, load_exported, read_export

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        if args.output:
            check_output_folder(args.output, "--output")
        _, meta = read_export(args.model)
    except (ExportError, CommandError) as e:
        return fail(PROG, e)
    if args.data_path:
        data_path = args.data_path
    else:
        data_path = ",".join(f"{k}={v}" for k, v in (meta.get("data") or {}).items())
    try:
        data = load_data_info(data_path)
    except (ConfigError, ValueError) as e:
        where = "--data-path " + data_path if args.data_path else "the data the model was trained on"
        return fail(PROG, f"{where}: {str(e).split(': ', 1)[-1]}" + ("" if args.data_path else
                                                                   " (give the dataset with --data-path)"))
    if not data.has(args.split):
        return fail(PROG, f"--split {args.split}: no {args.split} split in {data_path} (have: "
                          f"{', '.join(data.prefixes)})")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model, cfg, tok, meta = load_exported(args.model, device=device, dropout=0.0, dropatt=0.0)
    except ExportError as e:
        return fail(PROG, e)
    if data.vocab_size > cfg.vocab_size:
        return fail(PROG, f"the data's vocabulary ({data.vocab_size} ids, {data.prefixes[args.split]}) is larger "
                          f"than the model's ({cfg.vocab_size}): evaluate on data made with the model's tokenizer")
    ev = meta.get("eval", {})
    xl = args.protocol == "xl"
    tgt = args.tgt_len or (ev.get("tgt_len") if xl else None) or cfg.tgt_len
    mem = args.mem_len if args.mem_len is not None else ((ev.get("mem_len") if xl else None) or cfg.mem_len)
    clamp = args.clamp_len if args.clamp_len is not None else ((ev.get("clamp_len") if xl else None) or cfg.clamp_len)
    same = args.same_length if args.same_length is not None else (bool(ev.get("same_length")) if xl else cfg.same_length)
    sliding = args.protocol == "sliding"
    stride = args.stride or max(1, tgt // 2)
    try:
        if sliding:
            if stride > tgt:
                raise ExportError(f"--stride {stride}: must be at most the window (--tgt-len {tgt})")
        else:
            check_overrides(cfg, tgt_len=tgt, mem_len=mem, clamp_len=clamp, same_length=same)
    except ExportError as e:
        return fail(PROG, e)
    prefix = data.prefixes[args.split]
    forward = lambda t, s, y, **kw: model(t, s, y, **kw)
    t0 = time.time()
    bar = None

    def progress(done, total):
        nonlocal bar
        if bar is None:
            bar = Progress(PROG, f"{args.split}, protocol {args.protocol}", total, unit="segments",
                           enabled=not args.no_progress)
        bar.update(done - bar.done)

    try:
        if sliding:
            mask = data.meta.get("loss_mask")
            mask_prefix = os.path.join(os.path.dirname(os.path.abspath(prefix)), mask) if mask else None
            res = sliding_eval(forward, model, prefix, window=tgt, stride=stride, batch_size=args.batch_size,
                               device=device, loss_mask=mask_prefix, max_windows=args.max_steps, progress=progress)
            settings = {"window": tgt, "stride": stride, "memory": 0}
        else:
            streams = 1 if args.protocol == "carry" else args.batch_size
            stream = EvalStream(prefix, seq_len=tgt, num_streams=streams, pad_id=data.pad_id)
            res = streamed_eval(forward, model, stream, device=device, mem_len=mem, clamp_len=clamp,
                                same_length=same, reset_memory=args.reset_memory, max_steps=args.max_steps,
                                progress=progress,
                                accuracy=args.accuracy if args.accuracy is not None else "loss_mask" in data.meta)
            settings = {"tgt_len": tgt, "mem_len": mem, "clamp_len": clamp, "same_length": same, "streams": streams}
    except (IndexedDatasetError, TokenizerError, ValueError) as e:
        return fail(PROG, str(e) if os.path.basename(prefix) in str(e) else f"{prefix}: {e}")
    finally:
        if bar is not None:
            bar.close()
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
        from data_tools.cli import staged_file
        with staged_file(args.output) as tmp, open(tmp, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
