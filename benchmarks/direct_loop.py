"""A plain training loop over a synthetic task, without the engine: the control for engine runs on the same task.

    python benchmarks/direct_loop.py --stages runs/copy6:600 --mechanism rmt --mem-tokens 4
    python benchmarks/direct_loop.py --stages runs/copyL2:200,runs/copyL4:400,runs/copy6:600 --mechanism rmt
    python benchmarks/direct_loop.py --stages runs/copy6:600 --mechanism xl --mem-len 20

The loop of the RMT paper's synthetic experiments (Bulatov et al. 2022, §4; its ``train_synthetic.py``): every step
draws ``--batch`` examples of the stage's training split at random (``data_tools/synthetic.py`` output: examples of
one padded length, a multiple of ``--segment``), starts every row from a fresh memory, runs the example's segments
in order with the memory kept in the graph, and takes one AdamW step on the mean loss of the answer tokens (the
task's loss mask), gradient clipped to 1.  There is no data stream, no DeepSpeed, no schedule (constant learning
rate) and no checkpoint: what it shares with ``pretrain/train.py`` is the model (``pretrain.model.build_model``).

``--stages P1:S1,P2:S2,...`` trains S1 steps on P1's training split, then S2 on P2's, ... (a curriculum over the
number of segments per example when the tasks differ only in length); the test split of the last stage's prefix is
scored every ``--eval-every`` steps (teacher-forced next-token accuracy on the answer tokens, as the engine's
``accuracy``).  Prints one JSON line per evaluation and writes them all to ``--out`` when given.
"""
if __name__ == "__main__" and not __package__:
    import os, sys
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import json
import os
import sys
import time
from typing import List, Tuple


def parse_stages(text: str) -> List[Tuple[str, int]]:
    out = []
    for part in text.split(","):
        prefix, sep, steps = part.rpartition(":")
        if not sep or not prefix or not steps.isdigit() or int(steps) < 1:
            raise argparse.ArgumentTypeError(f"expected PREFIX:STEPS[,PREFIX:STEPS...], got {part!r}")
        out.append((prefix, int(steps)))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stages", type=parse_stages, required=True, help="PREFIX:STEPS,... (training splits in order)")
    p.add_argument("--mechanism", choices=("rmt", "xl", "none"), default="rmt")
    p.add_argument("--mem-tokens", type=int, default=4, help="rmt: memory tokens")
    p.add_argument("--mem-len", type=int, default=4, help="xl: memory length")
    p.add_argument("--segment", type=int, default=4, help="segment length (tokens)")
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--d-head", type=int, default=16)
    p.add_argument("--d-inner", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-examples", type=int, default=500)
    p.add_argument("--out", default=None, help="write the evaluations as JSON here")
    return p


def load_examples(prefix: str):
    """(tokens [E, L] int64, answer mask [E, L] bool) of a synthetic split (every example one padded length)."""
    import numpy as np
    import torch

    from data_tools import indexed
    ds, mask = indexed.IndexedDataset(prefix), indexed.IndexedDataset(prefix + ".mask")
    L = int(ds.sequence_lengths[0])
    if not (ds.sequence_lengths == L).all():
        raise SystemExit(f"direct_loop.py: {prefix}: examples of different lengths (not a synthetic task split)")
    toks = np.asarray(ds.tokens).reshape(-1, L).astype(np.int64)
    m = np.asarray(mask.tokens).reshape(-1, L).astype(bool)
    return torch.from_numpy(toks), torch.from_numpy(m)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from pretrain.model import build_model, parallel
    from pretrain.model.model_config import ModelConfig

    torch.manual_seed(args.seed)
    parallel.initialize(1)
    last = args.stages[-1][0]
    test_x, test_m = load_examples(last + "_test")
    test_x, test_m = test_x[:args.eval_examples], test_m[:args.eval_examples]
    with open(last + "_test.json") as f:
        vocab = int(json.load(f)["vocab_size"])
    cfg = ModelConfig(attn_type=0, n_layer=args.n_layer, d_model=args.d_model, n_head=args.n_head,
                      d_head=args.d_head, d_inner=args.d_inner, dropout=0.0, tgt_len=args.segment,
                      vocab_size=vocab, mem_len=args.mem_len if args.mechanism == "xl" else 0, seed=args.seed)
    if args.mechanism == "rmt":
        cfg.rmt.num_mem_tokens = args.mem_tokens
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    N = args.segment

    def run(x, m, train: bool):
        """Mean answer-token NLL (a graph when ``train``) and accuracy of the examples ``x`` [B, L]."""
        B, L = x.shape
        pad = torch.zeros(B, 1, dtype=x.dtype)
        inp, tgt = x, torch.cat([x[:, 1:], pad], 1)                     # position p predicts token p + 1
        scored = torch.cat([m[:, 1:], torch.zeros(B, 1, dtype=torch.bool)], 1)
        state = model.init_state(B)
        total, correct = torch.zeros(()), 0
        for s in range(0, L, N):
            out, state = model(inp[:, s:s + N], state, tgt[:, s:s + N], detach_state=not train, return_logits=True)
            mk = scored[:, s:s + N]
            total = total + (out.nll * mk).sum()
            correct += int(((out.logits.argmax(-1) == tgt[:, s:s + N]) & mk).sum())
        n = int(scored.sum())
        return total / n, correct / n

    evals, step, t0 = [], 0, time.time()
    for prefix, steps in args.stages:
        x, m = load_examples(prefix + "_train")
        if x.shape[1] % N:
            raise SystemExit(f"direct_loop.py: --segment {N} does not divide {prefix}'s example length {x.shape[1]}")
        for _ in range(steps):
            step += 1
            idx = torch.randint(0, x.shape[0], (args.batch,))
            model.train()
            loss, _ = run(x[idx], m[idx], True)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if step % args.eval_every == 0:
                model.eval()
                with torch.no_grad():
                    test_loss, acc = run(test_x, test_m, False)
                rec = {"step": step, "stage": os.path.basename(prefix), "train_loss": round(loss.item(), 4),
                       "test_loss": round(test_loss.item(), 4), "test_accuracy": round(acc, 4),
                       "seconds": round(time.time() - t0, 1)}
                evals.append(rec)
                print(json.dumps(rec), flush=True)
    if args.out:
        with open(args.out + ".tmp", "w") as f:
            json.dump({"settings": {k: v for k, v in vars(args).items()}, "evals": evals}, f, indent=1)
        os.replace(args.out + ".tmp", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
