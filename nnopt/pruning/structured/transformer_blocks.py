"""Attention heads and MLP neurons of transformer blocks beyond BERT: ViT, GPT-2, Llama-style, and
user-written blocks with ``nn.MultiheadAttention``.

Their Python control flow (caches, masks, attention back-ends) defeats torch.fx, so, as
:func:`~nnopt.pruning.structured.groups.encoder_groups` does for BERT, the blocks are recognized by
class and layout, each one checked against the ``transformers`` source it was written for
(transformers 5.x: the forward reshapes with ``view(..., -1, head_dim)``, so the head count follows
the projection widths):

- ``ViTAttention`` (q/k/v/o_proj) and ``LlamaAttention`` (grouped-query attention): one channel is
  one key/value head together with the ``num_key_value_groups`` query heads that read it (for ViT,
  one head): its rows of q_proj, k_proj, v_proj and its columns of o_proj;
- ``GPT2Attention``: one head is three row blocks of the fused ``c_attn`` (q, k, v at offsets 0,
  w and 2w, w the inner width) and its columns of ``c_proj``;
- :class:`~nnopt.layers.attention.SplitMultiheadAttention` (what ``nn.MultiheadAttention`` becomes):
  rows of q/k/v_proj, columns of out_proj;
- MLPs: ``ViTMLP`` (fc1 → act → fc2), ``GPT2MLP`` (c_fc → act → c_proj), ``LlamaMLP`` (SwiGLU:
  gate_proj and up_proj rows together, down_proj columns) and, as a pattern, any
  ``nn.Sequential(Linear, parameter-free element-wise activations/Dropout, Linear)``, whose hidden
  neurons are private to it whatever the input's shape (a Linear acts on the last dimension).

Two layers need a swap first, done by :func:`prepare_transformer` with equal outputs and recorded
so that :func:`replay_prepare` redoes it on load: GPT-2's ``Conv1D`` (weight stored transposed,
(in, out)) becomes an ``nn.Linear``, and ``nn.MultiheadAttention`` (one packed in_proj, inner width
fixed to embed_dim) becomes a ``SplitMultiheadAttention``. After a cut, :func:`sync_heads` sets
the head-count attributes each attention module reads from its new widths; it also runs after the
layers are resized on load, so nothing else needs recording. The model's ``config`` is left as
built (it is shared by all layers, whose head counts now differ).

Frozen, with the reason: the residual width (hidden size; normalized by LayerNorm/RMSNorm and added
in every block), GPT-2 cross-attention, ``nn.MultiheadAttention`` with ``add_bias_kv`` or
``add_zero_attn``, a layer that appears under two names (shared weights), a layout whose widths do
not match its head size, and any other module whose class name ends in "Attention".
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch import nn

from nnopt.errors import ModelFormatError
from nnopt.layers.attention import (
    SplitMultiheadAttention,
    empty_split_like,
    split_multihead_attention,
    split_refusal,
)
from nnopt.pruning.structured.groups import ChannelGroup, Member
from nnopt.select import replace_layer

# Attention classes whose forward views q/k/v as (..., -1, head_dim): widths set the head counts.
QKVO_ATTENTION = ("ViTAttention", "LlamaAttention")
GPT2_ATTENTION = ("GPT2Attention",)
# MLP classes: (layers whose rows are the neurons, layer whose columns read them).
MLP_LAYOUTS: dict[str, tuple[tuple[str, ...], str]] = {
    "ViTMLP": (("fc1",), "fc2"),
    "GPT2MLP": (("c_fc",), "c_proj"),
    "LlamaMLP": (("gate_proj", "up_proj"), "down_proj"),
}
# Parameter-free element-wise modules f with f(0) = 0 where they matter: a neuron between two
# Linear layers of an nn.Sequential stays private through them.
_ELEMENTWISE = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.ELU, nn.Hardswish, nn.Mish,
    nn.Dropout, nn.Identity,
)
RESIDUAL_REASON = "residual width: normalized by LayerNorm/RMSNorm and added in every block, never cut"


# --------------------------------------------------------------------------- recognition


def _is_linear(module: Any) -> bool:
    return type(module) is nn.Linear


def _is_conv1d(module: Any) -> bool:
    """transformers' ``Conv1D``: a Linear whose weight is stored (in, out)."""
    weight = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) and weight.dim() == 2
            and tuple(weight.shape) == (getattr(module, "nx", -1), getattr(module, "nf", -1)))


