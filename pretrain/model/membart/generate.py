"""Decoding from a MemBART encoder output: greedy, sampling (temperature, top-k, top-p) and beam search, with
Hugging Face ``generate``'s semantics for BART so that the same weights give the same tokens.

    enc, state = model.encode(source, state)              # one time step (the memory moves on)
    ids = generate(model, enc, num_beams=4, max_length=64, early_stopping=True)

Every sequence starts with ``decoder_start_token_id`` (counted in ``max_length``, as in Hugging Face).  The
scores are the model's full-vocabulary log-probabilities (fp32, gathered under tensor parallelism, so every rank
takes the same decisions: sampling draws from ``generator`` or the default generator, which tensor-parallel ranks
seed alike).  Processors, in Hugging Face's order: ``min_length`` (EOS forbidden while the sequence is shorter),
``forced_bos_token_id`` (the only choice at position 1), ``forced_eos_token_id`` (the only choice at position
``max_length - 1``); with sampling then ``temperature``, ``top_k``, ``top_p`` (Holtzman et al. 2020's nucleus,
at least one token kept).

Beam search keeps ``num_beams`` running hypotheses per row and the ``2 * num_beams`` best continuations at every
step; a continuation ending in EOS (among the top ``num_beams``) joins the finished hypotheses with the score
``sum log p / gen_len ** length_penalty`` (``gen_len`` the generated tokens, EOS included).  Stopping as Hugging
Face's ``early_stopping``: True stops a row when ``num_beams`` hypotheses are finished; False when the best running
score at the current length cannot beat the worst finished one; ``"never"`` with ``length_penalty > 0`` compares
at ``max_length`` instead.  Finished sequences are padded with ``pad_token_id``.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

_NEG = -1.0e9          # Hugging Face's "impossible" score in beam bookkeeping


def _process(scores: torch.Tensor, cur_len: int, max_length: int, min_length: int, eos: int,
             forced_bos: Optional[int], forced_eos: Optional[int]) -> torch.Tensor:
    """Min-length, forced BOS and forced EOS on [N, V] scores for sequences of ``cur_len`` tokens."""
    if cur_len < min_length:
        scores[:, eos] = float("-inf")
    if forced_bos is not None and cur_len == 1:
        scores.fill_(float("-inf"))
        scores[:, forced_bos] = 0.0
    if forced_eos is not None and cur_len == max_length - 1:
        scores.fill_(float("-inf"))
        scores[:, forced_eos] = 0.0
    return scores


def _warp(scores: torch.Tensor, temperature: float, top_k: int, top_p: float, keep: int) -> torch.Tensor:
    """Temperature, top-k and top-p (nucleus) filtering of [N, V] scores (filtered entries -inf), keeping at least
    ``keep`` tokens."""
    if temperature != 1.0:
        scores = scores / temperature
    if top_k and top_k > 0:
        k = min(max(top_k, keep), scores.shape[-1])
        kth = torch.topk(scores, k)[0][..., -1, None]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        cum = sorted_scores.softmax(-1).cumsum(-1)
        remove = cum <= (1 - top_p)
        remove[..., -keep:] = False
        scores = scores.masked_fill(remove.scatter(1, order, remove), float("-inf"))
    return scores


def _check(name: str, ok: bool, why: str) -> None:
    if not ok:
        raise ValueError(f"generate: {name} {why}")


@torch.no_grad()
def generate(model, enc, max_length: int = 20, min_length: int = 0, do_sample: bool = False, num_beams: int = 1,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, length_penalty: float = 1.0,
             early_stopping: Union[bool, str] = False, num_return_sequences: int = 1,
             forced_bos_token_id: Optional[int] = None, forced_eos_token_id: Optional[int] = -1,
             eos_token_id: Optional[int] = None, pad_token_id: Optional[int] = None,
             decoder_start_token_id: Optional[int] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Token ids [B * num_return_sequences, L] (L <= ``max_length``, starting with the decoder start token) for the
    encoder output ``enc`` (``MemBart.encode``; B rows).  Token options default to the model config's
    (``forced_eos_token_id=-1`` means the config's; None turns it off).  Raises ValueError naming a bad option."""
    cfg = model.cfg
    eos = cfg.eos_token_id if eos_token_id is None else eos_token_id
    pad = cfg.pad_token_id if pad_token_id is None else pad_token_id
    start = cfg.decoder_start_token_id if decoder_start_token_id is None else decoder_start_token_id
    forced_eos = cfg.forced_eos_token_id if forced_eos_token_id == -1 else forced_eos_token_id
    _check("max_length", max_length >= 2, f"must be >= 2 (the start token and one more), got {max_length}")
    _check("num_beams", num_beams >= 1, f"must be >= 1, got {num_beams}")
    _check("num_return_sequences", 1 <= num_return_sequences and (num_beams == 1 or num_return_sequences <= num_beams),
           f"must be in [1, num_beams] with beam search, got {num_return_sequences}")
    _check("num_return_sequences", num_beams > 1 or do_sample or num_return_sequences == 1,
           "> 1 needs sampling or beam search (greedy decoding gives one sequence)")
    _check("temperature", temperature > 0, f"must be > 0, got {temperature}")
    _check("top_p", 0 < top_p <= 1, f"must be in (0, 1], got {top_p}")
    _check("early_stopping", early_stopping in (True, False, "never"), f"must be True, False or 'never', got "
                                                                         f"{early_stopping!r}")
    was_training = model.training
    model.eval()
    try:
        if num_beams > 1:
            return _beam_search(model, enc, max_length, min_length, num_beams, do_sample, temperature, top_k, top_p,
                                length_penalty, early_stopping, num_return_sequences, forced_bos_token_id,
                                forced_eos, eos, pad, start, generator)
        return _sample(model, enc, max_length, min_length, do_sample, temperature, top_k, top_p,
                       num_return_sequences, forced_bos_token_id, forced_eos, eos, pad, start, generator)
    finally:
        model.train(was_training)


