"""Transformer-XL segment recurrence (attn_type 0 and 1) and the absolute-position baseline (2): the
registration (torch-free; read by the registry and the config), the mixer (``mixer.py``), its fp64 reference
(``reference.py``).  See README.md."""
from __future__ import annotations

from pretrain.model.spec import Mechanism, Variant

MECHANISM = Mechanism(
    name="xl",
    implementation=".mixer:XLMixer",
    order=10,
    description="Transformer-XL segment recurrence: attention over [cached layer inputs ; segment]",
    variants={0: Variant("rel", {"memory": True, "sinusoid": True}),      # XL relative positions (u, v, W_R R)
              1: Variant("shaw", {"memory": True}),                       # Shaw learned relative positions
              2: Variant("absolute", {"sinusoid": True, "absolute_positions": True})},  # absolute, no memory
    aliases={"xl": 0, "shaw": 1, "absolute": 2},
    test_configs=({"attn_type": 0}, {"attn_type": 1}, {"attn_type": 2, "mem_len": 0}),
    recurrence_exact=True,
)

MECHANISMS = (MECHANISM,)
