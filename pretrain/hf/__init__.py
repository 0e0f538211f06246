"""Hugging Face ``transformers`` and lm-evaluation-harness for trained memory LMs (docs/huggingface.md).

``export.py``: the exporter behind ``pretrain/export_hf.py``; ``configuration_memtrain.py`` and
``modeling_memtrain.py``: templates copied into every exported directory (they import only transformers and the
files copied beside them, so they are not importable from here); ``lm_eval_memtrain.py``: the lm-evaluation-harness
model ``memtrain``.
"""
