"""Sparse execution of pruned Linear layers, used only where it is measured to be faster.

:class:`SparseLinear` holds a Linear's weight in compressed sparse row form (CSR: row offsets,
column indices and the non-zero values; 32-bit indices when they fit) and multiplies with the
sparse kernels torch ships (MKL on x86 CPUs). It keeps no dense copy of the weight, yet its
state_dict is exactly ``nn.Linear``'s (dense ``weight`` and ``bias``), so saved files keep the
standard format.

Kernel, as measured on a 2-core x86 CPU with MKL (4096×4096, 95 % zeros): for one sample
``addmv(bias, W_csr, x)``; for a batch the transposed product ``(W_csr @ xᵀ)ᵀ`` via ``addmm``.
``x @ W_csrᵀ`` (dense @ sparse), COO and BSR (4×4, 16×16 blocks) were 5-250× slower than these and
slower than dense, and 64-bit CSR indices cost up to 2× at batch 1, so none of them is used.

:func:`choose_kernels` times each selected Linear against its SparseLinear twin side by side
(alternated, :func:`nnopt.metrics.speed.compare_latency`) at the configured batch size and swaps
in the sparse layer only where ``dense_ms / sparse_ms >= min_speedup``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

from nnopt.config import Config
from nnopt.errors import ConfigError, ModelFormatError, UnsupportedModelError
from nnopt.layers.sparse import SparseLinear
from nnopt.lineage import AppliedPass
from nnopt.select import replace_layer, select_layers, validate_patterns

PASS_NAME = "sparse-kernels"
CSR = "csr"
DENSE = "dense"
METHOD = (
    "measured: median of alternated timed calls (nnopt.metrics.compare_latency: dense Linear and "
    "SparseLinear on the same random (batch_size, in_features) input, warm-up, 5 rounds)"
)

@dataclasses.dataclass(frozen=True)
class SparseKernelConfig(Config):
    """Use a sparse (CSR) kernel for a Linear only where it measures faster than the dense one.

    Each selected Linear is timed dense and sparse on random input of ``(batch_size, in_features)``
    for ``min_seconds`` each (alternated), at the current ``torch.get_num_threads()``; the sparse
    layer replaces it when ``dense_ms / sparse_ms >= min_speedup`` (0 means always sparse).
    ``layers`` selects layers (names, ``re:`` patterns, ``type:`` names); empty means every Linear.
    """

    kind = "sparse-kernels"
    batch_size: int = 1
    min_speedup: float = 1.1
    min_seconds: float = 0.3
    layers: tuple[str, ...] = ()

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"SparseKernelConfig.batch_size must be >= 1, got {self.batch_size}")
        if not (math.isfinite(self.min_speedup) and self.min_speedup >= 0):
            raise ConfigError(f"SparseKernelConfig.min_speedup must be a finite number >= 0, got {self.min_speedup}")
        if not (math.isfinite(self.min_seconds) and self.min_seconds >= 0):
            raise ConfigError(f"SparseKernelConfig.min_seconds must be a finite number >= 0, got {self.min_seconds}")
        validate_patterns(self.layers)


def choose_kernels(model: nn.Module, config: SparseKernelConfig, **_: Any) -> dict[str, Any]:
    """Measure dense vs CSR per selected Linear and swap in :class:`SparseLinear` where faster."""
    from nnopt.metrics.speed import compare_latency

    targets = select_layers(model, config.layers, default_types=(nn.Linear,))
    skipped = {}
    if not config.layers:  # by default, Linear subclasses (an attention's out_proj, read directly) stay dense
        skipped = {name: f"a {type(module).__name__}, whose owner may read its weight directly: sparse kernels "
                   "replace nn.Linear layers only" for name, module in targets if type(module) is not nn.Linear}
        targets = [(name, module) for name, module in targets if name not in skipped]
    for name, module in targets:
        if type(module) is not nn.Linear:
            raise UnsupportedModelError(
                f"layer {name!r} is a {type(module).__name__}; sparse kernels replace nn.Linear layers only"
            )
    layers: dict[str, Any] = {}
    for name, linear in targets:
        sparse = SparseLinear.from_linear(linear)
        was_training = linear.training
        stats = compare_latency({DENSE: linear, CSR: sparse}, (linear.in_features,), (config.batch_size,),
                                min_seconds=config.min_seconds, device=str(linear.weight.device))
        linear.train(was_training)
        dense_ms = stats[DENSE].at(config.batch_size).median_ms
        sparse_ms = stats[CSR].at(config.batch_size).median_ms
        speedup = dense_ms / sparse_ms if sparse_ms > 0 else math.inf
        use_sparse = speedup >= config.min_speedup
        if use_sparse:
            replace_layer(model, name, sparse.train(was_training))
        layers[name] = {
            "kernel": CSR if use_sparse else DENSE,
            "shape": [linear.out_features, linear.in_features],
            "density": sparse.density,
            "nonzeros": sparse.nonzeros,
            "dense_ms": dense_ms,
            "sparse_ms": sparse_ms,
            "speedup": speedup,
        }
    return {
        "batch_size": config.batch_size,
        "threads": torch.get_num_threads(),
        "min_speedup": config.min_speedup,
        "method": METHOD,
        "layers": layers,
        **({"skipped": skipped} if skipped else {}),
    }


def replay(model: nn.Module, applied: AppliedPass) -> None:
    """Re-create the SparseLinear layers a saved model records (weights are loaded afterwards)."""
    SparseKernelConfig.from_dict(applied.config, where=f"pass {applied.name!r}")
    layers = applied.details.get("layers", {})
    if not isinstance(layers, dict):
        raise ModelFormatError(f"pass {applied.name!r}: 'layers' must be a mapping")
    for name, entry in layers.items():
        kernel = entry.get("kernel") if isinstance(entry, dict) else None
        if kernel not in (CSR, DENSE):
            raise ModelFormatError(f"pass {applied.name!r}: layer {name!r} records kernel {kernel!r}")
        if kernel != CSR:
            continue
        module = model.get_submodule(name)
        if type(module) is not nn.Linear:
            raise ModelFormatError(f"recorded sparse layer {name!r} is a {type(module).__name__}, not Linear")
        weight = module.weight
        sparse = SparseLinear(module.in_features, module.out_features, module.bias is not None,
                              weight.dtype, weight.device)
        replace_layer(model, name, sparse.train(module.training))
