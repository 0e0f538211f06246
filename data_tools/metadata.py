"""``prefix.json``: the description written beside every ``prefix.bin``/``prefix.idx`` pair.

It says how the tokens were made (tokenizer spec, vocabulary size, EOD id) and what the files hold
(documents, sequences, tokens, dtype, input checksum).  Training, evaluation and generation read the
tokenizer from here, so all three decode exactly as preprocessing encoded.

Fields written by every producer::

    format          "MMIDIDX"
    dtype           "uint16" | "int32" | ...
    vocab_size      int   (the tokenizer's, not padded)
    eod_id          int | null
    pad_id          int | null
    tokenizer       {"type": ..., ...}   (see data_tools.tokenization)
    documents, sequences, tokens   ints
    producer        "preprocess" | "synthetic" | "merge" | ...
Optional: ``split``, ``input`` ({"paths", "bytes", "sha256"}), ``loss_mask`` (prefix of a companion uint8
dataset marking scored positions), ``task`` (synthetic task parameters), anything producer-specific.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict


def meta_path(prefix: str) -> str:
    return prefix + ".json"


def write_metadata(prefix: str, meta: Dict[str, Any]) -> None:
    """Write ``prefix.json`` atomically (temporary name, then rename)."""
    path = meta_path(prefix)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def read_metadata(prefix: str) -> Dict[str, Any]:
    """``prefix.json`` as a dict.  ``FileNotFoundError`` when it is missing; ``ValueError`` naming the file
    (and line) when it is not a JSON object."""
    path = meta_path(prefix)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path}: no metadata beside the dataset (write it with data_tools/preprocess.py, or pass the "
            f"tokenizer explicitly)")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}); expected the dataset's JSON metadata") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a JSON object (the dataset's metadata), got a {type(meta).__name__}")
    return meta
