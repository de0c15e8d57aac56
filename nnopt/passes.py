"""Registry of optimization passes that a saved model may record, and how to replay structure.

Saving stores the weights as they are (for example int8 codes of a quantized layer); loading
builds the architecture, then asks each recorded pass to re-create the module structure it
produced, then loads the weights into it. Replays never compute anything from data.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any

from torch import nn

from nnopt.errors import ConfigError, ModelFormatError
from nnopt.lineage import AppliedPass, has_lineage, with_pass

Replay = Callable[[nn.Module, AppliedPass], None]


@dataclasses.dataclass(frozen=True)
class PassSpec:
    name: str
    replay: Replay | None  # None: the pass changes values only, never structure


_PASSES: dict[str, PassSpec] = {}


def register_pass(name: str, replay: Replay | None = None) -> None:
    if name in _PASSES:
        raise ValueError(f"pass {name!r} is already registered")
    _PASSES[name] = PassSpec(name, replay)


def replay_structure(model: nn.Module, applied: AppliedPass) -> None:
    _ensure_builtin()
    spec = _PASSES.get(applied.name)
    if spec is None:
        raise ModelFormatError(
            f"the model records pass {applied.name!r}, which this nnopt does not know; "
            f"known: {', '.join(sorted(_PASSES))}"
        )
    if spec.replay is not None:
        spec.replay(model, applied)


def working_copy(model: Any, inplace: bool = False) -> nn.Module:
    """The module a verb works on: the model itself, a deep copy, or a converted Keras model."""
    if _is_keras(model):
        if inplace:
            raise ConfigError("a Keras model is converted to an nnopt model, so inplace=True cannot apply")
        from nnopt.models import from_keras

        return from_keras(model)
    if not isinstance(model, nn.Module):
        raise ModelFormatError(f"expected a torch.nn.Module or a Keras model, got {type(model).__name__}")
    return model if inplace else copy.deepcopy(model)


def record(model: nn.Module, name: str, config: dict[str, Any], details: dict[str, Any]) -> None:
    """Note a pass on an nnopt-created model; foreign modules are optimized but carry no record."""
    if has_lineage(model):
        with_pass(model, AppliedPass(name=name, config=config, details=details))


Apply = Callable[..., dict[str, Any]]  # (model, config, **context) -> details to record


def run_verb(
    verb: str, table: dict[type, tuple[str, Apply]], model: Any, config: Any, inplace: bool, **context: Any
) -> nn.Module:
    """Shared body of the verbs: find the config's implementation, run it, record the pass.

    ``context`` (data for passes that fine-tune, for example) goes to the implementation as is.
    """
    entry = table.get(type(config))
    if entry is None:
        known = ", ".join(c.__name__ for c in table)
        raise ConfigError(f"{type(config).__name__} is not a {verb} config; known: {known}")
    name, apply = entry
    target = working_copy(model, inplace)
    details = apply(target, config, **context)
    record(target, name, config.to_dict(), details)
    return target


def _is_keras(model: Any) -> bool:
    return any(cls.__module__.split(".")[0] == "keras" for cls in type(model).__mro__)


def _ensure_builtin() -> None:
    import nnopt.pruning  # noqa: F401
    import nnopt.quantization  # noqa: F401
    import nnopt.simplify  # noqa: F401
    import nnopt.sparse  # noqa: F401
