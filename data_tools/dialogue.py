"""Dialogues as JSON lines -> Megatron's indexed dataset with one document per dialogue and one sequence per turn,
the data of MemBART's fine-tuning (``data_tools/seq2seq.py``, task ``dialogue``).

    python data_tools/dialogue.py --input train=msc_train.jsonl valid=msc_valid.jsonl --tokenizer hf \\
        --tokenizer-file bart/tokenizer.json --output-prefix data/msc      # -> data/msc_train, data/msc_valid
    python data_tools/dialogue.py --input chats.jsonl --tokenizer bytes --output-prefix data/chats

Input format: one JSON object per line (empty lines are skipped) with a list of turns under ``turns`` (or
``--turns-key``), oldest first; a turn is a string, or an object whose ``text`` (``--text-key``) is one.  Other keys
(an ``id``, speakers) are ignored.  At least one turn per dialogue; a dialogue of one turn has no response to train
on and is counted but contributes no time step::

    {"id": "d1", "turns": ["Hi, how was the trip?", "Great, we saw the coast.", "Which part?"]}
    {"turns": [{"speaker": "A", "text": "Hello"}, {"speaker": "B", "text": "Hi there"}]}

Output: ``PREFIX.bin`` / ``PREFIX.idx`` (MMIDIDX: each dialogue a document, each turn a sequence; turns are encoded
on their own, nothing appended) and ``PREFIX.json`` (tokenizer spec, counts, ``"producer": "dialogue"``,
``"turns": true``), plus the tokenizer's files beside it.  The sequence boundaries are the turn index: a time step
is a response turn t >= 1, its source the turns before it.  Bad input (a line that is not JSON, no turn list, an
empty or non-string turn) stops the command with ``file:line`` and exit status 2 (``--skip-bad-lines`` counts and
skips such lines); every input is read and encoded before anything is written, and the files are written under
temporary names and renamed into place, so a failed run leaves nothing behind.
"""
if __name__ == "__main__" and not __package__:
    import os, sys  # noqa: E401
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import json
import os
import sys
from typing import List, Optional, Tuple

import numpy as np

from data_tools.cli import CommandError, CommandParser, run_command
from data_tools.indexed import IndexedDatasetError, IndexedDatasetWriter, optimal_dtype
from data_tools.metadata import write_metadata
from data_tools.tokenization import (ByteTokenizer, GPT2Tokenizer, HFTokenizer, SentencePieceTokenizer, Tokenizer,
                                     TokenizerError)

PROG = "dialogue.py"
TOKENIZERS = ("bytes", "gpt2", "hf", "sentencepiece")


def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(prog=PROG, description=__doc__.split("\n\n")[0].replace("``", ""))
    p.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help="JSON-lines files of dialogues; NAME=PATH writes split NAME to PREFIX_NAME (train=a.jsonl "
                        "valid=b.jsonl) (required, no default)")
    p.add_argument("--turns-key", default="turns", help="key of the list of turns (default: turns)")
    p.add_argument("--text-key", default="text", help="key of a turn's text when turns are objects (default: text)")
    p.add_argument("--skip-bad-lines", action="store_true",
                   help="skip and count bad lines instead of stopping at the first (default: off)")
    p.add_argument("--tokenizer", required=True, choices=TOKENIZERS,
                   help="bytes; gpt2 (--vocab-file and --merge-file, or --tokenizer-file); hf (--tokenizer-file: "
                        "a tokenizer.json, e.g. BART's, whose ids a converted checkpoint reads); sentencepiece "
                        "(--tokenizer-file: the .model) (required)")
    p.add_argument("--vocab-file", default=None, help="gpt2: vocab.json (default: none)")
    p.add_argument("--merge-file", default=None, help="gpt2: merges.txt (default: none)")
    p.add_argument("--tokenizer-file", default=None, help="gpt2 / hf: tokenizer.json; sentencepiece: .model "
                                                          "(default: none)")
    p.add_argument("--output-prefix", required=True, help="write PREFIX.bin/.idx/.json (PREFIX_NAME with NAME=PATH "
                                                          "inputs) (required, no default)")
    return p


def _existing(path: Optional[str], flag: str) -> str:
    if not path:
        raise CommandError(f"{flag} is required for this tokenizer")
    if not os.path.exists(path):
        raise CommandError(f"{flag} {path}: no such file")
    return path


