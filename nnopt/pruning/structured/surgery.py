"""Cutting channels out of layers: the physical removal, its masked twin, and its replay on load.

:func:`remove_channels` builds smaller dense layers (new ``nn.Linear``/``nn.ConvNd``/
``nn.ConvTransposeNd``/``BatchNorm`` modules holding only the kept rows and columns; a depthwise
convolution loses the removed channels on both sides and as many groups), so the result runs on
ordinary dense kernels.
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
from nnopt.pruning.structured.groups import (
    CONV_LAYERS,
    NORM_LAYERS,
    PRUNABLE_LAYERS,
    TRANSPOSED_CONV_LAYERS,
    ChannelGroup,
    is_depthwise,
    weight_dim,
)
from nnopt.select import replace_layer


def removed_positions(
    groups: list[ChannelGroup], removed: dict[str, torch.Tensor]
) -> dict[str, dict[str, torch.Tensor]]:
    """Per module, per member role: the indices that go (along that role's dimension)."""
    found: dict[str, dict[str, list[torch.Tensor]]] = defaultdict(lambda: defaultdict(list))
    for group in groups:
        channels = removed.get(group.name)
        if channels is None or channels.numel() == 0:
            continue
        for member in group.members:
            found[member.module][member.role].append(member.positions(channels))
    return {name: {role: torch.unique(torch.cat(parts)) for role, parts in roles.items()}
            for name, roles in found.items()}


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
    for name, roles in removed_positions(groups, removed).items():
        module = model.get_submodule(name)
        if isinstance(module, NORM_LAYERS):
            keep = _keep(module.num_features, roles.get("norm"))
            replace_layer(model, name, _sliced_norm(module, keep))
            shapes[name] = {"type": type(module).__name__, "features": int(keep.numel())}
            continue
        keep_out, keep_in = _kept_channels(name, module, roles)
        new = _sliced_layer(module, keep_out, keep_in)
        replace_layer(model, name, new)
        shapes[name] = {"type": type(module).__name__, "out": int(keep_out.numel()), "in": int(keep_in.numel())}
        if getattr(new, "groups", 1) != 1:
            shapes[name]["groups"] = int(new.groups)
    for group in groups:
        channels = removed.get(group.name)
        if group.kind == "head" and channels is not None and channels.numel():
            attention = model.get_submodule(group.members[0].module.rsplit(".", 1)[0])
            if not hasattr(attention, "attention_head_size"):
                continue  # not BERT: transformer_blocks.sync_heads sets the counts from the new widths
            _set_heads(attention, group.size - int(channels.numel()))
            shapes[group.name] = {"type": "heads", "heads": int(attention.num_attention_heads)}
    return shapes


def _channel_counts(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    return module.out_channels, module.in_channels


def _kept_channels(name: str, module: nn.Module, roles: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(output channels, input channels) that stay, in the module's own numbering."""
    out, inp = _channel_counts(module)
    if "depthwise" in roles:
        if not is_depthwise(module) or set(roles) != {"depthwise"}:
            raise ModelFormatError(f"structured pruning found {name} both depthwise and not")
        factor = out // inp
        gone_in = torch.unique(roles["depthwise"] // factor)
        keep_in = _keep(inp, gone_in)
        keep_out = (keep_in[:, None] * factor + torch.arange(factor)[None, :]).flatten()
        if keep_out.numel() != out - roles["depthwise"].numel():  # a multiplier's outputs go together
            raise ModelFormatError(f"structured pruning would split the outputs of one channel of {name}")
    else:
        keep_out, keep_in = _keep(out, roles.get("out")), _keep(inp, roles.get("in"))
    if keep_out.numel() == 0 or keep_in.numel() == 0:
        raise ValueError(f"structured pruning would remove every channel of {name}")
    return keep_out, keep_in


def mask_channels(model: nn.Module, groups: list[ChannelGroup], removed: dict[str, torch.Tensor]) -> None:
    """Zero the same channels in place (rows, biases, norm entries and input columns)."""
    with torch.no_grad():
        for name, roles in removed_positions(groups, removed).items():
            module = model.get_submodule(name)
            for role, gone in roles.items():
                if isinstance(module, NORM_LAYERS):
                    if module.affine:
                        module.weight[gone] = 0.0
                        module.bias[gone] = 0.0
                    continue
                module.weight.index_fill_(weight_dim(module, role), gone, 0.0)
                if role in ("out", "depthwise") and module.bias is not None:
                    module.bias[gone] = 0.0


def _sliced_layer(module: nn.Module, keep_out: torch.Tensor, keep_in: torch.Tensor) -> nn.Module:
    weight = module.weight.detach().index_select(weight_dim(module, "out"), keep_out)
    groups = keep_in.numel() if is_depthwise(module) else 1
    if not is_depthwise(module):  # a depthwise weight holds one input channel per row
        weight = weight.index_select(weight_dim(module, "in"), keep_in)
    bias = None if module.bias is None else module.bias.detach()[keep_out]
    new = _resized_layer(module, int(keep_out.numel()), int(keep_in.numel()), int(groups))
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    new.train(module.training)
    return new


def _resized_layer(module: nn.Module, out: int, inp: int, groups: int = 1) -> nn.Module:
    kwargs = {"device": module.weight.device, "dtype": module.weight.dtype}
    bias = module.bias is not None
    if type(module) is nn.Linear:
        return nn.Linear(inp, out, bias=bias, **kwargs)
    if type(module) in CONV_LAYERS:
        return type(module)(inp, out, module.kernel_size, module.stride, module.padding, module.dilation, groups,
                            bias, module.padding_mode, **kwargs)
    if type(module) in TRANSPOSED_CONV_LAYERS and groups == 1:
        return type(module)(inp, out, module.kernel_size, module.stride, module.padding, module.output_padding,
                            groups, bias, module.dilation, module.padding_mode, **kwargs)
    raise ModelFormatError(f"structured pruning cannot resize a {type(module).__name__} (groups={groups})")


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
    # on the old norm's device and dtype (a weightless "meta" copy stays on "meta": MAC-target trials)
    like = module.weight if module.affine else module.running_mean
    kwargs = {} if like is None else {"device": like.device, "dtype": like.dtype}
    return type(module)(
        features, eps=module.eps, momentum=module.momentum, affine=module.affine,
        track_running_stats=module.track_running_stats, **kwargs,
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
            if type(module) in NORM_LAYERS and type(module).__name__ == kind:
                replace_layer(model, name, _resized_norm(module, int(shape["features"])))
            elif type(module) in PRUNABLE_LAYERS and type(module).__name__ == kind:
                groups = int(shape.get("groups", 1))
                replace_layer(model, name, _resized_layer(module, int(shape["out"]), int(shape["in"]), groups))
            else:
                raise ModelFormatError(f"recorded pruned layer {name!r} is a {type(module).__name__}, not {kind}")
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise ModelFormatError(f"bad structured-pruning record for {name!r}: {exc}") from None
