"""Scoring a split: every target token counted exactly once, under a named protocol.

Protocols (the one used is printed with every result):

* ``train``: the training segment and memory lengths, state carried from segment to segment (LaMemo, RMT);
* ``xl``: Transformer-XL's: a short target segment with a long memory, ``clamp_len`` and ``same_length``;
* ``carry``: one stream over the whole split, state carried (fast-weight "carry-over" evaluation);
* ``sliding``: no memory; windows of ``tgt_len`` tokens moved by ``stride``, each scoring only its last
  ``stride`` targets with the window before them as context (the first window scores all its targets).

``streamed_eval`` serves the first three (they differ in lengths and stream count); ``sliding_eval`` the
last.  Both take a ``forward(tokens, state, targets, **kw) -> (out, state)`` callable so the trainer can pass
its DeepSpeed engine and ``evaluate.py`` a plain model, and both feed it through the training loop's batch class
(``pretrain/engine/batch.py``: the model's inputs are decided there).  The reported loss is the LM loss: a
mechanism's auxiliary loss (``out.aux_loss``) is a training signal and is not part of it.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, Optional

import numpy as np
import torch

from data_tools.indexed import IndexedDataset
from data_tools.streams import EvalStream
from pretrain.engine.batch import Batch, call_model
from pretrain.engine.dist import all_reduce_sum


@torch.no_grad()
def streamed_eval(forward: Callable, model, stream: EvalStream, *, device, mem_len: Optional[int] = None,
                  clamp_len: Optional[int] = None, same_length: Optional[bool] = None,
                  reset_memory: bool = False, max_steps: int = 0, group=None, accuracy: bool = False,
                  progress: Optional[Callable[[int, int], None]] = None,
                  make_batch: Optional[Callable] = None, max_groups: int = 64) -> Dict[str, float]:
    """Mean NLL over the stream's scored targets (summed over the data-parallel ``group``); with ``accuracy``
    also the fraction of scored targets that are the most likely token (teacher-forced, as RMT reports).
    ``make_batch(micro_batch, device)`` builds the batch (the model family's class; default: ``Batch`` with
    ``reset_memory``).  When the batch groups its rows
    (``Batch.row_groups``: MemBART's turn of the episode) the result also has ``groups``: group -> {"loss",
    "tokens", "nll_sum"} for groups ``0 .. max_groups - 1`` (later ones are counted in the last)."""
    steps = len(stream) if max_steps <= 0 else min(max_steps, len(stream))
    if make_batch is None:
        make_batch = lambda mb, dev: Batch.from_micro_batch(mb, dev, reset_memory=reset_memory)  # noqa: E731
    state = model.init_state(stream.num_streams, mem_len=mem_len, device=device)
    nll_sum, count, correct = 0.0, 0.0, 0.0
    g_nll = torch.zeros(max_groups, dtype=torch.float64)
    g_count = torch.zeros(max_groups, dtype=torch.float64)
    grouped = False
    kw = {"return_logits": True} if accuracy else {}
    if clamp_len is not None or same_length is not None:
        kw.update(clamp_len=clamp_len, same_length=same_length)
    t0 = time.time()
    for step in range(steps):
        batch = make_batch(stream.get(step), device)
        out, state = call_model(forward, state, batch, **kw)
        nll_sum += float(batch.masked_nll_sum(out.nll))
        count += batch.num_scored()
        groups = batch.row_groups()
        if groups is not None:
            grouped = True
            rows = groups >= 0
            g = groups[rows].clamp(max=max_groups - 1).cpu()
            g_nll.index_add_(0, g, (out.nll.float() * batch.loss_mask)[rows].sum(1).double().cpu())
            g_count.index_add_(0, g, batch.loss_mask[rows].sum(1).double().cpu())
        if accuracy:
            correct += float(((out.logits.argmax(-1) == batch.targets).float() * batch.loss_mask).sum())
        if progress is not None:
            progress(step + 1, steps)
    nll_sum, count, correct = all_reduce_sum([nll_sum, count, correct], group)
    res = {"nll_sum": nll_sum, "tokens": count, "loss": nll_sum / max(count, 1.0), "steps": steps,
           "seconds": time.time() - t0}
    if accuracy:
        res["accuracy"] = correct / max(count, 1.0)
    if grouped:
        sums = all_reduce_sum(g_nll.tolist() + g_count.tolist(), group)
        res["groups"] = {i: {"nll_sum": sums[i], "tokens": sums[max_groups + i],
                             "loss": sums[i] / sums[max_groups + i]}
                         for i in range(max_groups) if sums[max_groups + i] > 0}
    return res


@torch.no_grad()
def sliding_eval(forward: Callable, model, prefix: str, *, window: int, stride: int, batch_size: int,
                 device, loss_mask: Optional[str] = None, max_windows: int = 0,
                 progress: Optional[Callable[[int, int], None]] = None) -> Dict[str, float]:
    """Sliding-window NLL without memory over the whole token stream of ``prefix`` (one process).

    Window k ends at target position e_k (e_0 = min(window, T-1), then += stride, capped at T-1); its inputs
    are the ``window`` tokens before e_k and it scores the targets in (e_{k-1}, e_k], so every target
    1 .. T-1 is scored exactly once, with at least ``window - stride`` tokens of context (all after the first
    window)."""
    if not 1 <= stride <= window:
        raise ValueError(f"stride must be in [1, window={window}], got {stride}")
    ds = IndexedDataset(prefix)
    tokens, T = ds.tokens, ds.num_tokens
    if T < 2:
        raise ValueError(f"{prefix}: needs at least 2 tokens, has {T}")
    mask_tokens = IndexedDataset(loss_mask).tokens if loss_mask else None
    ends = [min(window, T - 1)]
    while ends[-1] < T - 1:
        ends.append(min(ends[-1] + stride, T - 1))
    if max_windows > 0:
        ends = ends[:max_windows]
    scored = np.diff([0] + ends)
    n = min(window, T - 1)
    nll_sum, count = 0.0, 0.0
    for b0 in range(0, len(ends), batch_size):
        E, C = ends[b0:b0 + batch_size], scored[b0:b0 + batch_size]
        inp = np.stack([np.asarray(tokens[e - n:e], dtype=np.int64) for e in E])
        tgt = np.stack([np.asarray(tokens[e - n + 1:e + 1], dtype=np.int64) for e in E])
        score = np.zeros((len(E), n), dtype=np.float32)
        for i, (e, c) in enumerate(zip(E, C)):
            score[i, n - c:] = 1.0
            if mask_tokens is not None:
                score[i] *= np.asarray(mask_tokens[e - n + 1:e + 1], dtype=np.float32)
        batch = Batch(tokens=torch.from_numpy(inp).to(device), targets=torch.from_numpy(tgt).to(device),
                      loss_mask=torch.from_numpy(score).to(device),
                      reset=torch.ones(len(E), dtype=torch.bool, device=device))
        state = model.init_state(len(E), device=device)  # fresh: the memory holds nothing
        out, _ = call_model(forward, state, batch)
        nll_sum += float(batch.masked_nll_sum(out.nll))
        count += batch.num_scored()
        if progress is not None:
            progress(min(b0 + batch_size, len(ends)), len(ends))
    return {"nll_sum": nll_sum, "tokens": count, "loss": nll_sum / max(count, 1.0), "windows": len(ends)}
