"""Which layers a quantization technique changes, and the checks it makes on each before it changes anything.

With no layer patterns every weighted layer of the model is considered: those the technique covers become
targets, the others stay as they are with the reason recorded in the pass details (``skipped``), never
silently. A layer inside one already considered (``nn.MultiheadAttention``'s ``out_proj``) belongs to it.
Named layers (patterns) that the technique cannot take are refused with an error instead.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence

import torch
from torch import nn

from nnopt.errors import SelectionError, UnsupportedModelError
from nnopt.select import select_layers

# Layer types that hold weights a quantization technique could reach; found by default, then covered or skipped.
WEIGHTED_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.Embedding, nn.EmbeddingBag, nn.RNN, nn.LSTM, nn.GRU, nn.MultiheadAttention,
)
Already = Sequence[tuple[type[nn.Module] | tuple[type[nn.Module], ...], str]]
Targets = list[tuple[str, nn.Module]]


def check_target(
    name: str,
    module: nn.Module,
    supported: Collection[type[nn.Module]],
    technique: str,
    already: Already = (),
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
    if not all(bool(torch.isfinite(p).all()) for p in module.parameters()):
        raise UnsupportedModelError(f"layer {name!r} has NaN or infinite weights; {technique} cannot take them")


def choose_targets(
    model: nn.Module,
    patterns: Sequence[str],
    supported: Collection[type[nn.Module]],
    technique: str,
    already: Already = (),
    reasons: Mapping[type[nn.Module], str] | None = None,
    refuse: Callable[[nn.Module], str | None] | None = None,
) -> tuple[Targets, dict[str, str]]:
    """The layers ``technique`` transforms, and (default selection only) those it leaves, with why.

    ``reasons`` names why a layer type is not covered (else: "``technique`` does not cover T");
    ``refuse(module)`` returns why one layer of a covered type cannot be taken (a padding mode, ...), or None.
    Raises when nothing is left to transform, naming what was skipped.
    """
    reasons = reasons or {}
    if patterns:
        targets = select_layers(model, patterns)
        for name, module in targets:
            check_target(name, module, supported, technique, already)
            why = refuse(module) if refuse is not None else None
            if why:
                raise UnsupportedModelError(f"layer {name!r}: {why}")
        return targets, {}
    done_types = tuple(t for types, _ in already for t in (types if isinstance(types, tuple) else (types,)))
    wanted = (*WEIGHTED_TYPES, *supported, *done_types)
    chosen: Targets = []
    skipped: dict[str, str] = {}
    owners: list[str] = []  # every layer considered: what lies inside one belongs to it
    for name, module in model.named_modules():
        if not name or not isinstance(module, wanted) or any(name.startswith(o + ".") for o in owners):
            continue
        owners.append(name)
        if type(module) in supported:
            check_target(name, module, supported, technique, already)
            why = refuse(module) if refuse is not None else None
            if why:
                skipped[name] = why
            else:
                chosen.append((name, module))
            continue
        for types, done in already:
            if isinstance(module, types):
                raise UnsupportedModelError(f"layer {name!r} is already {done}")
        skipped[name] = reasons.get(type(module)) or _default_reason(module, technique)
    if not chosen:
        if skipped:
            shown = "; ".join(f"{n}: {why}" for n, why in list(skipped.items())[:4])
            raise UnsupportedModelError(f"{technique} finds no layer it can take here ({shown})")
        kinds = ", ".join(t.__name__ for t in supported)
        raise SelectionError(f"the model has no layers of type {kinds}")
    return chosen, skipped


def _default_reason(module: nn.Module, technique: str) -> str:
    name = type(module).__name__
    base = next((t for t in WEIGHTED_TYPES if isinstance(module, t)), None)
    if base is not None and base is not type(module):
        return f"{technique} does not cover {name} (a subclass of {base.__name__} whose forward it cannot know)"
    return f"{technique} does not cover {name}"
