"""BatchNorm folding: a BatchNorm that directly follows a Conv/Linear becomes part of that layer.

In eval mode a BatchNorm is a per-channel affine map, ``y = (x − μ) · γ / √(σ² + ε) + β`` with its
running statistics μ, σ². When ``x`` is the output of a layer ``W·in + b``, the two compose exactly to
one layer with ``W' = W · s`` (row c scaled by ``s_c = γ_c / √(σ²_c + ε)``) and
``b' = (b − μ) · s + β``. The BatchNorm becomes ``nn.Identity()``: one fewer pass over the
activations, and the same outputs up to float rounding (the arithmetic is done in float64).

Pairs are found with a torch.fx trace: a BatchNorm is folded only when its input is the output of
one Conv1d/Conv2d/ConvTranspose1d/ConvTranspose2d/Linear whose output nothing else reads, and each of
the two modules is called once.
Models torch.fx cannot trace (Hugging Face encoders, for example) fall back to adjacent
``(layer, BatchNorm)`` children of a plain ``nn.Sequential``. A Linear→BatchNorm1d pair is folded
only when the Linear's output is known (from an example input) to be ``(batch, features)``:
on a 3-D ``(batch, length, features)`` output BatchNorm1d would normalize the length axis.

Conv+ReLU fusion is not offered: eager PyTorch has no fused fp32 Conv+ReLU kernel
(``torch.ao.nn.intrinsic.ConvReLU2d`` calls the convolution and the ReLU one after the other),
so there is no speed to gain in eager mode; the fusion happens in compiled or exported graphs
(``torch.compile``, ONNX Runtime), which fold the Identity away too.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

import torch
from torch import nn

from nnopt.config import Config
from nnopt.errors import ModelFormatError
from nnopt.lineage import AppliedPass
from nnopt.select import replace_layer
from nnopt.techniques import Technique, register_technique, train_split

PASS_NAME = "fold-batchnorm"
NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)
# Which BatchNorm type normalizes the channels of which layer's output (channel axis 1).
_NORM_FOR = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d, nn.Linear: nn.BatchNorm1d,
             nn.ConvTranspose1d: nn.BatchNorm1d, nn.ConvTranspose2d: nn.BatchNorm2d}
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d)


def _out_dim(layer: nn.Module) -> int:
    """The weight dimension of a layer's output channels: (in, out, *kernel) for a transposed convolution."""
    return 1 if isinstance(layer, _TRANSPOSED) else 0


@dataclasses.dataclass(frozen=True)
class FoldBatchNormConfig(Config):
    """Fold every BatchNorm1d/2d that directly follows a Conv1d/Conv2d/Linear into that layer.

    Exact for the model in eval mode (running statistics); the folded model has the layer's bias
    where the BatchNorm was, so fine-tuning it afterwards trains that bias instead of BatchNorm
    statistics. BatchNorms that cannot be folded stay, with the reason recorded. No options:
    eager PyTorch has no fused Conv+ReLU kernel to offer (see :mod:`nnopt.simplification.fold`).

    >>> folded = nnopt.simplify(model.eval(), FoldBatchNormConfig())  # doctest: +SKIP
    """

    kind = "fold-batchnorm"


@dataclasses.dataclass(frozen=True)
class FoldPlan:
    """Which BatchNorm folds into which layer, and why the others cannot."""

    pairs: dict[str, str]  # BatchNorm name -> layer name
    skipped: dict[str, str]  # BatchNorm name -> reason
    method: str  # "torch.fx" or "nn.Sequential"


def find_pairs(model: nn.Module, example: torch.Tensor | None = None) -> FoldPlan:
    """The foldable (layer, BatchNorm) pairs of ``model``; ``example`` is one input batch, used only
    to learn the rank of Linear outputs."""
    norms = [name for name, m in model.named_modules() if isinstance(m, NORM_TYPES)]
    try:
        pairs, skipped = _traced_pairs(model, example)
        method = "torch.fx"
    except Exception as exc:  # torch.fx raises many types; fall back and say why
        pairs, skipped = _sequential_pairs(model)
        method = "nn.Sequential"
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        for name in norms:
            if name not in pairs and name not in skipped:
                skipped[name] = ("not directly after a Conv/Linear in an nn.Sequential "
                                 f"(torch.fx could not trace: {why})")
    for name in norms:
        if name not in pairs and name not in skipped:
            skipped[name] = "not called in the traced forward pass"
    return FoldPlan(pairs, skipped, method)


