"""Pruning: ``prune(model, config)`` dispatches on the config's type.

Unstructured configs: :class:`ThresholdPruneConfig` (|w| < θ → 0), :class:`MagnitudePruneConfig`
(a sparsity target, allocated uniformly, globally or by LAMP scores), :class:`NMPruneConfig`
(N:M patterns) and :class:`GradualPruneConfig` (cubic schedule with fine-tuning; needs data).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from nnopt.checkpoint import CheckpointSpec, checkpoint_context
from nnopt.config import Config
from nnopt.data import Split
from nnopt.passes import Apply, register_pass, run_verb
from nnopt.pruning.magnitude import (
    MAGNITUDE_PASS,
    THRESHOLD_PASS,
    MagnitudePruneConfig,
    ThresholdPruneConfig,
    prune_magnitude,
    prune_threshold,
)
from nnopt.pruning.masks import MaskKeeper
from nnopt.pruning.nm import NM_PASS, NMPruneConfig, prune_nm
from nnopt.pruning.schedule import GRADUAL_PASS, GradualPruneConfig, prune_gradual
from nnopt.pruning.structured import (
    STRUCTURED_PASS,
    StructuredPruneConfig,
    prune_structured,
    register_importance,
    replay_structured,
)
from nnopt.training import TrainConfig, TrainHistory, parallel_context, train

__all__ = [
    "GradualPruneConfig", "MagnitudePruneConfig", "MaskKeeper", "NMPruneConfig", "StructuredPruneConfig",
    "ThresholdPruneConfig", "finetune", "prune", "register_importance",
]

_PRUNERS: dict[type, tuple[str, Apply]] = {
    ThresholdPruneConfig: (THRESHOLD_PASS, prune_threshold),
    MagnitudePruneConfig: (MAGNITUDE_PASS, prune_magnitude),
    NMPruneConfig: (NM_PASS, prune_nm),
    GradualPruneConfig: (GRADUAL_PASS, prune_gradual),
}
for _name, _ in _PRUNERS.values():
    register_pass(_name)  # values only: nothing to replay on load
_PRUNERS[StructuredPruneConfig] = (STRUCTURED_PASS, prune_structured)
register_pass(STRUCTURED_PASS, replay_structured)  # layers change shape: re-create them on load


def prune(
    model: Any,
    config: Config = ThresholdPruneConfig(),
    data: Split | Any | None = None,
    eval_data: Split | None = None,
    inplace: bool = False,
    progress: bool | None = None,
    checkpoint: CheckpointSpec | None = None,
    resume: bool = False,
    data_parallel: int = 1,
) -> nn.Module:
    """Prune ``model`` as ``config`` says and return the result (a copy unless ``inplace``).

    ``data`` is needed by configs that fine-tune (gradual pruning) or read gradients (structured
    pruning with the ``gradient`` or ``taylor`` criterion); for a sentence encoder it is a list of
    token batches (dicts of ``input_ids`` and ``attention_mask``).

    >>> pruned = prune(model, MagnitudePruneConfig(sparsity=0.9, allocation="global"))
    >>> pruned = prune(model, GradualPruneConfig(final_sparsity=0.9), data=dataset.train)
    >>> smaller = prune(model, StructuredPruneConfig(ratio=0.5, importance="gradient"), data=dataset.train)

    ``checkpoint``/``resume``: passes that train (gradual pruning) checkpoint every epoch and continue
    from the last checkpoint (see :mod:`nnopt.checkpoint`). ``data_parallel`` > 1: passes that train
    (gradual pruning, structured recovery) run in that many DDP processes (see :func:`nnopt.train`).
    """
    return run_verb("pruning", _PRUNERS, model, config, inplace, data=data, eval_data=eval_data, progress=progress,
                    **checkpoint_context(checkpoint, resume), **parallel_context(data_parallel))


def finetune(
    model: nn.Module, data: Split, config: TrainConfig = TrainConfig(), eval_data: Split | None = None,
    progress: bool | None = None, data_parallel: int = 1,
) -> TrainHistory:
    """Fine-tune in place while every zero weight of a Linear/Conv2d layer stays exactly zero
    (``data_parallel`` > 1: in that many DDP processes, as :func:`nnopt.train`)."""
    return train(model, data, config, eval_data=eval_data, callbacks=[MaskKeeper.from_zeros(model)],
                 progress=progress, data_parallel=data_parallel)
