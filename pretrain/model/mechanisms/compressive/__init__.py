"""Compressive Transformer layers (attn_type 60, 61, 62; config section ``model.compressive``): the
registration (torch-free), the mixer (``mixer.py``), its fp64 reference (``reference.py``).  See README.md."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from pretrain.config_base import F, ConfigError
from pretrain.model.spec import Mechanism, Variant


@dataclass
class CompressiveConfig:
    """Options of the Compressive Transformer layers (``model.compressive``; Rae et al. 2020, "Compressive
    Transformers for Long-Range Sequence Modelling").  attn_type 60 (``compressive``): XL relative attention
    over [compressed memory ; memory ; segment]; 61 (``compressive_xl``): over [memory ; segment] (no
    compression); 62 (``compressive_local``): within the segment only.  61 and 62 exist for the layers that keep
    no compressed memory (``memory_layers``) and share the section's residual gating."""
    cmem_len: Optional[int] = F(None, "compressed memory slots per memory layer, n_cm (default: mem_len // "
                                      "cmem_ratio, at least 1)")
    cmem_ratio: int = F(4, "compression rate c: every c positions that leave the memory become one compressed "
                           "slot (the paper's best: 3 on enwik8, 4 on WikiText-103)")
    compression: str = F("conv", "compression function f_c: conv (1-D convolution, kernel = stride = c, trained "
                                 "by the attention-reconstruction loss only), max or mean (pooling, kernel = stride "
                                 "= c, nothing to train)")
    reconstruction_loss_weight: float = F(1.0, "weight of the attention-reconstruction loss (conv only), "
                                               "returned as the model's aux_loss: weight x the mean over the "
                                               "compressing layers (0: not computed)")
    memory_layers: List[int] = F([], "layers (0-based; negative counts from the top) whose attn_type 60 keeps a "
                                      "compressed memory; the other attn_type 60 layers become `other_layers` "
                                      "(empty: every attn_type 60 layer compresses)")
    other_layers: str = F("xl", "what the attn_type 60 layers outside `memory_layers` become: xl (61: the "
                                "Transformer-XL memory, no compression) or local (62: the segment only)")
    gru_gating: bool = F(False, "GRU-type gating of both residual connections instead of x + f(x) (GTrXL, "
                                "Parisotto et al. 2019), in the layers of attn_type 60, 61 and 62")
    gate_bias: float = F(2.0, "initial bias of the gate's update z (z = sigmoid(2) ~ 0.88 keeps the residual: "
                              "each gated block starts close to the identity)")

    def validate(self):
        if self.cmem_len is not None and self.cmem_len < 1:
            raise ConfigError("cmem_len", f"must be >= 1 (or null for mem_len // cmem_ratio), got {self.cmem_len}")
        if self.cmem_ratio < 1:
            raise ConfigError("cmem_ratio", f"must be >= 1, got {self.cmem_ratio}")
        if self.compression not in ("conv", "max", "mean"):
            raise ConfigError("compression", f"must be conv, max or mean, got {self.compression!r}")
        if self.reconstruction_loss_weight < 0:
            raise ConfigError("reconstruction_loss_weight", f"must be >= 0, got {self.reconstruction_loss_weight}")
        if self.other_layers not in ("xl", "local"):
            raise ConfigError("other_layers", f"must be xl or local, got {self.other_layers!r}")

    def slots(self, mem_len: int) -> int:
        """The compressed memory length n_cm for a model whose config has ``mem_len``."""
        return self.cmem_len if self.cmem_len is not None else max(1, mem_len // self.cmem_ratio)

    def rewrite_layers(self, codes: List[int]) -> List[int]:
        """``memory_layers`` resolved into the layer pattern: attn_type 60 at a layer not listed becomes 61
        (``other_layers: xl``) or 62 (``local``).  Raises ConfigError naming ``compressive.memory_layers`` for an
        index outside the model or a listed layer that is not attn_type 60."""
        if not self.memory_layers:
            return codes
        n = len(codes)
        listed = set()
        for i, idx in enumerate(self.memory_layers):
            if not -n <= idx < n:
                raise ConfigError(f"compressive.memory_layers[{i}]", f"layer {idx} outside a model of {n} layers "
                                                                     f"(0-based; -1 is the top layer)")
            if codes[idx % n] != 60:
                raise ConfigError(f"compressive.memory_layers[{i}]", f"layer {idx % n} has attn_type "
                                                                     f"{codes[idx % n]}, not 60 (compressive)")
            listed.add(idx % n)
        other = 61 if self.other_layers == "xl" else 62
        return [other if c == 60 and i not in listed else c for i, c in enumerate(codes)]


_CT = {"sinusoid": True}

MECHANISM = Mechanism(
    name="compressive",
    implementation=".mixer:CompressiveMixer",
    order=70,
    description="Compressive Transformer: XL memory plus a compressed memory of what leaves it",
    variants={60: Variant("compressed", {**_CT, "memory": True, "compressed": True}),   # [cmem ; mem ; segment]
              61: Variant("memory", {**_CT, "memory": True}),                           # [mem ; segment]
              62: Variant("local", _CT)},                                               # the segment only
    aliases={"compressive": 60, "compressive_xl": 61, "compressive_local": 62},
    section="compressive",
    section_class=CompressiveConfig,
    test_configs=({"attn_type": 60, "compressive": {"cmem_len": 3, "cmem_ratio": 2}},
                  {"attn_type": 61, "compressive": {"gru_gating": True}},
                  {"attn_type": 62, "mem_len": 0, "compressive": {"gru_gating": True}}),
    recurrence_exact=False,   # what leaves the memory is compressed: a longer segment sees it uncompressed
)

MECHANISMS = (MECHANISM,)
