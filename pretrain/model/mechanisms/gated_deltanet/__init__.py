"""Gated DeltaNet (Yang, Kautz & Hatamizadeh, ICLR 2025; attn_type 70, alias "gdn"): the registration and the
config section ``model.gated_deltanet`` (torch-free), the mixer (``mixer.py``), its fp64 reference
(``reference.py``).  See README.md."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from pretrain.config_base import F, ConfigError
from pretrain.model.spec import Mechanism, Variant

IMPLEMENTATIONS = ("auto", "chunk", "naive", "fla")


@dataclass
class GatedDeltaNetConfig:
    """Options of the Gated DeltaNet layers (``model.gated_deltanet``).  The number of heads is
    ``model.n_head``; the key width of a head is ``head_dim`` (default ``model.d_head``), its value width
    ``expand_v * head_dim`` (fla's ``GatedDeltaNet``: head_dim 256, expand_v 2)."""
    head_dim: Optional[int] = F(None, "key (and query) width K of one head (default: model.d_head)")
    expand_v: float = F(2.0, "value width V = expand_v * K of one head (must give an integer)")
    conv_size: int = F(4, "kernel width W of the short causal convolutions on q, k, v")
    use_short_conv: bool = F(True, "short convolutions (with SiLU) on q, k, v; false: SiLU only (fla warns: "
                                   "the convolutions matter for quality)")
    allow_neg_eigval: bool = F(False, "beta = 2 sigmoid(.) in (0, 2): eigenvalues of the transition down to -1 "
                                      "(Grazzi et al. 2025)")
    norm_eps: float = F(1e-5, "epsilon of the per-head RMSNorm of the output")
    carry_state: bool = F(True, "carry the state (matrix S and convolution inputs) from segment to segment "
                                "(false: every segment starts from zero)")
    impl: str = F("auto", "gated delta rule implementation: auto (fla's Triton kernel on CUDA when it imports, "
                          "else chunk), chunk, naive, fla")
    chunk_size: int = F(64, "chunk length of the chunkwise-parallel rule (impl chunk)")

    def validate(self):
        if self.head_dim is not None and self.head_dim < 1:
            raise ConfigError("head_dim", f"must be >= 1 (or null for model.d_head), got {self.head_dim}")
        if not self.expand_v > 0:
            raise ConfigError("expand_v", f"must be > 0, got {self.expand_v}")
        if self.head_dim is not None and abs(self.head_dim * self.expand_v - round(self.head_dim * self.expand_v)) \
                > 1e-6:
            raise ConfigError("expand_v", f"{self.expand_v} x head_dim {self.head_dim} is not an integer value width")
        if self.conv_size < 1:
            raise ConfigError("conv_size", f"must be >= 1, got {self.conv_size}")
        if not self.norm_eps > 0:
            raise ConfigError("norm_eps", f"must be > 0, got {self.norm_eps}")
        if self.impl not in IMPLEMENTATIONS:
            raise ConfigError("impl", f"must be one of {', '.join(IMPLEMENTATIONS)}, got {self.impl!r}")
        if self.chunk_size < 1:
            raise ConfigError("chunk_size", f"must be >= 1, got {self.chunk_size}")

    def widths(self, d_head: int):
        """(K, V): the key and value widths of one head for a model of head width ``d_head``.  ConfigError
        (``expand_v``) when V is not an integer."""
        K = self.head_dim or d_head
        V = K * self.expand_v
        if abs(V - round(V)) > 1e-6:
            raise ConfigError("expand_v", f"{self.expand_v} x head_dim {K} is not an integer value width")
        return K, int(round(V))


MECHANISM = Mechanism(
    name="gated_deltanet",
    implementation=".mixer:GatedDeltaNetMixer",
    description="Gated DeltaNet: the gated delta rule with short convolutions and a gated RMSNorm output "
                "(Yang, Kautz & Hatamizadeh 2025)",
    variants={70: Variant("gdn", {})},
    aliases={"gdn": 70},
    section="gated_deltanet",
    section_class=GatedDeltaNetConfig,
    test_configs=({"attn_type": 70, "mem_len": 0, "d_model": 32, "n_head": 2, "d_head": 8},
                  {"label": "gdn-xl", "attn_type": 70, "layers": "gdn,xl", "mem_len": 5, "d_model": 32,
                   "n_head": 2, "d_head": 8}),
    recurrence_exact=True,
)

MECHANISMS = (MECHANISM,)
