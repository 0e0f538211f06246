"""From ``--data-path`` to the dataset prefixes of each split and what the run needs to know about them.

``--data-path P``: ``P_train`` / ``P_valid`` / ``P_test`` when they exist (what ``preprocess.py --split`` and
the synthetic tasks write), else ``P`` alone as the training split.  ``--data-path train=A,valid=B,test=C``
names them explicitly.  ``P.json`` gives the vocabulary size, the EOD and pad ids and the tokenizer; the
tokenizer decides the reported metric: bits per character/byte for byte- and character-level data,
perplexity otherwise.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional

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
    prefixes = resolve_splits(path)
    try:
        meta = read_metadata(prefixes["train"])
    except FileNotFoundError as e:
        raise ConfigError("data.path", str(e)) from None
    for key in ("vocab_size", "tokenizer"):
        if key not in meta:
            raise ConfigError("data.path", f"{prefixes['train']}.json has no {key!r} field")
    return DataInfo(prefixes=prefixes, vocab_size=int(meta["vocab_size"]), eod_id=meta.get("eod_id"),
                    pad_id=meta.get("pad_id"), tokenizer=meta["tokenizer"], metric=metric_for(meta["tokenizer"]),
                    meta=meta)


def summarize_loss(nll: float, metric: str) -> Dict[str, float]:
    """{"loss": mean nll in nats, and "bpc" or "ppl"}."""
    out = {"loss": nll}
    if metric == "bpc":
        out["bpc"] = nll / math.log(2)
    else:
        out["ppl"] = math.exp(min(nll, 700.0))
    return out

