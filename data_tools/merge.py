"""Concatenate indexed datasets into one, in the order given (Megatron's ``tools/merge_datasets.py``).

    python data_tools/merge.py --input data/shard_0 data/shard_1 --output-prefix data/all
    python data_tools/merge.py --input data/shards/ --output-prefix data/all   # every prefix in the folder, sorted

Every input must have the same token dtype and, where the inputs have ``prefix.json``, the same tokenizer
(same kind, options and file contents, whatever the files are called); otherwise the merge stops with a
message naming the first input that differs.  The output is written under temporary names and renamed when
complete; its ``.json`` sums the counts, lists the inputs, and carries the shared tokenizer (saved beside
the output).
"""
if __name__ == "__main__":
    import os, signal, sys  # noqa: E401
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C while starting up: end at once (nothing written yet)
    if not __package__:
        sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import os
import sys
from typing import Any, Dict, List, Optional, Tuple

from data_tools.cli import (CommandError, CommandParser, check_not_inputs, check_output_folder, fail, interrupted,
                            make_folders, remove_folders, sigterm_as_interrupt, signals_deferred)
from data_tools.indexed import IndexedDataset, IndexedDatasetError, IndexedDatasetWriter, bin_path, idx_path
from data_tools.metadata import meta_path, read_metadata, write_metadata
from data_tools.tokenization import TokenizerError, tokenizer_fingerprint, tokenizer_from_spec

TOKENIZER_SIDECARS = (".vocab.json", ".merges.txt", ".tokenizer.json", ".model")

PROG = "merge.py"


class MergeError(ValueError):
    """Inputs that cannot be merged; the message names the input."""


def resolve_prefixes(args: List[str]) -> List[str]:
    """Dataset prefixes from ``--input``: prefixes (``.bin``/``.idx`` suffixes are dropped), or folders whose
    ``*.idx`` files with a ``.bin`` beside them are taken in sorted order."""
    out = []
    for arg in args:
        if os.path.isdir(arg):
            found = sorted(os.path.join(arg, f[:-4]) for f in os.listdir(arg)
                           if f.endswith(".idx") and os.path.isfile(os.path.join(arg, f[:-4] + ".bin")))
            if not found:
                raise MergeError(f"--input {arg}: no .bin/.idx pairs in this folder")
            out += found
        else:
            out.append(arg[:-4] if arg.endswith((".bin", ".idx")) else arg)
    return out


def input_files(prefixes: List[str]) -> List[Tuple[str, str]]:
    """``("--input", path)`` for every file the merge reads: the datasets and the tokenizer files their
    ``.json`` names."""
    files = []
    for p in prefixes:
        files += [("--input", bin_path(p)), ("--input", idx_path(p)), ("--input", meta_path(p))]
        meta = _metadata(p) if os.path.isfile(meta_path(p)) else None
        spec = (meta or {}).get("tokenizer") or {}
        if isinstance(spec, dict):  # a malformed spec is reported when the tokenizers are compared
            files += [("--input", os.path.join(_dir(p), v)) for k, v in spec.items()
                      if k in ("file", "vocab", "merges", "model") and isinstance(v, str)]
    return files


