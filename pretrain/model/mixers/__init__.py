"""Token mixers, one per file, behind the interface in base.py (registered in pretrain/model/registry.py)."""
