"""A plain chain of layers described entirely by JSON-friendly strings.

Adapters (Keras today) convert foreign models into this form, so that they can be optimized,
saved and reloaded without the original framework and without executing stored code.
Layer specs: ``linear:IN:OUT`` (``linear:IN:OUT:nobias`` without bias),
``conv2d:IN:OUT:KH:KW:SH:SW:PH:PW`` (``:nobias``), ``batchnorm1d:C:EPS``, ``batchnorm2d:C:EPS``,
``maxpool2d:KH:KW:SH:SW``, ``avgpool2d:KH:KW:SH:SW``, ``globalavgpool2d`` (keeps 1×1), ``nhwc_to_nchw``
(channels-last input, as Keras gives it, to torch's channels-first), ``relu``, ``tanh``, ``sigmoid``,
``gelu``, ``flatten``, ``identity``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from nnopt.config import Config
from nnopt.errors import ConfigError
from nnopt.models.registry import register_architecture


class NhwcToNchw(nn.Module):
    """(N, H, W, C) -> (N, C, H, W): lets a channels-last model (Keras) run torch's convolutions."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 3, 1, 2)


_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
    "flatten": nn.Flatten,
    "identity": nn.Identity,
    "nhwc_to_nchw": NhwcToNchw,
    "globalavgpool2d": lambda: nn.AdaptiveAvgPool2d(1),
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
    builder = _BUILDERS.get(kind)
    if builder is None or len(args) not in builder.arity:
        raise ConfigError(f"unknown layer spec {spec!r}; known: {', '.join(b.usage for b in _BUILDERS.values())}, "
                          + ", ".join(_ACTIVATIONS))
    return builder.build(spec, args)


def _sizes(spec: str, fields: list[str], minimum: int = 1) -> list[int]:
    try:
        values = [int(f) for f in fields]
    except ValueError:
        raise ConfigError(f"bad layer spec {spec!r}: sizes must be integers") from None
    if any(v < minimum for v in values):
        raise ConfigError(f"bad layer spec {spec!r}: sizes must be >= {minimum}")
    return values


def _bias_flag(spec: str, args: list[str], position: int) -> bool:
    if len(args) > position and args[position] != "nobias":
        raise ConfigError(f"bad layer spec {spec!r}: the last field may only be 'nobias'")
    return len(args) == position


def _linear(spec: str, args: list[str]) -> nn.Module:
    n_in, n_out = _sizes(spec, args[:2])
    return nn.Linear(n_in, n_out, bias=_bias_flag(spec, args, 2))


def _conv2d(spec: str, args: list[str]) -> nn.Module:
    n_in, n_out, kh, kw, sh, sw = _sizes(spec, args[:6])
    ph, pw = _sizes(spec, args[6:8], minimum=0)
    return nn.Conv2d(n_in, n_out, (kh, kw), (sh, sw), (ph, pw), bias=_bias_flag(spec, args, 8))


def _batchnorm(module: type[nn.Module]) -> Callable[[str, list[str]], nn.Module]:
    def build(spec: str, args: list[str]) -> nn.Module:
        (channels,) = _sizes(spec, args[:1])
        try:
            eps = float(args[1])
        except ValueError:
            raise ConfigError(f"bad layer spec {spec!r}: epsilon must be a number") from None
        if not 0 < eps < 1:
            raise ConfigError(f"bad layer spec {spec!r}: epsilon must be in (0, 1)")
        return module(channels, eps=eps)
    return build


def _pool(module: type[nn.Module]) -> Callable[[str, list[str]], nn.Module]:
    def build(spec: str, args: list[str]) -> nn.Module:
        kh, kw, sh, sw = _sizes(spec, args)
        return module((kh, kw), (sh, sw))
    return build


@dataclasses.dataclass(frozen=True)
class _Builder:
    usage: str
    arity: tuple[int, ...]
    build: Callable[[str, list[str]], nn.Module]


_BUILDERS = {
    "linear": _Builder("linear:IN:OUT[:nobias]", (2, 3), _linear),
    "conv2d": _Builder("conv2d:IN:OUT:KH:KW:SH:SW:PH:PW[:nobias]", (8, 9), _conv2d),
    "batchnorm1d": _Builder("batchnorm1d:C:EPS", (2,), _batchnorm(nn.BatchNorm1d)),
    "batchnorm2d": _Builder("batchnorm2d:C:EPS", (2,), _batchnorm(nn.BatchNorm2d)),
    "maxpool2d": _Builder("maxpool2d:KH:KW:SH:SW", (4,), _pool(nn.MaxPool2d)),
    "avgpool2d": _Builder("avgpool2d:KH:KW:SH:SW", (4,), _pool(nn.AvgPool2d)),
}


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
