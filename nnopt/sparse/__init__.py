"""Sparse execution: ``sparsify(model, config)`` swaps pruned Linears for CSR kernels where measured faster."""

from __future__ import annotations

from typing import Any

from torch import nn

from nnopt.config import Config
from nnopt.passes import Apply, register_pass, run_verb
from nnopt.sparse import kernels
from nnopt.sparse.kernels import PASS_NAME, SparseKernelConfig, SparseLinear, choose_kernels

__all__ = ["PASS_NAME", "SparseKernelConfig", "SparseLinear", "sparsify"]

_SPARSIFIERS: dict[type, tuple[str, Apply]] = {SparseKernelConfig: (PASS_NAME, choose_kernels)}
register_pass(PASS_NAME, kernels.replay)


def sparsify(model: Any, config: Config = SparseKernelConfig(), inplace: bool = False) -> nn.Module:
    """Use sparse (CSR) kernels for the Linear layers where they time faster than dense ones.

    Returns the result (a copy unless ``inplace``); the per-layer measurements are recorded in the
    model's lineage, so a saved model reloads with the same kernels and without re-measuring.

    >>> fast = sparsify(pruned, SparseKernelConfig(batch_size=1))  # doctest: +SKIP
    >>> type(fast.fc1).__name__  # doctest: +SKIP
    'SparseLinear'
    """
    return run_verb("sparse kernel", _SPARSIFIERS, model, config, inplace)


def kernel_summary(details: dict[str, Any]) -> str:
    """One line for reports: which layers run a sparse kernel, and the measurement behind it."""
    batch = details.get("batch_size")
    parts = []
    for name, layer in details.get("layers", {}).items():
        parts.append(f"{name} {layer['kernel']} (csr {layer['speedup']:.2f}× dense)")
    return f"kernels measured at batch {batch}: " + ", ".join(parts) if parts else "no layers measured"
