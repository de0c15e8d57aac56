"""Pruning: ``prune(model, config)`` dispatches on the config's type."""

from __future__ import annotations

from typing import Any

from torch import nn

from nnopt.config import Config
from nnopt.passes import Apply, register_pass, run_verb
from nnopt.pruning.magnitude import THRESHOLD_PASS, ThresholdPruneConfig, prune_threshold

__all__ = ["ThresholdPruneConfig", "prune"]

_PRUNERS: dict[type, tuple[str, Apply]] = {ThresholdPruneConfig: (THRESHOLD_PASS, prune_threshold)}
register_pass(THRESHOLD_PASS)  # values only: nothing to replay on load


def prune(model: Any, config: Config = ThresholdPruneConfig(), inplace: bool = False) -> nn.Module:
    """Prune ``model`` as ``config`` says and return the result (a copy unless ``inplace``).

    >>> pruned = prune(model, ThresholdPruneConfig(threshold=0.01))
    >>> float((pruned.classifier.weight == 0).float().mean())  # doctest: +SKIP
    0.07
    """
    return run_verb("pruning", _PRUNERS, model, config, inplace)
