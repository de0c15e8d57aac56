"""What a model is and what was done to it, carried with the model and saved beside its weights.

A saved model is rebuilt from this record without executing stored code: the architecture is
created by name from its config, then each applied pass re-creates the module structure it
produced (for example quantized layers) before the weights are loaded.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from torch import nn

from nnopt.errors import ModelFormatError

_ATTR = "_nnopt_lineage"


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
