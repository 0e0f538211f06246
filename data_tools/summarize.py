"""Print what an indexed dataset holds: files, dtype, tokenizer, counts, document lengths, first tokens.

    python data_tools/summarize.py data/corpus
    python data_tools/summarize.py meg-gpt2-openwebtext_text_document \\
        --vocab-file gpt2-tiny-vocab.json --merge-file gpt2-tiny-merges.txt     # a prefix without .json

A dataset with an answer mask (``"loss_mask"`` in ``PREFIX.json``: synthetic tasks, ``preprocess.py
--answer-key``) also gets its mask checked against the tokens and its scored tokens counted.

The tokenizer comes from ``PREFIX.json`` when there is one; otherwise from ``--vocab-file``/``--merge-file``
(GPT-2 BPE), ``--tokenizer-file`` (a tokenizer.json, or a sentencepiece .model), or none at all (token ids
are printed undecoded).
"""
if __name__ == "__main__":
    import os, signal, sys  # noqa: E401
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C while starting up: end at once (nothing written yet)
    if not __package__:
        sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import os
import sys
from typing import Any, Dict, List, Optional, TextIO, Tuple

import numpy as np

from data_tools.cli import CommandParser, fail, int_at_least, interrupted
from data_tools.indexed import IndexedDataset, IndexedDatasetError, bin_path, idx_path
from data_tools.metadata import meta_path, read_metadata
from data_tools.tokenization import (GPT2Tokenizer, HFTokenizer, SentencePieceTokenizer, Tokenizer, TokenizerError,
                                     tokenizer_from_spec)

PROG = "summarize.py"


def tokenizer_for(prefix: str, meta: Optional[Dict[str, Any]], vocab_file: Optional[str] = None,
                  merge_file: Optional[str] = None, tokenizer_file: Optional[str] = None) -> Optional[Tokenizer]:
    """The dataset's tokenizer: from the options when given, else from its metadata, else None."""
    if vocab_file or merge_file:
        if not (vocab_file and merge_file):
            raise TokenizerError("--vocab-file and --merge-file go together")
        return GPT2Tokenizer(vocab_file, merge_file)
    if tokenizer_file:
        if tokenizer_file.endswith(".model"):
            return SentencePieceTokenizer(tokenizer_file)
        return HFTokenizer(tokenizer_file)
    if meta and meta.get("tokenizer"):
        return tokenizer_from_spec(meta["tokenizer"], os.path.dirname(os.path.abspath(prefix)))
    return None


def mask_row(prefix: str, meta: Optional[Dict[str, Any]], offsets: np.ndarray,
             num_tokens: int) -> Tuple[Optional[str], Optional[Tuple[str, str]], Optional[int]]:
    """The answer mask named by ``meta["loss_mask"]``: its prefix, a summary row (scored tokens of the total,
    or a warning when the mask is unreadable or does not match the tokens' documents) and the scored count.
    All None when the dataset has no mask."""
    name = (meta or {}).get("loss_mask")
    if not name:
        return None, None, None
    path = os.path.join(os.path.dirname(os.path.abspath(prefix)), name)
    try:
        mask = IndexedDataset(path)
    except IndexedDatasetError as e:
        return path, ("warning", f"loss mask {name}: {e}"), None
    if mask.num_tokens != num_tokens or not np.array_equal(mask.document_token_offsets(), offsets):
        return path, ("warning", f"loss mask {name}: {mask.num_tokens:,} tokens in {mask.num_documents:,} "
                                 f"documents, which do not match the dataset's"), None
    chunk = 1 << 24
    scored = sum(int(np.count_nonzero(mask.tokens[a:a + chunk])) for a in range(0, num_tokens, chunk))
    share = f" ({100 * scored / num_tokens:.1f}%)" if num_tokens else ""
    return path, ("loss mask", f"{name}: {scored:,} of {num_tokens:,} tokens scored{share}"), scored


def length_stats(lengths: np.ndarray) -> Tuple[int, float, float, int]:
    """min, median, mean, max of the document lengths."""
    return int(lengths.min()), float(np.median(lengths)), float(lengths.mean()), int(lengths.max())


