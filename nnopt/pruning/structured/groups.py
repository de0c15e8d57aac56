"""Coupled channel groups: which output channels, input columns and norm entries must go together.

Removing output channel c of a Linear/Conv2d also removes column c (or, after a flatten, the
block of columns c·HW … (c+1)·HW) of every layer that reads it, entry c of every BatchNorm on the
way, and — through a residual addition — channel c of the other branch. A *group* is one such
coupled set; each of its ``size`` channels can be removed as a whole.

Two analyses produce groups:
- :func:`traced_groups`: a torch.fx trace with shapes, for models built from Linear, Conv2d,
  BatchNorm, element-wise activations, pooling, flatten, addition and concatenation. Anything it
  cannot follow freezes the channels involved (never silently wrong), with the reason recorded.
- :func:`encoder_groups`: attention heads (query/key/value rows with the output projection's
  columns) and FFN neurons of BERT-family encoders, whose Python control flow torch.fx cannot trace.

The network's input and output channels are always frozen; so is anything normalized across
channels (LayerNorm, softmax over channels), where removing one channel changes the others.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any

import torch
from torch import nn

from nnopt.errors import UnsupportedModelError

PRUNABLE_LAYERS = (nn.Linear, nn.Conv2d)
NORM_LAYERS = (nn.BatchNorm1d, nn.BatchNorm2d)
# Modules that act on each channel independently and keep channel positions.
_PASSTHROUGH_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.ELU, nn.Hardswish,
    nn.Dropout, nn.Identity, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
)
_PASSTHROUGH_FUNCTIONS = {
    torch.relu, torch.nn.functional.relu, torch.nn.functional.gelu, torch.sigmoid, torch.tanh,
    torch.nn.functional.dropout, torch.nn.functional.max_pool2d, torch.nn.functional.avg_pool2d,
    torch.nn.functional.adaptive_avg_pool2d, torch.nn.functional.silu,
}
_PASSTHROUGH_METHODS = {"relu", "sigmoid", "tanh", "contiguous", "clone", "detach"}
_ELEMENTWISE = {operator.add, operator.iadd, torch.add, operator.sub, torch.sub, operator.mul, torch.mul}
_ELEMENTWISE_METHODS = {"add", "add_", "sub", "mul"}


@dataclasses.dataclass(frozen=True)
class Member:
    """One place a group's channels live.

    ``role``: "out" (rows of a Linear/Conv2d weight and its bias), "in" (input columns of a
    Linear/Conv2d) or "norm" (entries of a BatchNorm). Channel c of the group is position
    ``offset + c`` of that dimension, or positions ``offset + c·inner … offset + (c+1)·inner − 1``
    when a flatten spread each channel over ``inner`` features. For attention heads, ``inner`` is
    the head size.
    """

    module: str
    role: str
    offset: int = 0
    inner: int = 1

    def positions(self, channels: torch.Tensor) -> torch.Tensor:
        """Indices along the member's dimension of the given group channels (1-D int64)."""
        span = torch.arange(self.inner)
        return (self.offset + channels[:, None] * self.inner + span[None, :]).flatten()


@dataclasses.dataclass
class ChannelGroup:
    """``size`` channels that are removed together; ``frozen`` says why they cannot be."""

    name: str
    size: int
    members: list[Member] = dataclasses.field(default_factory=list)
    frozen: str = ""
    kind: str = "channel"  # "channel", "head" or "neuron" (FFN)

    @property
    def prunable(self) -> bool:
        return not self.frozen and any(m.role == "out" for m in self.members)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "size": self.size, "kind": self.kind, "frozen": self.frozen,
            "members": [dataclasses.asdict(m) for m in self.members],
        }


# --------------------------------------------------------------------------- torch.fx analysis


@dataclasses.dataclass(frozen=True)
class _Segment:
    space: int  # a channel space: the output channels of one layer (or the input, or an unknown op)
    length: int
    inner: int = 1


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
    """Channel groups of ``model`` found by tracing it with ``example`` (one input batch)."""
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
    with torch.no_grad():
        ShapeProp(graph_module).propagate(example)
    model.train(was_training)
    modules = dict(graph_module.named_modules())
    spaces = _Spaces()
    layouts: dict[Any, list[_Segment] | None] = {}
    for node in graph_module.graph.nodes:
        layouts[node] = _visit(node, modules, spaces, layouts)
    return spaces.groups()


def _shape(node: Any) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if hasattr(node, "meta") else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _fresh(node: Any, spaces: _Spaces, frozen: str) -> list[_Segment] | None:
    shape = _shape(node)
    if shape is None or len(shape) < 2:
        return None
    return [_Segment(spaces.new(shape[1], node.name, frozen), shape[1])]


