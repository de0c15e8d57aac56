"""Top-1 accuracy on held-out data."""

from __future__ import annotations

import torch
from torch import nn

from nnopt.data import Split


def accuracy(model: nn.Module, data: Split, batch_size: int = 512) -> float:
    """Fraction of rows whose arg-max prediction equals the label (model left in eval mode)."""
    model.eval()
    correct = 0
    with torch.inference_mode():
        for x, y in data.batches(batch_size):
            correct += int((model(x).argmax(-1) == y).sum())
    return correct / len(data)
