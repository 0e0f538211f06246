"""Token embeddings and the output softmax, adaptive or not, split by vocabulary across tensor-parallel ranks.

Clusters.  The vocabulary is cut at ``cutoffs`` into clusters [0, c_1), [c_1, c_2), ..., [c_n, V) (one
cluster without cutoffs).  Cluster i has its own table of width d_embed / div_val**i and, where that width
differs from d_model (or div_val > 1), a projection to d_model (Baevski & Auli's adaptive input; with
div_val = 1 one projection is shared by all clusters).  Embeddings are scaled by sqrt(d_model) (XL).

Adaptive softmax (Grave et al., as in Transformer-XL).  The head scores the shortlist (cluster 0) plus one
logit per tail cluster; a token of tail cluster i has log p = log p_head(cluster i) + log p_i(token).  So the
negative log-likelihood is a head cross entropy for every token plus a tail cross entropy for the tokens
of each tail cluster, each computed with megatron-core's ``vocab_parallel_cross_entropy``.  Weights are
tied to the embedding tables (``tie_weight``) and the tail projections to the input ones (``tie_projs``;
the head projection is never tied, as in XL's WikiText-103 setup).  Each output layer has its own bias.

Tensor parallelism.  Every table (and the head's cluster rows) is split by vocabulary rows into equal
contiguous pieces; a size that is not a multiple of the tensor-parallel size is padded, and padded rows get
a -inf logit.  The head's logits on a rank are [its shortlist rows ; its cluster rows], so the head is
one vocabulary-parallel softmax.  Projections are replicated.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megatron.core.tensor_parallel import VocabParallelEmbedding, vocab_parallel_cross_entropy

from pretrain.model import parallel
from pretrain.model.clusters import cluster_bounds, cluster_dims  # noqa: F401 (re-exported)
from pretrain.model.modules.attention import score_dtype
from pretrain.model.modules.linear import _no_init, column_linear, column_parallel
from pretrain.model.parallel import ShardSpec
from pretrain.model.weights import describe




def _pad_mask(sections, rank: int, world: int) -> torch.Tensor:
    """[local size] True at this rank's padded rows of a ShardSpec with these sections."""
    parts = []
    for s in sections:
        n = math.ceil(s / world)
        parts.append(rank * n + torch.arange(n) >= s)
    return torch.cat(parts)


