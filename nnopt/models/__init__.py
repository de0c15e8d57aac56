"""Reference models by name, and adapters for models from other frameworks."""

from __future__ import annotations

from typing import Any

from nnopt.models.registry import architectures, build_from_lineage, create_model, register_architecture

__all__ = ["architectures", "build_from_lineage", "create_model", "from_keras", "register_architecture"]


def from_keras(model: Any, sample: Any = None) -> Any:
    """Convert a Keras 3 model (torch backend) into an equivalent nnopt model. Imports Keras lazily."""
    from nnopt.models.keras_adapter import from_keras as convert

    return convert(model, sample=sample)
