"""Which weights pruning touches: Linear and Conv2d weights, never biases or norms.

By default every such layer except the final classifier (the last one in module order, whose
outputs are the model's outputs); explicit patterns may select the classifier too.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from nnopt.errors import SelectionError, UnsupportedModelError
from nnopt.select import select_layers

PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)


def prune_targets(model: nn.Module, patterns: Sequence[str] = ()) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` pairs to prune; an error when nothing prunable is selected."""
    if patterns:
        chosen = select_layers(model, patterns)
    else:
        if not any(isinstance(m, PRUNABLE_TYPES) for m in model.modules()):
            raise UnsupportedModelError(
                f"{type(model).__name__} has no float Linear or Conv2d layer to prune "
                "(quantized and sparse-kernel layers cannot be pruned: prune before quantizing)"
            )
        chosen = select_layers(model, (), default_types=PRUNABLE_TYPES)[:-1]
        if not chosen:
            raise SelectionError(
                "the model's only prunable layer is its final classifier, which is left alone by default; "
                "select it explicitly (layers=...) to prune it"
            )
    for name, module in chosen:
        weight = getattr(module, "weight", None)
        if not isinstance(module, PRUNABLE_TYPES) or not isinstance(weight, torch.Tensor):
            raise UnsupportedModelError(
                f"layer {name!r} ({type(module).__name__}) has no float weight to prune; "
                "pruning works on Linear and Conv2d layers, before quantizing"
            )
    return chosen


def layer_stats(targets: Sequence[tuple[str, nn.Module]]) -> dict[str, object]:
    """Per-layer and overall sparsity of the selected weights, for the pass record."""
    layers = {}
    for name, module in targets:
        weight = module.weight
        zeros = int((weight == 0).sum())
        layers[name] = {"numel": weight.numel(), "zeros": zeros, "sparsity": zeros / weight.numel()}
    total = sum(v["numel"] for v in layers.values())
    zeros = sum(v["zeros"] for v in layers.values())
    return {"layers": layers, "sparsity": zeros / total if total else 0.0}
