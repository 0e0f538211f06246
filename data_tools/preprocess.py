"""Tokenize a corpus into Megatron's indexed dataset: ``P.bin`` + ``P.idx`` (MMIDIDX, byte for byte what
megatron-core writes) and ``P.json`` (tokenizer spec, counts, input checksums).

    python data_tools/preprocess.py --input corpus.jsonl --tokenizer gpt2 \\
        --vocab-file gpt2-vocab.json --merge-file gpt2-merges.txt --append-eod --output-prefix data/corpus
    python data_tools/preprocess.py --input enwik8 --input-format bytes --tokenizer bytes \\
        --split 90,5,5 --output-prefix data/enwik8          # -> data/enwik8_{train,valid,test}
    python data_tools/preprocess.py --input train=wiki.train.tokens valid=wiki.valid.tokens \\
        test=wiki.test.tokens --input-format wikitext --tokenizer words --output-prefix data/wt103
    python data_tools/preprocess.py --input qa.jsonl --json-key question --answer-key answer \\
        --tokenizer gpt2 --tokenizer-file tokenizer.json --append-eod --output-prefix data/qa  # + data/qa.mask

How it runs: the main process reads the inputs once, in order (hashing them as it goes), and cuts them into
blocks of whole documents; ``--workers`` processes parse and tokenize blocks; the main process writes the
results in input order through the streaming writer, so memory stays bounded whatever the corpus size.
Everything is written under temporary names and renamed into place only when complete; on any error
nothing is left behind.  Vocabularies built from the data (``chars``, ``words``) and ``--train-bpe`` take
an extra pass over the input before encoding (two for ``words`` with ``--split``).

Prompt/answer data (``--answer-key``, JSON lines): each document is the prompt's tokens followed by the
answer's (each encoded on its own), and a companion uint8 dataset ``P.mask`` with the same documents and
sequences marks the answer tokens (and the EOD) with 1; ``P.json`` names it under ``loss_mask``, so
training and evaluation score the answers only.  This module never imports torch.
"""
if __name__ == "__main__":
    import os, signal, sys  # noqa: E401
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C while starting up: end at once (nothing written yet)
    if not __package__:
        sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np

from data_tools.cli import (CommandError, CommandParser, check_not_inputs, check_output_folder, int_at_least,
                            make_folders, remove_folders, run_command, signals_deferred)
from data_tools.indexed import (CODE_OF_DTYPE, IndexedDataset, IndexedDatasetError, IndexedDatasetWriter,
                                bin_path, idx_path, optimal_dtype)
from data_tools.inputs import (FORMATS, Block, FileInfo, InputError, detect_format, parse_block, read_blocks,
                               resolve_inputs)
from data_tools.metadata import meta_path, write_metadata
from data_tools.progress import Progress
from data_tools.tokenization import (ByteTokenizer, GPT2Tokenizer, HFTokenizer, SentencePieceTokenizer, Tokenizer,
                                     TokenizerError, build_char_vocab, build_word_vocab, count_words, train_byte_bpe)
from data_tools.workers import WorkerDied, ordered_map

PROG = "preprocess.py"
TOKENIZERS = ("bytes", "chars", "words", "gpt2", "hf", "sentencepiece")
# Megatron's --tokenizer-type names for the same tokenizers.
ALIASES = {"GPT2BPETokenizer": "gpt2", "HuggingFaceTokenizer": "hf", "SentencePieceTokenizer": "sentencepiece",
           "GPTSentencePieceTokenizer": "sentencepiece"}
SPLIT_NAMES = ("train", "valid", "test")
CHAR_EOD = "<eod>"
# Files a tokenizer may save beside the output prefix (data_tools.tokenization: sidecar files).
TOKENIZER_SIDECARS = (".vocab.json", ".merges.txt", ".tokenizer.json", ".model")


class PreprocessError(ValueError):
    """A bad option or a corpus that cannot be written; the message says which."""


# ------------------------------------------------------------------------------------------ options
def split_weights(text: str) -> List[int]:
    """argparse type of ``--split``: 1 to 3 non-negative integer weights with a positive sum."""
    try:
        return parse_split(text)
    except PreprocessError as e:
        raise argparse.ArgumentTypeError(str(e).split(": ", 1)[1]) from None


