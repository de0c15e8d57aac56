"""Quality on held-out data: top-1 accuracy with labels; without them, fidelity to the original model
(top-1 agreement of the predictions and mean cosine similarity of the outputs)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nnopt.data import Split, as_split, call_model
from nnopt.errors import ConfigError


def accuracy(model: nn.Module, data: Split | Any, batch_size: int = 512) -> float:
    """Fraction of rows whose arg-max prediction equals the label (model left in eval mode).

    ``data``: a Split or anything :func:`nnopt.as_dataset` takes, with labels."""
    data = as_split(data)
    if data.y is None:
        raise ConfigError("accuracy needs labels; without them measure fidelity(model, original, data) "
                          "(top-1 agreement and output cosine)")
    model.eval()
    correct = 0
    with torch.inference_mode():
        for x, y in data.batches(batch_size):
            correct += int((call_model(model, x).argmax(-1) == y).sum())
    return correct / len(data)


@dataclasses.dataclass(frozen=True)
class Fidelity:
    """How closely a model's outputs follow a reference model's on the same rows.

    ``agreement``: share of rows whose top-1 prediction (arg-max of the last dimension) is the reference's;
    ``cosine_mean``/``cosine_min``: cosine similarity of each row's flattened outputs."""

    agreement: float
    cosine_mean: float
    cosine_min: float
    rows: int

    def to_dict(self) -> dict[str, float | int]:
        return dataclasses.asdict(self)


def model_outputs(model: nn.Module, data: Split | Any, batch_size: int = 512) -> torch.Tensor:
    """The model's outputs on every row of ``data``, in order (eval mode, no gradients)."""
    data = as_split(data)
    model.eval()
    parts = []
    with torch.inference_mode():
        for x, _ in data.batches(batch_size):
            out = call_model(model, x)
            if not isinstance(out, torch.Tensor):
                raise ConfigError(f"fidelity compares tensor outputs; the model returns {type(out).__name__}")
            parts.append(out.float())
    return torch.cat(parts)


def output_fidelity(outputs: torch.Tensor, reference: torch.Tensor) -> Fidelity:
    """:class:`Fidelity` of ``outputs`` against ``reference`` (same shape, one row per example)."""
    if outputs.shape != reference.shape:
        raise ConfigError(f"outputs {tuple(outputs.shape)} and reference outputs {tuple(reference.shape)} differ "
                          "in shape")
    agree = (outputs.argmax(-1) == reference.argmax(-1)).double().mean()
    cosine = F.cosine_similarity(outputs.flatten(1).double(), reference.flatten(1).double(), dim=-1)
    return Fidelity(agreement=float(agree), cosine_mean=float(cosine.mean()), cosine_min=float(cosine.min()),
                    rows=int(outputs.shape[0]))


def fidelity(model: nn.Module, reference: nn.Module, data: Split | Any, batch_size: int = 512) -> Fidelity:
    """Top-1 agreement and output cosine of ``model`` against ``reference`` (the original) on ``data``'s
    inputs; labels are not needed (nor read).

    >>> import torch, nnopt
    >>> model = torch.nn.Linear(4, 3)
    >>> nnopt.fidelity(model, model, torch.randn(8, 4)).agreement
    1.0
    """
    return output_fidelity(model_outputs(model, data, batch_size), model_outputs(reference, data, batch_size))
