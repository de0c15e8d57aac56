"""Architectures by name: each has a config class and a builder. Duplicate names are an error.

The user's own modules are not registered: their records (architecture ``user-module``) are rebuilt
by :mod:`nnopt.models.user_module`, with the caller's factory or, when allowed, an import.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from torch import nn

from nnopt.config import Config
from nnopt.errors import ConfigError
from nnopt.lineage import USER_MODULE, Lineage, set_lineage


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
    if name in _ARCHITECTURES or name == USER_MODULE:
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


def build_from_lineage(
    lineage: Lineage, factory: Callable[..., Any] | None = None, trust_import: bool = False
) -> nn.Module:
    """Re-create the untrained module structure that a lineage's architecture describes.

    ``factory`` and ``trust_import`` apply to user modules only (see :mod:`nnopt.models.user_module`).
    """
    return architecture_builder(lineage, factory, trust_import)()


def architecture_builder(
    lineage: Lineage, factory: Callable[..., Any] | None = None, trust_import: bool = False
) -> Callable[[], nn.Module]:
    """A zero-argument builder of :func:`build_from_lineage`'s module; everything that could refuse
    (an unknown name, a bad config, an import not allowed) is checked now, before anything is built."""
    if lineage.architecture == USER_MODULE:
        from nnopt.models.user_module import user_builder

        make = user_builder(lineage.config, factory, trust_import)
        config = dict(lineage.config)

        def build_user() -> nn.Module:
            model = make()
            set_lineage(model, Lineage(architecture=USER_MODULE, config=config))
            return model

        return build_user
    if factory is not None:
        raise ConfigError(f"factory applies to user modules; {lineage.architecture!r} is an nnopt architecture, "
                          "rebuilt by name")
    arch = _lookup(lineage.architecture)
    cfg = arch.config_cls.from_dict(lineage.config, where=f"architecture {lineage.architecture!r}")

    def build() -> nn.Module:
        model = arch.build(cfg)
        set_lineage(model, Lineage(architecture=lineage.architecture, config=cfg.to_dict()))
        return model

    return build


def _lookup(name: str) -> Architecture:
    _ensure_builtin()
    if name not in _ARCHITECTURES:
        known = ", ".join(sorted(_ARCHITECTURES))
        raise ConfigError(f"unknown architecture {name!r}; known: {known}")
    return _ARCHITECTURES[name]


def _ensure_builtin() -> None:
    # Importing the modules registers the built-in architectures exactly once.
    from nnopt.models import hf_encoder, imagenet_cnns, mlp, resnet, sequential  # noqa: F401