def _freeze_all(layout: list[_Segment] | None, spaces: _Spaces, reason: str) -> None:
    for segment in layout or []:
        spaces.freeze(segment.space, reason)


def _tensor_args(node: Any, layouts: dict[Any, Any]) -> list[list[_Segment]]:
    from torch.fx import Node

    found = []
    for arg in node.all_input_nodes:
        if isinstance(arg, Node) and layouts.get(arg) is not None:
            found.append(layouts[arg])
    return found


def _members(layout: list[_Segment], spaces: _Spaces, module: str, role: str) -> None:
    offset = 0
    for segment in layout:
        spaces.members[segment.space].append(Member(module, role, offset, segment.inner))
        offset += segment.length * segment.inner


def _visit(node: Any, modules: dict[str, nn.Module], spaces: _Spaces, layouts: dict[Any, Any]) -> Any:
    inputs = _tensor_args(node, layouts)
    first = inputs[0] if inputs else None
    if node.op == "placeholder":
        return _fresh(node, spaces, "network input")
    if node.op == "output":
        for layout in inputs:
            _freeze_all(layout, spaces, "network output")
        return None
    if node.op == "get_attr":
        return None
    if node.op == "call_module":
        module = modules[node.target]
        if isinstance(module, PRUNABLE_LAYERS) and type(module) in PRUNABLE_LAYERS:
            reason = _layer_refusal(node, module)
            if reason:  # channels are not on dim 1 (a Linear on a feature map) or are mixed in groups
                _freeze_all(first, spaces, reason)
                return _fresh(node, spaces, reason)
            if first is not None:
                _members(first, spaces, node.target, "in")
            space = spaces.new(module.weight.shape[0], node.target)
            spaces.members[space].append(Member(node.target, "out"))
            return [_Segment(space, module.weight.shape[0])]
        if isinstance(module, NORM_LAYERS) and type(module) in NORM_LAYERS and first is not None:
            _members(first, spaces, node.target, "norm")
            return first
        if isinstance(module, _PASSTHROUGH_MODULES):
            return first
        if isinstance(module, nn.Flatten):
            return _flatten(node, first, spaces, module.start_dim, module.end_dim)
        return _unknown(node, inputs, spaces, f"{type(module).__name__} {node.target}")
    target = node.target
    if node.op == "call_function" and target in _PASSTHROUGH_FUNCTIONS:
        return first
    if node.op == "call_method" and target in _PASSTHROUGH_METHODS:
        return first
    if (node.op == "call_function" and target in _ELEMENTWISE) or (
        node.op == "call_method" and target in _ELEMENTWISE_METHODS
    ):
        return _elementwise(node, inputs, spaces)
    if node.op == "call_function" and target is torch.cat:
        return _concat(node, inputs, spaces)
    if (node.op == "call_function" and target is torch.flatten) or (node.op == "call_method" and target == "flatten"):
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
        return _flatten(node, first, spaces, start, end)
    if node.op == "call_method" and target in ("size", "dim") or target in (getattr, operator.getitem) and not inputs:
        return None
    if node.op == "call_method" and target in ("reshape", "view") and first is not None:
        in_shape, out_shape = _shape(node.all_input_nodes[0]), _shape(node)
        if (in_shape is not None and out_shape is not None and len(out_shape) == 2 and len(in_shape) == 4
                and out_shape[0] == in_shape[0]):
            return _flatten(node, first, spaces, 1, -1)
        if in_shape == out_shape:
            return first
    label = getattr(target, "__name__", str(target))
    return _unknown(node, inputs, spaces, f"operation {label} ({node.name})")


def _layer_refusal(node: Any, module: nn.Module) -> str:
    """Why a Linear/Conv2d's channels cannot be followed ("" when they can)."""
    shape = _shape(node.all_input_nodes[0]) if node.all_input_nodes else None
    wanted = 2 if isinstance(module, nn.Linear) else 4
    if shape is None or len(shape) != wanted:
        return f"{type(module).__name__} {node.target} on a {len(shape) if shape else '?'}-D input"
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        return f"grouped convolution {node.target}"
    return ""


def _unknown(node: Any, inputs: list[list[_Segment]], spaces: _Spaces, what: str) -> Any:
    reason = f"{what} is not understood by the channel analysis"
    for layout in inputs:
        _freeze_all(layout, spaces, reason)
    return _fresh(node, spaces, reason)


