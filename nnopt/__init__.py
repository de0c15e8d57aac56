"""nnopt: make trained neural networks smaller, faster and cheaper in energy, with measurements.

Importing this package is cheap: the verbs below load their modules on first use, and nothing
imports ONNX, Keras or transformers until a feature needs it.

>>> import nnopt
>>> model = nnopt.create_model("simplenet")
>>> pruned = nnopt.prune(model, nnopt.ThresholdPruneConfig(threshold=0.01))
>>> quantized = nnopt.quantize(pruned, nnopt.WeightQuantConfig(bits=8))
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from nnopt._version import __version__

# public name -> module that defines it
_EXPORTS = {
    "create_model": "nnopt.models",
    "architectures": "nnopt.models",
    "from_keras": "nnopt.models",
    "load_dataset": "nnopt.data",
    "load_digits": "nnopt.data",
    "as_dataset": "nnopt.data",
    "load_data": "nnopt.datafiles",
    "fidelity": "nnopt.metrics",
    "train": "nnopt.training",
    "TrainConfig": "nnopt.training",
    "prune": "nnopt.pruning",
    "ThresholdPruneConfig": "nnopt.pruning",
    "MagnitudePruneConfig": "nnopt.pruning",
    "NMPruneConfig": "nnopt.pruning",
    "GradualPruneConfig": "nnopt.pruning",
    "StructuredPruneConfig": "nnopt.pruning",
    "finetune": "nnopt.pruning",
    "sparsify": "nnopt.sparse",
    "SparseKernelConfig": "nnopt.sparse",
    "quantize": "nnopt.quantization",
    "WeightQuantConfig": "nnopt.quantization",
    "DynamicQuantConfig": "nnopt.quantization",
    "StaticQuantConfig": "nnopt.quantization",
    "QATConfig": "nnopt.quantization",
    "ClusterConfig": "nnopt.quantization",
    "MixedPrecisionConfig": "nnopt.quantization",
    "sensitivity": "nnopt.quantization",
    "export_onnx": "nnopt.io.onnx_export",
    "open_model": "nnopt.io.sources",
    "Recipe": "nnopt.recipe",
    "load_recipe": "nnopt.recipe",
    "parse_recipe": "nnopt.recipe",
    "apply_recipe": "nnopt.recipe",
    "recipe_to_yaml": "nnopt.recipe",
    "SearchSettings": "nnopt.search",
    "auto": "nnopt.search",
    "AutoConfig": "nnopt.search",
    "AutoResult": "nnopt.search",
    "load_onnx": "nnopt.io.onnx_import",
    "quantize_onnx": "nnopt.io.onnx_import",
    "load_keras": "nnopt.io.keras_file",
    "save_keras": "nnopt.io.keras_file",
    "OnnxRunner": "nnopt.io.onnx_export",
    "measure": "nnopt.metrics",
    "accuracy": "nnopt.metrics",
    "profile_model": "nnopt.metrics",
    "measure_latency": "nnopt.metrics",
    "save_model": "nnopt.saving",
    "load_model": "nnopt.loading",
    "NnoptError": "nnopt.errors",
    "tune_allocator": "nnopt.runtime",
    "CheckpointSpec": "nnopt.checkpoint",
    "verify_directory": "nnopt.io.manifest",
    "simplify": "nnopt.simplification",
    "FoldBatchNormConfig": "nnopt.simplification",
    "LowRankConfig": "nnopt.simplification",
    "thread_sweep": "nnopt.parallel",
    "parallel_predict": "nnopt.parallel",
    "throughput_vs_workers": "nnopt.parallel",
    "ddp_train": "nnopt.parallel",
    "system_report": "nnopt.metrics.system",
    "estimate_energy": "nnopt.energy",
    "measure_energy": "nnopt.energy",
    "latency_energy": "nnopt.energy",
    "device_energy": "nnopt.energy",
    "cpu_active_power": "nnopt.energy",
    "load_energy_table": "nnopt.energy",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'nnopt' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:  # for type checkers and IDEs only
    from nnopt.data import load_dataset, load_digits
    from nnopt.errors import NnoptError
    from nnopt.loading import load_model
    from nnopt.metrics import accuracy, measure, measure_latency, profile_model
    from nnopt.models import architectures, create_model, from_keras
    from nnopt.pruning import (
        GradualPruneConfig,
        MagnitudePruneConfig,
        NMPruneConfig,
        ThresholdPruneConfig,
        finetune,
        prune,
    )
    from nnopt.quantization import WeightQuantConfig, quantize
    from nnopt.saving import save_model
    from nnopt.search import AutoConfig, AutoResult, auto
    from nnopt.sparse import SparseKernelConfig, sparsify
    from nnopt.training import TrainConfig, train
