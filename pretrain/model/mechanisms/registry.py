"""Names of the memory mechanisms, the attn_types each supports, and where each is implemented.

Kept free of torch so that config validation can use it.  Adding a mechanism = one file in this package
(a ``Mechanism`` subclass, see base.py) and one line in each table below.
"""

MECHANISMS = {
    "xl": (0, 1, 2),             # Transformer-XL recurrence; 2 = absolute positions, no memory
    "lamemo": (3, 31, 32, 33),   # LaMemo look-ahead memory
}

IMPLEMENTATIONS = {
    "xl": "pretrain.model.mechanisms.xl:XLMemory",
    "lamemo": "pretrain.model.mechanisms.lamemo:LaMemoMemory",
}


def mechanism_class(name: str):
    import importlib
    module, cls = IMPLEMENTATIONS[name].split(":")
    return getattr(importlib.import_module(module), cls)
