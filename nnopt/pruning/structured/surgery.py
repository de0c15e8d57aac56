"""Cutting channels out of layers: the physical removal, its masked twin, and its replay on load.

:func:`remove_channels` builds smaller dense layers (new ``nn.Linear``/``nn.Conv2d``/``BatchNorm``
modules holding only the kept rows and columns), so the result runs on ordinary dense kernels.
:func:`mask_channels` zeroes the same channels in place instead; the two give the same outputs,
which is what the equality tests check. :func:`resize_layers` re-creates the recorded shapes on
load, before the weights are read.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch import nn

from nnopt.errors import ModelFormatError
from nnopt.pruning.structured.groups import NORM_LAYERS, ChannelGroup
from nnopt.select import replace_layer

_DIMS = {"out": 0, "in": 1, "norm": 0}


def _positions(
    groups: list[ChannelGroup], removed: dict[str, torch.Tensor]
) -> dict[str, dict[int, torch.Tensor]]:
    """Per module, per weight dimension: the indices that go."""
    found: dict[str, dict[int, list[torch.Tensor]]] = defaultdict(lambda: defaultdict(list))
    for group in groups:
        channels = removed.get(group.name)
        if channels is None or channels.numel() == 0:
            continue
        for member in group.members:
            found[member.module][_DIMS[member.role]].append(member.positions(channels))
    return {name: {dim: torch.unique(torch.cat(parts)) for dim, parts in dims.items()} for name, dims in found.items()}


def _keep(size: int, gone: torch.Tensor | None) -> torch.Tensor:
    keep = torch.ones(size, dtype=torch.bool)
    if gone is not None:
        keep[gone] = False
    return keep.nonzero().flatten()


def remove_channels(
    model: nn.Module, groups: list[ChannelGroup], removed: dict[str, torch.Tensor]
) -> dict[str, dict[str, Any]]:
    """Remove ``removed[group.name]`` (group channel indices) from ``model`` in place.

    Returns the new shape of every layer it changed, for the saved record.
    """
    shapes: dict[str, dict[str, Any]] = {}
    for name, dims in _positions(groups, removed).items():
        module = model.get_submodule(name)
        if isinstance(module, NORM_LAYERS):
            keep = _keep(module.num_features, dims.get(0))
            replace_layer(model, name, _sliced_norm(module, keep))
            shapes[name] = {"type": type(module).__name__, "features": int(keep.numel())}
            continue
        keep_out = _keep(module.weight.shape[0], dims.get(0))
        keep_in = _keep(module.weight.shape[1], dims.get(1))
        if keep_out.numel() == 0 or keep_in.numel() == 0:
            raise ValueError(f"structured pruning would remove every channel of {name}")
        replace_layer(model, name, _sliced_layer(module, keep_out, keep_in))
        shapes[name] = {"type": type(module).__name__, "out": int(keep_out.numel()), "in": int(keep_in.numel())}
    for group in groups:
        channels = removed.get(group.name)
        if group.kind == "head" and channels is not None and channels.numel():
            attention = model.get_submodule(group.members[0].module.rsplit(".", 1)[0])
            _set_heads(attention, group.size - int(channels.numel()))
            shapes[group.name] = {"type": "heads", "heads": int(attention.num_attention_heads)}
    return shapes


def mask_channels(model: nn.Module, groups: list[ChannelGroup], removed: dict[str, torch.Tensor]) -> None:
    """Zero the same channels in place (rows, biases, norm entries and input columns)."""
    with torch.no_grad():
        for name, dims in _positions(groups, removed).items():
            module = model.get_submodule(name)
            for dim, gone in dims.items():
                if isinstance(module, NORM_LAYERS):
                    if module.affine:
                        module.weight[gone] = 0.0
                        module.bias[gone] = 0.0
                    continue
                module.weight.index_fill_(dim, gone, 0.0)
                if dim == 0 and module.bias is not None:
                    module.bias[gone] = 0.0


def _sliced_layer(module: nn.Module, keep_out: torch.Tensor, keep_in: torch.Tensor) -> nn.Module:
    weight = module.weight.detach().index_select(0, keep_out).index_select(1, keep_in)
    bias = None if module.bias is None else module.bias.detach()[keep_out]
    new = _resized_layer(module, int(keep_out.numel()), int(keep_in.numel()))
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    new.train(module.training)
    return new


def _resized_layer(module: nn.Module, out: int, inp: int) -> nn.Module:
    kwargs = {"device": module.weight.device, "dtype": module.weight.dtype}
    if type(module) is nn.Linear:
        return nn.Linear(inp, out, bias=module.bias is not None, **kwargs)
    if type(module) is nn.Conv2d:
        return nn.Conv2d(
            inp, out, module.kernel_size, module.stride, module.padding, module.dilation, module.groups,
            module.bias is not None, module.padding_mode, **kwargs,
        )
    raise ModelFormatError(f"structured pruning cannot resize a {type(module).__name__}")


def _sliced_norm(module: nn.Module, keep: torch.Tensor) -> nn.Module:
    new = _resized_norm(module, int(keep.numel()))
    with torch.no_grad():
        for attr in ("weight", "bias", "running_mean", "running_var"):
            value = getattr(module, attr)
            if value is not None:
                getattr(new, attr).copy_(value.detach()[keep])
        if module.num_batches_tracked is not None:
            new.num_batches_tracked.copy_(module.num_batches_tracked)
    new.train(module.training)
    return new


def _resized_norm(module: nn.Module, features: int) -> nn.Module:
    return type(module)(
        features, eps=module.eps, momentum=module.momentum, affine=module.affine,
        track_running_stats=module.track_running_stats,
    )


def _set_heads(attention: nn.Module, heads: int) -> None:
    attention.num_attention_heads = heads
    attention.all_head_size = heads * int(attention.attention_head_size)


def resize_layers(model: nn.Module, shapes: dict[str, dict[str, Any]]) -> None:
    """Re-create recorded shapes on a freshly built model (values come from the saved weights)."""
    for name, shape in shapes.items():
        kind = shape.get("type")
        try:
            if kind == "heads":
                _set_heads(model.get_submodule(name.rsplit(".", 1)[0] + ".self"), int(shape["heads"]))
                continue
            module = model.get_submodule(name)
            if kind in ("BatchNorm1d", "BatchNorm2d") and type(module).__name__ == kind:
                replace_layer(model, name, _resized_norm(module, int(shape["features"])))
            elif kind in ("Linear", "Conv2d") and type(module).__name__ == kind:
                replace_layer(model, name, _resized_layer(module, int(shape["out"]), int(shape["in"])))
            else:
                raise ModelFormatError(f"recorded pruned layer {name!r} is a {type(module).__name__}, not {kind}")
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise ModelFormatError(f"bad structured-pruning record for {name!r}: {exc}") from None
