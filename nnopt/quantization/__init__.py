"""Quantization: ``quantize(model, config)`` dispatches on the config's type."""

from __future__ import annotations

from typing import Any

from torch import nn

from nnopt.config import Config
from nnopt.passes import Apply, register_pass, run_verb
from nnopt.quantization import weights
from nnopt.quantization.weights import WeightQuantConfig

__all__ = ["WeightQuantConfig", "quantize"]

_QUANTIZERS: dict[type, tuple[str, Apply]] = {
    WeightQuantConfig: (weights.PASS_NAME, weights.quantize_weights),
}
register_pass(weights.PASS_NAME, weights.replay)


def quantize(model: Any, config: Config = WeightQuantConfig(), inplace: bool = False) -> nn.Module:
    """Quantize ``model`` as ``config`` says and return the result (a copy unless ``inplace``).

    >>> q = quantize(model, WeightQuantConfig(bits=8))
    >>> q.classifier.weight_q.dtype
    torch.int8
    """
    return run_verb("quantization", _QUANTIZERS, model, config, inplace)
