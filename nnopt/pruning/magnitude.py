"""Magnitude pruning. The classic rule: a weight becomes exactly 0 when |w| < θ."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

from nnopt.config import Config
from nnopt.errors import ConfigError, UnsupportedModelError
from nnopt.select import select_layers, validate_patterns

THRESHOLD_PASS = "prune-threshold"
PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)


@dataclasses.dataclass(frozen=True)
class ThresholdPruneConfig(Config):
    """Zero every selected weight with ``|w| < threshold``. Biases are never touched.

    ``layers`` selects layers (names, ``re:`` patterns, ``type:`` names); empty means every
    Linear and Conv2d weight, as in the classic rule.
    """

    kind = "prune-threshold"
    threshold: float = 0.01
    layers: tuple[str, ...] = ()

    def validate(self) -> None:
        if not math.isfinite(self.threshold) or self.threshold < 0:
            raise ConfigError(f"threshold θ must be a finite number >= 0, got {self.threshold}")
        validate_patterns(self.layers)


def prune_threshold(model: nn.Module, config: ThresholdPruneConfig) -> dict[str, Any]:
    """Apply the rule in place; returns per-layer sparsity."""
    layers: dict[str, Any] = {}
    for name, module in select_layers(model, config.layers, default_types=PRUNABLE_TYPES):
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
            raise UnsupportedModelError(
                f"layer {name!r} ({type(module).__name__}) has no float weight to prune; "
                "prune before quantizing"
            )
        with torch.no_grad():
            keep = weight.abs() >= config.threshold
            weight.mul_(keep)
        zeros = int((weight == 0).sum())
        layers[name] = {"numel": weight.numel(), "zeros": zeros, "sparsity": zeros / weight.numel()}
    total = sum(v["numel"] for v in layers.values())
    zeros = sum(v["zeros"] for v in layers.values())
    return {"layers": layers, "sparsity": zeros / total if total else 0.0}