def _attention_kind(module: nn.Module) -> str:
    """"qkvo", "gpt2", "split" or "" (not an attention layout this module understands)."""
    name = type(module).__name__
    if name in QKVO_ATTENTION:
        return "qkvo"
    if name in GPT2_ATTENTION:
        return "gpt2"
    if isinstance(module, SplitMultiheadAttention):
        return "split"
    return ""


def is_transformer(model: nn.Module) -> bool:
    """Whether ``model`` holds a block that :func:`transformer_groups` understands (or can, after
    :func:`prepare_transformer`)."""
    return any(
        _attention_kind(m) or type(m).__name__ in MLP_LAYOUTS or isinstance(m, nn.MultiheadAttention)
        for m in model.modules()
    )


# --------------------------------------------------------------------------- preparation (swaps)


def _linear_from_conv1d(conv: nn.Module, copy_values: bool = True) -> nn.Linear:
    weight = conv.weight  # (in, out)
    assert isinstance(weight, torch.Tensor)
    bias = getattr(conv, "bias", None)
    linear = nn.Linear(weight.shape[0], weight.shape[1], bias=bias is not None, device=weight.device,
                       dtype=weight.dtype)
    if copy_values:
        with torch.no_grad():
            linear.weight.copy_(weight.detach().t())
            if bias is not None:
                linear.bias.copy_(bias.detach())
    linear.train(conv.training)
    return linear


def _conv1d_names(model: nn.Module) -> list[str]:
    """Conv1D layers of GPT-2 self-attention and MLP blocks (cross-attention is left as it is)."""
    names = []
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if type(module).__name__ in GPT2_ATTENTION and not getattr(module, "is_cross_attention", False):
            children = ("c_attn", "c_proj")
        elif type(module).__name__ == "GPT2MLP":
            children = ("c_fc", "c_proj")
        else:
            continue
        names += [prefix + c for c in children if _is_conv1d(getattr(module, c, None))]
    return names


def prepare_transformer(model: nn.Module) -> dict[str, list[str]]:
    """Swap, in place and with equal outputs, the layers whose heads cannot be cut as they are:
    GPT-2 ``Conv1D`` → ``nn.Linear`` (weight transposed) and ``nn.MultiheadAttention`` →
    :class:`SplitMultiheadAttention`. Returns what was swapped, for :func:`replay_prepare`
    (empty lists when nothing was)."""
    record: dict[str, list[str]] = {"linear_from_conv1d": [], "split_attention": []}
    for name in _conv1d_names(model):
        replace_layer(model, name, _linear_from_conv1d(model.get_submodule(name)))
        record["linear_from_conv1d"].append(name)
    for name, module in list(model.named_modules()):
        if type(module) is nn.MultiheadAttention and not split_refusal(module):
            replace_layer(model, name, split_multihead_attention(module))
            record["split_attention"].append(name)
    return record


def replay_prepare(model: nn.Module, record: dict[str, Any]) -> None:
    """Redo :func:`prepare_transformer`'s recorded swaps on a freshly built model (shapes only;
    the saved weights fill them)."""
    for name in record.get("linear_from_conv1d", []):
        replace_layer(model, name, _linear_from_conv1d(_recorded(model, name, "Conv1D"), copy_values=False))
    for name in record.get("split_attention", []):
        module = _recorded(model, name, "MultiheadAttention")
        assert isinstance(module, nn.MultiheadAttention)
        replace_layer(model, name, empty_split_like(module))


def _recorded(model: nn.Module, name: str, wanted: str) -> nn.Module:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise ModelFormatError(f"recorded {wanted} layer {name!r} is not in the model") from None
    if type(module).__name__ != wanted:
        raise ModelFormatError(f"recorded {wanted} layer {name!r} is a {type(module).__name__}")
    return module


# --------------------------------------------------------------------------- groups


