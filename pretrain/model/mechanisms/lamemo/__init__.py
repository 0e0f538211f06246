"""LaMemo look-ahead memory (attn_type 3, 31, 32, 33): the registration (torch-free), the mixer
(``mixer.py``), its fp64 reference (``reference.py``).  See README.md."""
from __future__ import annotations

from pretrain.model.spec import Mechanism, Variant

_LAMEMO = {"memory": True, "sinusoid": True}

MECHANISM = Mechanism(
    name="lamemo",
    implementation=".mixer:LaMemoMixer",
    order=20,
    description="LaMemo look-ahead memory: memory rows refreshed by attending to their right context",
    variants={3: Variant("disentangled", _LAMEMO),      # causal look-ahead, |distance|, a future position bias
              31: Variant("negative", _LAMEMO),         # XL's sinusoid of negative distances, XL's v
              32: Variant("disentangled_v2", _LAMEMO),  # as 3, plus a future content bias
              33: Variant("full", _LAMEMO)},            # full look-ahead inside the window
    aliases={"lamemo": 3},
    test_configs=({"attn_type": 3}, {"attn_type": 31}, {"attn_type": 32}, {"attn_type": 33}),
    recurrence_exact=False,   # memory rows see their right context: a longer segment is a different model
)

MECHANISMS = (MECHANISM,)
