"""One way to pick layers: exact names, ``re:`` patterns and ``type:`` module types.

A pattern list like ``("fc1", "re:^blocks\\.0\\.", "type:Conv2d")`` selects the union of what
each entry matches. An empty list means the caller's default types. Matching nothing is an
error, because a silent no-op is the worst outcome of a typo.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from torch import nn

from nnopt.errors import SelectionError

TYPE_PREFIX = "type:"
REGEX_PREFIX = "re:"


def select_layers(
    model: nn.Module,
    patterns: Sequence[str] = (),
    default_types: Iterable[type[nn.Module]] = (),
) -> list[tuple[str, nn.Module]]:
    """Return ``(name, module)`` pairs in model order for every module the patterns match."""
    named = [(name, module) for name, module in model.named_modules() if name]
    if not patterns:
        wanted = tuple(default_types)
        chosen = [(n, m) for n, m in named if isinstance(m, wanted)]
        if not chosen:
            names = ", ".join(t.__name__ for t in wanted) or "(none)"
            raise SelectionError(f"the model has no layers of type {names}")
        return chosen
    chosen_names: set[str] = set()
    for pattern in patterns:
        hits = [n for n, m in named if _matches(pattern, n, m)]
        if not hits:
            raise SelectionError(
                f"layer pattern {pattern!r} matches no layer; layers are: "
                + ", ".join(n for n, _ in named[:30])
            )
        chosen_names.update(hits)
    return [(n, m) for n, m in named if n in chosen_names]


def _matches(pattern: str, name: str, module: nn.Module) -> bool:
    if pattern.startswith(TYPE_PREFIX):
        return type(module).__name__ == pattern[len(TYPE_PREFIX) :]
    if pattern.startswith(REGEX_PREFIX):
        return re.search(pattern[len(REGEX_PREFIX) :], name) is not None
    return name == pattern


def validate_patterns(patterns: Sequence[str]) -> None:
    """Fail early on a pattern that cannot compile, before any work starts."""
    from nnopt.errors import ConfigError

    for pattern in patterns:
        if pattern.startswith(REGEX_PREFIX):
            try:
                re.compile(pattern[len(REGEX_PREFIX) :])
            except re.error as exc:
                raise ConfigError(f"bad layer pattern {pattern!r}: {exc}") from None
        elif not pattern:
            raise ConfigError("empty layer pattern")


def replace_layer(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` where the layer called ``name`` (dotted path) is now."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
