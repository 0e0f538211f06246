"""Generate text from an exported model, carrying the memory while generating.

    python pretrain/generate.py --model runs/lamemo/export --prompt "The history of" --max-new-tokens 200
    python pretrain/generate.py --model runs/lamemo/export --prompt-file prompts.txt --top-p 0.95 --seed 42

The prompt is fed in segments of the training length with the memory carried from one to the next; then
tokens are sampled one at a time (a segment of length 1), each forward updating the memory: Transformer-XL
appends the new position, LaMemo also refreshes every memory position with the new token (its look-ahead).
Sampling: temperature, then top-k, then nucleus (top-p).  Output is decoded with the dataset's tokenizer.
A prompt file holds one prompt per line (or per blank-line-separated block with --blocks).
"""
if __name__ == "__main__" and not __package__:
    import os, sys
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import json
import sys
from typing import List, Optional


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="export directory (SAVE/export of a training run)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", action="append", default=None, help="a prompt (repeatable)")
    src.add_argument("--prompt-file", default=None, help="file with one prompt per line")
    p.add_argument("--blocks", action="store_true", help="prompt file: prompts are blank-line-separated blocks")
    p.add_argument("--max-new-tokens", type=int, default=100, help="tokens to sample per prompt")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (0 = greedy)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus: keep the smallest set with this mass (1 = all)")
    p.add_argument("--seed", type=int, default=42, help="sampling seed")
    p.add_argument("--mem-len", type=int, default=None, help="memory length while generating (default: training's)")
    p.add_argument("--segment-len", type=int, default=None, help="prompt segment length (default: training's)")
    p.add_argument("--clamp-len", type=int, default=None, help="clamp relative distances (default: training's)")
    p.add_argument("--stop-at-eod", action="store_true", help="stop a sample at the end-of-document token")
    p.add_argument("--output", default=None, help="also write the samples as JSON lines here")
    return p


def sample_next(logprobs, temperature: float, top_k: int, top_p: float, generator):
    """One token id per row from log-probabilities [B, V]."""
    import torch
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
        drop = cum - probs > top_p  # keep the token that crosses the threshold
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, -1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def generate(model, prompt_ids: List[int], *, max_new_tokens: int, temperature: float, top_k: int,
             top_p: float, generator, mem_len: Optional[int], segment_len: int, clamp_len: Optional[int] = None,
             eod_id: Optional[int] = None, device="cpu") -> List[int]:
    """Sample up to ``max_new_tokens`` ids after ``prompt_ids``, carrying the memory as the model asks
    (``model.decode_policy``): ``"token"``: the prompt goes in segments of ``segment_len``, then every new token
    is a segment of one that updates the state (Transformer-XL appends it, LaMemo also refreshes its memory with
    it, fast weights write it); ``"segment"``: the state is written only at segment boundaries, so the current
    partial segment is re-read from the state at its start for every new token, and the state moves on when the
    segment holds ``segment_len`` tokens."""
    import torch
    state = model.init_state(1, mem_len=mem_len, device=device)
    ids = list(prompt_ids)
    if not ids:
        ids = [eod_id if eod_id is not None else 0]

    def run(tokens, st, **kw):
        return model(torch.tensor([tokens], dtype=torch.long, device=device), st, clamp_len=clamp_len, **kw)

    out_ids: List[int] = []
    with torch.no_grad():
        if getattr(model, "decode_policy", "token") == "token":
            # all prompt tokens but the last build the memory; the last one is the first generation input
            ctx, cur = ids[:-1], ids[-1]
            for s in range(0, len(ctx), segment_len):
                _, state = run(ctx[s:s + segment_len], state)
            for _ in range(max_new_tokens):
                out, state = run([cur], state, return_logits=True)
                cur = int(sample_next(out.logits[:, -1, :], temperature, top_k, top_p, generator)[0])
                out_ids.append(cur)
                if cur == eod_id:
                    break
            return out_ids
        # segment policy: whole segments of the prompt move the state; the rest (1..segment_len tokens) is the
        # current partial segment
        pos = 0
        while len(ids) - pos > segment_len:
            _, state = run(ids[pos:pos + segment_len], state)
            pos += segment_len
        buf = ids[pos:]
        for _ in range(max_new_tokens):
            out, after = run(buf, state, return_logits=True)
            cur = int(sample_next(out.logits[:, -1, :], temperature, top_k, top_p, generator)[0])
            out_ids.append(cur)
            if cur == eod_id:
                break
            if len(buf) == segment_len:          # the segment is complete: its state is the next one's
                state, buf = after, [cur]
            else:
                buf.append(cur)
    return out_ids


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from pretrain.runtime import tune_cpu_allocator
    tune_cpu_allocator()
    import torch

    from pretrain.engine.export import load_exported, read_export
    try:
        read_export(args.model)
    except FileNotFoundError as e:
        print(f"generate.py: {e}", file=sys.stderr)
        return 2
    if args.prompt_file:
        try:
            text = open(args.prompt_file, encoding="utf-8").read()
        except OSError as e:
            print(f"generate.py: {args.prompt_file}: {e.strerror}", file=sys.stderr)
            return 2
        prompts = [b.strip("\n") for b in text.split("\n\n")] if args.blocks else text.splitlines()
        prompts = [p for p in prompts if p.strip()]
    else:
        prompts = args.prompt or [""]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, cfg, tok, meta = load_exported(args.model, device=device, dropout=0.0, dropatt=0.0)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    eod = meta.get("eod_id") if args.stop_at_eod else None
    results = []
    for prompt in prompts:
        try:
            ids = tok.encode(prompt) if prompt else []
        except ValueError as e:
            print(f"generate.py: prompt {prompt!r}: {e}", file=sys.stderr)
            return 2
        new = generate(model, ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                       top_k=args.top_k, top_p=args.top_p, generator=gen, mem_len=args.mem_len,
                       segment_len=args.segment_len or cfg.tgt_len, clamp_len=args.clamp_len, eod_id=eod,
                       device=device)
        text = tok.decode(new)
        results.append({"prompt": prompt, "completion": text, "prompt_tokens": len(ids), "new_tokens": len(new)})
        print(f"=== prompt ({len(ids)} tokens): {prompt!r}")
        print(f"--- sample ({len(new)} tokens, temperature {args.temperature}, top-k {args.top_k}, "
              f"top-p {args.top_p}, memory {args.mem_len or cfg.mem_len}):")
        print(text)
    if args.output:
        with open(args.output, "w") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
