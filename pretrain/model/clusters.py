"""The adaptive vocabulary's clusters (Baevski & Auli's adaptive input / Grave et al.'s adaptive softmax):
plain arithmetic on the config, no imports, so the fp64 reference and an exported Hugging Face model directory
(``pretrain/hf``) share it with ``embeddings.py``."""
from __future__ import annotations

from typing import List, Tuple


def cluster_bounds(cfg) -> List[Tuple[int, int]]:
    """[(first id, end id)] of every cluster: the head, then the tails, from ``cfg.cutoffs`` and ``cfg.vocab_size``."""
    edges = [0] + list(cfg.cutoffs) + [cfg.vocab_size]
    return list(zip(edges[:-1], edges[1:]))


def cluster_dims(cfg) -> List[int]:
    """The embedding width of every cluster: ``embed_dim // div_val ** i``."""
    return [cfg.embed_dim // cfg.div_val ** i for i in range(len(cfg.cutoffs) + 1)]
