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
from nnopt.pruning.magnitude import MagnitudePruneConfig, ThresholdPruneConfig
from nnopt.pruning.masks import MaskKeeper
from nnopt.pruning.nm import NMPruneConfig
from nnopt.pruning.schedule import GradualPruneConfig
from nnopt.pruning.structured import StructuredPruneConfig, register_importance
from nnopt.techniques import Technique, always, register_technique, run_technique, train_split
from nnopt.training import TrainConfig, TrainHistory, parallel_context, train

__all__ = [
    "GradualPruneConfig", "MagnitudePruneConfig", "MaskKeeper", "NMPruneConfig", "StructuredPruneConfig",
    "ThresholdPruneConfig", "finetune", "prune", "register_importance",
]

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
    >>> pruned = prune(model, GradualPruneConfig(final_sparsity=0.9, epochs=3), data=dataset.train)
    >>> smaller = prune(model, StructuredPruneConfig(ratio=0.5, importance="gradient"), data=dataset.train)

    ``checkpoint``/``resume``: passes that train (gradual pruning) checkpoint every epoch and continue
    from the last checkpoint (see :mod:`nnopt.checkpoint`). ``data_parallel`` > 1: passes that train
    (gradual pruning, structured recovery) run in that many DDP processes (see :func:`nnopt.train`).
    """
    return run_technique("prune", model, config, inplace, data=data, eval_data=eval_data, progress=progress,
                    **checkpoint_context(checkpoint, resume), **parallel_context(data_parallel))


def finetune(
    model: nn.Module, data: Split, config: TrainConfig = TrainConfig(), eval_data: Split | None = None,
    progress: bool | None = None, data_parallel: int = 1,
) -> TrainHistory:
    """Fine-tune in place while every zero weight of a Linear/Conv2d layer stays exactly zero
    (``data_parallel`` > 1: in that many DDP processes, as :func:`nnopt.train`)."""
    return train(model, data, config, eval_data=eval_data, callbacks=[MaskKeeper.from_zeros(model)],
                 progress=progress, data_parallel=data_parallel)


def _finetune_step(model: nn.Module, config: TrainConfig, data: Split | None = None, progress: bool | None = None,
                   data_parallel: int = 1, **_: Any) -> dict[str, Any]:
    finetune(model, data, config, progress=progress, data_parallel=data_parallel)  # type: ignore[arg-type]
    return {}


# A recipe's `train` step: fine-tuning changes values only, so the model's record does not list it.
register_technique(Technique(TrainConfig, "finetune", _finetune_step, needs_data=always("fine-tuning"),
                             data_for=train_split, records=False))