def summarize(prefix: str, tokenizer: Optional[Tokenizer] = None, meta: Optional[Dict[str, Any]] = None,
              first_tokens: int = 40, out: Optional[TextIO] = None) -> Dict[str, Any]:
    """Print the summary of ``prefix`` to ``out`` (default stdout) and return its figures."""
    out = out or sys.stdout
    ds = IndexedDataset(prefix)
    rows: List[Tuple[str, str]] = []
    files = [bin_path(prefix), idx_path(prefix)] + ([meta_path(prefix)] if meta is not None else [])
    if meta and meta.get("tokenizer"):
        spec = meta["tokenizer"]
        files += [os.path.join(os.path.dirname(os.path.abspath(prefix)), spec[k]) for k in
                  ("file", "vocab", "merges", "model") if isinstance(spec.get(k), str)]
    offsets = ds.document_token_offsets()
    mask_path, mask_summary, scored = mask_row(prefix, meta, offsets, ds.num_tokens)
    if mask_path is not None:
        files += [bin_path(mask_path), idx_path(mask_path)]
    for i, f in enumerate(files):
        rows.append(("files" if i == 0 else "", f"{f}  ({os.path.getsize(f):,} bytes)" if os.path.isfile(f)
                     else f"{f}  (missing)"))
    rows.append(("dtype", f"{ds.dtype.name} (code {ds.dtype_code})"))
    vocab_size = tokenizer.vocab_size if tokenizer else (meta or {}).get("vocab_size")
    eod = tokenizer.eod_id if tokenizer else (meta or {}).get("eod_id")
    rows.append(("tokenizer", tokenizer.describe() if tokenizer else "none (ids only)"))
    rows.append(("vocab size", f"{vocab_size:,}" if vocab_size is not None else "unknown"))
    rows.append(("EOD id", str(eod) if eod is not None else "none"))
    lengths = np.diff(offsets)
    empty = int((lengths == 0).sum())
    rows.append(("documents", f"{ds.num_documents:,}" + (f" ({empty:,} empty)" if empty else "")))
    rows.append(("sequences", f"{ds.sequence_count:,}"))
    rows.append(("tokens", f"{ds.num_tokens:,}"))
    if mask_summary is not None:
        rows.append(mask_summary)
    stats = length_stats(lengths) if lengths.size else None
    if stats:
        rows.append(("doc length", f"min {stats[0]:,} / median {stats[1]:,.1f} / mean {stats[2]:,.1f} / "
                                   f"max {stats[3]:,} tokens"))
    if ds.num_tokens:
        top = int(np.asarray(ds.tokens).max()) if ds.num_tokens <= (1 << 26) else None
        if top is not None and vocab_size is not None and top >= vocab_size:
            rows.append(("warning", f"token id {top} is outside the vocabulary ({vocab_size} ids)"))
    if meta and "split" in meta:
        rows.append(("split", ", ".join(f"{k} {v}" for k, v in meta["split"].items())))
    width = max(len(k) for k, _ in rows)
    print(f"{'dataset':<{width}}  {prefix}", file=out)
    for k, v in rows:
        print(f"{k:<{width}}  {v}", file=out)
    head = np.asarray(ds.tokens[:first_tokens]).astype(np.int64)
    print(f"first {len(head)} tokens: {head.tolist()}", file=out)
    text = None
    if tokenizer is not None and len(head):
        if int(head.max()) < tokenizer.vocab_size:
            text = tokenizer.decode(head.tolist())
            print(f"decoded: {text!r}", file=out)
        else:
            print(f"decoded: (not decodable: id {int(head.max())} is outside the tokenizer's {tokenizer.vocab_size} "
                  f"ids)", file=out)
    return {"documents": ds.num_documents, "sequences": ds.sequence_count, "tokens": ds.num_tokens,
            "dtype": ds.dtype.name, "vocab_size": vocab_size, "eod_id": eod, "length_stats": stats,
            "scored_tokens": scored,
            "first_ids": head.tolist(), "first_text": text}


def main(argv: Optional[List[str]] = None) -> int:
    """The command: exit status 0, 2 on bad input (one line on stderr), 130 when interrupted."""
    p = CommandParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("prefix", help="dataset prefix (PREFIX.bin / PREFIX.idx)")
    p.add_argument("--vocab-file", default=None, help="GPT-2 vocab.json, for a prefix without .json (default: none)")
    p.add_argument("--merge-file", default=None, help="GPT-2 merges.txt, with --vocab-file (default: none)")
    p.add_argument("--tokenizer-file", default=None,
                   help="a tokenizer.json or sentencepiece .model, for a prefix without .json (default: none)")
    p.add_argument("--tokens", type=int_at_least(0), default=40, help="how many leading tokens to show (default: 40)")
    args = p.parse_args(argv)
    prefix = args.prefix[:-4] if args.prefix.endswith((".bin", ".idx")) else args.prefix
    try:
        meta = read_metadata(prefix) if os.path.isfile(meta_path(prefix)) else None
        tok = tokenizer_for(prefix, meta, args.vocab_file, args.merge_file, args.tokenizer_file)
        summarize(prefix, tok, meta, args.tokens)
    except (IndexedDatasetError, TokenizerError, ValueError) as e:
        return fail(PROG, e)
    except OSError as e:
        return fail(PROG, f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}")
    except KeyboardInterrupt:
        return interrupted(PROG, "stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