def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(prog=PROG, description=__doc__.split("\n\n")[0].replace("``", ""))
    g = p.add_argument_group("input")
    g.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help="input files or globs; NAME=PATH gives each split its own files "
                        "(train=a.txt valid=b.txt test=c.txt); files ending in .gz are decompressed "
                        "(required, no default)")
    g.add_argument("--input-format", choices=FORMATS, default="auto",
                   help="jsonl: one JSON object per line; lines: one document per line; text: one document per "
                        "file; wikitext: articles split at ' = Title = ' lines; bytes: one raw byte stream per "
                        "file (enwik8); auto: jsonl for *.jsonl/*.json/*.ndjson, else text (default: auto)")
    g.add_argument("--json-key", "--json-keys", default="text",
                   help="key holding the text in JSON lines; with --answer-key, the prompt (default: text)")
    g.add_argument("--answer-key", default=None, metavar="KEY",
                   help="JSON lines: key holding an answer; each document is the prompt (--json-key) then the "
                        "answer, and PREFIX.mask marks the answer tokens (and the EOD) as the only scored ones "
                        "(default: none, every token is scored and no mask is written)")
    g.add_argument("--skip-bad-lines", action="store_true",
                   help="skip and count bad JSON lines (unparsable, no key, not a string; the answer too with "
                        "--answer-key) and undecodable lines "
                        "instead of stopping at the first (default: off)")
    g.add_argument("--split", default=None, type=split_weights, metavar="W1,W2[,W3]",
                   help="cut the input stream into train,valid[,test] by tokens, in order, at exact token "
                        "positions (a document across a cut is cut in two), e.g. 90,5,5; weights are relative "
                        "(default: no split, or the NAME=PATH splits)")

    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer", "--tokenizer-type", default=None, metavar="KIND",
                   help=f"one of {', '.join(TOKENIZERS)}; Megatron's GPT2BPETokenizer, HuggingFaceTokenizer and "
                        "SentencePieceTokenizer are accepted too (default: none; required unless --train-bpe)")
    g.add_argument("--vocab-file", default=None, help="gpt2: vocab.json / encoder.json (default: none)")
    g.add_argument("--merge-file", default=None, help="gpt2: merges.txt / vocab.bpe (default: none)")
    g.add_argument("--tokenizer-file", default=None,
                   help="gpt2 or hf: a tokenizer.json (hf: or its directory); sentencepiece: the .model "
                        "(default: none)")
    g.add_argument("--tokenizer-model", default=None,
                   help="sentencepiece: the .model, Megatron's name for it (default: none)")
    g.add_argument("--eod-token", default=None,
                   help="hf: the token used as EOD (default: the first of <|endoftext|>, <|end_of_text|>, "
                        "</s>, <eos>, <|im_end|>, [SEP] in the vocabulary)")
    g.add_argument("--train-bpe", type=int_at_least(257, "256 bytes + <|endoftext|>"), default=None, metavar="VOCAB",
                   help="train a byte-level BPE of VOCAB ids on the train split with the tokenizers library and "
                        "use it (default: off)")
    g.add_argument("--bpe-min-frequency", type=int_at_least(1), default=2,
                   help="--train-bpe: minimum frequency of a merged pair (default: 2)")
    g.add_argument("--min-count", type=int_at_least(1), default=1,
                   help="words: words seen fewer times in the train split become <unk> (default: 1)")
    g.add_argument("--max-vocab", type=int_at_least(2, "<eos> and <unk> included"), default=None,
                   help="words: keep at most this many symbols, <eos> and <unk> included (default: no limit)")
    g.add_argument("--tokenizer-backend", choices=("auto", "gigatoken", "tokenizers"), default="auto",
                   help="gpt2, hf, sentencepiece: gigatoken (fast; used only where it gives the reference's "
                        "ids) or tokenizers for the reference library (tokenizers, sentencepiece) "
                        "(default: auto = gigatoken when installed)")

    g = p.add_argument_group("output")
    g.add_argument("--output-prefix", required=True,
                   help="write PREFIX.bin/.idx/.json; with splits PREFIX_train, PREFIX_valid, ... "
                        "(required, no default)")
    g.add_argument("--append-eod", action="store_true",
                   help="append the EOD id to every document (default: off)")
    g.add_argument("--dtype", choices=("auto", "uint16", "int32"), default="auto",
                   help="token dtype; auto: uint16 for vocabularies under 65,500 ids, else int32, as Megatron "
                        "(default: auto)")
    g.add_argument("--workers", type=int_at_least(1), default=1,
                   help="tokenizing processes; document order is kept (default: 1)")
    g.add_argument("--no-progress", action="store_true",
                   help="no progress output (a bar on a terminal, else a line every 30 s with rate and ETA); "
                        "the final summary still prints (default: off)")
    return p


def parse_split(text: str) -> List[int]:
    """``"90,5,5"`` -> ``[90, 5, 5]``: 1 to 3 non-negative integer weights (train, valid, test) with a
    positive sum; ``PreprocessError`` otherwise."""
    try:
        weights = [int(w) for w in text.split(",")]
    except ValueError:
        raise PreprocessError(f"--split {text}: expected comma-separated integers such as 90,5,5, "
                              f"got {text!r}") from None
    if not 1 <= len(weights) <= 3 or min(weights) < 0 or sum(weights) <= 0:
        raise PreprocessError(f"--split {text}: give 1 to 3 non-negative weights (train,valid,test) with a "
                              f"positive sum, got {text!r}")
    return weights


