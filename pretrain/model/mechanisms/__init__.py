"""Memory mechanisms, one per file, behind the interface in base.py (names in registry.py)."""
