"""Channel groups of any traceable model: a torch.fx graph with shapes, one channel dim per tensor.

Every tensor that carries prunable channels has a *layout*: the dimension its channels are on (dim 1
after a convolution or BatchNorm, the last dim after a Linear, e.g. tokens (n, T, d)) and the channel
spaces it is made of (one per concatenated piece). Each node either keeps the layout (element-wise
activations, pooling over the other dims, broadcast products), moves the dim in a way that keeps
channel c whole (flatten/reshape that only merges or splits other dims, indexing other dims), makes a
new space (a layer's output channels, registering the old space's input columns), couples spaces
(addition, squeeze-and-excitation, depthwise convolutions), or — anything else — freezes the spaces it
touches with its reason. Never silently wrong: an operation is understood or it freezes.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nnopt.errors import UnsupportedModelError
from nnopt.pruning.structured.groups import (
    CONV_LAYERS,
    NORM_LAYERS,
    PRUNABLE_LAYERS,
    TRANSPOSED_CONV_LAYERS,
    ChannelGroup,
    Member,
    is_depthwise,
)

# Modules that act on each value independently (any layout).
_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh, nn.Sigmoid, nn.Hardsigmoid,
    nn.Hardswish, nn.Hardtanh, nn.ELU, nn.SELU, nn.CELU, nn.Softplus, nn.Softsign, nn.LogSigmoid,
    nn.Tanhshrink, nn.Hardshrink, nn.Softshrink, nn.Threshold, nn.Dropout, nn.AlphaDropout, nn.Identity,
)
# Modules that act on the trailing N dims only (pooling, padding, resizing): channels must lie before them.
_SPATIAL_MODULES: dict[type, int] = {
    getattr(nn, f"{kind}{n}d"): n
    for kind in ("MaxPool", "AvgPool", "AdaptiveAvgPool", "AdaptiveMaxPool", "LPPool", "ZeroPad", "ConstantPad",
                 "ReflectionPad", "ReplicationPad", "CircularPad", "Dropout")
    for n in (1, 2, 3) if hasattr(nn, f"{kind}{n}d")
}
_SPATIAL_MODULES.update({nn.UpsamplingNearest2d: 2, nn.UpsamplingBilinear2d: 2, nn.Upsample: -2})  # -2: all but 2
_ELEMENTWISE_FUNCTIONS = {
    torch.relu, F.relu, F.relu6, F.gelu, F.silu, F.mish, F.hardsigmoid, F.hardswish, F.hardtanh, F.leaky_relu,
    F.elu, F.selu, F.celu, F.softplus, F.softsign, F.logsigmoid, F.tanhshrink, F.hardshrink, F.softshrink,
    F.threshold, torch.sigmoid, torch.tanh, torch.exp, torch.abs, torch.neg, torch.sqrt, torch.square,
    torch.clamp, torch.clip, F.dropout, F.alpha_dropout, F.dropout1d, F.dropout2d, F.dropout3d,
    operator.add, operator.iadd, torch.add, operator.sub, operator.isub, torch.sub, operator.mul,
    operator.imul, torch.mul, operator.truediv, torch.div, operator.neg, torch.maximum, torch.minimum,
}
_ELEMENTWISE_METHODS = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "abs", "neg", "sqrt", "square", "clamp",
    "clamp_", "clip", "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "contiguous", "clone",
    "detach", "float", "double", "half", "bfloat16", "to",
}
_SPATIAL_FUNCTIONS: dict[Any, int] = {
    F.max_pool1d: 1, F.avg_pool1d: 1, F.adaptive_avg_pool1d: 1, F.adaptive_max_pool1d: 1,
    F.max_pool2d: 2, F.avg_pool2d: 2, F.adaptive_avg_pool2d: 2, F.adaptive_max_pool2d: 2,
    F.max_pool3d: 3, F.avg_pool3d: 3, F.adaptive_avg_pool3d: 3, F.adaptive_max_pool3d: 3,
    F.interpolate: -2,
}
_RESHAPES = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze}
_RESHAPE_METHODS = {"flatten", "reshape", "view", "squeeze", "unsqueeze"}
_REDUCTIONS = {torch.mean, torch.sum, torch.amax, torch.amin}
_REDUCTION_METHODS = {"mean", "sum", "amax", "amin"}
_SOFTMAX = {F.softmax, F.log_softmax, F.softmin, torch.softmax, torch.log_softmax}
_SOFTMAX_METHODS = {"softmax", "log_softmax"}
_NOT_UNDERSTOOD = "is not understood by the channel analysis"
# Named reasons for layers whose channels the analysis deliberately does not follow.
_REFUSED: dict[type, str] = {
    nn.RNNBase: "recurrent layer {kind} {name} (its gates mix the channels)",
    nn.RNNCellBase: "recurrent cell {kind} {name} (its gates mix the channels)",
    nn.Embedding: "Embedding {name} (a lookup table's columns are not followed)",
    nn.EmbeddingBag: "EmbeddingBag {name} (a lookup table's columns are not followed)",
    nn.MultiheadAttention: "MultiheadAttention {name} (attention mixes the channels)",
    nn.GroupNorm: "GroupNorm {name} normalizes across groups of channels",
    nn.LocalResponseNorm: "LocalResponseNorm {name} normalizes across neighbouring channels",
}


@dataclasses.dataclass(frozen=True)
class _Segment:
    space: int  # a channel space: the output channels of one layer (or the input, or an unknown op)
    length: int
    inner: int = 1


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Where a tensor's tracked channels are: dimension ``dim``, made of ``segments`` in order."""

    segments: tuple[_Segment, ...]
    dim: int

    @property
    def width(self) -> int:
        """Positions the channels take along ``dim``."""
        return sum(s.length * s.inner for s in self.segments)

    def at(self, dim: int) -> _Layout:
        return _Layout(self.segments, dim)

    def spread(self, factor: int) -> _Layout:
        """The same channels, each over ``factor`` times as many positions (flatten, depthwise multiplier)."""
        return _Layout(tuple(_Segment(s.space, s.length, s.inner * factor) for s in self.segments), self.dim)


