"""Model registry, CTranslate2 import, pruning and export."""
