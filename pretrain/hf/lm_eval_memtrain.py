"""The lm-evaluation-harness model ``memtrain``: a Hugging Face directory of ``pretrain/export_hf.py`` scored with
its memory carried, as ``pretrain/evaluate.py`` does.

    python -m pretrain.hf.lm_eval_memtrain --model memtrain --model_args path=hf/lamemo \\
        --tasks wikitext --include_path my_tasks/

(the lm_eval command line, with the ``memtrain`` model registered first: lm-evaluation-harness discovers no
model plugins, so ``lm_eval --model memtrain`` itself does not know it).  In Python: ``MemTrainLM(path=DIR)`` with
``lm_eval.simple_evaluate(model=...)``.

* ``loglikelihood_rolling`` (perplexity tasks): every document is read from a fresh memory in segments of
  ``segment_length`` (default: training's ``tgt_len``) with the memory carried from segment to segment (the XL
  protocol: ``evaluate.py --protocol carry`` over one document; ``mem_len``, ``clamp_len``, ``same_length`` as
  ``evaluate.py --protocol xl`` has them).  Every token is scored after an end-of-document token where the
  tokenizer has one (a document follows one in the training stream); without one the first token is context only.
* ``loglikelihood``: the context and the continuation are read the same way (segments, memory carried); the
  continuation's tokens are scored.
* ``generate_until``: the model's ``generate`` (``pretrain/generate.py``'s loop: segments as in training), greedy,
  cut at the first ``until`` string.

lm-evaluation-harness's own ``hf`` model with ``trust_remote_code=True`` also loads such a directory, but it reads
each rolling window (up to ``max_length`` tokens) as one segment from a fresh memory: the memory is never carried,
which is not how the model was trained (nor how ``evaluate.py`` scores it).

Importable without lm_eval (the class is then a plain object, not registered).
"""
from __future__ import annotations

from typing import Any, List, Optional, Tuple

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
    HAVE_LM_EVAL = True
except ImportError:                                     # the adapter stays importable (and testable) without it
    LM = object
    HAVE_LM_EVAL = False

    def register_model(*names):
        return lambda cls: cls


def _opt_int(v) -> Optional[int]:
    return None if v is None or v == "" else int(v)


def _opt_bool(v) -> Optional[bool]:
    if v is None or v == "" or isinstance(v, bool):
        return v
    return str(v).lower() in ("1", "true", "yes")


class _SentencePiece:
    """A sentencepiece processor with the two calls the adapter makes of a transformers tokenizer."""

    def __init__(self, sp):
        self.sp = sp

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": self.sp.encode(text)}

    def decode(self, ids):
        return self.sp.decode(list(ids))