def transformer_groups(model: nn.Module) -> list[ChannelGroup]:
    """Attention heads (kind "head") and MLP neurons (kind "neuron") of every block in ``model``
    that this module recognizes, plus frozen groups naming what it does not cut and why.

    Group names: ``<attention module>.heads`` and ``<mlp module>.neurons``. For grouped-query
    attention a channel of the heads group is one key/value head with its query heads.
    """
    uses = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    groups: list[ChannelGroup] = []
    hidden = 0
    claimed: set[str] = set()  # modules inside a recognized block
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if any(name.startswith(c + ".") for c in claimed):
            continue
        group = None
        kind = _attention_kind(module)
        if kind:
            group, width = _heads_group(name, prefix, module, kind)
            hidden = hidden or width
        elif type(module).__name__ in MLP_LAYOUTS:
            group = _mlp_group(name, prefix, module)
        elif type(module) is nn.Sequential:
            group = _sequential_group(name, prefix, module)
        elif isinstance(module, nn.MultiheadAttention):
            reason = split_refusal(module) or "nn.MultiheadAttention packs q/k/v: prepare_transformer swaps it first"
            group = ChannelGroup(f"{name}.heads", module.num_heads, frozen=reason, kind="head")
        elif type(module).__name__.endswith("Attention") and any(_is_linear(c) for c in module.children()):
            heads = int(getattr(module, "num_heads", getattr(module, "num_attention_heads", 0)) or 0)
            group = ChannelGroup(f"{name}.heads", heads, kind="head",
                                 frozen=f"attention layout {type(module).__name__} is not understood")
        if group is None:
            continue
        if not group.frozen:
            shared = [m.module for m in group.members if uses[id(model.get_submodule(m.module))] > 1]
            if shared:
                group.frozen = f"layer {shared[0]} appears under more than one name (shared weights)"
        groups.append(group)
        claimed.add(name)
    if hidden:
        groups.append(ChannelGroup("residual", hidden, frozen=RESIDUAL_REASON))
    return groups


def _heads_group(name: str, prefix: str, module: nn.Module, kind: str) -> tuple[ChannelGroup, int]:
    """(heads group, residual width) of a recognized attention module."""
    if kind == "gpt2":
        return _gpt2_heads(name, prefix, module)
    q, k, v = (getattr(module, p, None) for p in ("q_proj", "k_proj", "v_proj"))
    out_name = "out_proj" if kind == "split" else "o_proj"
    out = getattr(module, out_name, None)
    head_dim = int(getattr(module, "head_dim", 0) or 0)
    group = ChannelGroup(f"{name}.heads", 0, kind="head")
    if not all(_is_linear(p) for p in (q, k, v, out)) or head_dim < 1:
        group.frozen = f"{type(module).__name__} {name}: projections are not plain nn.Linear layers"
        return group, 0
    assert isinstance(q, nn.Linear) and isinstance(k, nn.Linear) and isinstance(v, nn.Linear)
    assert isinstance(out, nn.Linear)
    heads, rem_q = divmod(q.out_features, head_dim)
    kv_heads, rem_k = divmod(k.out_features, head_dim)
    expected_rep = getattr(module, "num_key_value_groups", 1)
    if rem_q or rem_k or v.out_features != k.out_features or out.in_features != q.out_features or kv_heads < 1 \
            or heads != kv_heads * expected_rep:
        group.frozen = (f"{type(module).__name__} {name}: widths q {q.out_features}, k {k.out_features}, "
                        f"v {v.out_features}, out {out.in_features} do not match head size {head_dim}")
        return group, out.out_features
    per_group = expected_rep * head_dim  # query rows (and out columns) of one key/value head
    group.size = kv_heads
    group.members = [
        Member(f"{prefix}q_proj", "out", 0, per_group),
        Member(f"{prefix}k_proj", "out", 0, head_dim),
        Member(f"{prefix}v_proj", "out", 0, head_dim),
        Member(f"{prefix}{out_name}", "in", 0, per_group),
    ]
    return group, out.out_features


def _gpt2_heads(name: str, prefix: str, module: nn.Module) -> tuple[ChannelGroup, int]:
    group = ChannelGroup(f"{name}.heads", int(getattr(module, "num_heads", 0)), kind="head")
    fused, proj = getattr(module, "c_attn", None), getattr(module, "c_proj", None)
    head_dim = int(getattr(module, "head_dim", 0) or 0)
    if getattr(module, "is_cross_attention", False):
        group.frozen = f"GPT-2 cross-attention {name}: c_attn holds only k|v, q comes from q_attn"
        return group, 0
    if _is_conv1d(fused) or _is_conv1d(proj):
        group.frozen = f"GPT-2 Conv1D layers in {name} (weights stored (in, out)): prepare_transformer swaps them first"
        return group, 0
    if not (_is_linear(fused) and _is_linear(proj)) or head_dim < 1:
        group.frozen = f"GPT2Attention {name}: c_attn/c_proj are not Conv1D or nn.Linear layers"
        return group, 0
    assert isinstance(fused, nn.Linear) and isinstance(proj, nn.Linear)
    width, rem = divmod(fused.out_features, 3)
    if rem or width % head_dim or proj.in_features != width or getattr(module, "split_size", width) != width:
        group.frozen = f"GPT2Attention {name}: c_attn width {fused.out_features} does not match c_proj and heads"
        return group, proj.out_features
    group.size = width // head_dim
    group.members = [Member(f"{prefix}c_attn", "out", offset, head_dim) for offset in (0, width, 2 * width)]
    group.members.append(Member(f"{prefix}c_proj", "in", 0, head_dim))
    return group, proj.out_features


