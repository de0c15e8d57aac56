"""Safe model files and atomic outputs.

Lazy: ``nnopt verify`` and other light commands import submodules (atomic writes, manifests) without
paying for torch, which ``model_dir`` needs.
"""

from __future__ import annotations

import importlib
from typing import Any

# Loading replays techniques, so it sits above them: nnopt.load_model (nnopt.loading).
_EXPORTS = {"SavedModel": "nnopt.io.model_dir", "read_meta": "nnopt.io.model_dir", "save_model": "nnopt.io.model_dir"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'nnopt.io' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
