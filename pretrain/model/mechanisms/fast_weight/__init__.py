"""Fast-weight layers (linear transformers; attn_type 4/5/6, 34/35/36, 24/25/26, 44/45/46): the
registration and the config section ``model.fast_weight`` (torch-free), the mixer (``mixer.py``), its fp64
reference (``reference.py``).  See README.md."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from pretrain.config_base import F, ConfigError
from pretrain.model.spec import Mechanism, Variant


@dataclass
class FastWeightConfig:
    """Options of the fast-weight layers (``model.fast_weight``); the rule and feature map come from each
    layer's attn_type (4/5/6, 34/35/36: sum rule; 24/25/26: delta rule; 44/45/46: delta rule with attention
    normalisation; x4 ELU+1, x5 FAVOR+, x6 DPFP).  4/5/6 and 34/35/36 differ in where 1/sqrt(d_head) applies
    (the scores or the normalised output; docs/model.md, "The fast-weight toolkit's attn_type codes").  The
    toolkit's sum-rule layers do not sum-normalise their features: reproduce them with ``sum_norm: false``."""
    performer_proj_dim: int = F(16, "FAVOR+ random features m (feature size 2m)")
    dpfp_nu: int = F(2, "DPFP roll count nu (feature size 2 nu d_head)")
    sum_norm: bool = F(True, "divide phi(k), phi(q) by their sum before the rule (lmtool: crucial for stability)")
    attn_norm: Optional[bool] = F(None, "divide the output by z_t . phi(q_t), z the running key sum (default: "
                                        "by attn_type: on for the sum rule and 44/45/46, off for 24/25/26)")
    eps: float = F(1e-5, "attention normalisation: added to the denominator")
    positions: str = F("none", "'none' (order comes from the recurrence; the default with carried state) or "
                               "'absolute' (sinusoid counted from the segment end, added to the embeddings)")
    carry_state: bool = F(True, "carry the fast weights from segment to segment (false: every segment starts "
                                "from zero, lmtool's limited-context training)")
    impl: str = F("auto", "rule implementation: auto (fused kernel on CUDA when built, else chunk), chunk, naive, "
                          "fused (the CUDA kernel, or an error)")
    chunk_size: int = F(64, "chunk length of the chunkwise-parallel rule")

    def absolute_positions(self, mechanisms) -> bool:
        """Whether the model adds absolute positions to its embeddings for its fast-weight layers."""
        return self.positions == "absolute" and "fast_weight" in mechanisms

    def validate(self):
        for name in ("performer_proj_dim", "dpfp_nu", "chunk_size"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        if self.eps <= 0:
            raise ConfigError("eps", f"must be > 0, got {self.eps}")
        if self.positions not in ("none", "absolute"):
            raise ConfigError("positions", f"must be 'none' or 'absolute', got {self.positions!r}")
        if self.impl not in ("auto", "chunk", "naive", "fused"):
            raise ConfigError("impl", f"must be auto, chunk, naive or fused, got {self.impl!r}")

    def validate_layers(self, specs) -> None:
        """ConfigError for a setting the layers ``specs`` (this section's) cannot train with: the delta rule on
        ELU+1 features without sum normalisation.  The update W += beta k' (v - W^T k')^T contracts only while
        beta |k'|^2 <= 2 (Schlag et al. 2021, §4.2: phi(k) is sum-normalised for stability); ELU+1 is 1 at 0 in
        every dimension, so |phi(k)|^2 is about d_head for the small keys of a fresh model and the recurrence
        diverges within its first segment (NaN at step 1, measured at d_head 32).  FAVOR+ (|phi(0)|^2 = 2) and
        DPFP (phi(0) = 0) start inside the bound and are left to the user."""
        bad = sorted({s.code for s in specs if s.settings.get("rule") == "delta"
                      and s.settings.get("feature_map") == "elu"})
        if bad and not self.sum_norm:
            raise ConfigError("sum_norm", f"false cannot train the delta rule on ELU+1 features (attn_type "
                                          f"{', '.join(map(str, bad))}): |phi(k)|^2 is about d_head, beyond the "
                                          f"rule's bound beta |phi(k)|^2 <= 2, and the fast weights diverge (NaN "
                                          f"from the first step); keep sum_norm true")


def _fw(rule: str, fmap: str, attn_norm: bool, scale: str = "output") -> Variant:
    """A fast-weight code: its rule, feature map, default attention normalisation, and where the factor
    1/sqrt(d_head) applies: ``"output"`` (on the normalised output: the toolkit's CUDA-path layers 24-26, 34, 35,
    44-46) or ``"scores"`` (on the scores phi(q) . phi(k), inside the attention normalisation, where it cancels but
    for eps: the toolkit's pure-PyTorch linear attention 4/5/6).  docs/model.md maps the toolkit's codes."""
    name = f"{rule}_{fmap}" + ("_norm" if attn_norm and rule == "delta" else "") + \
        ("_scaled" if rule == "sum" and scale == "output" else "")
    return Variant(name, {"rule": rule, "feature_map": fmap, "attn_norm": attn_norm, "scale": scale})


MECHANISM = Mechanism(
    name="fast_weight",
    implementation=".mixer:FastWeightMixer",
    order=30,
    description="fast-weight layers (linear transformers): sum rule or delta rule, ELU+1 / FAVOR+ / DPFP",
    # 4/5/6: the toolkit's pure-PyTorch linear attention (LinearMultiHeadAttn, PerformerMultiHeadAttn,
    # DPFPMultiHeadAttn); 34/35/36: its sum rule through the CUDA kernel (the output scaled after normalising)
    variants={4: _fw("sum", "elu", True, "scores"), 5: _fw("sum", "favor", True, "scores"),
              6: _fw("sum", "dpfp", True, "scores"),
              34: _fw("sum", "elu", True), 35: _fw("sum", "favor", True), 36: _fw("sum", "dpfp", True),
              24: _fw("delta", "elu", False), 25: _fw("delta", "favor", False), 26: _fw("delta", "dpfp", False),
              44: _fw("delta", "elu", True), 45: _fw("delta", "favor", True), 46: _fw("delta", "dpfp", True)},
    aliases={"linear": 4, "performer": 5, "dpfp_sum": 6, "delta": 24, "delta_favor": 25, "delta_dpfp": 26,
             "delta_norm": 44},
    section="fast_weight",
    section_class=FastWeightConfig,
    test_configs=({"attn_type": 24, "mem_len": 0}, {"attn_type": 4, "mem_len": 0}, {"attn_type": 34, "mem_len": 0},
                  {"attn_type": 25, "mem_len": 0}, {"attn_type": 46, "mem_len": 0}),
    recurrence_exact=True,
)

MECHANISMS = (MECHANISM,)