class AdaptiveEmbedding(nn.Module):
    def __init__(self, cfg, mp):
        super().__init__()
        world = parallel.tp_world_size()
        self.bounds = cluster_bounds(cfg)
        dims = cluster_dims(cfg)
        self.tables = nn.ModuleList()
        for (lo, hi), d in zip(self.bounds, dims):
            table = VocabParallelEmbedding(math.ceil((hi - lo) / world) * world, d, init_method=_no_init,
                                           config=mp)
            describe(table, "weight", "weight", ShardSpec(0, (hi - lo,)))
            self.tables.append(table)
        self.projs = nn.ParameterList()
        if cfg.div_val == 1:
            if cfg.embed_dim != cfg.d_model:
                self.projs.append(nn.Parameter(torch.empty(cfg.d_model, cfg.embed_dim)))
        else:
            for d in dims:
                self.projs.append(nn.Parameter(torch.empty(cfg.d_model, d)))
        for i in range(len(self.projs)):
            describe(self.projs, str(i), "proj")
        self.shared_proj = cfg.div_val == 1
        self.d_model = cfg.d_model
        self.scale = cfg.d_model ** 0.5

    def proj(self, i: int) -> Optional[nn.Parameter]:
        """Projection of cluster ``i`` to d_model (None: the table already has width d_model)."""
        if not len(self.projs):
            return None
        return self.projs[0] if self.shared_proj else self.projs[i]

    def _lookup(self, i: int, ids: torch.Tensor) -> torch.Tensor:
        e = self.tables[i](ids)
        p = self.proj(i)
        return e if p is None else F.linear(e, p)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, N] token ids -> [B, N, d_model]."""
        if len(self.tables) == 1:
            return self._lookup(0, tokens) * self.scale
        flat = tokens.reshape(-1)
        out = torch.zeros(flat.shape[0], self.d_model, dtype=self.tables[0].weight.dtype, device=flat.device)
        for i, (lo, hi) in enumerate(self.bounds):
            idx = ((flat >= lo) & (flat < hi)).nonzero().squeeze(1)
            if idx.numel():           # same tokens on every tensor-parallel rank: same branches
                out = out.index_copy(0, idx, self._lookup(i, flat.index_select(0, idx) - lo).to(out.dtype))
        return (out * self.scale).view(*tokens.shape, self.d_model)


class AdaptiveSoftmax(nn.Module):
    def __init__(self, cfg, mp, embedding: AdaptiveEmbedding):
        super().__init__()
        rank, world = parallel.tp_rank(), parallel.tp_world_size()
        self.bounds = cluster_bounds(cfg)
        dims = cluster_dims(cfg)
        self.n_tail = len(self.bounds) - 1
        self.shortlist = self.bounds[0][1]
        object.__setattr__(self, "embedding", embedding)     # tied tables / projections; not a submodule
        self.tie_weight = cfg.tie_weight
        self.out_weights = nn.ParameterList()
        if not cfg.tie_weight:
            for (lo, hi), d in zip(self.bounds, dims):
                self.out_weights.append(nn.Parameter(torch.empty(math.ceil((hi - lo) / world), d)))
                describe(self.out_weights, str(len(self.out_weights) - 1), "weight", ShardSpec(0, (hi - lo,)))
        # output layers (megatron column-parallel; weights passed in, each owns its bias)
        self.layers = nn.ModuleList()
        self.sections = []
        self.has_pad = []
        for i, ((lo, hi), d) in enumerate(zip(self.bounds, dims)):
            sections = (hi - lo, self.n_tail) if i == 0 and self.n_tail else (hi - lo,)
            local = sum(math.ceil(s / world) for s in sections)
            layer = column_parallel(d, local * world, mp, bias=True, skip_weight_param_allocation=True)
            describe(layer, "bias", "zeros", ShardSpec(0, sections))
            self.layers.append(layer)
            self.sections.append(sections)
            self.register_buffer(f"pad_{i}", _pad_mask(sections, rank, world), persistent=False)
            self.has_pad.append(any((rank + 1) * math.ceil(s / world) > s for s in sections))
        if self.n_tail:
            self.cluster_weight = nn.Parameter(torch.empty(math.ceil(self.n_tail / world), dims[0]))
            describe(self, "cluster_weight", "weight", ShardSpec(0, (self.n_tail,)))
        # output projections: own ones, or the input ones for tied tail clusters
        self.out_projs = nn.ParameterList()
        self.proj_source = []
        for i, d in enumerate(dims):
            if embedding.proj(i) is None:
                self.proj_source.append(None)
            elif cfg.tie_projs and i > 0:
                self.proj_source.append("tied")
            else:
                self.out_projs.append(nn.Parameter(torch.empty(cfg.d_model, d)))
                describe(self.out_projs, str(len(self.out_projs) - 1), "proj")
                self.proj_source.append(len(self.out_projs) - 1)
        self.world = world

    def tied_parameters(self) -> List[nn.Parameter]:
        """The input embedding's parameters this softmax uses (tied tables and projections)."""
        out = [t.weight for t in self.embedding.tables] if self.tie_weight else []
        for i, src in enumerate(self.proj_source):
            if src == "tied" and all(p is not self.embedding.proj(i) for p in out):
                out.append(self.embedding.proj(i))
        return out

    # -- pieces ---------------------------------------------------------------------------------------------
    def weight(self, i: int) -> torch.Tensor:
        w = self.embedding.tables[i].weight if self.tie_weight else self.out_weights[i]
        if i == 0 and self.n_tail:
            w = torch.cat([w, self.cluster_weight.to(w.dtype)])
        return w

    def proj(self, i: int) -> Optional[torch.Tensor]:
        src = self.proj_source[i]
        if src is None:
            return None
        return self.embedding.proj(i) if src == "tied" else self.out_projs[src]

    def logits(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """This rank's logits of cluster ``i`` (the head for i = 0), padded rows at -inf, in fp32 (or wider
        for fp64 parameters)."""
        p = self.proj(i)
        x = h if p is None else torch.matmul(h, p)
        out = column_linear(x, self.layers[i], self.weight(i))
        out = out.to(score_dtype(out.dtype))
        return out.masked_fill(getattr(self, f"pad_{i}"), float("-inf")) if self.has_pad[i] else out

    def _head_index(self, t: torch.Tensor) -> torch.Tensor:
        """Head-vocabulary index (shortlist token or S + cluster) -> index in the padded, split layout."""
        if self.world == 1:
            return t
        s_loc, c_loc = (math.ceil(s / self.world) for s in self.sections[0])
        is_tail = t >= self.shortlist
        c = t - self.shortlist
        rank = torch.where(is_tail, c // c_loc, t // s_loc)
        off = torch.where(is_tail, s_loc + c % c_loc, t % s_loc)
        return rank * (s_loc + c_loc) + off

    # -- loss and log-probabilities -------------------------------------------------------------------------
    def forward(self, h: torch.Tensor, target: Optional[torch.Tensor],
                log_probs: bool = False) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """``h`` [T, d_model], ``target`` [T] or None -> (nll [T] fp32 or None, log-probs [T, V] or None).
        The log-probabilities are for generation / evaluation and carry no gradient."""
        head = self.logits(0, h)
        lp = self._full_log_probs(h, head) if log_probs else None
        if target is None:
            return None, lp
        if not self.n_tail:
            return vocab_parallel_cross_entropy(head, target), lp
        cid = torch.bucketize(target, self._boundaries(target.device), right=True)
        head_target = torch.where(cid == 0, target, self.shortlist + cid - 1)
        nll = vocab_parallel_cross_entropy(head, self._head_index(head_target))
        for i in range(1, self.n_tail + 1):
            idx = (cid == i).nonzero().squeeze(1)
            if idx.numel():           # same targets on every tensor-parallel rank: same branches
                tail = self.logits(i, h.index_select(0, idx))
                nll_i = vocab_parallel_cross_entropy(tail, target.index_select(0, idx) - self.bounds[i][0])
                nll = nll.index_add(0, idx, nll_i)
        return nll, lp

    def _boundaries(self, device) -> torch.Tensor:
        return torch.tensor([lo for lo, _ in self.bounds[1:]], device=device)

    @torch.no_grad()
    def _full_log_probs(self, h: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
        head_lp = self._gather(_log_softmax(head), 0)
        if not self.n_tail:
            return head_lp
        parts = [head_lp[:, :self.shortlist]]
        for i in range(1, self.n_tail + 1):
            tail_lp = self._gather(_log_softmax(self.logits(i, h)), i)
            parts.append(head_lp[:, self.shortlist + i - 1:self.shortlist + i] + tail_lp)
        return torch.cat(parts, dim=1)

    def _gather(self, local: torch.Tensor, i: int) -> torch.Tensor:
        return ShardSpec(1, self.sections[i]).join(parallel.all_gather(local))


def _log_softmax(local: torch.Tensor) -> torch.Tensor:
    """Log-softmax of logits split by columns across tensor-parallel ranks (this rank's columns)."""
    if parallel.tp_world_size() == 1:
        return torch.log_softmax(local, dim=-1)
    m = local.max(dim=-1, keepdim=True)[0]
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=parallel.tp_group())
    s = torch.exp(local - m).sum(dim=-1, keepdim=True)
    dist.all_reduce(s, group=parallel.tp_group())
    return local - m - s.log()