def _sample(model, enc, max_length, min_length, do_sample, temperature, top_k, top_p, n_ret, forced_bos,
            forced_eos, eos, pad, start, generator) -> torch.Tensor:
    """Greedy decoding or sampling (Hugging Face's ``_sample``): finished rows continue with padding."""
    B = enc.batch_size
    dev = enc.hidden.device
    if n_ret > 1:
        enc = enc.index_select(torch.arange(B, device=dev).repeat_interleave(n_ret))
    N = enc.batch_size
    cache = model.new_cache(enc)
    seq = torch.full((N, 1), start, dtype=torch.long, device=dev)
    unfinished = torch.ones(N, dtype=torch.bool, device=dev)
    while seq.shape[1] < max_length:
        h = model.decode(seq[:, -1:], enc, cache)
        scores = model.log_probs(h[:, -1]).float()
        scores = _process(scores, seq.shape[1], max_length, min_length, eos, forced_bos, forced_eos)
        if do_sample:
            scores = _warp(scores, temperature, top_k, top_p, 1)
            nxt = torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(1)
        else:
            nxt = scores.argmax(-1)
        nxt = torch.where(unfinished, nxt, torch.full_like(nxt, pad))
        seq = torch.cat([seq, nxt[:, None]], 1)
        unfinished &= nxt != eos
        if not unfinished.any():
            break
    return seq


