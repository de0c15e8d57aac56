"""Knowledge distillation from the original model: the recovery loss when labels are missing (the default
then) or mixed with cross-entropy by a ``distill`` weight when they exist.

Classifier outputs (logits) are matched by the KL divergence of their softened distributions (Hinton et
al., 2015); embedding outputs (a sentence encoder's, or ``outputs="embedding"``) by 1 − cosine similarity.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nnopt.data import call_model
from nnopt.errors import ConfigError

OUTPUT_KINDS = ("auto", "logits", "embedding")


def output_kind(model: nn.Module, requested: str = "auto") -> str:
    """``logits`` or ``embedding``: what the model's outputs are (``auto``: embedding for a sentence encoder)."""
    if requested not in OUTPUT_KINDS:
        raise ConfigError(f"outputs must be one of {', '.join(OUTPUT_KINDS)}, got {requested!r}")
    if requested != "auto":
        return requested
    from nnopt.models.hf_encoder import SentenceEncoder

    return "embedding" if isinstance(model, SentenceEncoder) else "logits"


class DistillationLoss:
    """``loss(outputs, x, y)`` for :func:`nnopt.train`: (1 − weight)·cross-entropy + weight·distillation from
    ``teacher``; with ``y`` None (unlabelled rows) distillation only. Logits: T²·KL of the outputs softened
    at ``temperature``; embeddings: 1 − cosine similarity. A class, not a closure, so that it can travel to
    data-parallel training processes."""

    def __init__(
        self, teacher: nn.Module, weight: float = 1.0, temperature: float = 4.0, outputs: str = "auto"
    ) -> None:
        if not 0.0 <= weight <= 1.0:
            raise ConfigError(f"the distillation weight must lie in [0, 1], got {weight}")
        if not temperature > 0:
            raise ConfigError(f"the distillation temperature must be > 0, got {temperature}")
        self.teacher, self.weight, self.temperature = teacher, weight, temperature
        self.outputs = output_kind(teacher, outputs)

    def __call__(self, logits: torch.Tensor, x: Any, y: torch.Tensor | None) -> torch.Tensor:
        with torch.no_grad():
            target = call_model(self.teacher, x)
        kd = self.distance(logits, target)
        if y is None or self.weight >= 1.0:
            return kd
        return (1 - self.weight) * F.cross_entropy(logits, y) + self.weight * kd

    def distance(self, outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The distillation term between the student's ``outputs`` and the teacher's ``target`` (batch mean)."""
        if self.outputs == "embedding":
            return (1 - F.cosine_similarity(outputs.flatten(1), target.flatten(1), dim=-1)).mean()
        t = self.temperature
        log_p = F.log_softmax(outputs / t, dim=-1)
        soft = F.softmax(target / t, dim=-1)
        rows = outputs.numel() // outputs.shape[-1]  # (batch, classes) or (batch, ..., classes)
        return F.kl_div(log_p, soft, reduction="sum") / rows * t**2


def recovery_teacher(model: nn.Module, data: Any, context: dict[str, Any]) -> nn.Module | None:
    """What a pass that compresses ``model`` and then fine-tunes it on ``data`` distils from: the caller's
    ``context["teacher"]`` (a recipe's original model), else, when the data has no labels, a frozen copy
    of ``model`` taken now, before the pass changes any layer (None with labels: cross-entropy needs none)."""
    import copy

    teacher = context.get("teacher")
    if isinstance(teacher, nn.Module):
        return teacher
    unlabelled = getattr(data, "y", 0) is None
    return copy.deepcopy(model).eval() if unlabelled else None