def _elementwise(node: Any, inputs: list[list[_Segment]], spaces: _Spaces) -> Any:
    untracked = [arg for arg in node.all_input_nodes if _shape(arg) and math.prod(_shape(arg)) > 1]
    if len(untracked) > len(inputs):  # a parameter or buffer tensor: it has one entry per channel
        return _unknown(node, inputs, spaces, f"element-wise {node.name} with a parameter tensor")
    if len(inputs) == 1:  # with a scalar: channels keep their places
        return inputs[0]
    first = inputs[0]
    shapes = [_shape(arg) for arg in node.all_input_nodes]
    if len({s for s in shapes if s is not None}) != 1:  # broadcasting across channels couples them
        return _unknown(node, inputs, spaces, f"broadcast {node.name}")
    for other in inputs[1:]:
        if [(s.length, s.inner) for s in other] != [(s.length, s.inner) for s in first]:
            return _unknown(node, inputs, spaces, f"element-wise {node.name} of differently split channels")
        for a, b in zip(first, other):
            spaces.union(a.space, b.space)
    return first


def _concat(node: Any, inputs: list[list[_Segment]], spaces: _Spaces) -> Any:
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    shape = _shape(node)
    if shape is None or dim not in (1, 1 - len(shape)) or len(inputs) != len(node.args[0]):
        return _unknown(node, inputs, spaces, f"concatenation {node.name} along dim {dim}")
    return [segment for layout in inputs for segment in layout]


def _flatten(node: Any, layout: Any, spaces: _Spaces, start: int, end: int) -> Any:
    in_shape = _shape(node.all_input_nodes[0]) if node.all_input_nodes else None
    if layout is None or in_shape is None:
        return layout
    end = end % len(in_shape)
    if start != 1 or end != len(in_shape) - 1:
        return _unknown(node, [layout], spaces, f"flatten {node.name} from dim {start}")
    inner = 1
    for size in in_shape[2:]:
        inner *= int(size)
    return [_Segment(s.space, s.length, s.inner * inner) for s in layout]


# --------------------------------------------------------------------------- BERT-family encoders


def is_bert_encoder(model: nn.Module) -> bool:
    return any(_attention_parts(m) is not None for m in model.modules())


def _attention_parts(module: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(self-attention, output block) of a BertAttention-like module, else None."""
    inner, output = getattr(module, "self", None), getattr(module, "output", None)
    if not isinstance(inner, nn.Module) or not isinstance(output, nn.Module):
        return None
    if not all(isinstance(getattr(inner, p, None), nn.Linear) for p in ("query", "key", "value")):
        return None
    if not isinstance(getattr(output, "dense", None), nn.Linear) or not hasattr(inner, "attention_head_size"):
        return None
    return inner, output


def encoder_groups(model: nn.Module) -> list[ChannelGroup]:
    """Attention heads and FFN neurons of every BERT-family layer in ``model``.

    Heads: rows head·d … (head+1)·d − 1 of query, key and value, and the same columns of the
    attention output projection (d = head size). FFN: rows of the intermediate Linear and the
    columns of the output Linear that reads it. The hidden size (residual stream, normalized by
    LayerNorm) is frozen.
    """
    groups = []
    for name, module in model.named_modules():
        parts = _attention_parts(module)
        prefix = f"{name}." if name else ""
        if parts is not None:
            inner, _ = parts
            d = int(inner.attention_head_size)
            heads = inner.query.out_features // d
            members = [Member(f"{prefix}self.{p}", "out", 0, d) for p in ("query", "key", "value")]
            members.append(Member(f"{prefix}output.dense", "in", 0, d))
            groups.append(ChannelGroup(f"{name}.heads", heads, members, kind="head"))
        intermediate = getattr(module, "intermediate", None)
        output = getattr(module, "output", None)
        if isinstance(getattr(intermediate, "dense", None), nn.Linear) and isinstance(
            getattr(output, "dense", None), nn.Linear
        ) and _attention_parts(getattr(module, "attention", nn.Module())) is not None:
            size = intermediate.dense.out_features
            members = [Member(f"{prefix}intermediate.dense", "out"), Member(f"{prefix}output.dense", "in")]
            groups.append(ChannelGroup(f"{name}.ffn", size, members, kind="neuron"))
    return groups


def channel_groups(model: nn.Module, example: Any) -> list[ChannelGroup]:
    """The coupled groups of ``model``: encoder heads/FFN, or a traced graph for other models."""
    if is_bert_encoder(model):
        return encoder_groups(model)
    if not isinstance(example, torch.Tensor):
        raise UnsupportedModelError("structured pruning of a traced model needs one example input tensor")
    return traced_groups(model, example)
