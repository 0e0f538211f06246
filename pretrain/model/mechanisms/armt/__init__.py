"""Associative Recurrent Memory Transformer (ARMT), a stack-level memory (config section ``model.armt``): the
registration (torch-free), the memory (``memory.py``), its fp64 reference (``reference.py``).  See README.md."""
from __future__ import annotations

from dataclasses import dataclass

from pretrain.config_base import F, ConfigError
from pretrain.model.spec import memory_tokens


@dataclass
class ARMTConfig:
    """Options of the Associative Recurrent Memory Transformer (``model.armt``; Rodkin, Kuratov, Bulatov &
    Burtsev 2024, arXiv 2407.04841, Sec. 3, as the authors' ``modeling_amt/language_modeling.py`` computes it):
    M learned memory tokens appended at the end of every segment, and per layer an associative memory (A, z)
    written from the layer's outputs at the memory tokens and read, before the layer, by every position of the
    next segment.  Only (A, z) cross segments (the memory tokens are not carried)."""
    num_mem_tokens: int = F(0, "memory tokens M appended at the end of every segment (0: no ARMT)")
    d_mem: int = F(64, "width of the associative keys and queries (W_mq, W_mk: d_model -> d_mem); phi has "
                       "2 nu d_mem / heads features per head")
    nu: int = F(3, "order of the DPFP feature map (authors: 3)")
    heads: int = F(1, "associative heads H (experimental branch's n_heads): keys split into d_mem / H, values "
                      "into d_model / H, one beta per head; 1 = the main-branch model")
    correction: bool = F(True, "the gamma correction of the normaliser z (authors' default; false = "
                               "--no_correction)")
    normalize: bool = F(False, "L2-normalise phi (experimental branch, commit 4587ca0); false = main branch")
    eps: float = F(1e-5, "added to every z . phi denominator (authors: 1e-5)")
    value_init: str = F("zeros", "init of W_mv: zeros (the authors': the model starts as the plain transformer) "
                                 "or weight (normal(0, init_std), for tests that need a non-zero memory)")

    def validate(self):
        if self.num_mem_tokens < 0:
            raise ConfigError("num_mem_tokens", f"must be >= 0 (0 turns ARMT off), got {self.num_mem_tokens}")
        for name in ("d_mem", "nu", "heads"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        if self.d_mem % self.heads:
            raise ConfigError("d_mem", f"must be divisible by heads={self.heads}, got {self.d_mem}")
        if self.value_init not in ("zeros", "weight"):
            raise ConfigError("value_init", f"must be 'zeros' or 'weight', got {self.value_init!r}")
        if not self.eps > 0:
            raise ConfigError("eps", f"must be > 0, got {self.eps}")

    def validate_model(self, cfg):
        """Checks against the rest of the model config (``ModelConfig.validate`` calls it when present)."""
        if self.num_mem_tokens < 1:
            return
        rmt = getattr(cfg, "rmt", None)
        if rmt is not None and rmt.num_mem_tokens > 0:
            raise ConfigError("num_mem_tokens", f"ARMT ({self.num_mem_tokens} memory tokens) and RMT "
                                                f"(model.rmt.num_mem_tokens={rmt.num_mem_tokens}) cannot be on "
                                                f"together: set one of them to 0")
        if cfg.d_model % self.heads:
            raise ConfigError("heads", f"must divide d_model={cfg.d_model} (the values are split by head), "
                                       f"got {self.heads}")


MECHANISM = memory_tokens(
    "armt", ARMTConfig, implementation=".memory:ARMTMemory", reference=".reference:ARMTReference", order=100,
    description="Associative Recurrent Memory Transformer: M memory tokens appended to every segment; per layer "
                "an associative memory (DPFP delta rule) written from the layer's outputs at the memory tokens "
                "and read into the layer's input by every position of the next segment",
    # (W_mv drawn, not zero, so that the memory is not empty and the matrix checks the read and the write)
    test_configs=({"label": "m2", "attn_type": 0, "mem_len": 0,
                   "armt": {"num_mem_tokens": 2, "d_mem": 8, "value_init": "weight"}},
                  {"label": "m2-xl", "attn_type": 0, "mem_len": 5,
                   "armt": {"num_mem_tokens": 2, "d_mem": 8, "value_init": "weight"}},
                  {"label": "m2-h2-norm", "attn_type": 0, "mem_len": 0,
                   "armt": {"num_mem_tokens": 2, "d_mem": 8, "heads": 2, "normalize": True, "nu": 2,
                            "correction": True, "value_init": "weight"}}),
    recurrence_exact=False,   # the memory is a segment-level summary, not the past positions themselves
    bench_configs={"armt16": {"attn_type": 0, "mem_len": 0, "armt": {"num_mem_tokens": 16}}},
)

MECHANISMS = (MECHANISM,)
