"""Coupled channel groups: which output channels, input columns and norm entries must go together.

Removing output channel c of a layer also removes column c (or, after a flatten, the block of
columns c·HW … (c+1)·HW) of every layer that reads it, entry c of every BatchNorm on the way,
channel c of every depthwise convolution it flows through (in and out: one channel space), and —
through a residual addition or a squeeze-and-excitation product — channel c of the other branch.
A *group* is one such coupled set; each of its ``size`` channels can be removed as a whole.

Two analyses produce groups:
- :func:`nnopt.pruning.structured.traced.traced_groups`: a torch.fx trace with shapes, for models
  built from Linear (on inputs of any rank), Conv1d/2d/3d (groups=1 or depthwise), ConvTranspose,
  BatchNorm, element-wise activations, pooling, flatten/reshape, broadcast products, addition and
  concatenation. Anything it cannot follow freezes the channels involved (never silently wrong),
  with the reason recorded.
- :func:`encoder_groups`: attention heads (query/key/value rows with the output projection's
  columns) and FFN neurons of BERT-family encoders, whose Python control flow torch.fx cannot trace.

The network's input and output channels are always frozen; so is anything normalized across
channels (LayerNorm over them, softmax over them), where removing one channel changes the others.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from nnopt.errors import UnsupportedModelError

CONV_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
TRANSPOSED_CONV_LAYERS = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
PRUNABLE_LAYERS = (nn.Linear, *CONV_LAYERS, *TRANSPOSED_CONV_LAYERS)
NORM_LAYERS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
ROLES = ("out", "in", "norm", "depthwise")


def weight_dim(module: nn.Module, role: str) -> int:
    """The dimension of ``module.weight`` that a member of ``role`` indexes.

    A Linear/Conv weight is (out, in/groups, …); a transposed convolution's is (in, out/groups, …).
    A depthwise member indexes the output channels (dim 0); its input channels follow from them.
    """
    transposed = isinstance(module, TRANSPOSED_CONV_LAYERS)
    if role == "in":
        return 0 if transposed else 1
    return 1 if transposed and role == "out" else 0


def is_depthwise(module: nn.Module) -> bool:
    """A (non-transposed) convolution with one group per input channel: out = k·in, channel c → c·k … c·k+k−1."""
    groups, inp, out = (int(getattr(module, attr, 0)) for attr in ("groups", "in_channels", "out_channels"))
    return type(module) in CONV_LAYERS and 1 < groups == inp and out % inp == 0


@dataclasses.dataclass(frozen=True)
class Member:
    """One place a group's channels live.

    ``role``: "out" (output channels of a Linear/Conv: weight rows — dim 1 of a transposed
    convolution's weight — and the bias), "in" (input channels), "norm" (entries of a BatchNorm) or
    "depthwise" (output channels of a depthwise convolution with their bias; its input channels and
    ``groups`` shrink with them). Channel c of the group is position ``offset + c`` of that
    dimension, or positions ``offset + c·inner … offset + (c+1)·inner − 1`` when a flatten spread
    each channel over ``inner`` features (or a depthwise multiplier over ``inner`` outputs). For
    attention heads, ``inner`` is the head size.
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
    from nnopt.pruning.structured.transformer_blocks import is_transformer, transformer_groups  # builds on this

    if is_transformer(model):
        return transformer_groups(model)
    if not isinstance(example, torch.Tensor):
        raise UnsupportedModelError("structured pruning of a traced model needs one example input tensor")
    from nnopt.pruning.structured.traced import traced_groups  # traced.py builds on this module's types

    return traced_groups(model, example)
