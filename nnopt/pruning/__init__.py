"""Pruning: ``prune(model, config)`` dispatches on the config's type.

Unstructured configs: :class:`ThresholdPruneConfig` (|w| < θ → 0), :class:`MagnitudePruneConfig`
(a sparsity target, allocated uniformly, globally or by LAMP scores), :class:`NMPruneConfig`
(N:M patterns) and :class:`GradualPruneConfig` (cubic schedule with fine-tuning; needs data).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from nnopt.checkpoint import CheckpointSpec, checkpoint_context
from nnopt.config import Config
from nnopt.data import Split, training_data
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
    pruning with the ``gradient`` or ``taylor`` criterion): a Split, or anything :func:`nnopt.as_dataset`
    takes (a Dataset gives its training split); for a sentence encoder it may also be a list of
    token batches (dicts of ``input_ids`` and ``attention_mask``). Without labels, recovery distils
    from the unpruned model (structured pruning: ``distill`` becomes 1 unless set; gradual pruning: the
    model as it was before the schedule started), and gradient importance uses the model's own predictions.

    >>> pruned = prune(model, MagnitudePruneConfig(sparsity=0.9, allocation="global"))
    >>> pruned = prune(model, GradualPruneConfig(final_sparsity=0.9, epochs=3), data=dataset.train)
    >>> smaller = prune(model, StructuredPruneConfig(ratio=0.5, importance="gradient"), data=dataset.train)

    ``checkpoint``/``resume``: passes that train (gradual pruning) checkpoint every epoch and continue
    from the last checkpoint (see :mod:`nnopt.checkpoint`). ``data_parallel`` > 1: passes that train
    (gradual pruning, structured recovery) run in that many DDP processes (see :func:`nnopt.train`).
    """
    data = training_data(data)
    structured = isinstance(config, StructuredPruneConfig)
    if structured and _unlabelled(data) and config.finetune_epochs and not config.distill:  # type: ignore[attr-defined]
        config = dataclasses.replace(config, distill=1.0)  # no labels: recovery distils from the unpruned model
    return run_technique("prune", model, config, inplace, data=data, eval_data=eval_data, progress=progress,
                    **checkpoint_context(checkpoint, resume), **parallel_context(data_parallel))


def _unlabelled(data: Any) -> bool:
    return isinstance(data, Split) and data.y is None


def finetune(
    model: nn.Module, data: Split | Any, config: TrainConfig = TrainConfig(), eval_data: Split | Any | None = None,
    progress: bool | None = None, data_parallel: int = 1, teacher: nn.Module | None = None,
) -> TrainHistory:
    """Fine-tune in place while every zero weight of a Linear/Conv2d layer stays exactly zero
    (``data_parallel`` > 1: in that many DDP processes, as :func:`nnopt.train`).

    Without labels (or with ``config.distill`` > 0) the loss distils from ``teacher``: pass the original
    (unpruned, unquantized) model; by default it is the model as it is now, which only holds its outputs."""
    return train(model, training_data(data), config, eval_data=eval_data, callbacks=[MaskKeeper.from_zeros(model)],
                 progress=progress, data_parallel=data_parallel, teacher=teacher)


def _finetune_step(model: nn.Module, config: TrainConfig, data: Split | None = None, progress: bool | None = None,
                   data_parallel: int = 1, teacher: nn.Module | None = None, **_: Any) -> dict[str, Any]:
    # ``teacher``: the model before the recipe's first step, when the caller passes it (label-free recovery)
    finetune(model, data, config, progress=progress, data_parallel=data_parallel, teacher=teacher)
    return {}


# A recipe's `train` step: fine-tuning changes values only, so the model's record does not list it.
register_technique(Technique(TrainConfig, "finetune", _finetune_step, needs_data=always("fine-tuning"),
                             data_for=train_split, records=False))
