"""The decoding loop of ``pretrain/generate.py``: how a memory model is fed while it generates (``generate``) and
how the next token is drawn (``sample_next``).  Only torch: an exported Hugging Face model directory
(``pretrain/hf``) carries a copy of this file, so its ``generate()`` runs this very loop.

``generate`` needs of ``model``: ``init_state(batch, mem_len=, device=)`` -> a state with ``.mem_len``;
``decode_policy_for(mem_len)`` -> ``"segment"``, ``"window"`` or ``"token"``; ``model(tokens [1, n], state,
clamp_len=, return_logits=)`` -> (an output with ``.logits`` [1, n, V] log-probabilities, the new state).
"""
from __future__ import annotations

from typing import List, Optional


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