def _shared(model: nn.Module) -> set[int]:
    """ids of modules reachable under more than one name (their weights serve several places)."""
    counts = collections.Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    return {key for key, n in counts.items() if n > 1}


def _why_not(layer: nn.Module, norm: nn.Module, shared: set[int], out_rank: int | None) -> str | None:
    """None when ``norm`` can fold into ``layer``, else the reason it cannot."""
    wanted = _NORM_FOR.get(type(layer))
    if wanted is None:
        return f"its input comes from a {type(layer).__name__}, not a Conv1d/Conv2d/ConvTranspose/Linear"
    if type(norm) is not wanted:
        return f"a {type(norm).__name__} after a {type(layer).__name__} (expected {wanted.__name__})"
    if id(layer) in shared or id(norm) in shared:
        return "the layer or the BatchNorm is shared (registered under several names)"
    if norm.running_mean is None or norm.running_var is None:
        return "it has no running statistics (track_running_stats=False): it always uses batch statistics"
    if isinstance(layer, _TRANSPOSED) and layer.groups != 1:
        return f"a grouped transposed convolution (groups={layer.groups}) spreads each output channel over groups"
    if norm.num_features != layer.weight.shape[_out_dim(layer)]:
        return f"it has {norm.num_features} features, the layer has {layer.weight.shape[_out_dim(layer)]} outputs"
    if type(layer) is nn.Linear and out_rank != 2:
        if out_rank is None:
            return "the Linear's output shape is unknown (the model has no input_shape; pass data=...)"
        return f"the Linear's output is {out_rank}-D, so BatchNorm1d normalizes another axis than its features"
    return None


def _traced_pairs(model: nn.Module, example: torch.Tensor | None) -> tuple[dict[str, str], dict[str, str]]:
    from torch.fx import Node, symbolic_trace
    from torch.fx.passes.shape_prop import ShapeProp

    graph_module = symbolic_trace(model)
    ranks: dict[Node, int] = {}
    if example is not None:
        was_training = model.training
        graph_module.eval()
        try:
            with torch.no_grad():
                ShapeProp(graph_module).propagate(example)
            for node in graph_module.graph.nodes:
                meta = node.meta.get("tensor_meta")
                if meta is not None and hasattr(meta, "shape"):
                    ranks[node] = len(meta.shape)
        except Exception:  # shapes are a bonus: without them only Linear pairs are skipped
            ranks = {}
        finally:
            model.train(was_training)
    calls = collections.Counter(n.target for n in graph_module.graph.nodes if n.op == "call_module")
    shared = _shared(model)
    pairs: dict[str, str] = {}
    skipped: dict[str, str] = {}
    for node in graph_module.graph.nodes:
        if node.op != "call_module":
            continue
        norm = graph_module.get_submodule(node.target)
        if not isinstance(norm, NORM_TYPES):
            continue
        source = node.args[0] if node.args else None
        if not (isinstance(source, Node) and source.op == "call_module"):
            skipped[node.target] = "its input is not the output of a layer module"
            continue
        layer = graph_module.get_submodule(source.target)
        reason = _why_not(layer, norm, shared, ranks.get(source))
        if reason is None and (calls[node.target] > 1 or calls[source.target] > 1):
            reason = "the layer or the BatchNorm is called more than once"
        if reason is None and len(source.users) != 1:
            reason = f"the output of {source.target!r} is also read elsewhere"
        if reason is None:
            pairs[node.target] = source.target
        else:
            skipped[node.target] = reason
    return pairs, skipped


def _sequential_pairs(model: nn.Module) -> tuple[dict[str, str], dict[str, str]]:
    shared = _shared(model)
    pairs: dict[str, str] = {}
    skipped: dict[str, str] = {}
    for prefix, container in model.named_modules():
        if type(container) is not nn.Sequential:  # a subclass may override forward
            continue
        children = list(container.named_children())
        for (layer_name, layer), (norm_name, norm) in zip(children, children[1:]):
            if not isinstance(norm, NORM_TYPES):
                continue
            full = f"{prefix}.{norm_name}" if prefix else norm_name
            # Without a trace the Linear's output rank is unknown, so Linear pairs are skipped.
            reason = _why_not(layer, norm, shared, None if type(layer) is nn.Linear else 0)
            if reason is None:
                pairs[full] = f"{prefix}.{layer_name}" if prefix else layer_name
            else:
                skipped[full] = reason
    return pairs, skipped