def _mlp_group(name: str, prefix: str, module: nn.Module) -> ChannelGroup:
    producers, reader = MLP_LAYOUTS[type(module).__name__]
    layers = [getattr(module, p, None) for p in (*producers, reader)]
    group = ChannelGroup(f"{name}.neurons", 0, kind="neuron")
    if any(_is_conv1d(layer) for layer in layers):
        group.frozen = f"GPT-2 Conv1D layers in {name} (weights stored (in, out)): prepare_transformer swaps them first"
        return group
    if not all(_is_linear(layer) for layer in layers):
        group.frozen = f"{type(module).__name__} {name}: layers are not plain nn.Linear layers"
        return group
    widths = {layer.out_features for layer in layers[:-1] if isinstance(layer, nn.Linear)}
    last = layers[-1]
    assert isinstance(last, nn.Linear)
    group.size = last.in_features
    if widths != {last.in_features}:
        group.frozen = f"{type(module).__name__} {name}: hidden widths {sorted(widths)} ≠ {last.in_features}"
        return group
    group.members = [Member(prefix + p, "out") for p in producers] + [Member(prefix + reader, "in")]
    return group


def _sequential_group(name: str, prefix: str, module: nn.Sequential) -> ChannelGroup | None:
    """Hidden neurons of ``Sequential(Linear, element-wise..., Linear)``; None for anything else."""
    children = list(module.named_children())
    if len(children) < 2 or not (_is_linear(children[0][1]) and _is_linear(children[-1][1])):
        return None
    if not all(isinstance(c, _ELEMENTWISE) for _, c in children[1:-1]):
        return None
    first, last = children[0][1], children[-1][1]
    assert isinstance(first, nn.Linear) and isinstance(last, nn.Linear)
    if first.out_features != last.in_features:
        return None
    members = [Member(f"{prefix}{children[0][0]}", "out"), Member(f"{prefix}{children[-1][0]}", "in")]
    return ChannelGroup(f"{name}.neurons", first.out_features, members, kind="neuron")


# --------------------------------------------------------------------------- after a cut / on load


def sync_heads(model: nn.Module) -> dict[str, int]:
    """Set the head-count attributes each recognized attention module reads from its current
    projection widths (after :func:`~.surgery.remove_channels`, or after
    :func:`~.surgery.resize_layers` on load). Returns the query-head count per module."""
    counts = {}
    for name, module in model.named_modules():
        kind = _attention_kind(module)
        if kind == "gpt2" and _is_linear(getattr(module, "c_attn", None)):
            width = module.c_attn.out_features // 3
            module.split_size = width  # forward: c_attn(x).split(split_size, dim=2)
            module.num_heads = width // int(module.head_dim)
            counts[name] = int(module.num_heads)
        elif kind == "qkvo" and _is_linear(getattr(module, "q_proj", None)):
            head_dim = int(module.head_dim)
            heads, kv_heads = module.q_proj.out_features // head_dim, module.k_proj.out_features // head_dim
            # transformers 5.x reads only head_dim (and num_key_value_groups, unchanged when whole key/value
            # groups go); older releases read these counts, so keep them true where they exist.
            for attr, value in (("num_attention_heads", heads), ("num_heads", heads),
                                ("num_key_value_heads", kv_heads)):
                if hasattr(module, attr):
                    setattr(module, attr, value)
            if hasattr(module, "all_head_size"):
                module.all_head_size = heads * head_dim
            counts[name] = heads
        elif kind == "split":
            module.heads = module.q_proj.out_features // int(module.head_dim)
            counts[name] = int(module.heads)
    return counts