class _Spaces:
    """Union-find over channel spaces, with members and freeze reasons per space."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.names: list[str] = []
        self.members: list[list[Member]] = []
        self.frozen: list[str] = []

    def new(self, size: int, name: str, frozen: str = "") -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        self.names.append(name)
        self.members.append([])
        self.frozen.append(frozen)
        return len(self.parent) - 1

    def find(self, space: int) -> int:
        while self.parent[space] != space:
            self.parent[space] = self.parent[self.parent[space]]
            space = self.parent[space]
        return space

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra

    def freeze(self, space: int, reason: str) -> None:
        root = self.find(space)
        if not self.frozen[root]:
            self.frozen[root] = reason

    def groups(self) -> list[ChannelGroup]:
        roots: dict[int, ChannelGroup] = {}
        for space in range(len(self.parent)):
            root = self.find(space)
            group = roots.setdefault(root, ChannelGroup(self.names[root], self.size[root]))
            group.members.extend(self.members[space])
            if self.frozen[space] and not group.frozen:
                group.frozen = self.frozen[space]
            if self.size[space] != group.size and not group.frozen:
                group.frozen = f"coupled spaces of different sizes ({self.names[space]})"
        return list(roots.values())


def traced_groups(model: nn.Module, example: torch.Tensor) -> list[ChannelGroup]:
    """Channel groups of ``model`` found by tracing it with ``example`` (one input batch, any shape)."""
    from torch.fx import symbolic_trace
    from torch.fx.passes.shape_prop import ShapeProp

    try:
        graph_module = symbolic_trace(model)
    except Exception as exc:  # torch.fx raises many types; name the cause, not a deep traceback
        raise UnsupportedModelError(
            f"structured pruning could not trace {type(model).__name__}: {str(exc).splitlines()[0]}"
        ) from None
    was_training = model.training
    graph_module.eval()
    try:
        with torch.no_grad():
            ShapeProp(graph_module).propagate(example)
    except Exception as exc:  # the example does not fit the model: say so in one line
        raise UnsupportedModelError(
            f"structured pruning could not run {type(model).__name__} on an example of shape "
            f"{tuple(example.shape)}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from None
    finally:
        model.train(was_training)
    calls = collections.Counter(str(n.target) for n in graph_module.graph.nodes if n.op == "call_module")
    analysis = _Analysis(dict(graph_module.named_modules()), dict(calls))
    for node in graph_module.graph.nodes:
        analysis.layouts[node] = analysis.visit(node)
    return analysis.spaces.groups()


def _shape(node: Any) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if hasattr(node, "meta") else None
    return tuple(int(s) for s in meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _arg(node: Any, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


class _Analysis:
    """One pass over the graph in order: the layout of every node, and the spaces they use."""

    def __init__(self, modules: dict[str, nn.Module], calls: dict[str, int] | None = None) -> None:
        self.modules = modules
        self.calls = calls or {}  # call_module nodes per module: a layer called twice shares its weights
        self.spaces = _Spaces()
        self.layouts: dict[Any, _Layout | None] = {}

    # ------------------------------------------------------------------ helpers

    def layout(self, arg: Any) -> _Layout | None:
        return self.layouts.get(arg) if hasattr(arg, "op") else None

    def tracked(self, node: Any) -> list[_Layout]:
        return [layout for arg in node.all_input_nodes if (layout := self.layouts.get(arg)) is not None]

    def fresh(self, node: Any, frozen: str, dim: int = 1) -> _Layout | None:
        """A new space for the channels on ``dim`` of the node's output (None for non-tensors, 0-/1-D)."""
        shape = _shape(node)
        if shape is None or len(shape) < 2:
            return None
        dim %= len(shape)
        return _Layout((_Segment(self.spaces.new(shape[dim], node.name, frozen), shape[dim]),), dim)

    def freeze(self, layout: _Layout | None, reason: str) -> None:
        for segment in layout.segments if layout is not None else ():
            self.spaces.freeze(segment.space, reason)

    def members(self, layout: _Layout, module: str, role: str, factor: int = 1) -> None:
        offset = 0
        for segment in layout.segments:
            self.spaces.members[segment.space].append(Member(module, role, offset, segment.inner * factor))
            offset += segment.length * segment.inner * factor

    def unknown(self, node: Any, what: str, detail: str = _NOT_UNDERSTOOD) -> _Layout | None:
        """Freeze every tracked input; the output (if a tensor) is a new frozen space."""
        reason = f"{what} {detail}".rstrip()
        for layout in self.tracked(node):
            self.freeze(layout, reason)
        return self.fresh(node, reason)

    def operation(self, node: Any) -> str:
        label = getattr(node.target, "__name__", str(node.target))
        return f"operation {label} ({node.name})"

    # ------------------------------------------------------------------ dispatch

    def visit(self, node: Any) -> _Layout | None:
        if node.op == "placeholder":
            return self.fresh(node, "network input")
        if node.op == "output":
            for layout in self.tracked(node):
                self.freeze(layout, "network output")
            return None
        if node.op == "get_attr":
            return None  # a parameter or buffer: element-wise ops check what it touches
        if node.op == "call_module":
            return self.module(node, self.modules[node.target])
        return self.function(node)

    def module(self, node: Any, module: nn.Module) -> _Layout | None:
        x = self.layout(node.args[0]) if node.args else None
        name, kind = node.target, type(module).__name__
        if self.calls.get(name, 1) > 1 and (type(module) in PRUNABLE_LAYERS or type(module) in NORM_LAYERS):
            # one weight serves several places: its channels would have to match in all of them
            return self.unknown(node, f"{kind} {name} is called more than once (shared weights)", "")
        if type(module) in PRUNABLE_LAYERS:
            return self.layer(node, module, x)
        if type(module) in NORM_LAYERS:
            if x is not None and x.dim != 1:
                self.freeze(x, f"{kind} {name} normalizes dim 1, not the channels (dim {x.dim})")
            elif x is not None:
                self.members(x, name, "norm")
            return x
        if isinstance(module, nn.LayerNorm):
            return self.normalized(node, x, len(module.normalized_shape), f"LayerNorm {name}")
        if isinstance(module, _ELEMENTWISE_MODULES) or (isinstance(module, nn.PReLU) and module.num_parameters == 1):
            return self.elementwise(node)
        if type(module) in _SPATIAL_MODULES:
            return self.spatial(node, x, _SPATIAL_MODULES[type(module)], f"{kind} {name}")
        if isinstance(module, nn.Softmax | nn.LogSoftmax | nn.Softmin):
            return self.along(node, x, module.dim, f"{kind} {name}")
        if isinstance(module, nn.Flatten | nn.Unflatten):
            return self.reshaped(node, x, f"{kind} {name}")
        for refused, reason in _REFUSED.items():
            if isinstance(module, refused):
                return self.unknown(node, reason.format(kind=kind, name=name), "")
        return self.unknown(node, f"{kind} {name}")

    def function(self, node: Any) -> _Layout | None:
        target, method = node.target, node.op == "call_method"
        x = self.layout(node.args[0]) if node.args else None
        if (not method and target in _ELEMENTWISE_FUNCTIONS) or (method and target in _ELEMENTWISE_METHODS):
            return self.elementwise(node)
        if method and target == "type_as":
            return x
        if not method and target in _SPATIAL_FUNCTIONS:
            return self.spatial(node, x, _SPATIAL_FUNCTIONS[target], self.operation(node))
        if not method and target is F.pad:
            return self.spatial(node, x, len(_arg(node, 1, "pad", ())) // 2, self.operation(node))
        if (not method and target in _RESHAPES) or (method and target in _RESHAPE_METHODS):
            return self.reshaped(node, x, self.operation(node))
        if (not method and target in _REDUCTIONS) or (method and target in _REDUCTION_METHODS):
            return self.reduced(node, x)
        if (not method and target in _SOFTMAX) or (method and target in _SOFTMAX_METHODS):
            return self.along(node, x, _arg(node, 1, "dim"), self.operation(node))
        if (method and target in ("transpose", "swapaxes", "swapdims", "permute")) or (
            not method and target in (torch.transpose, torch.swapaxes, torch.swapdims, torch.permute)
        ):
            return self.permuted(node, x)
        if not method and target in (torch.cat, torch.concat, torch.concatenate):
            return self.concat(node)
        if not method and target is operator.getitem:
            return self.indexed(node, x) if self.tracked(node) else None
        if (method and target in ("size", "dim")) or (not method and target is getattr and _shape(node) is None):
            return None  # sizes and other non-tensor attributes
        return self.unknown(node, self.operation(node))

    # ------------------------------------------------------------------ layers

    def layer(self, node: Any, module: Any, x: _Layout | None) -> _Layout | None:
        """Linear (channels on the last dim, any rank) or (transposed) convolution (channels before
        the kernel's dims): its input channels join the input's spaces, its output channels are new."""
        name, kind = node.target, type(module).__name__
        in_shape = _shape(node.args[0]) if node.args else None
        if in_shape is None:
            return self.unknown(node, f"{kind} {name}")
        rank = len(in_shape)
        spatial = 0 if isinstance(module, nn.Linear) else len(module.kernel_size)
        dim = rank - spatial - 1
        if not isinstance(module, nn.Linear) and (rank - spatial) not in (1, 2):
            return self.unknown(node, f"{kind} {name} on a {rank}-D input")
        if isinstance(module, CONV_LAYERS + TRANSPOSED_CONV_LAYERS) and module.groups > 1:
            if is_depthwise(module):
                return self.depthwise(node, module, x, dim)
            return self.unknown(node, f"grouped convolution {name} (groups={module.groups})", "")
        if x is not None and x.dim != dim:
            self.freeze(x, f"{kind} {name} reads dim {dim - rank} but the channels are on dim {x.dim}")
        elif x is not None and x.width != in_shape[dim]:  # never expected: refuse rather than guess
            self.freeze(x, f"{kind} {name} reads {in_shape[dim]} channels, the analysis counted {x.width}")
        elif x is not None:
            self.members(x, name, "in")
        out = module.weight.shape[1 if type(module) in TRANSPOSED_CONV_LAYERS else 0]
        space = self.spaces.new(int(out), name)
        self.spaces.members[space].append(Member(name, "out"))
        return _Layout((_Segment(space, int(out)),), dim)

    def depthwise(self, node: Any, module: Any, x: _Layout | None, dim: int) -> _Layout | None:
        """Channel c in → channels c·k … c·k+k−1 out (k the multiplier): the same space flows through."""
        if x is None or x.dim != dim:
            return self.unknown(node, f"depthwise convolution {node.target} on channels the analysis does not follow",
                                "")
        factor = module.out_channels // module.in_channels
        self.members(x, node.target, "depthwise", factor)
        return x.spread(factor)

    def normalized(self, node: Any, x: _Layout | None, trailing: int, what: str) -> _Layout | None:
        """A norm over the trailing dims: across the channels if they are among them (frozen)."""
        shape = _shape(node)
        if x is not None and shape is not None and x.dim >= len(shape) - trailing:
            self.freeze(x, f"{what} normalizes across the channels")
        return x

    # ------------------------------------------------------------------ element-wise, broadcasts, concatenation

    def elementwise(self, node: Any) -> _Layout | None:
        """Operands broadcast against each other: tracked channels on the same output dim are one
        space (residual sums, squeeze-and-excitation gates); an operand broadcast over that dim
        (size 1) leaves it alone; a parameter or untracked tensor with one entry per channel freezes it."""
        out_shape = _shape(node)
        if out_shape is None:
            return self.unknown(node, self.operation(node))
        rank = len(out_shape)
        main: list[_Layout] = []
        untracked = []
        for arg in node.all_input_nodes:
            shape, layout = _shape(arg), self.layouts.get(arg)
            if shape is None:
                continue  # a Python number computed in the graph
            offset = rank - len(shape)
            if layout is None:
                untracked.append((arg, shape, offset))
            elif shape[layout.dim] == 1 and out_shape[layout.dim + offset] != 1:
                self.freeze(layout, f"{self.operation(node)} broadcasts it over channels")
            else:
                main.append(layout.at(layout.dim + offset))
        if not main:
            return None if not self.tracked(node) else self.fresh(node, f"{self.operation(node)} (broadcast)")
        first = main[0]
        if any(layout.dim != first.dim for layout in main):
            return self.unknown(node, f"element-wise {node.name} of tensors with channels on different dims", "")
        for arg, shape, offset in untracked:
            at = first.dim - offset
            if at >= 0 and shape[at] != 1:
                what = f"the parameter {arg.target}" if arg.op == "get_attr" else f"the untracked tensor {arg.name}"
                for layout in main:
                    self.freeze(layout, f"element-wise {node.name} with {what} (one entry per channel)")
        for other in main[1:]:
            if [(s.length, s.inner) for s in other.segments] != [(s.length, s.inner) for s in first.segments]:
                return self.unknown(node, f"element-wise {node.name} of differently split channels", "")
            for a, b in zip(first.segments, other.segments, strict=True):
                self.spaces.union(a.space, b.space)
        return first

    def concat(self, node: Any) -> _Layout | None:
        pieces = node.args[0] if node.args else node.kwargs.get("tensors", ())
        dim, shape = _arg(node, 1, "dim", 0), _shape(node)
        layouts = [self.layout(piece) for piece in pieces]
        if shape is None or not isinstance(dim, int):
            return self.unknown(node, f"concatenation {node.name}")
        dim %= len(shape)
        if any(layout is None for layout in layouts) or len({lay.dim for lay in layouts if lay is not None}) != 1:
            return self.unknown(node, f"concatenation {node.name} of untracked or differently laid out tensors", "")
        known = [lay for lay in layouts if lay is not None]
        if known[0].dim == dim:
            return _Layout(tuple(s for layout in known for s in layout.segments), dim)
        # along another dim (e.g. tokens): every piece has the same channels in the same places
        for other in known[1:]:
            if [(s.length, s.inner) for s in other.segments] != [(s.length, s.inner) for s in known[0].segments]:
                return self.unknown(node, f"concatenation {node.name} of differently split channels", "")
            for a, b in zip(known[0].segments, other.segments, strict=True):
                self.spaces.union(a.space, b.space)
        return known[0]

    # ------------------------------------------------------------------ shape changes

    def spatial(self, node: Any, x: _Layout | None, trailing: int, what: str) -> _Layout | None:
        """Pooling, padding, resizing: they act on the last ``trailing`` dims (negative: all but that many)."""
        shape = _shape(node)
        if x is None:
            return None if not self.tracked(node) else self.unknown(node, what)
        if shape is None or len(shape) != len(_shape(node.args[0]) or ()):
            return self.unknown(node, what)
        first_spatial = -trailing if trailing < 0 else len(shape) - trailing
        if x.dim >= first_spatial:
            return self.unknown(node, what, "acts on the channel dim")
        return x

    def along(self, node: Any, x: _Layout | None, dim: Any, what: str) -> _Layout | None:
        """Softmax-like: values along ``dim`` depend on each other."""
        shape = _shape(node)
        if x is None:
            return None if not self.tracked(node) else self.unknown(node, what)
        if shape is None or not isinstance(dim, int) or dim % len(shape) == x.dim:
            return self.unknown(node, what, "normalizes across the channels")
        return x

    def reshaped(self, node: Any, x: _Layout | None, what: str) -> _Layout | None:
        """flatten/reshape/view/squeeze/unsqueeze: follow the channel dim when only other dims are merged
        or split, or when the channels become the outer part of a merged dim (each channel a block)."""
        if x is None:
            return None if not self.tracked(node) else self.unknown(node, what)
        in_shape, out_shape = _shape(node.args[0]), _shape(node)
        if in_shape is None or out_shape is None:
            return self.unknown(node, what)
        before, channels = math.prod(in_shape[: x.dim]), in_shape[x.dim]
        if channels != x.width:
            return self.unknown(node, what)
        seen = 1
        for j, size in enumerate(out_shape):
            if seen == before:
                factor, k = 1, x.dim + 1
                while size >= channels * factor:
                    if size == channels * factor:
                        return x.spread(factor).at(j)
                    if k >= len(in_shape):
                        break
                    factor, k = factor * in_shape[k], k + 1
            seen *= size
            if seen > before:
                break
        return self.unknown(node, what, f"{_NOT_UNDERSTOOD}: it splits or moves the channels")

    def reduced(self, node: Any, x: _Layout | None) -> _Layout | None:
        """mean/sum/amax over dims other than the channels' (global pooling written by hand)."""
        in_shape, shape = _shape(node.args[0]) if node.args else None, _shape(node)
        dims, keep = _arg(node, 1, "dim"), _arg(node, 2, "keepdim", False)
        if x is None:
            return None if not self.tracked(node) else self.unknown(node, self.operation(node))
        if in_shape is None or shape is None or dims is None:
            return self.unknown(node, self.operation(node), "reduces across the channels")
        dims = {d % len(in_shape) for d in (dims if isinstance(dims, list | tuple) else (dims,))}
        if x.dim in dims:
            return self.unknown(node, self.operation(node), "reduces across the channels")
        return x if keep else x.at(x.dim - sum(d < x.dim for d in dims))

    def permuted(self, node: Any, x: _Layout | None) -> _Layout | None:
        """transpose/permute of other dims keeps the channels; one that moves them freezes them."""
        shape = _shape(node)
        if x is None:
            return None if not self.tracked(node) else self.unknown(node, self.operation(node))
        if shape is None:
            return self.unknown(node, self.operation(node))
        rank = len(shape)
        if node.target in ("permute", torch.permute):
            order = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], list | tuple) else node.args[1:]
            order = [d % rank for d in order] if all(isinstance(d, int) for d in order) else []
            stays = len(order) == rank and order[x.dim] == x.dim
        else:
            a, b = (_arg(node, 1, "dim0"), _arg(node, 2, "dim1"))
            stays = isinstance(a, int) and isinstance(b, int) and (a % rank == b % rank or x.dim not in
                                                                    (a % rank, b % rank))
        if stays:
            return x
        return self.unknown(node, self.operation(node), f"{_NOT_UNDERSTOOD}: it moves the channel dim")

    def indexed(self, node: Any, x: _Layout | None) -> _Layout | None:
        """x[...] with ints, full or partial slices, None and Ellipsis: channels kept whole or frozen."""
        in_shape = _shape(node.args[0])
        if x is None or in_shape is None or _shape(node) is None:
            return self.unknown(node, self.operation(node))
        index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        plain = (i is None or i is Ellipsis or isinstance(i, slice) or type(i) is int for i in index)
        if not all(plain) or sum(i is Ellipsis for i in index) > 1:
            return self.unknown(node, self.operation(node), "(indexing with tensors) is not understood")
        if Ellipsis not in index:
            index = (*index, Ellipsis)
        used = sum(i is not None and i is not Ellipsis for i in index)
        expanded: list[Any] = []
        for i in index:
            expanded += [slice(None)] * (len(in_shape) - used) if i is Ellipsis else [i]
        out_dim = in_dim = 0
        for i in expanded:
            if i is None:
                out_dim += 1
                continue
            if in_dim == x.dim:
                if i == slice(None):
                    return x.at(out_dim)
                return self.unknown(node, self.operation(node), "selects some of the channels")
            in_dim += 1
            out_dim += 0 if isinstance(i, int) else 1
        return self.unknown(node, self.operation(node))
