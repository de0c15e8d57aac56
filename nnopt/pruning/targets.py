"""Which weights pruning touches: the weight matrices of Linear, convolution, recurrent, attention
and embedding layers; never biases or norms.

A target is ``(name, weight)``: ``name`` is the layer's name for its ``weight`` (``"fc1"``), or
``layer.parameter`` for the other weight matrices of a layer (``"lstm.weight_hh_l0"``,
``"attn.in_proj_weight"``). By default every such layer except the final classifier (the last one
in module order, whose outputs are the model's outputs); explicit patterns may select it too.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from nnopt.errors import SelectionError, UnsupportedModelError
from nnopt.select import select_layers

_RECURRENT = (nn.LSTM, nn.GRU, nn.RNN)
PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.Embedding,
    *_RECURRENT, nn.MultiheadAttention,
)

Target = tuple[str, torch.Tensor]


def weight_names(module: nn.Module) -> tuple[str, ...]:
    """The parameter names of ``module``'s prunable weight matrices ("" if none): ``weight`` for
    Linear/conv/embedding layers, every ``weight_ih_l*``/``weight_hh_l*`` of a recurrent layer, the
    packed (or separate) input projections of an ``nn.MultiheadAttention`` (its ``out_proj`` is a
    Linear layer of its own)."""
    if isinstance(module, _RECURRENT):
        return tuple(n for n in module._flat_weights_names if n.startswith("weight_"))
    if isinstance(module, nn.MultiheadAttention):
        if module.in_proj_weight is not None:
            return ("in_proj_weight",)
        return ("q_proj_weight", "k_proj_weight", "v_proj_weight")
    if isinstance(module, PRUNABLE_TYPES) and isinstance(getattr(module, "weight", None), nn.Parameter):
        return ("weight",)
    return ()


def prune_targets(model: nn.Module, patterns: Sequence[str] = ()) -> list[Target]:
    """``(name, weight)`` pairs to prune; an error when nothing prunable is selected."""
    if patterns:
        chosen = select_layers(model, patterns)
    else:
        if not any(isinstance(m, PRUNABLE_TYPES) for m in model.modules()):
            raise UnsupportedModelError(
                f"{type(model).__name__} has no float Linear, convolution, recurrent, attention or embedding "
                "layer to prune (quantized and sparse-kernel layers cannot be pruned: prune before quantizing)"
            )
        chosen = select_layers(model, (), default_types=PRUNABLE_TYPES)[:-1]
        if not chosen:
            raise SelectionError(
                "the model's only prunable layer is its final classifier, which is left alone by default; "
                "select it explicitly (layers=...) to prune it"
            )
    targets: list[Target] = []
    for name, module in chosen:
        names = weight_names(module)
        if not names:
            raise UnsupportedModelError(
                f"layer {name!r} ({type(module).__name__}) has no float weight to prune; pruning works on "
                "Linear, convolution, recurrent, attention and embedding layers, before quantizing"
            )
        targets += [(name if p == "weight" else f"{name}.{p}", getattr(module, p)) for p in names]
    return targets


def target_weight(model: nn.Module, name: str) -> torch.Tensor:
    """The weight a target name stands for in ``model`` (the layer's ``weight``, or the named parameter)."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        return model.get_parameter(name)
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise UnsupportedModelError(f"layer {name!r} ({type(module).__name__}) has no weight")
    return weight


def layer_stats(targets: Sequence[Target]) -> dict[str, object]:
    """Per-weight and overall sparsity of the selected weights, for the pass record."""
    layers = {}
    for name, weight in targets:
        zeros = int((weight == 0).sum())
        layers[name] = {"numel": weight.numel(), "zeros": zeros, "sparsity": zeros / weight.numel()}
    total = sum(v["numel"] for v in layers.values())
    zeros = sum(v["zeros"] for v in layers.values())
    return {"layers": layers, "sparsity": zeros / total if total else 0.0}
