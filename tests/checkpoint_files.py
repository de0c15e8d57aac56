"""Test helpers for safetensors checkpoint directories (importable from any test: tests/ is on sys.path, as the
directory of the root conftest.py)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open


def checkpoint_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors checkpoint directory (all its shards), by name."""
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as fh:
            out.update({name: fh.get_tensor(name) for name in fh.keys()})
    return out