def fold_into(layer: nn.Module, norm: nn.Module) -> None:
    """Fold ``norm``'s eval-mode affine map into ``layer``'s weight and bias, in place."""
    weight = layer.weight
    with torch.no_grad():
        w = weight.detach().double()  # (out, ...) for Linear and Conv, (in, out, ...) for ConvTranspose
        scale = torch.rsqrt(norm.running_var.double() + norm.eps)  # (out,)
        if norm.weight is not None:
            scale = scale * norm.weight.detach().double()
        shift = norm.bias.detach().double() if norm.bias is not None else torch.zeros_like(scale)
        bias = layer.bias.detach().double() if layer.bias is not None else torch.zeros_like(scale)
        dim = _out_dim(layer)
        new_weight = w * scale.reshape(*([1] * dim), -1, *([1] * (w.ndim - 1 - dim)))
        new_bias = (bias - norm.running_mean.double()) * scale + shift
        weight.copy_(new_weight.to(weight.dtype))
        if layer.bias is None:
            layer.bias = nn.Parameter(new_bias.to(dtype=weight.dtype, device=weight.device))
        else:
            layer.bias.copy_(new_bias.to(layer.bias.dtype))


def _example(model: nn.Module, data: Any) -> torch.Tensor | None:
    """One input batch: the first of ``data`` when it is a tensor batch, else zeros of ``input_shape``."""
    if data is not None:
        from nnopt.quantization.ptq import calibration_inputs

        batch = next(iter(calibration_inputs(data, 2)), None)
        return batch if isinstance(batch, torch.Tensor) else None
    shape = getattr(model, "input_shape", None)
    if isinstance(shape, tuple) and all(isinstance(d, int) for d in shape):
        param = next(model.parameters(), None)
        return torch.zeros(2, *shape, device=param.device if param is not None else "cpu")
    return None


def fold_batchnorm(model: nn.Module, config: FoldBatchNormConfig, data: Any = None, **context: Any) -> dict[str, Any]:
    """Fold in place; returns which BatchNorm went into which layer and why others stayed."""
    plan = find_pairs(model, _example(model, data))
    for norm_name, layer_name in plan.pairs.items():
        fold_into(model.get_submodule(layer_name), model.get_submodule(norm_name))
    for norm_name in plan.pairs:
        replace_layer(model, norm_name, nn.Identity())
    return {"folded": dict(plan.pairs), "skipped": dict(plan.skipped), "method": plan.method}


def replay(model: nn.Module, applied: AppliedPass) -> None:
    """Re-create the folded structure on a fresh model: BatchNorms become Identity, and each layer
    they folded into gets a bias (its values come from the saved weights)."""
    folded = applied.details.get("folded", {})
    if not isinstance(folded, dict):
        raise ModelFormatError(f"pass {applied.name!r}: 'folded' must map BatchNorm names to layer names")
    for norm_name, layer_name in folded.items():
        try:
            norm, layer = model.get_submodule(norm_name), model.get_submodule(str(layer_name))
        except AttributeError as exc:
            raise ModelFormatError(f"pass {applied.name!r}: {exc}") from None
        if not isinstance(norm, NORM_TYPES) or type(layer) not in _NORM_FOR:
            raise ModelFormatError(
                f"pass {applied.name!r}: recorded fold of {norm_name!r} ({type(norm).__name__}) into "
                f"{layer_name!r} ({type(layer).__name__}) does not fit this architecture"
            )
        if layer.bias is None:
            layer.bias = nn.Parameter(torch.zeros(layer.weight.shape[_out_dim(layer)], dtype=layer.weight.dtype))
        replace_layer(model, norm_name, nn.Identity())


# Data is optional: one batch checks the shapes of Linear→BatchNorm1d pairs.
register_technique(Technique(FoldBatchNormConfig, "simplify", fold_batchnorm, replay, data_for=train_split))
