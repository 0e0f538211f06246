"""Memory-augmented transformer LMs on megatron-core tensor-parallel layers.

    from pretrain.model import ModelConfig, build_model, MemoryState, parallel
    parallel.initialize(tp_size=1)
    model = build_model(ModelConfig(attn_type=3))
    state = model.init_state(batch_size=8)
    out, state = model(tokens, state, targets)

``ModelConfig`` is importable without torch; the rest is imported on first use.
"""
from pretrain.model.model_config import ModelConfig, load_model_config

_LAZY = {
    "build_model": "pretrain.model.lm",
    "MemoryLM": "pretrain.model.lm",
    "LMOutput": "pretrain.model.lm",
    "MemoryState": "pretrain.model.state",
    "parallel": "pretrain.model.parallel",
}

__all__ = ["ModelConfig", "load_model_config"] + list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib
        module = importlib.import_module(_LAZY[name])
        return module if module.__name__.endswith("." + name) else getattr(module, name)
    raise AttributeError(f"module 'pretrain.model' has no attribute {name!r}")
