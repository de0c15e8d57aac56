"""The checks every quantization technique makes on a selected layer before it changes anything."""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch
from torch import nn

from nnopt.errors import UnsupportedModelError


def check_target(
    name: str,
    module: nn.Module,
    supported: Collection[type[nn.Module]],
    technique: str,
    already: Sequence[tuple[tuple[type[nn.Module], ...], str]] = (),
) -> None:
    """Refuse a layer that ``technique`` already transformed, cannot handle, or whose weights are not finite.

    ``already`` pairs layer types with how to name them (``((QuantizedLinear, ...), "quantized")``).
    """
    for types, done in already:
        if isinstance(module, types):
            raise UnsupportedModelError(f"layer {name!r} is already {done}")
    if type(module) not in supported:
        kinds = ", ".join(t.__name__ for t in supported)
        raise UnsupportedModelError(f"layer {name!r} is a {type(module).__name__}; {technique} supports {kinds}")
    if not bool(torch.isfinite(module.weight).all()):
        raise UnsupportedModelError(f"layer {name!r} has NaN or infinite weights; {technique} cannot take them")
