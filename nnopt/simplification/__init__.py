"""Simplification: ``simplify(model, config)`` rewrites a model into a cheaper equivalent (or near one).

- :class:`FoldBatchNormConfig`: BatchNorm folded into the preceding Conv/Linear (exact in eval mode).
- :class:`LowRankConfig`: Linear layers replaced by truncated-SVD factor pairs (approximate).

Each technique lives in its own module and registers its config type in the technique registry
(:mod:`nnopt.techniques`) when imported below.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from nnopt.config import Config
from nnopt.layers.lowrank import LowRankLinear
from nnopt.simplification import fold, lowrank  # noqa: F401  (their registrations)
from nnopt.simplification.fold import FoldBatchNormConfig
from nnopt.simplification.lowrank import LowRankConfig
from nnopt.techniques import run_technique

__all__ = ["FoldBatchNormConfig", "LowRankConfig", "LowRankLinear", "simplify"]


def simplify(
    model: Any,
    config: Config = FoldBatchNormConfig(),
    data: Any = None,
    inplace: bool = False,
) -> nn.Module:
    """Simplify ``model`` as ``config`` says and return the result (a copy unless ``inplace``).

    ``data`` (a :class:`nnopt.data.Split`, a tensor or an iterable of input batches) is optional:
    BatchNorm folding uses one batch to check the shapes of Linear→BatchNorm1d pairs when the model
    does not announce an ``input_shape``; low-rank factorization does not use it.

    >>> folded = simplify(nnopt.create_model("resnet8").eval(), FoldBatchNormConfig())
    >>> any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    False
    >>> small = simplify(model, LowRankConfig(energy=0.9))  # doctest: +SKIP
    """
    return run_technique("simplify", model, config, inplace, data=data)
