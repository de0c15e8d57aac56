"""What a model is and what was done to it, carried with the model and saved beside its weights.

A saved model is rebuilt from this record without executing stored code: the architecture is
created by name from its config, then each applied pass re-creates the module structure it
produced (for example quantized layers) before the weights are loaded.

A module nnopt did not create (the user's own ``nn.Module``) gets the architecture
:data:`USER_MODULE` when a verb first works on it: its config records, as data, the import path
of its class (``package.module:QualName``) and how to rebuild it (a factory path and JSON
keyword arguments); :mod:`nnopt.models.user_module` rebuilds it only when the caller allows.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from torch import nn

from nnopt.errors import ModelFormatError

_ATTR = "_nnopt_lineage"
# The architecture name of a user's own nn.Module (no registered architecture may take it).
USER_MODULE = "user-module"


@dataclasses.dataclass
class AppliedPass:
    """One optimization applied to a model: its registered name, config and what it touched."""

    name: str
    config: dict[str, Any]
    details: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "config": self.config, "details": self.details}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AppliedPass:
        if (not isinstance(data, dict) or not isinstance(data.get("config"), dict)
                or not isinstance(data.get("details", {}), dict) or not isinstance(data.get("name"), str)):
            raise ModelFormatError(f"malformed applied-pass record {str(data)[:200]}: needs a name, and "
                                   "config and details that are mappings")
        return cls(name=data["name"], config=dict(data["config"]), details=dict(data.get("details", {})))


@dataclasses.dataclass
class Lineage:
    """Architecture name, its config, and the passes applied in order."""

    architecture: str
    config: dict[str, Any]
    applied: list[AppliedPass] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "architecture": self.architecture,
            "config": self.config,
            "applied": [p.to_dict() for p in self.applied],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Lineage:
        if not isinstance(data.get("config"), dict):
            raise ModelFormatError("malformed model record: 'config' must be a mapping")
        try:
            return cls(
                architecture=str(data["architecture"]),
                config=dict(data["config"]),
                applied=[AppliedPass.from_dict(p) for p in data.get("applied", [])],
            )
        except (KeyError, TypeError) as exc:
            raise ModelFormatError(f"malformed model record: missing or bad {exc}") from None


def get_lineage(model: nn.Module) -> Lineage:
    """The lineage nnopt attached to ``model``; an error for models nnopt did not create."""
    lineage: Lineage | None = getattr(model, _ATTR, None)
    if lineage is None:
        raise ModelFormatError(
            f"{type(model).__name__} was not created by nnopt; build it with "
            "nnopt.models.create_model(...) or an adapter such as nnopt.models.from_keras(...)"
        )
    return lineage


def has_lineage(model: nn.Module) -> bool:
    return getattr(model, _ATTR, None) is not None


def set_lineage(model: nn.Module, lineage: Lineage) -> None:
    # A plain attribute: nn.Module keeps non-tensor attributes out of the state dict.
    object.__setattr__(model, _ATTR, lineage)


def with_pass(model: nn.Module, applied: AppliedPass) -> None:
    """Record ``applied`` on ``model`` (a copy nnopt owns)."""
    lineage = copy.deepcopy(get_lineage(model))
    lineage.applied.append(applied)
    set_lineage(model, lineage)


def note_input(model: nn.Module, x: Any) -> None:
    """Remember one sample's shape and dtype in a user module's record (when it has none yet), so that
    profiles, energy estimates and timings of it and of its reloads know what it takes."""
    import torch

    lineage = getattr(model, _ATTR, None)
    if lineage is None or lineage.architecture != USER_MODULE or "input_shape" in lineage.config:
        return
    if isinstance(x, torch.Tensor) and x.ndim >= 1:
        lineage = copy.deepcopy(lineage)
        lineage.config.update(input_shape=list(x.shape[1:]), input_dtype=str(x.dtype).removeprefix("torch."))
        set_lineage(model, lineage)


def recorded_input(model: nn.Module) -> tuple[tuple[int, ...], str] | None:
    """The sample shape and dtype name a user module's record remembers (see :func:`note_input`)."""
    lineage = getattr(model, _ATTR, None)
    if lineage is None:
        return None
    shape = lineage.config.get("input_shape")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d > 0 for d in shape)):
        return None
    return tuple(shape), str(lineage.config.get("input_dtype", "float32"))


def class_path(cls: type) -> str:
    """``package.module:QualName`` of ``cls``: what a user-module record names (data, never code)."""
    return f"{cls.__module__}:{cls.__qualname__}"


def user_module_lineage(model: nn.Module) -> Lineage:
    """A fresh lineage for the user's own ``model``: its class's import path as the way to rebuild it.

    A class defined in ``__main__`` or inside a function cannot be imported by a later process: its
    record keeps the class path but no factory, so that loading asks for one explicitly.
    """
    path = class_path(type(model))
    factory = path if unimportable_reason(path) is None else None
    return Lineage(architecture=USER_MODULE, config={"class": path, "factory": factory, "kwargs": {}})


def unimportable_reason(path: str) -> str | None:
    """Why ``module:qualname`` cannot be imported by another process (None when it may be)."""
    module, _, qualname = path.partition(":")
    if module == "__main__" or module.startswith("__main__."):
        return "it is defined in __main__ (the script that ran), which another process cannot import"
    if "<locals>" in qualname.split("."):
        return "it is defined inside a function (<locals>), which cannot be imported"
    if any(part.startswith("__") for part in (*module.split("."), *qualname.split("."))):
        return "its module or name is a dunder name, which nnopt never imports"
    return None
