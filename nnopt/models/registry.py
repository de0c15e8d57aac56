"""Architectures by name: each has a config class and a builder. Duplicate names are an error."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from torch import nn

from nnopt.config import Config
from nnopt.errors import ConfigError
from nnopt.lineage import Lineage, set_lineage


@dataclasses.dataclass(frozen=True)
class Architecture:
    name: str
    config_cls: type[Config]
    build: Callable[[Any], nn.Module]
    defaults: dict[str, Any]
    summary: str


_ARCHITECTURES: dict[str, Architecture] = {}


def register_architecture(
    name: str,
    config_cls: type[Config],
    build: Callable[[Any], nn.Module],
    summary: str,
    **defaults: Any,
) -> None:
    """Add an architecture; ``defaults`` override the config class's own defaults for this name."""
    if name in _ARCHITECTURES:
        raise ValueError(f"architecture {name!r} is already registered")
    _ARCHITECTURES[name] = Architecture(name, config_cls, build, dict(defaults), summary)


def architectures() -> dict[str, str]:
    """Registered names with a one-line summary each."""
    _ensure_builtin()
    return {name: arch.summary for name, arch in sorted(_ARCHITECTURES.items())}


def create_model(name: str, **config: Any) -> nn.Module:
    """Create a registered architecture by name, e.g. ``create_model("simplenet")``.

    >>> model = create_model("simplenet", seed=0)
    >>> model(torch.zeros(2, 64)).shape
    torch.Size([2, 10])
    """
    arch = _lookup(name)
    cfg = arch.config_cls.from_dict({**arch.defaults, **config}, where=f"architecture {name!r}")
    model = arch.build(cfg)
    set_lineage(model, Lineage(architecture=name, config=cfg.to_dict()))
    return model


def build_from_lineage(lineage: Lineage) -> nn.Module:
    """Re-create the untrained module structure that a lineage's architecture describes."""
    arch = _lookup(lineage.architecture)
    cfg = arch.config_cls.from_dict(lineage.config, where=f"architecture {lineage.architecture!r}")
    model = arch.build(cfg)
    set_lineage(model, Lineage(architecture=lineage.architecture, config=cfg.to_dict()))
    return model


def _lookup(name: str) -> Architecture:
    _ensure_builtin()
    if name not in _ARCHITECTURES:
        known = ", ".join(sorted(_ARCHITECTURES))
        raise ConfigError(f"unknown architecture {name!r}; known: {known}")
    return _ARCHITECTURES[name]


def _ensure_builtin() -> None:
    # Importing the modules registers the built-in architectures exactly once.
    from nnopt.models import hf_encoder, mlp, resnet, sequential  # noqa: F401