def merge(prefixes: List[str], output_prefix: str) -> Dict[str, Any]:
    """Write the concatenation of ``prefixes`` to ``output_prefix``; return the output's metadata.  Raises
    ``MergeError`` (and ``IndexedDatasetError``, ``TokenizerError``, ``CommandError``) naming the input at
    fault; nothing is written then, and folders created for the output are removed again."""
    if not prefixes:
        raise MergeError("nothing to merge")
    check_output_folder(output_prefix, "--output-prefix")
    outputs = [bin_path(output_prefix), idx_path(output_prefix), meta_path(output_prefix)]
    check_not_inputs(outputs + [output_prefix + s for s in TOKENIZER_SIDECARS], input_files(prefixes),
                     "--output-prefix", output_prefix)
    datasets = [IndexedDataset(p) for p in prefixes]
    first = datasets[0]
    for p, d in zip(prefixes, datasets):
        if d.dtype != first.dtype:
            raise MergeError(f"{idx_path(p)}: token dtype {d.dtype} differs from {idx_path(prefixes[0])}'s "
                             f"{first.dtype}; datasets of different dtypes cannot be merged")
    metas = [_metadata(p) for p in prefixes]
    if any(m is None for m in metas) and any(m is not None for m in metas):
        missing = prefixes[[m is None for m in metas].index(True)]
        raise MergeError(f"{meta_path(missing)}: missing, while other inputs have one (cannot tell whether the "
                         f"tokenizers match)")
    tokenizer = None
    if metas[0] is not None:
        prints = [tokenizer_fingerprint(m["tokenizer"], _dir(p)) if m.get("tokenizer") else None
                  for p, m in zip(prefixes, metas)]
        for p, m, fp in zip(prefixes, metas, prints):
            if fp != prints[0] or m.get("vocab_size") != metas[0].get("vocab_size"):
                raise MergeError(f"{meta_path(p)}: tokenizer differs from {meta_path(prefixes[0])}'s "
                                 f"({_describe(m)} vs {_describe(metas[0])}); only datasets made with the same "
                                 f"tokenizer can be merged")
        if metas[0].get("tokenizer"):
            tokenizer = tokenizer_from_spec(metas[0]["tokenizer"], _dir(prefixes[0]))

    created: List[str] = []
    folders = make_folders(_dir(output_prefix))
    writer = None
    try:
        writer = IndexedDatasetWriter(output_prefix, first.dtype)
        for p in prefixes:
            writer.add_index(p)
        meta: Optional[Dict[str, Any]] = None
        if metas[0] is not None:
            spec = tokenizer.save(output_prefix) if tokenizer is not None else None
            if spec is not None:
                created += [os.path.join(_dir(output_prefix), spec[k])
                            for k in type(tokenizer).file_keys if spec.get(k)]
            meta = {k: metas[0].get(k) for k in ("format", "dtype", "dtype_code", "vocab_size", "eod_id", "pad_id")}
            appends = {m.get("append_eod") for m in metas}
            meta.update(tokenizer=spec, documents=writer.document_count, sequences=writer.sequence_count,
                        tokens=writer.num_tokens, producer="merge", merged_from=[os.path.abspath(p) for p in prefixes],
                        append_eod=appends.pop() if len(appends) == 1 else None,
                        input={k: sum((m.get("input", {}).get(k, []) for m in metas), [])
                               for k in ("paths", "bytes", "sha256")})
        created += [bin_path(output_prefix), idx_path(output_prefix)]
        writer.finalize()
        if meta is not None:
            created.append(meta_path(output_prefix))
            write_metadata(output_prefix, meta)
    except BaseException:
        with signals_deferred():
            if writer is not None:
                writer.abort()
            for path in created:
                if os.path.exists(path):
                    os.remove(path)
            remove_folders(folders)
        raise
    return meta or {"documents": writer.document_count, "sequences": writer.sequence_count,
                    "tokens": writer.num_tokens}


def _metadata(prefix: str) -> Optional[Dict[str, Any]]:
    if not os.path.isfile(meta_path(prefix)):
        return None
    meta = read_metadata(prefix)
    if not isinstance(meta, dict):
        raise MergeError(f"{meta_path(prefix)}: expected a JSON object (the dataset's metadata)")
    return meta


def _dir(prefix: str) -> str:
    return os.path.dirname(os.path.abspath(prefix))


def _describe(meta: Dict[str, Any]) -> str:
    tok = meta.get("tokenizer") or {}
    return f"{tok.get('type', 'no tokenizer')}, {meta.get('vocab_size')} ids"


def main(argv: Optional[List[str]] = None) -> int:
    """The command: exit status 0, 2 on bad input (one line on stderr), 130 when interrupted."""
    p = CommandParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--input", nargs="+", required=True, metavar="PREFIX_OR_DIR",
                   help="dataset prefixes, or folders of them (taken in sorted order) (required, no default)")
    p.add_argument("--output-prefix", required=True, help="write PREFIX.bin/.idx/.json (required, no default)")
    args = p.parse_args(argv)
    try:
        with sigterm_as_interrupt():
            prefixes = resolve_prefixes(args.input)
            meta = merge(prefixes, args.output_prefix)
    except (MergeError, IndexedDatasetError, TokenizerError, CommandError, ValueError) as e:
        return fail(PROG, e)
    except OSError as e:
        return fail(PROG, f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}")
    except KeyboardInterrupt:
        return interrupted(PROG)
    print(f"{PROG}: merged {len(prefixes)} datasets into {args.output_prefix}: {meta['documents']:,} documents, "
          f"{meta['tokens']:,} tokens", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
