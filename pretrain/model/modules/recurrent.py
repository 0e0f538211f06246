"""What the mixers with a recurrent state have in common (the fast-weight layers, Gated DeltaNet): a recurrence
over the segment whose state is carried into the next one, wrapped in the same sub-block,

    out = x + Dropout(W_o o)  (pre-LN: o computed from norm(x)),   or   norm(x + Dropout(W_o o))  (post-LN),

with W_o row-parallel (this rank's heads in, the full d_model out).
"""
from __future__ import annotations

from typing import Dict, Mapping

import torch

from pretrain.model.dropout import dropout_add
from pretrain.model.mixer import Mixer, MixerOutput, SegmentContext
from pretrain.model.modules.linear import row_linear, row_parallel
from pretrain.model.modules.norm import layer_norm
from pretrain.model.parallel import ShardSpec
from pretrain.model.weights import describe


class RecurrentMixer(Mixer):
    """Base of a mixer whose state is a recurrence carried across segments.  ``self.sec``: its config section
    ``model.<mechanism>``, which has a ``carry_state`` switch (false: every segment starts from zeros).  The
    subclass builds its projections, then ``output_block``; its ``forward`` ends with ``residual_output``."""

    def __init__(self, cfg, mp, spec, specs):
        super().__init__(cfg, mp, spec, specs)
        self.sec = getattr(cfg, self.mechanism)

    def output_block(self, width: int, mp) -> None:
        """Registers ``out`` (W_o: ``width`` -> d_model, row-parallel, no bias; ``width`` counts the heads of
        all ranks), ``norm`` (the sub-block's LayerNorm) and the dropout rate ``p``."""
        cfg = self.cfg
        self.out = row_parallel(width, cfg.d_model, mp, bias=False)
        describe(self.out, "weight", "weight", ShardSpec(1, (width,)))
        self.norm = layer_norm(cfg.d_model)
        self.p = cfg.dropout

    def carries(self, mem_len):
        """``"all"`` with ``carry_state`` (the recurrence, with any short convolution, is exact whatever the
        segment cuts: generation may feed one token at a time), else ``"nothing"`` (every segment starts from
        zeros)."""
        return "all" if self.sec.carry_state else "nothing"

    def residual_output(self, x: torch.Tensor, o: torch.Tensor, new: Dict[str, torch.Tensor],
                        rows: Mapping[str, torch.Tensor], ctx: SegmentContext) -> MixerOutput:
        """The end of ``forward``: ``x`` [B, N, d] the layer input, ``o`` [B, N, width / tp] the recurrence's
        output (this rank's heads, in ``x``'s dtype), ``new`` the layer's new state entries (cut from the graph
        with ``ctx.detach``); the row streams pass through."""
        h = dropout_add(x, row_linear(o, self.out), self.p, self.training)
        if ctx.detach:
            new = {k: t.detach() for k, t in new.items()}
        return MixerOutput(h if self.pre_lnorm else self.norm(h), new, dict(rows))