def _beam_search(model, enc, max_length, min_length, nb, do_sample, temperature, top_k, top_p, length_penalty,
                 early_stopping, n_ret, forced_bos, forced_eos, eos, pad, start, generator) -> torch.Tensor:
    """Beam search (or beam sampling) with Hugging Face's vectorised bookkeeping (module docstring)."""
    B = enc.batch_size
    dev = enc.hidden.device
    enc = enc.index_select(torch.arange(B, device=dev).repeat_interleave(nb))
    cache = model.new_cache(enc)
    keep = 2 * nb                                          # continuations kept per row (one EOS token)
    prompt = 1
    fill = pad if pad else eos
    running = torch.full((B, nb, max_length), fill, dtype=torch.long, device=dev)
    running[:, :, 0] = start
    finished = running.clone()
    run_scores = torch.zeros(B, nb, device=dev)
    run_scores[:, 1:] = _NEG
    fin_scores = torch.full((B, nb), _NEG, device=dev)
    fin_len = torch.zeros(B, nb, dtype=torch.long, device=dev)
    is_fin = torch.zeros(B, nb, dtype=torch.bool, device=dev)
    improvable = torch.ones(B, 1, dtype=torch.bool, device=dev)
    top_mask = torch.cat([torch.ones(nb, dtype=torch.bool), torch.zeros(keep - nb, dtype=torch.bool)]).to(dev)
    rows = torch.arange(B, device=dev)[:, None]
    cur = 1
    last = running[:, :, 0].reshape(-1, 1)
    while True:
        h = model.decode(last, enc, cache)
        lp = model.log_probs(h[:, -1]).float()
        lp = _process(lp, cur, max_length, min_length, eos, forced_bos, forced_eos)
        if do_sample:
            lp = _warp(lp, temperature, top_k, top_p, keep)
        V = lp.shape[-1]
        acc = (lp.view(B, nb, V) + run_scores[:, :, None]).view(B, nb * V)
        if do_sample:
            idx = torch.multinomial(acc.softmax(-1), keep, generator=generator)
            top_lp = acc.gather(1, idx)
            top_lp, order = top_lp.sort(-1, descending=True)
            idx = idx.gather(1, order)
        else:
            top_lp, idx = torch.topk(acc, keep)
        src_beam, tok = idx // V, idx % V
        cand = running[rows, src_beam].clone()              # [B, keep, max_length]
        cand[:, :, cur] = tok
        hits = (tok == eos) | (cur + 1 >= max_length)       # the continuation ends here
        # running beams of the next step: the best continuations that did not end
        nxt = torch.topk(top_lp + hits.float() * _NEG, nb)[1]
        running = cand[rows, nxt]
        run_scores = (top_lp + hits.float() * _NEG).gather(1, nxt)
        beam_src = (src_beam.gather(1, nxt) + rows * nb).reshape(-1)
        # finished hypotheses: merge the continuations that ended among the top nb, keep the best nb
        just = hits & top_mask[None, :]
        fin_lp = top_lp / ((cur + 1 - prompt) ** length_penalty)
        full = is_fin.all(1, keepdim=True) & (early_stopping is True)
        fin_lp = fin_lp + full.float() * _NEG + (~improvable).float() * _NEG + (~just).float() * _NEG
        m_seq = torch.cat([finished, cand], 1)
        m_scores = torch.cat([fin_scores, fin_lp], 1)
        m_len = torch.cat([fin_len, torch.full_like(tok, cur + 1)], 1)
        m_fin = torch.cat([is_fin, just], 1)
        pick = torch.topk(m_scores, nb)[1]
        finished, fin_scores = m_seq[rows, pick], m_scores.gather(1, pick)
        fin_len, is_fin = m_len.gather(1, pick), m_fin.gather(1, pick)
        cache.reorder(beam_src)
        cur += 1
        # can a running beam still beat the worst finished one?
        best_len = (max_length - prompt) if (early_stopping == "never" and length_penalty > 0.0) else (cur - prompt)
        best_run = run_scores[:, :1] / (best_len ** length_penalty)
        worst = torch.where(is_fin, fin_scores.min(1, keepdim=True)[0], torch.full_like(fin_scores, _NEG))
        improvable = improvable & (best_run > worst).any(-1, keepdim=True)
        go_on = improvable.any() & ~(is_fin.all() & (early_stopping is True)) & ~hits.all()
        if not bool(go_on):
            break
        last = running[:, :, cur - 1].reshape(-1, 1)
    out = finished[:, :n_ret].reshape(B * n_ret, max_length)
    length = int(fin_len[:, :n_ret].max())
    return out[:, :max(length, 1)]
