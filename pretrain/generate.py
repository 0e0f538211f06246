"""Generate text from an exported model, every new token predicted with the context training gave it.

    python pretrain/generate.py --model runs/lamemo/export --prompt "The history of" --max-new-tokens 200
    python pretrain/generate.py --model runs/lamemo/export --prompt-file prompts.txt --top-p 0.95 --seed 42

How the model is fed follows from what its state carries (``model.decode_policy``, see ``generate``): a memory
(Transformer-XL, LaMemo, Compressive, RMT, slots) is carried from segment to segment of the training length as
in training, the current partial segment re-read for every new token; a model without carried state (mem_len 0,
absolute positions, fast weights restarted every segment) reads a sliding window of the segment length;
carried fast weights take one token at a time.  Sampling: temperature, then top-k, then nucleus (top-p).
Output is decoded with the dataset's tokenizer.  A prompt file holds one prompt per line (or per
blank-line-separated block with --blocks).
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

from data_tools.cli import CommandParser, bounded, check_output_folder, fail, int_at_least, run_interruptible

from pretrain.decoding import generate, sample_next  # noqa: F401 (the decoding loop, shared with pretrain/hf)

PROG = "generate.py"


def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(prog=PROG, description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="export directory (SAVE/export of a training run)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", action="append", default=None, help="a prompt (repeatable)")
    src.add_argument("--prompt-file", default=None, help="file with one prompt per line")
    p.add_argument("--blocks", action="store_true", help="prompt file: prompts are blank-line-separated blocks")
    p.add_argument("--max-new-tokens", type=int_at_least(1), default=100, help="tokens to sample per prompt")
    p.add_argument("--temperature", type=bounded(float, 0, hint="0 = greedy"), default=1.0,
                   help="softmax temperature (0 = greedy)")
    p.add_argument("--top-k", type=int_at_least(0, "0 = all"), default=0,
                   help="keep the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=bounded(float, 0, 1, low_open=True, hint="1 = no nucleus filtering"),
                   default=0.95, help="nucleus: keep the smallest set of tokens with this probability mass "
                                      "(1 = all; a tiny value keeps only the most likely token)")
    p.add_argument("--seed", type=int_at_least(0), default=42, help="sampling seed")
    p.add_argument("--mem-len", type=int_at_least(0, "0 = no memory"), default=None,
                   help="memory length while generating (default: training's)")
    p.add_argument("--segment-len", type=int_at_least(1), default=None,
                   help="segment (or sliding window) length the text is read in (default: training's)")
    p.add_argument("--clamp-len", type=bounded(int), default=None,
                   help="clamp relative distances (<= 0: no clamp; default: training's)")
    p.add_argument("--stop-at-eod", action="store_true", help="stop a sample at the end-of-document token")
    p.add_argument("--output", default=None, help="also write the samples as JSON lines here")
    return p


def main(argv=None) -> int:
    """The command: prints each prompt and its sample; exit status 0, 2 on bad input (one line on stderr
    naming the flag or file), 130 when interrupted."""
    return run_interruptible(PROG, _generate, build_parser().parse_args(argv), what="no samples written")


def _generate(args) -> int:
    import warnings
    warnings.filterwarnings("ignore", category=UserWarning, module="megatron")  # optional fused kernels absent
    from pretrain.runtime import tune_cpu_allocator
    tune_cpu_allocator()
    import torch

    from data_tools.cli import CommandError, staged_file
    from pretrain.engine.export import ExportError, check_overrides, load_exported
    if args.blocks and not args.prompt_file:
        return fail(PROG, "--blocks splits a --prompt-file into blank-line-separated prompts; give --prompt-file")
    if args.prompt_file:
        try:
            text = open(args.prompt_file, encoding="utf-8").read()
        except OSError as e:
            return fail(PROG, f"--prompt-file {args.prompt_file}: {e.strerror}")
        except UnicodeDecodeError as e:
            return fail(PROG, f"--prompt-file {args.prompt_file}: not UTF-8 text (byte {e.start})")
        prompts = [b.strip("\n") for b in text.split("\n\n")] if args.blocks else text.splitlines()
        prompts = [p for p in prompts if p.strip()]
        if not prompts:
            return fail(PROG, f"--prompt-file {args.prompt_file}: no prompt in it (blank)")
    else:
        prompts = args.prompt or [""]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        if args.output:
            check_output_folder(args.output, "--output")
        model, cfg, tok, meta = load_exported(args.model, device=device, dropout=0.0, dropatt=0.0)
        check_overrides(cfg, mem_len=args.mem_len, clamp_len=args.clamp_len)
    except (ExportError, CommandError) as e:
        return fail(PROG, e)
    eod = meta.get("eod_id") if args.stop_at_eod else None
    if args.stop_at_eod and eod is None:
        return fail(PROG, f"--stop-at-eod: the model's tokenizer ({args.model}) has no end-of-document token")
    gen = torch.Generator(device=device).manual_seed(args.seed)
    mem_len = args.mem_len if args.mem_len is not None else cfg.mem_len
    results = []
    for prompt in prompts:
        try:
            ids = tok.encode(prompt) if prompt else []
        except ValueError as e:
            return fail(PROG, f"prompt {prompt[:60]!r}: cannot be encoded with the model's tokenizer: {e}")
        new = generate(model, ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                       top_k=args.top_k, top_p=args.top_p, generator=gen, mem_len=args.mem_len,
                       segment_len=args.segment_len or cfg.tgt_len, clamp_len=args.clamp_len, eod_id=eod,
                       device=device)
        text = tok.decode(new)
        results.append({"prompt": prompt, "completion": text, "prompt_tokens": len(ids), "new_tokens": len(new)})
        print(f"=== prompt ({len(ids)} tokens): {prompt!r}")
        print(f"--- sample ({len(new)} tokens, temperature {args.temperature}, top-k {args.top_k}, "
              f"top-p {args.top_p}, memory {mem_len}):")
        print(text, flush=True)
    if args.output:
        with staged_file(args.output) as tmp, open(tmp, "w") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
