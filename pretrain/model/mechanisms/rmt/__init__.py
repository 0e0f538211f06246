"""Recurrent Memory Transformer memory tokens, a stack-level memory (config section ``model.rmt``): the
registration (torch-free), the memory (``memory.py``), its fp64 reference (``reference.py``).  See README.md."""
from __future__ import annotations

from dataclasses import dataclass

from pretrain.config_base import F, ConfigError
from pretrain.model.spec import memory_tokens


@dataclass
class RMTConfig:
    """Options of the Recurrent Memory Transformer (``model.rmt``; Bulatov, Kuratov & Burtsev 2022, "Recurrent
    Memory Transformer", §3, and their LM-RMT code): K memory tokens added to every segment, written by the last
    layer and read by the next segment at the bottom of the stack."""
    num_mem_tokens: int = F(0, "memory tokens K (0: no RMT memory)")
    mem_at_end: bool = F(True, "read memory before the segment and write memory after it (LM-RMT's mem_at_end, "
                               "the paper's setting); false: [memory ; segment], the next memory is read back "
                               "from the leading positions (which see only each other and, with "
                               "read_mem_from_cache, the Transformer-XL cache)")
    read_mem_from_cache: bool = F(False, "memory rows also attend to the Transformer-XL cache (mem_len > 0); "
                                         "tokens always do")

    def validate(self):
        if self.num_mem_tokens < 0:
            raise ConfigError("num_mem_tokens", f"must be >= 0 (0 turns RMT off), got {self.num_mem_tokens}")


MECHANISM = memory_tokens(
    "rmt", RMTConfig, implementation=".memory:RMTMemory", reference=".reference:RMTReference", order=60,
    description="Recurrent Memory Transformer: K memory tokens read before the segment, written after it by the "
                "last layer, fed to the next segment's first layer",
    test_configs=({"label": "k2", "attn_type": 0, "mem_len": 0, "rmt": {"num_mem_tokens": 2}},
                  {"label": "k3-xl", "attn_type": 0, "mem_len": 5, "rmt": {"num_mem_tokens": 3}},
                  {"label": "k2-xl-cache", "attn_type": 0, "mem_len": 5,
                   "rmt": {"num_mem_tokens": 2, "read_mem_from_cache": True}},
                  {"label": "k2-read-only", "attn_type": 0, "mem_len": 5,
                   "rmt": {"num_mem_tokens": 2, "mem_at_end": False, "read_mem_from_cache": True}}),
    recurrence_exact=False,   # the memory is a learned summary, not the past positions themselves
    bench_configs={"rmt8": {"attn_type": 0, "mem_len": 0, "rmt": {"num_mem_tokens": 8}},
                   "rmt16": {"attn_type": 0, "mem_len": 0, "rmt": {"num_mem_tokens": 16}},
                   "rmt8_xl": {"attn_type": 0, "rmt": {"num_mem_tokens": 8}}},
)

MECHANISMS = (MECHANISM,)
