"""Which config type runs which quantization pass. Each technique module registers itself here.

Kept apart from ``nnopt.quantization.__init__`` so technique modules can register at import time
without a circular import.
"""

from __future__ import annotations

from nnopt.passes import Apply, Replay, register_pass

QUANTIZERS: dict[type, tuple[str, Apply]] = {}


def register_quantizer(config_type: type, pass_name: str, apply: Apply, replay: Replay | None) -> None:
    """Make ``quantize(model, config_type(...))`` run ``apply(model, config, **context)``.

    ``context`` holds ``data``, ``eval_data`` and ``progress``; ``replay`` re-creates the
    structure on load (None when the pass changes values only). Duplicates are an error.
    """
    if config_type in QUANTIZERS:
        raise ValueError(f"{config_type.__name__} is already registered")
    QUANTIZERS[config_type] = (pass_name, apply)
    register_pass(pass_name, replay)

