"""Sparse execution: ``sparsify(model, config)`` swaps pruned Linears for CSR kernels where measured faster."""

from __future__ import annotations

from typing import Any

from torch import nn

from nnopt.config import Config
from nnopt.layers.sparse import SparseLinear
from nnopt.sparse import kernels
from nnopt.sparse.kernels import PASS_NAME, SparseKernelConfig, choose_kernels
from nnopt.techniques import Technique, register_technique, run_technique

__all__ = ["PASS_NAME", "SparseKernelConfig", "SparseLinear", "sparsify"]

register_technique(Technique(SparseKernelConfig, "sparsify", choose_kernels, kernels.replay))


def sparsify(model: Any, config: Config = SparseKernelConfig(), inplace: bool = False) -> nn.Module:
    """Use sparse (CSR) kernels for the Linear layers where they time faster than dense ones.

    Returns the result (a copy unless ``inplace``); the per-layer measurements are recorded in the
    model's lineage, so a saved model reloads with the same kernels and without re-measuring.

    >>> fast = sparsify(pruned, SparseKernelConfig(batch_size=1))  # doctest: +SKIP
    >>> type(fast.fc1).__name__  # doctest: +SKIP
    'SparseLinear'
    """
    return run_technique("sparsify", model, config, inplace)


def kernel_summary(details: dict[str, Any]) -> str:
    """One line for reports: which layers run a sparse kernel, and the measurement behind it."""
    batch = details.get("batch_size")
    parts = []
    for name, layer in details.get("layers", {}).items():
        parts.append(f"{name} {layer['kernel']} (csr {layer['speedup']:.2f}× dense)")
    return f"kernels measured at batch {batch}: " + ", ".join(parts) if parts else "no layers measured"