@register_model("memtrain")
class MemTrainLM(LM):
    """A ``pretrain/export_hf.py`` directory for lm-evaluation-harness (module docstring).

    ``path``: the directory; ``segment_length``, ``mem_len``, ``clamp_len``, ``same_length``: the reading protocol
    (default: training's, or the run's evaluation settings with ``protocol=xl``); ``dtype``: the parameters'
    dtype (``float64`` default; computation is fp64 anyway); ``max_gen_toks``: the generation limit when a task
    gives none.  Other keyword arguments lm_eval passes (``batch_size``, ``device``) are accepted and ignored:
    documents are read one at a time on the CPU."""

    def __init__(self, path: str, segment_length=None, mem_len=None, clamp_len=None, same_length=None,
                 protocol: str = "train", dtype: str = "float64", max_gen_toks=256, **unused: Any):
        if HAVE_LM_EVAL:
            super().__init__()
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        self.model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True,
                                                          dtype=getattr(torch, str(dtype))).eval()
        import os
        if os.path.isfile(os.path.join(path, "tokenizer.model")) and \
                not os.path.isfile(os.path.join(path, "tokenizer_config.json")):
            import sentencepiece                     # a sentencepiece model is exported as it is
            self.tokenizer = _SentencePiece(sentencepiece.SentencePieceProcessor(
                model_file=os.path.join(path, "tokenizer.model")))
        else:
            self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
        cfg = self.model.config
        ev = cfg.eval if protocol == "xl" else {}
        if protocol not in ("train", "xl"):
            raise ValueError(f"protocol={protocol!r}: 'train' (training's segment and memory lengths) or 'xl' "
                             f"(the run's evaluation settings)")
        self.segment_length = _opt_int(segment_length) or ev.get("tgt_len") or cfg.segment_length
        self.mem_len = _opt_int(mem_len) if _opt_int(mem_len) is not None else (ev.get("mem_len") or cfg.mem_len)
        self.clamp_len = _opt_int(clamp_len) if _opt_int(clamp_len) is not None else ev.get("clamp_len")
        self.same_length = _opt_bool(same_length) if same_length is not None else \
            (bool(ev["same_length"]) if "same_length" in ev else None)
        self.max_gen_toks = int(max_gen_toks)
        self.eod_id = cfg.eos_token_id

    # -- the protocol -------------------------------------------------------------------------------------------
    def encode(self, text: str) -> List[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def score_tokens(self, tokens: List[int], first_scored: int) -> Tuple[float, bool]:
        """(sum of log-probabilities of ``tokens[first_scored:]``, whether each was the argmax), reading
        ``tokens`` from a fresh memory in segments with the memory carried."""
        import torch
        logprobs, argmax = self._read(tokens)
        lp = logprobs[first_scored - 1:]
        greedy = bool((argmax[first_scored - 1:] == torch.tensor(tokens[first_scored:])).all())
        return float(lp.sum()), greedy

    def _read(self, tokens: List[int]):
        """(log-probability of every token after the first [T - 1] float64, the argmax at every position before
        the last [T - 1])."""
        import torch
        n = self.segment_length
        x = torch.tensor(tokens, dtype=torch.long)
        memory, out, best = None, [], []
        with torch.no_grad():
            for s in range(0, len(tokens) - 1, n):
                seg = x[s:min(s + n, len(tokens) - 1)][None]
                tgt = x[s + 1:s + 1 + seg.shape[1]]
                lp, memory = self.model._run(seg, memory, self.mem_len, self.clamp_len, self.same_length)
                out.append(lp[0].gather(-1, tgt[:, None]).squeeze(-1))
                best.append(lp[0].argmax(-1))
        return torch.cat(out), torch.cat(best)

    def _prefix(self) -> List[int]:
        return [] if self.eod_id is None else [int(self.eod_id)]

    def rolling(self, text: str) -> float:
        """The log-likelihood of a whole document (``loglikelihood_rolling``'s protocol, module docstring)."""
        ids = self._prefix() + self.encode(text)
        if len(ids) < 2:
            return 0.0
        return self.score_tokens(ids, 1)[0]

    def pair(self, context: str, continuation: str) -> Tuple[float, bool]:
        """(log-likelihood of ``continuation`` after ``context``, whether greedy decoding gives it)."""
        n_space = len(context) - len(context.rstrip())
        if n_space:                     # as lm_eval's hf model: trailing spaces belong to the continuation
            context, continuation = context[:-n_space], context[-n_space:] + continuation
        whole = self.encode(context + continuation)
        ctx = self.encode(context)
        if whole[:len(ctx)] != ctx:     # the tokenizer merges across the boundary: encode apart
            whole = ctx + self.encode(continuation)
        ids = self._prefix() + whole
        first = len(self._prefix()) + len(ctx)
        if first == 0:                  # no context and no end-of-document token: the first token is context
            first = 1
        return self.score_tokens(ids, first)

    # -- lm_eval's interface --------------------------------------------------------------------------------------
    def loglikelihood_rolling(self, requests) -> List[float]:
        return [self.rolling(req.args[0]) for req in requests]

    def loglikelihood(self, requests) -> List[Tuple[float, bool]]:
        return [self.pair(*req.args[:2]) for req in requests]

    def generate_until(self, requests) -> List[str]:
        import torch
        out = []
        for req in requests:
            context, kwargs = req.args[0], dict(req.args[1] if len(req.args) > 1 else {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            ids = self._prefix() + self.encode(context)
            new = self.model.generate(torch.tensor([ids]), max_new_tokens=int(kwargs.get("max_gen_toks",
                                                                                         self.max_gen_toks)),
                                      do_sample=False, mem_len=self.mem_len, segment_length=self.segment_length,
                                      clamp_len=self.clamp_len)[0, len(ids):].tolist()
            if self.eod_id is not None and int(self.eod_id) in new:
                new = new[:new.index(int(self.eod_id))]
            text = self.tokenizer.decode(new)
            for stop in until:
                if stop and stop in text:
                    text = text[:text.index(stop)]
            out.append(text)
        return out

    @property
    def tokenizer_name(self) -> str:
        return str(self.model.config.name_or_path).replace("/", "__")


def main(argv=None) -> None:
    """lm_eval's command line with the ``memtrain`` model registered."""
    import sys
    if not HAVE_LM_EVAL:
        sys.exit("lm_eval_memtrain: lm-evaluation-harness is not installed (pip install lm-eval)")
    from lm_eval.__main__ import cli_evaluate
    if argv is not None:
        sys.argv = [sys.argv[0]] + list(argv)
    cli_evaluate()


if __name__ == "__main__":
    main()
