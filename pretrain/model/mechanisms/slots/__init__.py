"""Memformer memory slots: the slot layers (mechanism ``memformer``, attn_type 50 and 51) and the stack-level
memory they read and write (mechanism ``slots``, config section ``model.slots``): the registrations (torch-free),
the mixer and the memory (``mixer.py``), their fp64 reference (``reference.py``).  See README.md."""
from __future__ import annotations

from dataclasses import dataclass

from pretrain.config_base import F, ConfigError
from pretrain.model.spec import Mechanism, Variant


@dataclass
class SlotsConfig:
    """Options of Memformer's memory slots (``model.slots``): a fixed set of K learned-to-write vectors per
    stream, read by every slot layer (attn_type 50, alias ``slots``) and rewritten once per segment (Wu et al.
    2022, "Memformer"; MemBART's dual stream, qywu/memformers).  The slots exist when some layer is a slot
    layer (attn_type 50 reads and writes them, 51 only reads them; at least one layer must write)."""
    num_slots: int = F(64, "memory slots K per stream (MemBART: 64 base, 128 large)")

    def validate(self):
        if self.num_slots < 1:
            raise ConfigError("num_slots", f"must be >= 1, got {self.num_slots}")


def _has_slot_layers(cfg) -> bool:
    return any(s.mechanism == "memformer" for s in cfg.layer_specs())


MEMFORMER = Mechanism(
    name="memformer",
    implementation=".mixer:SlotMixer",
    order=40,
    description="Memformer slot layer: tokens read the memory slots (and the segment, XL relative positions); in "
                "a writing layer (50) the slots' write stream attends to itself and the segment's tokens",
    variants={50: Variant("slots", {"sinusoid": True}),      # reads the slots and writes them (MemBART's encoder)
              51: Variant("read", {"sinusoid": True, "standalone": False})},   # reads only (MemBART's decoder)
    aliases={"slots": 50, "slots_read": 51},
    test_configs=({"attn_type": 50, "mem_len": 0, "slots": {"num_slots": 4}},),
    recurrence_exact=False,   # the slots summarise a segment as a whole: a longer segment is another model
)

SLOTS = Mechanism(
    name="slots",
    kind="stack",
    enabled=_has_slot_layers,
    implementation=".mixer:SlotMemory",
    reference=".reference:SlotsReference",
    order=50,
    description="Memformer memory slots: biased-normalisation forgetting m_0 = LN((1-r) M + b_mem) below the "
                "layers, the update gate M' = a m_L + (1-a) m_0 above them",
    section="slots",
    section_class=SlotsConfig,
    # (a writing and a reading slot layer, pre-LN, per-layer position biases)
    test_configs=({"attn_type": 51, "layers": "slots,slots_read", "mem_len": 0, "pre_lnorm": True,
                   "untie_r": True, "slots": {"num_slots": 3}},),
)

MECHANISMS = (MEMFORMER, SLOTS,)
