"""How far back a model's memory helps: per-token losses under a bounded history, and Dai et al.'s RECL.

Protocol ("warm-up from reset", one for every mechanism).  The split is one token stream, cut into segments of
the model's ``tgt_len`` N aligned at its first token, as ``--protocol carry`` reads it.  With a history of ``c``
tokens (``c`` a multiple of N), segment k is scored by a model whose state is fresh (``model.init_state``: no
memory, no fast weights, no memory tokens or slots carried) before segment ``k - c/N``; it reads the ``c/N``
segments before segment k (warm-up, not scored), carrying its state between segments exactly as in training,
then scores segment k.  So every scored token sees at most ``c`` tokens before its segment plus the earlier
tokens of its own segment (``c + j`` at position j), and whatever of them the mechanism keeps: an XL/LaMemo
memory of ``mem_len`` tokens keeps ``min(c, mem_len)`` of them, a fast-weight or RMT state a summary of all of
them.  ``c = 0``: the state is reset before every segment (no memory at all).  ``c = "all"``: the state is carried
from the first token to the last (equal to ``--protocol carry``).  Segments with fewer than ``c/N`` segments
before them read from the stream's start, which is the carried pass itself.

``context_losses`` computes the per-target losses of one model for a list of histories; ``recl`` the relative
effective context length of a group of models from such losses.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from data_tools.streams import EvalStream
from pretrain.engine.batch import Batch, call_model

Context = Union[int, str]  # a number of tokens, or "all"

PROTOCOL = ("warm-up from reset: segments of tgt_len aligned at the stream's first token; with history c "
            "(a multiple of tgt_len) each segment is scored from a fresh state after reading the c tokens before "
            "it in tgt_len segments (state carried between them, not scored); a token at position j of its "
            "segment sees at most c + j earlier tokens; c = 0 resets the state before every segment; c = all "
            "carries the state over the whole stream (= evaluate.py --protocol carry)")


def _rows(stream: EvalStream, blocks: Sequence[int], device) -> Batch:
    mbs = [stream.get(int(k)) for k in blocks]
    cat = lambda name, dt: torch.from_numpy(np.concatenate([getattr(m, name) for m in mbs]).astype(dt)).to(device)  # noqa: E731
    return Batch(tokens=cat("tokens", np.int64), targets=cat("targets", np.int64),
                 loss_mask=cat("loss_mask", np.float32),
                 reset=torch.zeros(len(mbs), dtype=torch.bool, device=device))


@torch.no_grad()
def context_losses(forward: Callable, model, stream: EvalStream, contexts: Sequence[Context], *, device,
                   batch_size: int = 8, max_segments: int = 0,
                   progress: Optional[Callable[[int, int], None]] = None) -> Dict[Context, Dict[str, np.ndarray]]:
    """Per-target losses of ``model`` with each history in ``contexts`` (multiples of the stream's ``seq_len``,
    or "all").  ``stream``: an ``EvalStream`` with one stream.  Returns context -> {"nll": float64 [blocks, N],
    "mask": float64 [blocks, N]} (row k = segment k; mask 0 past the stream's end and on unscored targets).
    ``max_segments`` > 0 scores only the stream's first segments (as ``streamed_eval``'s ``max_steps``)."""
    if stream.num_streams != 1:
        raise ValueError("context_losses reads one stream")
    N, K = stream.seq_len, len(stream) if max_segments <= 0 else min(max_segments, len(stream))
    for c in contexts:
        if c != "all" and (int(c) < 0 or int(c) % N):
            raise ValueError(f"history {c} is not a multiple of the segment length {N}")
    total = K + sum(max(K - int(c) // N, 0) * (int(c) // N + 1) for c in contexts if c != "all")
    done = 0
    # the carried pass: every segment after the whole stream before it (also the early segments of every c)
    nll_all = np.zeros((K, N))
    mask = np.zeros((K, N))
    state = model.init_state(1, device=device)
    for k in range(K):
        batch = _rows(stream, [k], device)
        out, state = call_model(forward, state, batch)
        nll_all[k] = out.nll.double().cpu().numpy()[0]
        mask[k] = batch.loss_mask.double().cpu().numpy()[0]
        done += 1
        if progress is not None:
            progress(done, total)
    nll_all *= mask
    res: Dict[Context, Dict[str, np.ndarray]] = {}
    for c in contexts:
        if c == "all":
            res[c] = {"nll": nll_all, "mask": mask}
            continue
        m = int(c) // N
        nll = nll_all.copy()  # segments k < m: the warm-up reaches the stream's start
        for b0 in range(m, K, batch_size):
            ks = np.arange(b0, min(b0 + batch_size, K))
            state = model.init_state(len(ks), device=device)
            for j in range(m + 1):
                batch = _rows(stream, ks - m + j, device)
                out, state = call_model(forward, state, batch)
            nll[ks] = out.nll.double().cpu().numpy() * mask[ks]
            done += len(ks) * (m + 1)
            if progress is not None:
                progress(done, total)
        res[c] = {"nll": nll, "mask": mask}
    return res


def summarize(losses: Dict[str, np.ndarray]) -> Dict[str, object]:
    """{"loss": mean nll over scored targets, "tokens", "by_position": mean nll at each segment position}."""
    nll, mask = losses["nll"], losses["mask"]
    count = mask.sum(0)
    return {"loss": float(nll.sum() / max(mask.sum(), 1.0)), "tokens": int(mask.sum()),
            "by_position": [float(s / n) if n else None for s, n in zip(nll.sum(0), count)]}


def recl(losses: Dict[str, Dict[int, np.ndarray]], contexts: Sequence[int], r: float = 1.0,
         threshold: float = 0.01, mask: Optional[np.ndarray] = None) -> Dict[str, Dict[str, object]]:
    """Relative effective context length of each model of a group (Dai et al. 2019, "Transformer-XL", §4.3
    and the appendix "Details about RECL").

    ``losses[model][c]``: the per-token losses l_i(c, t) of the group's models with history c, all on the same
    tokens (``mask`` > 0 selects the scored ones); ``contexts``: the increasing histories to step through
    (the step Δ is the difference of consecutive ones).  For a short history c and a long one c' >= c:

    * the baseline b(c, t) = min_i l_i(c, t), the group's best loss on token t with history c;
    * T = the top-r fraction of the tokens with the largest b(c, t) (r = 1: all tokens; the paper's r);
    * the relative loss f_i(c, c') = mean over t in T of min(b(c, t), l_i(c', t));
    * the relative gain g_i(c, c') = (exp f_i(c, c) - exp f_i(c, c')) / exp f_i(c, c), a relative perplexity
      reduction.

    Starting from c = contexts[0], while g_i(c, c + Δ) >= ``threshold`` (the paper's 0.01) c moves to c + Δ;
    RECL is the c where it stops.  Returns model -> {"recl": c, "lower_bound": True when every step gained (RECL is
    then at least the last history: the grid is too short to see the end)}."""
    names = list(losses)
    contexts = [int(c) for c in contexts]
    first = losses[names[0]][contexts[0]]
    keep = np.ones(first.size, bool) if mask is None else (np.asarray(mask).reshape(-1) > 0)
    L = {n: {c: np.asarray(losses[n][c], np.float64).reshape(-1)[keep] for c in contexts} for n in names}
    out = {}
    for n in names:
        i, lower_bound = 0, True
        while i + 1 < len(contexts):
            c, c2 = contexts[i], contexts[i + 1]
            b = np.min(np.stack([L[m][c] for m in names]), axis=0)
            top = max(1, int(round(r * b.size)))
            T = np.argsort(-b, kind="stable")[:top]
            f_short = float(np.mean(np.minimum(b[T], L[n][c][T])))
            f_long = float(np.mean(np.minimum(b[T], L[n][c2][T])))
            gain = (math.exp(f_short) - math.exp(f_long)) / math.exp(f_short)
            if gain < threshold:
                lower_bound = False
                break
            i += 1
        out[n] = {"recl": contexts[i], "lower_bound": lower_bound}
    return out
