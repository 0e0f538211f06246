"""MemBART: a BART encoder-decoder with K memory slots carried from step to step (docs/membart.md).

* ``config.py``: ``MemBartConfig``, the presets (``load_membart_config``), Hugging Face ``config.json`` fields;
* ``model.py``: the model on megatron-core tensor-parallel layers (``MemBart``, ``build_membart``), a
  ``pretrain.model.family.ModelFamily`` as the decoder LMs are;
* ``weights.py``: Hugging Face / memformers checkpoints in and out (``load_pretrained``, ``save_pretrained``);
* ``generate.py``: greedy, sampling and beam-search decoding (``MemBart.generate``).

The config names are imported here (no torch); every other name of ``model.py`` (the module
``pretrain.model.membart`` of earlier layouts) on first use, so ``from pretrain.model.membart import build_membart``
still works.  The earlier module paths ``pretrain.model.membart_config``, ``membart_weights`` and
``membart_generate`` are these modules under their old names (``pretrain.model.registry.LEGACY_MODULES``).
"""
from pretrain.model.membart.config import (ACTIVATIONS, ARCH, NUMERIC_FIELDS, MemBartConfig, from_hf_config,
                                           is_membart_preset, load_membart_config, to_hf_config)

_SUBMODULES = ("config", "model", "weights", "generate")
_MODEL_NAMES = ("MemBart", "build_membart", "EncoderOutput", "Seq2SeqOutput", "DecoderCache", "ACTIVATION_FNS",
                "MECHANISM", "STATE_KEY")

__all__ = ["ACTIVATIONS", "ARCH", "NUMERIC_FIELDS", "MemBartConfig", "from_hf_config", "is_membart_preset",
           "load_membart_config", "to_hf_config"] + list(_MODEL_NAMES)


def __getattr__(name: str):
    """A submodule, or a name of ``model.py`` (what the module ``pretrain.model.membart`` held), imported on
    first use."""
    import importlib
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name.startswith("__"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    model = importlib.import_module(f"{__name__}.model")
    try:
        return getattr(model, name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