def make_tokenizer(a: argparse.Namespace) -> Tokenizer:
    if a.tokenizer == "bytes":
        return ByteTokenizer()
    if a.tokenizer == "gpt2":
        if a.tokenizer_file:
            return GPT2Tokenizer(tokenizer_file=_existing(a.tokenizer_file, "--tokenizer-file"))
        return GPT2Tokenizer(_existing(a.vocab_file, "--vocab-file"), _existing(a.merge_file, "--merge-file"))
    if a.tokenizer == "hf":
        return HFTokenizer(_existing(a.tokenizer_file, "--tokenizer-file"))
    return SentencePieceTokenizer(_existing(a.tokenizer_file, "--tokenizer-file"))


def parse_dialogue(line: str, where: str, turns_key: str = "turns", text_key: str = "text") -> List[str]:
    """The turns of one JSON line; CommandError naming ``where`` (``file:line``) and the field otherwise."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise CommandError(f"{where}: not JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get(turns_key), list):
        raise CommandError(f"{where}: expected an object with a list under {turns_key!r} (see --turns-key)")
    turns = obj[turns_key]
    if not turns:
        raise CommandError(f"{where}: {turns_key!r} is empty (a dialogue needs at least one turn)")
    out = []
    for i, t in enumerate(turns):
        if isinstance(t, dict):
            t = t.get(text_key)
        if not isinstance(t, str) or not t.strip():
            raise CommandError(f"{where}: turn {i} is not a non-empty string (or an object with a {text_key!r} "
                               f"string; see --text-key)")
        out.append(t)
    return out


def read_dialogues(path: str, args) -> Tuple[List[List[str]], int]:
    """(dialogues, skipped bad lines) of one file."""
    dialogues, skipped = [], 0
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    dialogues.append(parse_dialogue(line, f"{path}:{n}", args.turns_key, args.text_key))
                except CommandError:
                    if not args.skip_bad_lines:
                        raise
                    skipped += 1
    except FileNotFoundError:
        raise CommandError(f"--input {path}: no such file") from None
    except UnicodeDecodeError as e:
        raise CommandError(f"{path}: not UTF-8 text (byte {e.start})") from None
    return dialogues, skipped


def _outputs(args) -> List[Tuple[str, str]]:
    pairs = []
    for item in args.input:
        name, sep, path = item.partition("=")
        if sep and name and "/" not in name:
            pairs.append((f"{args.output_prefix}_{name}", path))
        else:
            pairs.append((args.output_prefix, item))
    prefixes = [p for p, _ in pairs]
    if len(set(prefixes)) != len(prefixes):
        raise CommandError("--input: give one file, or NAME=PATH with distinct names")
    return pairs


def run(args) -> List[str]:
    tok = make_tokenizer(args)
    dtype = optimal_dtype(tok.vocab_size)
    jobs = []
    for prefix, path in _outputs(args):
        dialogues, skipped = read_dialogues(path, args)
        if not dialogues:
            raise CommandError(f"{path}: no dialogues")
        encoded = [[np.asarray(tok.encode(t), dtype=np.int64) for t in d] for d in dialogues]
        for d, (turns, enc) in enumerate(zip(dialogues, encoded)):
            for i, e in enumerate(enc):
                if e.size == 0:
                    raise CommandError(f"{path}: dialogue {d} turn {i} encodes to no tokens")
        jobs.append((prefix, path, encoded, skipped))
    written = []
    for prefix, path, encoded, skipped in jobs:
        with IndexedDatasetWriter(prefix, dtype) as w:
            for enc in encoded:
                w.add_document(np.concatenate(enc).astype(dtype), [e.size for e in enc])
        spec = tok.save(prefix)
        turns = sum(len(e) for e in encoded)
        write_metadata(prefix, {
            "format": "MMIDIDX", "dtype": np.dtype(dtype).name, "vocab_size": tok.vocab_size,
            "eod_id": tok.eod_id, "pad_id": tok.pad_id, "tokenizer": spec, "documents": len(encoded),
            "sequences": turns, "tokens": int(sum(e.size for d in encoded for e in d)), "producer": "dialogue",
            "turns": True, "responses": turns - len(encoded), "skipped_bad_lines": skipped,
            "input": {"paths": [path], "turns_key": args.turns_key}})
        written.append(prefix)
        print(f"{PROG}: {prefix}: {len(encoded)} dialogues, {turns} turns ({turns - len(encoded)} responses), "
              f"{sum(e.size for d in encoded for e in d)} tokens" + (f", {skipped} bad lines skipped" if skipped else ""))
    return written


def main(argv: Optional[List[str]] = None) -> int:
    """Exit status 0, 2 on bad input (one line on stderr), 130 when interrupted."""
    args = build_parser().parse_args(argv)
    return run_command(PROG, lambda: run(args), (CommandError, TokenizerError, IndexedDatasetError))


if __name__ == "__main__":
    sys.exit(main())
