"""From ``--data-path`` to the dataset prefixes of each split and what the run needs to know about them.

``--data-path P``: ``P_train`` / ``P_valid`` / ``P_test`` when they exist (what ``preprocess.py --split`` and
the synthetic tasks write), else ``P`` alone as the training split.  ``--data-path train=A,valid=B,test=C``
names them explicitly.  ``P.json`` gives the vocabulary size, the EOD and pad ids and the tokenizer; the
tokenizer decides the reported metric: bits per character/byte for byte- and character-level data,
perplexity otherwise.

Every split is checked when the run starts, not when it is first read (a corrupt validation split found at the
first evaluation, after hours of training, costs the run): ``load_data_info`` opens each split's ``.bin``/``.idx``
pair and its loss-mask companion with the reader's structural checks, and ``check_token_ids`` holds the largest
token id of every split against the vocabulary size (an id past the embedding table is otherwise an IndexError
deep in the model).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np

from data_tools import indexed
from data_tools.metadata import read_metadata
from pretrain.config_base import ConfigError

SPLITS = ("train", "valid", "test")


@dataclass
class DataInfo:
    prefixes: Dict[str, str]          # split -> prefix
    vocab_size: int
    eod_id: Optional[int]
    pad_id: Optional[int]
    tokenizer: dict
    metric: str                       # "bpc" or "ppl"
    meta: dict

    def has(self, split: str) -> bool:
        return split in self.prefixes


def resolve_splits(path: Optional[str]) -> Dict[str, str]:
    if not path:
        raise ConfigError("data.path", "no dataset given (--data-path PREFIX; make one with "
                                       "data_tools/preprocess.py or data_tools/synthetic.py)")
    if "=" in path:
        out = {}
        for part in path.split(","):
            if "=" not in part:
                raise ConfigError("data.path", f"{part!r}: expected split=prefix (splits: {', '.join(SPLITS)})")
            split, prefix = (s.strip() for s in part.split("=", 1))
            if split not in SPLITS:
                raise ConfigError("data.path", f"unknown split {split!r} (splits: {', '.join(SPLITS)})")
            out[split] = prefix
    elif indexed.exists(path + "_train"):
        out = {s: f"{path}_{s}" for s in SPLITS if indexed.exists(f"{path}_{s}")}
    else:
        out = {"train": path}
    for split, prefix in out.items():
        if not indexed.exists(prefix):
            raise ConfigError("data.path", f"{split} split: {prefix}.bin/.idx not found")
    if "train" not in out:
        raise ConfigError("data.path", f"no train split in {path!r}")
    return out


def metric_for(tokenizer_spec: dict) -> str:
    kind = tokenizer_spec.get("type")
    if kind == "bytes" or (kind == "vocab" and tokenizer_spec.get("split") == "chars"):
        return "bpc"
    return "ppl"


def load_data_info(path: Optional[str]) -> DataInfo:
    """The splits of ``path`` with the training split's metadata; every split (and its loss-mask companion) is
    opened and checked.  ConfigError on field ``data.path`` naming the file and what is wrong with it."""
    prefixes = resolve_splits(path)
    try:
        meta = read_metadata(prefixes["train"])
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError("data.path", str(e)) from None
    for key in ("vocab_size", "tokenizer"):
        if key not in meta:
            raise ConfigError("data.path", f"{prefixes['train']}.json has no {key!r} field")
    for split, prefix in prefixes.items():
        open_split(prefix)
    return DataInfo(prefixes=prefixes, vocab_size=int(meta["vocab_size"]), eod_id=meta.get("eod_id"),
                    pad_id=meta.get("pad_id"), tokenizer=meta["tokenizer"], metric=metric_for(meta["tokenizer"]),
                    meta=meta)


def open_split(prefix: str) -> indexed.IndexedDataset:
    """Open ``prefix`` and, when its ``.json`` names one, its loss-mask companion, with the reader's checks (index
    header, sizes, offsets; the mask marks every token).  ConfigError on ``data.path`` naming the file."""
    try:
        ds = indexed.IndexedDataset(prefix)
        m = read_metadata(prefix) if os.path.isfile(prefix + ".json") else {}
        if m.get("loss_mask"):
            mask_prefix = os.path.join(os.path.dirname(os.path.abspath(prefix)), m["loss_mask"])
            mask = indexed.IndexedDataset(mask_prefix)
            if mask.num_tokens != ds.num_tokens:
                raise ValueError(f"{mask_prefix}.bin: the loss mask has {mask.num_tokens} entries, {prefix}.bin "
                                 f"{ds.num_tokens} tokens")
    except ValueError as e:  # IndexedDatasetError, invalid JSON
        raise ConfigError("data.path", str(e)) from None
    return ds


def max_token_id(prefix: str, chunk: int = 1 << 24) -> Tuple[int, bool]:
    """(largest token id of ``prefix``, whether it was measured).  Read from the ``.json`` (``max_token_id``) when
    the producer recorded it, else scanned in chunks of ``chunk`` tokens with numpy (a sequential read of the
    ``.bin``, about 1 GB/s from the page cache)."""
    try:
        m = read_metadata(prefix) if os.path.isfile(prefix + ".json") else {}
    except ValueError:
        m = {}
    if isinstance(m.get("max_token_id"), int):
        return int(m["max_token_id"]), False
    tokens = indexed.IndexedDataset(prefix, validate=False).tokens
    best = -1
    for a in range(0, len(tokens), chunk):
        best = max(best, int(np.max(tokens[a:a + chunk])))
    return best, True


def check_token_ids(data: DataInfo, max_ids: Optional[Dict[str, int]] = None) -> None:
    """ConfigError on ``data.path`` when a split holds a token id >= the vocabulary size of the training split's
    ``.json``.  ``max_ids`` (split -> largest id) comes from ``token_id_bounds`` (measured once and shared by the
    ranks); without it the bounds are measured here."""
    bounds = max_ids if max_ids is not None else token_id_bounds(data)
    for split, prefix in data.prefixes.items():
        top = bounds.get(split, -1)
        if top >= data.vocab_size:
            raise ConfigError("data.path", f"{prefix}.bin holds token id {top}, but {data.prefixes['train']}.json says "
                                           f"vocab_size {data.vocab_size} (ids must be below it): the .json and the "
                                           f"tokens come from different tokenizers; rerun preprocessing")


def token_id_bounds(data: DataInfo) -> Dict[str, int]:
    """split -> largest token id, skipping the scan where the token dtype cannot hold an id >= vocab_size."""
    out = {}
    for split, prefix in data.prefixes.items():
        ds = indexed.IndexedDataset(prefix, validate=False)
        if ds.dtype.kind in "iu" and np.iinfo(ds.dtype).max < data.vocab_size:
            out[split] = -1
            continue
        out[split] = max_token_id(prefix)[0]
    return out


def summarize_loss(nll: float, metric: str) -> Dict[str, float]:
    """{"loss": mean nll in nats, and "bpc" or "ppl"}."""
    out = {"loss": nll}
    if metric == "bpc":
        out["bpc"] = nll / math.log(2)
    else:
        out["ppl"] = math.exp(min(nll, 700.0))
    return out