def split_cuts(total: int, weights: List[int]) -> List[Tuple[str, int, int]]:
    """``(name, start, end)`` token ranges: cut k is at ``total * (w_1 + ... + w_k) // sum(w)`` (so 90,5,5 of
    enwik8's 10^8 bytes cuts at 9e7 and 9.5e7, and 90,10 of tinyshakespeare at nanoGPT's int(0.9 n));
    splits of weight 0 are left out."""
    out, acc, s = [], 0, sum(weights)
    for name, w in zip(SPLIT_NAMES, weights):
        start, acc = total * acc // s, acc + w
        if w:
            out.append((name, start, total * acc // s))
    return out


# ------------------------------------------------------------------------------------ worker tasks
class EncodeTask:
    """Block -> tokens of its documents (in the output dtype) and one length per document piece; with an
    answer key also the answer mask of those tokens (uint8, 1 on the answer and the EOD)."""

    def __init__(self, tokenizer: Tokenizer, dtype, json_key: str, skip_bad_lines: bool, append_eod: bool,
                 answer_key: Optional[str] = None):
        self.tokenizer, self.dtype = tokenizer, np.dtype(dtype)
        self.json_key, self.skip_bad_lines, self.answer_key = json_key, skip_bad_lines, answer_key
        self.eod = np.array([tokenizer.eod_id], self.dtype) if append_eod else None

    def __call__(self, block: Block) -> Dict[str, Any]:
        parsed = parse_block(block, self.json_key, self.skip_bad_lines, self.answer_key)
        answers = parsed.answers
        parts, lengths, encode = [], [], self.tokenizer.encode_ids
        spans: List[int] = []  # with answers: prompt length, scored length, per document
        last = len(parsed.docs) - 1
        for i, doc in enumerate(parsed.docs):
            try:
                ids = encode(doc)
                answer = encode(answers[i]) if answers is not None else None
            except (ValueError, UnicodeError) as e:  # e.g. a lone surrogate, a symbol outside a fixed vocabulary
                line = parsed.lines[i] if parsed.lines else block.line
                msg = f"{block.path}:{line}: cannot tokenize: {str(e).splitlines()[0]}"
                if not (self.skip_bad_lines and parsed.lines):
                    raise InputError(msg) from None
                parsed.skipped += 1
                parsed.first_skip = parsed.first_skip or msg
                continue
            parts.append(ids)
            n = len(ids)
            if answer is not None:
                parts.append(answer)
                n += len(answer)
            if self.eod is not None and not (i == last and parsed.continues):
                parts.append(self.eod)
                n += 1
            if answer is not None:
                spans += [len(ids), n - len(ids)]
            lengths.append(n)
        tokens = np.concatenate(parts).astype(self.dtype, copy=False) if parts else np.zeros(0, self.dtype)
        out = {"tokens": tokens, "lengths": np.array(lengths, np.int64), "continues": parsed.continues,
               "skipped": parsed.skipped, "first_skip": parsed.first_skip}
        if answers is not None:
            out["mask"] = np.repeat(np.tile(np.array([0, 1], np.uint8), len(spans) // 2), spans)
        return out


class CharsTask:
    """Block -> the set of characters in it."""

    def __init__(self, json_key: str, skip_bad_lines: bool, answer_key: Optional[str] = None):
        self.json_key, self.skip_bad_lines, self.answer_key = json_key, skip_bad_lines, answer_key

    def __call__(self, block: Block) -> set:
        chars = set()
        for texts in parse_block(block, self.json_key, self.skip_bad_lines, self.answer_key).records():
            for text in texts:
                chars.update(text)
        return chars


class WordsTask:
    """Block -> word counts (when ``count``) and its number of word-level tokens (words + one ``<eos>`` per
    line, + one EOD per complete document with ``--append-eod``); with an answer key, the answers' words
    count too."""

    def __init__(self, json_key: str, skip_bad_lines: bool, append_eod: bool, count: bool = True,
                 answer_key: Optional[str] = None):
        self.json_key, self.skip_bad_lines, self.append_eod, self.count = json_key, skip_bad_lines, append_eod, count
        self.answer_key = answer_key

    def __call__(self, block: Block, limit: Optional[int] = None) -> Tuple[Dict[str, int], int]:
        """With ``limit``, only the words among the block's first ``limit`` tokens are counted."""
        parsed = parse_block(block, self.json_key, self.skip_bad_lines, self.answer_key)
        counts: Dict[str, int] = {}
        total = 0
        for i, texts in enumerate(parsed.records()):
            eod = self.append_eod and not (i == len(parsed.docs) - 1 and parsed.continues)
            if limit is not None and total + sum(count_words(t, {}) for t in texts) + eod > limit:
                return self._count_until(texts, counts, total, limit)
            total += sum(count_words(t, counts if self.count else {}) for t in texts) + eod
        return counts, total

    @staticmethod
    def _count_until(texts: Tuple[str, ...], counts: Dict[str, int], total: int,
                     limit: int) -> Tuple[Dict[str, int], int]:
        """Count the words of a document's ``texts`` (each encoded on its own) one token at a time until
        ``limit`` tokens in all (the cut falls inside this document)."""
        for text in texts:
            *lines, tail = text.split("\n")
            for line, eos in [(line, True) for line in lines] + [(tail, False)]:
                for w in line.split() + ([None] if eos else []):  # None: the line's <eos>
                    if total >= limit:
                        return counts, total
                    if w is not None:
                        counts[w] = counts.get(w, 0) + 1
                    total += 1
        return counts, total


# --------------------------------------------------------------------------------------- the job
def mask_prefix(prefix: str) -> str:
    """The answer mask written beside ``prefix`` with ``--answer-key``."""
    return prefix + ".mask"


@dataclass
class Output:
    """One dataset being written: its token writer and, with ``--answer-key``, its answer-mask writer (fed
    the same calls, so both have the same documents and sequences)."""
    prefix: str
    name: Optional[str]  # split name
    writer: IndexedDatasetWriter
    mask: Optional[IndexedDatasetWriter]
    info: List[FileInfo] = field(default_factory=list)  # the input files' sizes and checksums
    split: Dict[str, Any] = field(default_factory=dict)  # --split details for the metadata
    scored: int = 0  # tokens marked 1 in the mask


class Outputs:
    """Every file and folder the job creates: on failure the temporary files are removed, the final ones
    too if the failure comes after some were renamed into place, and then every folder created for them."""

    def __init__(self, prefix: str):
        self.writers: List[IndexedDatasetWriter] = []
        self.created: List[str] = []
        self.directory = os.path.dirname(os.path.abspath(prefix))
        self.folders: List[str] = []  # folders this job created, outermost first

    def make_directory(self) -> None:
        """Create the output folder (and its missing parents), remembering which were new."""
        self.folders = make_folders(self.directory)

    def writer(self, prefix: str, dtype) -> IndexedDatasetWriter:
        w = IndexedDatasetWriter(prefix, dtype)
        self.writers.append(w)
        return w

    def output(self, prefix: str, name: Optional[str], dtype, masked: bool) -> Output:
        """Writers for ``prefix`` (and ``prefix.mask`` when ``masked``)."""
        mask = self.writer(mask_prefix(prefix), np.uint8) if masked else None
        return Output(prefix, name, self.writer(prefix, dtype), mask)

    def finalize(self, w: IndexedDatasetWriter) -> None:
        self.created += [bin_path(w.prefix), idx_path(w.prefix)]
        w.finalize()

    def abort(self) -> None:
        """Remove everything written so far (a second Ctrl-C does not cut this short)."""
        with signals_deferred():
            for w in self.writers:
                w.abort()
            for p in self.created:
                if os.path.exists(p):
                    os.remove(p)
            remove_folders(self.folders)


class Job:
    """One preprocessing run, built from the parsed options."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.outputs = Outputs(args.output_prefix)
        self.stats: Dict[str, Any] = {}
        self.skipped: Dict[str, int] = {}  # bad lines skipped, per output prefix
        self.inputs = resolve_inputs(args.input)
        self.named = None not in self.inputs
        self.weights = args.split
        if self.weights and self.named:
            raise PreprocessError("--split cuts one input stream; with NAME=PATH inputs each split already has "
                                  "its own files")
        self.formats = {p: detect_format(p, args.input_format) for ps in self.inputs.values() for p in ps}
        if args.answer_key is not None:
            other = next((p for p, f in self.formats.items() if f != "jsonl"), None)
            if other is not None:
                raise PreprocessError(f"--answer-key {args.answer_key} reads prompt/answer records from JSON lines, "
                                      f"but {other} is read as {self.formats[other]} (give *.jsonl files or "
                                      f"--input-format jsonl)")
            if args.answer_key == args.json_key:
                raise PreprocessError(f"--answer-key {args.answer_key}: the same key as --json-key (the prompt); "
                                      f"name the answer's key")
        kind = ALIASES.get(args.tokenizer, args.tokenizer)
        if args.train_bpe is not None:
            if kind not in (None, "gpt2"):
                raise PreprocessError(f"--train-bpe trains a byte-level BPE; it cannot be combined with "
                                      f"--tokenizer {args.tokenizer}")
            kind = "train-bpe"
        elif kind is None:
            raise PreprocessError("--tokenizer is required (one of " + ", ".join(TOKENIZERS) + "), or --train-bpe")
        elif kind not in TOKENIZERS:
            raise PreprocessError(f"--tokenizer {args.tokenizer}: unknown tokenizer (choose from "
                                  f"{', '.join(TOKENIZERS)})")
        self.kind = kind
        raw = [p for p, f in self.formats.items() if f == "bytes"]
        if raw and kind != "bytes":
            raise PreprocessError(f"--input-format bytes reads raw bytes ({raw[0]}); it needs --tokenizer bytes")
        check_output_folder(args.output_prefix, "--output-prefix")
        check_not_inputs(self.output_files(), self.input_files(), "--output-prefix", args.output_prefix)
        self.total_bytes = sum(os.path.getsize(p) for ps in self.inputs.values() for p in ps)
        self.start = time.perf_counter()

    # ---------------------------------------------------------------- helpers
    def log(self, msg: str) -> None:
        print(f"{PROG}: {msg}", file=sys.stderr, flush=True)

    def blocks(self, paths: List[str], info: Optional[List[FileInfo]] = None,
               cut_point: Optional[Callable[[str], int]] = None) -> Iterator[Block]:
        info = [] if info is None else info
        for p in paths:
            yield from read_blocks(p, self.formats[p], info, cut_point)

    def all_paths(self) -> List[str]:
        return [p for ps in self.inputs.values() for p in ps]

    def output_prefixes(self) -> List[str]:
        a = self.args
        if self.weights:
            return [f"{a.output_prefix}_{name}" for name, w in zip(SPLIT_NAMES, self.weights) if w]
        return [a.output_prefix if name is None else f"{a.output_prefix}_{name}" for name in self.inputs]

    def output_files(self) -> List[str]:
        """Every final file this job may write (data, masks, metadata, tokenizer files)."""
        files = [self.args.output_prefix + s for s in TOKENIZER_SIDECARS]
        for prefix in self.output_prefixes():
            files += [bin_path(prefix), idx_path(prefix), meta_path(prefix)]
            if self.args.answer_key is not None:
                files += [bin_path(mask_prefix(prefix)), idx_path(mask_prefix(prefix))]
        return files

    def input_files(self) -> List[Tuple[str, str]]:
        """``(flag, path)`` of every file the job reads."""
        a = self.args
        files = [("--input", p) for p in self.all_paths()]
        return files + [(flag, path) for flag, path in (
            ("--vocab-file", a.vocab_file), ("--merge-file", a.merge_file), ("--tokenizer-file", a.tokenizer_file),
            ("--tokenizer-model", a.tokenizer_model)) if path]

    def progress(self, desc: str, paths: List[str], count_docs: bool = False) -> Progress:
        """Progress over the bytes of ``paths`` (with documents per second when ``count_docs``)."""
        bar = Progress(PROG, desc, sum(os.path.getsize(p) for p in paths), "B", enabled=not self.args.no_progress)
        if count_docs:
            bar.postfix = lambda: f"{bar.count:,} docs, {bar.count / max(bar.elapsed(), 1e-9):,.0f} docs/s"
        return bar

    def map(self, task: Callable, blocks: Iterator[Block]) -> Iterator[Tuple[Block, Any]]:
        """``(block, task(block))`` in order, in ``--workers`` processes (blocks are sent by reference)."""
        return ordered_map(task, blocks, self.args.workers, ship=Block.by_reference)

    # ---------------------------------------------------------------- tokenizer
    def make_tokenizer(self) -> Tokenizer:
        a, kind = self.args, self.kind
        if kind == "bytes":
            return ByteTokenizer(eod=a.append_eod)
        if kind == "gpt2":
            if a.tokenizer_file:
                return GPT2Tokenizer(tokenizer_file=self._file(a.tokenizer_file, "--tokenizer-file"),
                                     backend=a.tokenizer_backend)
            if not (a.vocab_file and a.merge_file):
                raise PreprocessError("--tokenizer gpt2 needs --vocab-file and --merge-file, or --tokenizer-file")
            return GPT2Tokenizer(self._file(a.vocab_file, "--vocab-file"), self._file(a.merge_file, "--merge-file"),
                                 backend=a.tokenizer_backend)
        if kind == "hf":
            if not a.tokenizer_file:
                raise PreprocessError("--tokenizer hf needs --tokenizer-file (a tokenizer.json or its directory)")
            return HFTokenizer(self._file(a.tokenizer_file, "--tokenizer-file", allow_dir=True), a.eod_token,
                               backend=a.tokenizer_backend)
        if kind == "sentencepiece":
            model = a.tokenizer_model or a.tokenizer_file
            if not model:
                raise PreprocessError("--tokenizer sentencepiece needs --tokenizer-model (the .model file)")
            return SentencePieceTokenizer(self._file(model, "--tokenizer-model"),
                                          backend=a.tokenizer_backend)
        if kind == "chars":
            chars: set = set()
            task = CharsTask(a.json_key, a.skip_bad_lines, a.answer_key)
            with self.progress("reading characters", self.all_paths()) as bar:
                for block, found in self.map(task, self.blocks(self.all_paths())):
                    chars |= found
                    bar.update(block.raw_bytes)
            if not chars:
                raise PreprocessError(self._empty_message())
            return build_char_vocab(chars, eod=CHAR_EOD if a.append_eod else None)
        if kind == "words":
            return build_word_vocab(self.count_train_words(), a.min_count, a.max_vocab)
        if kind == "train-bpe":
            return self.train_bpe()
        raise AssertionError(kind)

    def _file(self, path: str, flag: str, allow_dir: bool = False) -> str:
        if not os.path.exists(path):
            raise PreprocessError(f"{flag} {path}: no such file")
        if os.path.isdir(path) and not allow_dir:
            raise PreprocessError(f"{flag} {path}: is a directory, expected a file")
        return path

    def train_paths(self, what: str) -> List[str]:
        if self.named:
            if "train" not in self.inputs:
                raise PreprocessError(f"{what} is built from the train split: name it (--input train=PATH ...)")
            return self.inputs["train"]
        return self.all_paths()

    def count_train_words(self) -> Dict[str, int]:
        """Word counts of the train split (of the first train-weight share of the tokens with --split)."""
        a = self.args
        paths = self.train_paths("the words vocabulary")
        limit = None
        if self.weights:
            total = 0
            task = WordsTask(a.json_key, a.skip_bad_lines, a.append_eod, count=False, answer_key=a.answer_key)
            with self.progress("counting tokens", paths) as bar:
                for block, (_, n) in self.map(task, self.blocks(paths)):
                    total += n
                    bar.update(block.raw_bytes)
            limit = split_cuts(total, self.weights)[0][2] if self.weights[0] else 0
        counts: Dict[str, int] = {}
        task = WordsTask(a.json_key, a.skip_bad_lines, a.append_eod, answer_key=a.answer_key)
        seen = 0
        with self.progress("counting words", paths) as bar:
            for block, (c, n) in self.map(task, self.blocks(paths)):
                if limit is not None and seen + n > limit:
                    c, n = task(block, limit - seen)  # the train share ends inside this block
                    _merge_counts(counts, c)
                    break
                _merge_counts(counts, c)
                seen += n
                bar.update(block.raw_bytes)
        return counts

    def train_bpe(self) -> Tokenizer:
        """Train on the train split's documents (with --split: on the documents of the first train-weight
        share of the input bytes, since token cut points only exist after training)."""
        a = self.args
        paths = self.train_paths("--train-bpe")
        budget = None
        if self.weights:
            budget = sum(os.path.getsize(p) for p in paths) * self.weights[0] // sum(self.weights)

        def texts(bar: Progress) -> Iterator[str]:
            seen = 0
            for block in self.blocks(paths):
                if budget is not None and seen >= budget:
                    return
                seen += block.raw_bytes
                bar.update(block.raw_bytes)
                for record in parse_block(block, a.json_key, a.skip_bad_lines, a.answer_key).records():
                    yield from record  # the prompt and the answer are encoded on their own

        self.outputs.created.append(a.output_prefix + ".tokenizer.json")
        with self.progress("training BPE", paths) as bar:
            return train_byte_bpe(texts(bar), a.train_bpe, a.output_prefix, a.bpe_min_frequency)

    # ---------------------------------------------------------------- encoding
    def encode(self, paths: List[str], out: Output, task: EncodeTask, desc: str) -> None:
        """Tokenize ``paths`` in order into ``out`` (the tokens, and the answer mask when there is one);
        record the files' sizes and checksums in ``out.info``."""
        open_doc = False  # the previous block's last document continues
        skipped = 0
        blocks = self.blocks(paths, out.info, self.tokenizer.cut_point)
        with self.progress(desc, paths, count_docs=True) as bar:
            for block, r in self.map(task, blocks):
                skipped += r["skipped"]
                if r["skipped"] and "first_skip" not in self.stats:
                    self.stats["first_skip"] = r["first_skip"]
                complete = write_pieces(out.writer, r["tokens"], r["lengths"], open_doc, r["continues"])
                if out.mask is not None:
                    write_pieces(out.mask, r["mask"], r["lengths"], open_doc, r["continues"])
                    out.scored += int(np.count_nonzero(r["mask"]))
                open_doc = r["continues"]
                bar.count += max(complete, 0)
                bar.update(block.raw_bytes)
        self.stats["skipped"] = self.stats.get("skipped", 0) + skipped
        self.skipped[out.prefix] = skipped

    # ---------------------------------------------------------------- run
    def run(self) -> List[str]:
        a = self.args
        try:
            self.outputs.make_directory()
            self.tokenizer = tok = self.make_tokenizer()
            if a.append_eod and tok.eod_id is None:
                raise PreprocessError(f"--append-eod: the tokenizer ({tok.describe()}) has no EOD token"
                                      + (" (name one with --eod-token)" if self.kind == "hf" else ""))
            dtype = self.pick_dtype(tok)
            self.verify_fast_backend(tok)
            task = EncodeTask(tok, dtype, a.json_key, a.skip_bad_lines, a.append_eod, a.answer_key)
            masked = a.answer_key is not None
            results: List[Output] = []
            if self.weights:
                results = self.run_token_split(task, dtype)
            else:
                for name, paths in self.inputs.items():
                    prefix = a.output_prefix if name is None else f"{a.output_prefix}_{name}"
                    out = self.outputs.output(prefix, name, dtype, masked)
                    self.encode(paths, out, task, f"encoding {os.path.basename(prefix)}")
                    results.append(out)
            self.check_not_empty(results)
            spec = tok.save(a.output_prefix)
            self.outputs.created += [os.path.join(os.path.dirname(os.path.abspath(a.output_prefix)), spec[k])
                                     for k in type(tok).file_keys if spec.get(k)]
            for out in results:
                self.outputs.finalize(out.writer)
                if out.mask is not None:
                    self.outputs.finalize(out.mask)
                self.outputs.created.append(meta_path(out.prefix))
                write_metadata(out.prefix, self.metadata(tok, spec, dtype, out))
        except BaseException:
            self.outputs.abort()
            raise
        with signals_deferred():  # the outputs are complete: a Ctrl-C now must not report otherwise
            self.summarize(results, dtype)
        return [r.prefix for r in results]

    def run_token_split(self, task: EncodeTask, dtype) -> List[Output]:
        """One stream, encoded into a temporary dataset (and mask), then cut at exact token positions."""
        a = self.args
        tmp = self.outputs.output(f"{a.output_prefix}.all.tmp{os.getpid()}", None, dtype, a.answer_key is not None)
        self.encode(self.all_paths(), tmp, task, "encoding")
        self.check_not_empty([tmp])
        for w in (tmp.writer, tmp.mask):
            if w is not None:
                self.outputs.finalize(w)
        src = IndexedDataset(tmp.prefix)
        mask_src = IndexedDataset(mask_prefix(tmp.prefix)) if tmp.mask is not None else None
        results = []
        cuts = split_cuts(src.num_tokens, self.weights)
        for k, (name, start, end) in enumerate(cuts):
            if end <= start:
                raise PreprocessError(f"--split {a.split}: split {name!r} would be empty ({src.num_tokens:,} tokens "
                                      f"in all); give a larger input or other weights")
            out = self.outputs.output(f"{a.output_prefix}_{name}", name, dtype, mask_src is not None)
            out.info, out.split = tmp.info, {"weights": self.weights, "token_range": [start, end]}
            copy_token_range(src, out.writer, start, end, last=k == len(cuts) - 1)
            if mask_src is not None:  # the same cut of a dataset of the same structure: the same calls
                copy_token_range(mask_src, out.mask, start, end, last=k == len(cuts) - 1)
                out.scored = count_nonzero(mask_src.tokens, start, end)
            results.append(out)
        del src, mask_src
        for w in (tmp.writer, tmp.mask):
            if w is not None:
                os.remove(bin_path(w.prefix))
                os.remove(idx_path(w.prefix))
        return results

    def pick_dtype(self, tok: Tokenizer):
        need = optimal_dtype(tok.vocab_size)
        if self.args.dtype == "auto":
            return need
        dtype = np.dtype(self.args.dtype)
        if tok.vocab_size - 1 > np.iinfo(dtype).max:
            raise PreprocessError(f"--dtype {self.args.dtype}: the vocabulary has {tok.vocab_size:,} ids, more than "
                                  f"{self.args.dtype} holds (max id {np.iinfo(dtype).max:,}); use int32")
        return dtype.type

    def verify_fast_backend(self, tok: Tokenizer) -> None:
        """For hf/sentencepiece, compare gigatoken with the reference on the first documents too."""
        if not hasattr(tok, "verify") or tok.backend != "gigatoken":
            return
        sample, size = [], 0
        for block in self.blocks(self.all_paths()[:1]):
            for doc in (t for r in parse_block(block, self.args.json_key, True, self.args.answer_key).records()
                        for t in r):
                sample.append(doc[:1 << 16])  # both backends see the same (possibly cut) text
                size += len(sample[-1])
                if size > 1 << 18:
                    break
            break
        if not tok.verify(sample):
            self.log("gigatoken differs from the reference on this tokenizer; using the reference library")

    def check_not_empty(self, results: List[Output]) -> None:
        for out in results:
            if out.writer.num_tokens == 0:
                raise PreprocessError(self._empty_message(out.name))

    def _empty_message(self, name: Optional[str] = None) -> str:
        paths = self.inputs.get(name) if name in self.inputs else self.all_paths()
        shown = ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
        what = f"split {name!r}" if name else "the input"
        extra = f" ({self.stats['skipped']} bad lines skipped)" if self.stats.get("skipped") else ""
        return f"no tokens in {what}: {shown}{extra}"

    def metadata(self, tok, spec, dtype, out: Output) -> Dict[str, Any]:
        a, w, name, info = self.args, out.writer, out.name, out.info
        meta = {
            "format": "MMIDIDX", "dtype": np.dtype(dtype).name, "dtype_code": CODE_OF_DTYPE[np.dtype(dtype)],
            "vocab_size": tok.vocab_size, "eod_id": tok.eod_id, "pad_id": tok.pad_id, "tokenizer": spec,
            "documents": w.document_count, "sequences": w.sequence_count, "tokens": w.num_tokens,
            "producer": "preprocess", "append_eod": a.append_eod,
            "input": {"paths": [f.path for f in info], "bytes": [f.bytes for f in info],
                      "sha256": [f.sha256 for f in info],
                      "format": sorted({self.formats[p] for p in self.inputs.get(name) or self.all_paths()}),
                      "json_key": a.json_key},
            "skipped_bad_lines": self.skipped.get(w.prefix, self.stats.get("skipped", 0)),
        }
        if name is not None:
            meta["split"] = dict(name=name, **out.split)
        if out.mask is not None:
            meta["input"]["answer_key"] = a.answer_key
            meta["loss_mask"] = os.path.basename(mask_prefix(out.prefix))
            meta["scored_tokens"] = out.scored
        return meta

    def summarize(self, results: List[Output], dtype) -> None:
        secs = time.perf_counter() - self.start
        for out in results:
            w = out.writer
            mask = f" + {mask_prefix(out.prefix)}.bin/.idx" if out.mask is not None else ""
            scored = f", {out.scored:,} scored" if out.mask is not None else ""
            self.log(f"wrote {out.prefix}.bin/.idx/.json{mask}: {w.document_count:,} documents, {w.num_tokens:,} "
                     f"tokens{scored} ({np.dtype(dtype).name})")
        docs = sum(r.writer.document_count for r in results)
        self.log(f"{self.tokenizer.describe()}; {self.total_bytes / 1e6:,.1f} MB in {secs:.2f} s "
                 f"({self.total_bytes / 1e6 / secs:,.1f} MB/s, {docs / secs:,.0f} docs/s)")
        if self.stats.get("skipped"):
            self.log(f"skipped {self.stats['skipped']:,} bad lines (first: {self.stats['first_skip']})")


def _merge_counts(into: Dict[str, int], counts: Dict[str, int]) -> None:
    for w, c in counts.items():
        into[w] = into.get(w, 0) + c


# ---------------------------------------------------------------------------------- writing pieces
def write_pieces(writer: IndexedDatasetWriter, tokens: np.ndarray, lengths: np.ndarray, open_doc: bool,
                 continues: bool) -> int:
    """Append one block's document pieces (``tokens`` cut by ``lengths``) to ``writer``: when ``open_doc``
    the first piece finishes (or extends) the document left open by the previous block; when
    ``continues`` the last piece stays open.  Returns the number of pieces that end their document."""
    complete = len(lengths) - (1 if continues else 0)
    pos, k = 0, 0
    if open_doc and len(lengths):
        writer.add_item(tokens[:lengths[0]])
        pos, k = int(lengths[0]), 1
        if complete >= 1:
            writer.end_document()
    if complete > k:
        end = pos + int(lengths[k:complete].sum())
        writer.add_documents(tokens[pos:end], lengths[k:complete])
        pos, k = end, complete
    if continues and k < len(lengths):
        writer.add_item(tokens[pos:])
    return complete


def count_nonzero(values: np.ndarray, start: int, end: int, chunk: int = 1 << 24) -> int:
    """Non-zero entries of ``values[start:end]``, a chunk at a time (``values`` may be a large memmap)."""
    return sum(int(np.count_nonzero(values[a:min(a + chunk, end)])) for a in range(start, end, chunk))


# ---------------------------------------------------------------------------------- token splits
def copy_token_range(src: IndexedDataset, writer: IndexedDatasetWriter, start: int, end: int,
                     last: bool = False, max_tokens: int = 1 << 24) -> None:
    """Append tokens ``[start, end)`` of ``src`` to ``writer``, document by document: documents inside the
    range are copied as they are (runs of one-sequence documents in bulk), a document across either end is
    cut there.  Empty documents go to the range they start in (at ``end`` only when ``last``)."""
    item, n, total = src.dtype.itemsize, src.sequence_count, src.num_tokens
    di, ptr, lens = src.document_indices, src.sequence_pointers, src.sequence_lengths
    ndocs = src.num_documents

    def doc_starts(lo: int, hi: int) -> np.ndarray:  # token offset where documents lo..hi-1 start
        s = np.asarray(di[lo:hi], dtype=np.int64)
        out = np.full(s.shape, total, np.int64)
        inside = s < n
        out[inside] = np.asarray(ptr[s[inside]]) // item
        return out

    def first_doc(pred) -> int:  # smallest d in [0, ndocs] with pred(d) (pred monotone)
        lo, hi = 0, ndocs
        while lo < hi:
            mid = (lo + hi) // 2
            if pred(mid):
                hi = mid
            else:
                lo = mid + 1
        return lo

    def bounds(d: int) -> Tuple[int, int]:
        s, e = doc_starts(d, d + 2)
        return int(s), int(e)

    d0 = first_doc(lambda d: bounds(d)[1] > start or bounds(d)[0] >= start)
    d1 = ndocs if last else first_doc(lambda d: bounds(d)[0] >= end)
    chunk = 1 << 16
    for c in range(d0, d1, chunk):
        c1 = min(c + chunk, d1)
        edges = doc_starts(c, c1 + 1)  # starts of c..c1-1 and the end of c1-1
        s, e = edges[:-1], edges[1:]
        nseq = np.diff(np.asarray(di[c:c1 + 1], dtype=np.int64))
        simple = (nseq == 1) & (s >= start) & (e <= end)
        breaks = np.flatnonzero(~simple)  # documents that are cut, empty by convention, or multi-sequence
        j = 0
        while j < len(s):
            if simple[j]:  # a run of whole one-sequence documents: copy in bulk, max_tokens at a time
                nxt = np.searchsorted(breaks, j)
                k = int(breaks[nxt]) if nxt < len(breaks) else len(s)
                k = max(j + 1, min(k, j + int(np.searchsorted(e[j:k] - s[j], max_tokens, "right"))))
                writer.add_documents(src.tokens[s[j]:e[k - 1]], e[j:k] - s[j:k])
                j = k
                continue
            # A document cut by the range, empty, or of several sequences: copied sequence by sequence (a
            # sequence is at most one input piece, so memory stays bounded), keeping the part in range.
            d = c + j
            lo, hi = max(int(s[j]), start), min(int(e[j]), end)
            q0, q1 = int(di[d]), int(di[d + 1])
            qs = np.asarray(ptr[q0:q1]) // item
            qe = qs + np.asarray(lens[q0:q1])
            kept = 0
            for a, b in zip(np.maximum(qs, lo), np.minimum(qe, hi)):
                if b > a:
                    writer.add_item(src.tokens[a:b])
                    kept += 1
            if kept == 0 and q1 > q0:
                writer.add_item(src.tokens[0:0])  # an empty document written as a zero-length sequence
            writer.end_document()
            j += 1


# --------------------------------------------------------------------------------------------- main
def main(argv: Optional[List[str]] = None) -> int:
    """The command: exit status 0, 2 on bad input (one line on stderr), 130 when interrupted (SIGINT or
    SIGTERM); nothing is left behind unless it succeeds."""
    args = build_parser().parse_args(argv)
    return run_command(PROG, lambda: Job(args).run(),
                       (PreprocessError, InputError, TokenizerError, IndexedDatasetError, CommandError, WorkerDied))


if __name__ == "__main__":
    # Run the copy imported under its package name, so worker processes find their functions by name.
    from data_tools.preprocess import main as _main
    sys.exit(_main())
