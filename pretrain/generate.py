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
from typing import List, Optional

from data_tools.cli import CommandParser, bounded, check_output_folder, fail, int_at_least, run_interruptible

PROG = "generate.py"


def sample_next(logprobs, temperature: float, top_k: int, top_p: float, generator):
    """One token id per row (int64 [B]) from log-probabilities ``logprobs`` [B, V].

    ``temperature`` 0 is greedy (argmax); otherwise the logits are divided by it, then only the ``top_k``
    most likely tokens are kept (0 = all), then nucleus sampling (Holtzman et al. 2020, "The Curious Case
    of Neural Text Degeneration", section 3.1) keeps the smallest set of most likely tokens whose
    probability reaches ``top_p`` (in (0, 1]; 1 keeps all).  ``ValueError`` for values outside these
    ranges (the command checks them first)."""
    import torch
    if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(f"temperature must be >= 0, top_k >= 0 and top_p in (0, 1]; got {temperature}, {top_k}, "
                         f"{top_p}")
    if temperature <= 0:
        return logprobs.argmax(-1)
    logits = logprobs.float() / temperature
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0 < top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, -1)
        cum = probs.cumsum(-1)
        drop = cum - probs >= top_p  # the mass before a token already reaches top_p: not needed
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, -1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def generate(model, prompt_ids: List[int], *, max_new_tokens: int, temperature: float, top_k: int,
             top_p: float, generator, mem_len: Optional[int], segment_len: int, clamp_len: Optional[int] = None,
             eod_id: Optional[int] = None, device="cpu") -> List[int]:
    """Sample up to ``max_new_tokens`` ids (a list of ints, stopping after ``eod_id`` if given) after
    ``prompt_ids`` (token ids; an empty prompt starts from ``eod_id``, or 0), one sequence, without gradients.

    Every new token is drawn from what the model predicts *with the context it was trained with*: training read
    the text in segments of ``segment_len`` (tgt_len), each position seeing the earlier positions of its segment
    plus what the state carried in from before it.  How that context is rebuilt while generating follows from
    what the state carries (``model.decode_policy_for(mem_len)``, derived from each layer's ``carries``):

    * ``"segment"`` (a memory that carries part of the past: Transformer-XL and LaMemo caches, compressed
      memory, RMT memory tokens, slots, and hybrids with such layers): the prompt and the output are read in
      segments aligned at the prompt's first token, the state moving on at segment boundaries exactly as in
      training; for every new token the current partial segment is re-read from the state at its start.  Each
      token's distribution is the one of a teacher-forced pass over prompt + output in training segments (what
      ``evaluate.py --protocol train`` scores).  A token-by-token decode would instead give every token only the
      ``mem_len`` cached positions, the context of a segment's first position (none with mem_len 0).
    * ``"window"`` (no state carries anything: mem_len 0, absolute positions, fast weights restarted every
      segment): every new token's distribution is the prediction at the last position of a pass over the last
      ``segment_len`` tokens from a fresh state, a sliding window (``evaluate.py --protocol sliding`` with stride
      1).  Of the contexts training gave (0 to ``segment_len`` - 1 earlier tokens) this is the longest, in the
      place training had it (the segment's last position, which matters for absolute positions); the segment-
      aligned reading would restart from a single token at every segment boundary.
    * ``"token"`` (every layer's state carries all it has read: carried fast weights): the prompt goes in
      segments of ``segment_len``, then every new token is a segment of one that updates the state, which
      equals reading whole segments.

    A pass over fewer than ``segment_len`` tokens (a partial segment, a window at the start of the text) is
    padded to ``segment_len`` with copies of its last token and read at its last real position: causality keeps
    the padding from every earlier position, and positions counted from the segment's end (absolute positions)
    then sit where training had them.  ``mem_len`` (None: the model's), ``clamp_len`` (None: the model's)
    override the model's settings; ``ValueError`` for a ``mem_len`` the model refuses or a ``segment_len`` < 1;
    ``sample_next``'s errors for bad sampling settings."""
    import torch
    if segment_len < 1:
        raise ValueError(f"segment_len must be >= 1, got {segment_len}")
    state = model.init_state(1, mem_len=mem_len, device=device)
    policy = model.decode_policy_for(state.mem_len)
    ids = list(prompt_ids)
    if not ids:
        ids = [eod_id if eod_id is not None else 0]

    def run(tokens, st, **kw):
        return model(torch.tensor([tokens], dtype=torch.long, device=device), st, clamp_len=clamp_len, **kw)

    def predict(tokens, st):
        """(log-probabilities [1, V] after the last of ``tokens``, the state after them) from state ``st``; a
        pass over fewer than segment_len tokens is padded (its state is then not the text's: unused)."""
        n = len(tokens)
        out, after = run(tokens + tokens[-1:] * (segment_len - n), st, return_logits=True)
        return out.logits[:, n - 1, :], after

    out_ids: List[int] = []

    def emit(logprobs) -> bool:
        """Sample the next token into out_ids; True when generation is over."""
        cur = int(sample_next(logprobs, temperature, top_k, top_p, generator)[0])
        out_ids.append(cur)
        return cur == eod_id or len(out_ids) == max_new_tokens

    with torch.no_grad():
        if max_new_tokens < 1:
            return out_ids
        if policy == "token":
            # all prompt tokens but the last build the state; the last one is the first generation input
            ctx, cur = ids[:-1], ids[-1]
            for s in range(0, len(ctx), segment_len):
                _, state = run(ctx[s:s + segment_len], state)
            while True:
                out, state = run([cur], state, return_logits=True)
                if emit(out.logits[:, -1, :]):
                    return out_ids
                cur = out_ids[-1]
        if policy == "window":
            while True:
                if emit(predict((ids + out_ids)[-segment_len:], state)[0]):
                    return out_ids
        # segment policy: whole segments of the prompt move the state; the rest (1..segment_len tokens) is the
        # current partial segment
        pos = 0
        while len(ids) - pos > segment_len:
            _, state = run(ids[pos:pos + segment_len], state)
            pos += segment_len
        buf = ids[pos:]
        while True:
            logprobs, after = predict(buf, state)
            if emit(logprobs):
                return out_ids
            if len(buf) == segment_len:          # the segment is complete: its state is the next one's
                state, buf = after, [out_ids[-1]]
            else:
                buf.append(out_ids[-1])


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
