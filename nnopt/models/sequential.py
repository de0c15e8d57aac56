"""A plain chain of layers described entirely by JSON-friendly strings.

Adapters (Keras today) convert foreign models into this form, so that they can be optimized,
saved and reloaded without the original framework and without executing stored code.
Layer specs: ``linear:IN:OUT`` (``linear:IN:OUT:nobias`` without bias), ``relu``, ``tanh``,
``sigmoid``, ``gelu``, ``flatten``, ``identity``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from nnopt.config import Config
from nnopt.errors import ConfigError
from nnopt.models.registry import register_architecture

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
    "flatten": nn.Flatten,
    "identity": nn.Identity,
}


@dataclasses.dataclass(frozen=True)
class SequentialConfig(Config):
    kind = "sequential"
    input_shape: tuple[int, ...] = (64,)
    layers: tuple[str, ...] = ()
    # What the source model applied after the last layer; forward() returns logits either way.
    output: str = "none"
    source: str = ""

    def validate(self) -> None:
        if not self.layers:
            raise ConfigError("SequentialConfig.layers: at least one layer is needed")
        for spec in self.layers:
            _layer_from_spec(spec)
        if not self.input_shape or any(d < 1 for d in self.input_shape):
            raise ConfigError(f"SequentialConfig.input_shape must be non-empty sizes >= 1, got {self.input_shape}")
        if self.output not in ("none", "softmax"):
            raise ConfigError(f"SequentialConfig.output must be 'none' or 'softmax', got {self.output!r}")


def _layer_from_spec(spec: str) -> nn.Module:
    kind, *args = spec.split(":")
    if kind in _ACTIVATIONS and not args:
        return _ACTIVATIONS[kind]()
    if kind == "linear" and len(args) in (2, 3):
        try:
            n_in, n_out = int(args[0]), int(args[1])
        except ValueError:
            raise ConfigError(f"bad layer spec {spec!r}: sizes must be integers") from None
        if n_in < 1 or n_out < 1:
            raise ConfigError(f"bad layer spec {spec!r}: sizes must be >= 1")
        if len(args) == 3 and args[2] != "nobias":
            raise ConfigError(f"bad layer spec {spec!r}: third field may only be 'nobias'")
        return nn.Linear(n_in, n_out, bias=len(args) == 2)
    raise ConfigError(
        f"unknown layer spec {spec!r}; known: linear:IN:OUT[:nobias], " + ", ".join(_ACTIVATIONS)
    )


class SequentialNet(nn.Module):
    """Layers named ``layers.0``, ``layers.1``, ... in order."""

    def __init__(self, config: SequentialConfig) -> None:
        super().__init__()
        self.config = config
        self.input_shape = tuple(config.input_shape)
        self.layers = nn.Sequential(*(_layer_from_spec(s) for s in config.layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        out = self.forward(x)
        return torch.softmax(out, dim=-1) if self.config.output == "softmax" else out


register_architecture(
    "sequential", SequentialConfig, SequentialNet, "a chain of layers given as specs (used by adapters)"
)
