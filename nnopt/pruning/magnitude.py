"""Magnitude pruning: the classic threshold rule, sparsity targets, and their allocation.

- threshold: a weight becomes exactly 0 when |w| < θ;
- uniform: every selected layer loses the same fraction of its smallest weights;
- global: one magnitude threshold across all selected layers;
- lamp: one threshold on layer-adaptive scores (Lee et al., ICLR 2021), which normalize each
  weight by the mass of the larger weights of its layer, so no layer is emptied.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from nnopt.config import Config
from nnopt.errors import ConfigError
from nnopt.pruning.masks import apply_masks
from nnopt.pruning.targets import Target, layer_stats, prune_targets
from nnopt.select import validate_patterns
from nnopt.techniques import Technique, register_technique

THRESHOLD_PASS = "prune-threshold"
MAGNITUDE_PASS = "prune-magnitude"
ALLOCATIONS: tuple[str, ...] = ("uniform", "global", "lamp")


@dataclasses.dataclass(frozen=True)
class ThresholdPruneConfig(Config):
    """Zero every selected weight with ``|w| < threshold``. Biases are never touched.

    ``layers`` selects layers (names, ``re:`` patterns, ``type:`` names); empty means every
    Linear, convolution, recurrent, attention and embedding layer but the final classifier.
    """

    kind = "prune-threshold"
    threshold: float = 0.01
    layers: tuple[str, ...] = ()

    def validate(self) -> None:
        if not math.isfinite(self.threshold) or self.threshold < 0:
            raise ConfigError(f"threshold θ must be a finite number >= 0, got {self.threshold}")
        validate_patterns(self.layers)


@dataclasses.dataclass(frozen=True)
class MagnitudePruneConfig(Config):
    """Zero the smallest-magnitude weights until ``sparsity`` of the selected weights are zero."""

    kind = "prune-magnitude"
    sparsity: float = 0.5
    allocation: str = "uniform"
    layers: tuple[str, ...] = ()

    def validate(self) -> None:
        check_sparsity(self.sparsity)
        check_allocation(self.allocation)
        validate_patterns(self.layers)


def check_sparsity(value: float, name: str = "sparsity") -> None:
    if not (math.isfinite(value) and 0.0 <= value < 1.0):
        raise ConfigError(f"{name} must be in [0, 1), got {value}")


def check_allocation(value: str) -> None:
    if value not in ALLOCATIONS:
        raise ConfigError(f"allocation must be one of {', '.join(ALLOCATIONS)}, got {value!r}")


def prune_threshold(model: nn.Module, config: ThresholdPruneConfig, **_: Any) -> dict[str, Any]:
    """Apply the classic rule in place; returns per-layer sparsity."""
    targets = prune_targets(model, config.layers)
    with torch.no_grad():
        for _name, weight in targets:
            weight.masked_fill_(weight.abs() < config.threshold, 0.0)
    return layer_stats(targets)


def prune_magnitude(model: nn.Module, config: MagnitudePruneConfig, **_: Any) -> dict[str, Any]:
    targets = prune_targets(model, config.layers)
    apply_masks(targets, magnitude_masks(targets, config.sparsity, config.allocation))
    return {"allocation": config.allocation, **layer_stats(targets)}


def magnitude_masks(
    targets: Sequence[Target], sparsity: float, allocation: str
) -> dict[str, torch.Tensor]:
    """Boolean keep-masks (True = keep) reaching ``sparsity`` over the targets' weights."""
    weights = {name: weight.detach() for name, weight in targets}
    if allocation == "uniform":
        return {name: _keep_largest(w.abs(), sparsity) for name, w in weights.items()}
    scores = {name: (w.abs() if allocation == "global" else lamp_scores(w)) for name, w in weights.items()}
    flat = torch.cat([s.flatten() for s in scores.values()])
    keep = _keep_largest(flat, sparsity)
    masks, start = {}, 0
    for name, score in scores.items():
        masks[name] = keep[start : start + score.numel()].view_as(score)
        start += score.numel()
    return masks


def lamp_scores(weight: torch.Tensor) -> torch.Tensor:
    """LAMP score of each weight: w_u² / Σ_{v ≥ u} w_v² over the layer sorted by magnitude."""
    squared = weight.detach().flatten().double() ** 2
    order = torch.argsort(squared)  # ascending
    sorted_sq = squared[order]
    tail = torch.flip(torch.cumsum(torch.flip(sorted_sq, [0]), 0), [0])  # Σ of this and all larger
    scores = torch.empty_like(squared)
    scores[order] = sorted_sq / tail.clamp_min(torch.finfo(torch.float64).tiny)
    return scores.view_as(weight)


def _keep_largest(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Mask that drops exactly round(sparsity · n) smallest scores (ties broken by position)."""
    n = scores.numel()
    drop = int(round(sparsity * n))
    keep = torch.ones(n, dtype=torch.bool)
    if drop:
        order = torch.argsort(scores.flatten(), stable=True)
        keep[order[:drop]] = False
    return keep.view_as(scores)


# Values only: nothing to replay on load.
register_technique(Technique(ThresholdPruneConfig, "prune", prune_threshold))
register_technique(Technique(MagnitudePruneConfig, "prune", prune_magnitude))
