"""Quantization: ``quantize(model, config)`` dispatches on the config's type.

Each technique lives in its own module and registers its config type in the technique registry
(:mod:`nnopt.techniques`) when imported below.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from nnopt.checkpoint import CheckpointSpec, checkpoint_context
from nnopt.config import Config
from nnopt.quantization import clustering, mixed, ptq, qat, weights  # noqa: F401  (their registrations)
from nnopt.quantization.clustering import ClusterConfig
from nnopt.quantization.mixed import MixedPrecisionConfig, sensitivity
from nnopt.quantization.ptq import DynamicQuantConfig, StaticQuantConfig
from nnopt.quantization.qat import QATConfig
from nnopt.quantization.weights import WeightQuantConfig
from nnopt.techniques import run_technique

__all__ = [
    "ClusterConfig", "DynamicQuantConfig", "MixedPrecisionConfig", "QATConfig", "StaticQuantConfig",
    "WeightQuantConfig", "quantize", "sensitivity",
]


def quantize(
    model: Any,
    config: Config = WeightQuantConfig(),
    data: Any = None,
    eval_data: Any = None,
    inplace: bool = False,
    progress: bool | None = None,
    checkpoint: CheckpointSpec | None = None,
    resume: bool = False,
    data_parallel: int = 1,
) -> nn.Module:
    """Quantize ``model`` as ``config`` says and return the result (a copy unless ``inplace``).

    ``data`` is needed by configs that calibrate or fine-tune (static int8, QAT, clustering,
    mixed precision): a :class:`nnopt.data.Split` or an iterable of input batches.

    >>> q = quantize(model, WeightQuantConfig(bits=8))
    >>> q.classifier.weight_q.dtype
    torch.int8

    ``checkpoint``/``resume``: QAT checkpoints every epoch and continues from the last checkpoint.
    ``data_parallel`` > 1: QAT and clustering fine-tune in that many DDP processes (see :func:`nnopt.train`).
    """
    from nnopt.training import parallel_context

    return run_technique(
        "quantize", model, config, inplace, data=data, eval_data=eval_data, progress=progress,
        **checkpoint_context(checkpoint, resume), **parallel_context(data_parallel),
    )
