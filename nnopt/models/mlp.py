"""Fully connected classifiers: the classic SimpleNet (64-32-10) and LeNet-300-100."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from nnopt.config import Config
from nnopt.errors import ConfigError
from nnopt.models.registry import register_architecture


@dataclasses.dataclass(frozen=True)
class MLPConfig(Config):
    kind = "mlp"
    in_features: int = 64
    hidden: tuple[int, ...] = (64, 32)
    num_classes: int = 10
    seed: int | None = None

    def validate(self) -> None:
        if self.in_features < 1 or self.num_classes < 2:
            raise ConfigError("MLPConfig: in_features must be >= 1 and num_classes >= 2")
        if any(h < 1 for h in self.hidden):
            raise ConfigError(f"MLPConfig.hidden: every width must be >= 1, got {self.hidden}")


class MLP(nn.Module):
    """Dense → ReLU blocks, then a Dense classifier.

    ``forward`` returns logits (train them with cross-entropy); ``predict_proba`` applies the
    softmax output layer for probabilities.
    """

    def __init__(self, config: MLPConfig) -> None:
        super().__init__()
        if config.seed is not None:
            torch.manual_seed(config.seed)
        self.config = config
        self.input_shape = (config.in_features,)
        widths = (config.in_features, *config.hidden)
        layers: list[nn.Module] = []
        for w_in, w_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(w_in, w_out), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(widths[-1], config.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (batch, in_features) -> (batch, num_classes) logits
        return self.classifier(self.features(x.flatten(1)))

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.forward(x), dim=-1)


register_architecture(
    "simplenet", MLPConfig, MLP, "the classic Dense 64 ReLU -> Dense 32 ReLU -> Dense 10 softmax",
    hidden=(64, 32),
)
register_architecture(
    "lenet300", MLPConfig, MLP, "LeNet-300-100: Dense 300 ReLU -> Dense 100 ReLU -> Dense 10",
    hidden=(300, 100),
)
