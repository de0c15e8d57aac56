"""Which config type runs which simplification pass. Each technique module registers itself here.

Kept apart from ``nnopt.simplify.__init__`` so technique modules can register at import time
without a circular import.
"""

from __future__ import annotations

from nnopt.passes import Apply, Replay, register_pass

SIMPLIFIERS: dict[type, tuple[str, Apply]] = {}


def register_simplifier(config_type: type, pass_name: str, apply: Apply, replay: Replay | None) -> None:
    """Make ``simplify(model, config_type(...))`` run ``apply(model, config, data=...)``.

    ``replay`` re-creates the structure on load (None when the pass changes values only).
    Duplicates are an error.
    """
    if config_type in SIMPLIFIERS:
        raise ValueError(f"{config_type.__name__} is already registered")
    SIMPLIFIERS[config_type] = (pass_name, apply)
    register_pass(pass_name, replay)
