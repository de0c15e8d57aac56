"""Convert nnopt models into Keras 3 models (torch backend): :func:`to_keras`, the inverse of
:func:`nnopt.models.keras_adapter.from_keras`.

Only plain chains are written: Linear, Conv2d, BatchNorm, pooling, Flatten, Dropout, Identity and
ReLU/Tanh/Sigmoid/GELU layers applied one after another (weight-only quantized, clustered and sparse
layers as the float weights they stand for). The Keras twin is checked numerically against the
model before it is returned, so a model whose ``forward`` does something other than chain its
layers is refused instead of silently exported wrongly. Layouts are mapped as
:mod:`nnopt.models.keras_adapter` describes: images stay channels-last on the Keras side.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import nn

from nnopt.errors import UnsupportedModelError, brief
from nnopt.models.keras_adapter import _random_rows, _tensor, import_keras, same_padding

_EXPORT_ATOL = 1e-4


@dataclasses.dataclass
class _KerasLayer:
    """One Keras layer to create: its class in ``keras.layers``, arguments and weights."""

    cls: str
    name: str
    kwargs: dict[str, Any]
    weights: list[np.ndarray] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _Export:
    """The Keras chain being built, and what the current tensor looks like on both sides."""

    shape: tuple[int, ...]  # torch's shape of the current tensor, batch dimension left out
    layers: list[_KerasLayer] = dataclasses.field(default_factory=list)
    image: bool = False  # torch holds (C, H, W) while Keras holds (H, W, C)
    # Flat features after flattening an image: torch position t holds Keras feature perm[t].
    perm: torch.Tensor | None = None
    foldable: bool = False  # the last Keras layer is a Dense/Conv2D whose activation is still linear

    def add(self, layer: _KerasLayer, foldable: bool = False) -> None:
        self.layers.append(layer)
        self.foldable = foldable


def to_keras(model: nn.Module) -> Any:
    """Return a Keras model (torch backend) computing what the nnopt ``model`` computes.

    ``model`` must be a chain of Linear, Conv2d, BatchNorm, pooling, Flatten, Dropout, Identity and
    ReLU/Tanh/Sigmoid/GELU layers in registration order (an nnopt ``sequential`` model, SimpleNet,
    or any model :func:`from_keras` produced, after pruning or quantization). Pruned zeros are kept
    as zeros and structurally pruned layers are as narrow as in ``model``. Weight-quantized,
    clustered and sparse layers are written as the float weights they stand for (a ``.keras`` file
    cannot hold integer codes). The result is checked against ``model`` on 16 random rows (within
    1e-4; quantized layers compute on their exact dequantize path for this check, not with their
    bf16 kernels); :class:`UnsupportedModelError` names any layer without a Keras equivalent.
    ``model`` is left as it was (train/eval and compute modes included).
    """
    keras = import_keras()
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"expected a torch.nn.Module, got {type(model).__name__}")
    input_shape = _declared_input_shape(model)
    handlers = _export_handlers()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    with _reference_mode(model), torch.no_grad():
        export = _Export(shape=input_shape)
        x = torch.zeros((1, *input_shape), device=device)
        for index, (name, module) in enumerate(_torch_chain(model, handlers)):
            keras_name = name.replace(".", "_") or f"layer_{index}"
            _handler(module, handlers)(keras_name, module, export)  # type: ignore[misc]
            try:
                x = module(x)
            except Exception as exc:  # torch raises RuntimeError for shape mismatches
                raise UnsupportedModelError(
                    f"layer {name!r} ({type(module).__name__}) fails on the output of the layer before it "
                    f"({brief(exc)}): the model is not a simple chain of its layers"
                ) from None
            export.shape = tuple(x.shape[1:])
        rows = _random_rows(input_shape).to(device)
        if _ends_in_softmax(model, rows):
            if export.foldable and export.layers[-1].cls == "Dense":
                export.layers[-1].kwargs["activation"] = "softmax"
            else:
                export.add(_KerasLayer("Activation", "softmax_output", {"activation": "softmax"}))
        if not export.layers:
            raise UnsupportedModelError(f"{type(model).__name__} has no layer that Keras would compute")
        built = [getattr(keras.layers, spec.cls)(name=spec.name, **spec.kwargs) for spec in export.layers]
        km = keras.Sequential([keras.Input(shape=input_shape), *built], name=_keras_name(model))
        for layer, spec in zip(built, export.layers):
            if spec.weights:
                layer.set_weights(spec.weights)
        _verify_export(model, km, rows, keras)
    return km


def _export_handlers() -> dict[type[nn.Module], Callable[[str, Any, _Export], None]]:
    # Exact types only: a subclass (a fake-quant Linear, say) may compute something else. nnopt's compressed
    # layers are found through the layer protocol instead (see _handler).
    from nnopt.models.sequential import NhwcToNchw

    handlers: dict[type[nn.Module], Callable[[str, Any, _Export], None]] = {
        nn.Linear: _export_linear, nn.Conv2d: _export_conv,
        nn.BatchNorm1d: _export_norm, nn.BatchNorm2d: _export_norm,
        nn.MaxPool2d: _export_pool, nn.AvgPool2d: _export_pool, nn.AdaptiveAvgPool2d: _export_global_average,
        nn.Flatten: _export_flatten, NhwcToNchw: _export_channels_first,
        nn.Identity: _export_nothing, nn.Dropout: _export_nothing,
    }
    handlers.update(dict.fromkeys(_TORCH_ACTIVATIONS, _export_activation))
    return handlers


def _handler(module: nn.Module, handlers: dict[type[nn.Module], Any]) -> Callable[[str, Any, _Export], None] | None:
    from nnopt.layers.protocol import CompressedLayer

    if isinstance(module, CompressedLayer):
        return {"Dense": _export_linear, "Conv2D": _export_conv}.get(module.keras_layer or "")
    return handlers.get(type(module))


_TORCH_ACTIVATIONS: dict[type[nn.Module], str] = {
    nn.ReLU: "relu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.GELU: "gelu",
}
_EXPORTABLE = (
    "Linear, Conv2d, BatchNorm1d/2d, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d(1), Flatten, Dropout, Identity, "
    "ReLU, Tanh, Sigmoid, GELU, and weight-only quantized, clustered or sparse Linear/Conv2d layers"
)


def _torch_chain(model: nn.Module, handlers: dict[type[nn.Module], Any]) -> list[tuple[str, nn.Module]]:
    """The layers Keras will get, in registration order; containers are opened, others refused."""
    chain: list[tuple[str, nn.Module]] = []

    def visit(name: str, module: nn.Module) -> None:
        if _handler(module, handlers) is not None:
            chain.append((name, module))
            return
        children = list(module.named_children())
        own = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        if not children or own:
            hint = (
                " (it quantizes activations, which Keras layers cannot express; save before that pass)"
                if hasattr(module, "input_lo") or hasattr(module, "weight_step") else ""
            )
            raise UnsupportedModelError(
                f"layer {name or '<model>'!r} ({type(module).__name__}) has no Keras equivalent{hint}; "
                f"nnopt writes {_EXPORTABLE}"
            )
        for child_name, child in children:
            visit(f"{name}.{child_name}" if name else child_name, child)

    visit("", model)
    return chain


def _export_linear(name: str, module: Any, ex: _Export) -> None:
    if ex.image:
        raise UnsupportedModelError(
            f"layer {name!r} ({type(module).__name__}) is applied to a (C, H, W) feature map; Keras "
            "Dense layers read the last axis of a channels-last map, so it has no Keras equivalent"
        )
    kernel = _dense_weight(module).T  # (in, out), Keras' layout
    if ex.perm is not None:
        kernel = kernel[torch.argsort(ex.perm)]
    bias = module.bias
    weights = [kernel] if bias is None else [kernel, bias]
    layer = _KerasLayer("Dense", name, {"units": kernel.shape[1], "use_bias": bias is not None}, _numpy(weights))
    ex.add(layer, foldable=True)
    ex.perm = None


def _export_conv(name: str, module: Any, ex: _Export) -> None:
    kind = type(module).__name__
    if not ex.image:
        raise UnsupportedModelError(
            f"layer {name!r} ({kind}) reads a channels-first (C, H, W) tensor; Keras convolutions are "
            "channels-last, so nnopt writes image models whose input is (H, W, C) and whose first layer "
            "is nhwc_to_nchw (as load_keras produces them)"
        )
    if tuple(module.dilation) != (1, 1) or module.groups != 1 or getattr(module, "padding_mode", "zeros") != "zeros":
        raise UnsupportedModelError(
            f"layer {name!r} ({kind}): only dilation 1, groups 1 and zero padding are supported"
        )
    kernel, stride = tuple(module.kernel_size), tuple(module.stride)
    padding = _torch_padding(name, kind, module.padding, ex.shape[1:], kernel, stride)
    weight = _dense_weight(module).permute(2, 3, 1, 0)  # (out, in, KH, KW) -> Keras' (KH, KW, in, out)
    bias = module.bias
    kwargs = {
        "filters": weight.shape[3], "kernel_size": kernel, "strides": stride, "padding": padding,
        "use_bias": bias is not None,
    }
    ex.add(_KerasLayer("Conv2D", name, kwargs, _numpy([weight] if bias is None else [weight, bias])), foldable=True)


def _export_norm(name: str, module: Any, ex: _Export) -> None:
    kind = type(module).__name__
    if module.running_mean is None or module.running_var is None:
        raise UnsupportedModelError(f"layer {name!r} ({kind}) keeps no running statistics; Keras would need them")
    if (kind == "BatchNorm2d") != ex.image or (not ex.image and len(ex.shape) != 1):
        raise UnsupportedModelError(f"layer {name!r} ({kind}) on a tensor of shape {ex.shape} has no Keras equivalent")
    params = [module.weight, module.bias] if module.affine else []
    params += [module.running_mean, module.running_var]
    if ex.perm is not None:
        inverse = torch.argsort(ex.perm)
        params = [p[inverse] for p in params]
    momentum = 0.99 if module.momentum is None else 1.0 - float(module.momentum)
    kwargs = {
        "axis": -1, "epsilon": float(module.eps), "momentum": momentum,
        "center": module.affine, "scale": module.affine,
    }
    ex.add(_KerasLayer("BatchNormalization", name, kwargs, _numpy(params)))


def _export_activation(name: str, module: Any, ex: _Export) -> None:
    activation = _TORCH_ACTIVATIONS[type(module)]
    if activation == "gelu" and module.approximate != "none":
        raise UnsupportedModelError(f"layer {name!r} (GELU): the tanh approximation has no Keras equivalent")
    if ex.foldable:
        ex.layers[-1].kwargs["activation"] = activation
        ex.foldable = False
    else:
        ex.add(_KerasLayer("Activation", name, {"activation": activation}))


def _export_flatten(name: str, module: Any, ex: _Export) -> None:
    if module.start_dim != 1 or module.end_dim != -1:
        raise UnsupportedModelError(f"layer {name!r} (Flatten): only start_dim=1, end_dim=-1 is supported")
    if ex.image:
        c, h, w = ex.shape
        ex.perm = torch.arange(h * w * c).reshape(h, w, c).permute(2, 0, 1).flatten()
        ex.image = False
    elif len(ex.shape) == 1:
        return  # already flat
    ex.add(_KerasLayer("Flatten", name, {}))


def _export_pool(name: str, module: Any, ex: _Export) -> None:
    kind = type(module).__name__
    if not ex.image:
        raise UnsupportedModelError(f"layer {name!r} ({kind}) needs an image, got shape {ex.shape}")
    kernel = _pair(module.kernel_size)
    stride = _pair(module.stride if module.stride is not None else module.kernel_size)
    plain = _pair(module.padding) == (0, 0) and not module.ceil_mode
    if kind == "MaxPool2d":
        plain = plain and _pair(module.dilation) == (1, 1) and not module.return_indices
    else:
        plain = plain and module.divisor_override is None
    if not plain:
        raise UnsupportedModelError(
            f"layer {name!r} ({kind}): padding, ceil_mode, dilation and divisor_override are not supported"
        )
    cls = "MaxPooling2D" if kind == "MaxPool2d" else "AveragePooling2D"
    ex.add(_KerasLayer(cls, name, {"pool_size": kernel, "strides": stride, "padding": "valid"}))


def _export_global_average(name: str, module: Any, ex: _Export) -> None:
    if not ex.image or _pair(module.output_size) != (1, 1):
        raise UnsupportedModelError(
            f"layer {name!r} (AdaptiveAvgPool2d): only output_size 1 on an image has a Keras equivalent"
        )
    ex.add(_KerasLayer("GlobalAveragePooling2D", name, {"keepdims": True}))


def _export_channels_first(name: str, module: Any, ex: _Export) -> None:
    if ex.image or len(ex.shape) != 3:
        raise UnsupportedModelError(f"layer {name!r} (NhwcToNchw) needs an (H, W, C) input, got shape {ex.shape}")
    ex.image = True  # Keras simply stays channels-last


def _export_nothing(name: str, module: Any, ex: _Export) -> None:
    """Identity, and Dropout (a no-op at inference)."""


def _torch_padding(
    name: str, kind: str, padding: Any, hw: tuple[int, ...], kernel: tuple[int, ...], stride: tuple[int, ...]
) -> str:
    if padding in ("valid", "same"):
        return padding  # torch allows "same" only at stride 1, where it pads as Keras does
    pads = _pair(padding)
    if pads == (0, 0):
        return "valid"
    if all(same_padding(n, k, s) == (p, p) for n, k, s, p in zip(hw, kernel, stride, pads)):
        return "same"
    raise UnsupportedModelError(
        f"layer {name!r} ({kind}): padding {pads} on a {tuple(hw)} input is neither Keras' 'valid' nor 'same'"
    )


def _dense_weight(module: Any) -> torch.Tensor:
    from nnopt.layers.protocol import CompressedLayer

    # Compressed layers hold codes, a codebook or CSR parts: Keras gets the weight they compute with.
    return module.dense_weight() if isinstance(module, CompressedLayer) else module.weight


def _numpy(tensors: list[torch.Tensor]) -> list[np.ndarray]:
    return [t.detach().to("cpu", torch.float32).contiguous().numpy().copy() for t in tensors]


def _pair(value: Any) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else tuple(int(v) for v in value)


def _declared_input_shape(model: nn.Module) -> tuple[int, ...]:
    shape = getattr(model, "input_shape", None)
    if not isinstance(shape, (tuple, list)) or not shape or not all(isinstance(d, int) and d > 0 for d in shape):
        raise UnsupportedModelError(
            f"{type(model).__name__} declares no input_shape (nnopt models carry one); cannot build a Keras model"
        )
    return tuple(shape)


def _keras_name(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return f"nnopt_{getattr(config, 'kind', type(model).__name__.lower())}"


def _ends_in_softmax(model: nn.Module, rows: torch.Tensor) -> bool:
    """Whether ``predict_proba`` is the softmax of ``forward`` (the output nnopt keeps as metadata)."""
    predict = getattr(model, "predict_proba", None)
    if predict is None:
        return False
    logits, probs = model(rows), predict(rows)
    if probs.shape != logits.shape or torch.allclose(probs, logits, rtol=0.0, atol=1e-6):
        return False
    return torch.allclose(probs, torch.softmax(logits, dim=-1), rtol=0.0, atol=1e-6)


def _verify_export(model: nn.Module, km: Any, rows: torch.Tensor, keras: ModuleType) -> None:
    predict = getattr(model, "predict_proba", model)
    expected = predict(rows).detach().to("cpu", torch.float32).numpy()
    try:
        got = _tensor(km(keras.ops.convert_to_tensor(rows.cpu()), training=False)).numpy()
    except Exception as exc:  # Keras errors mean the chain was built wrongly; name them plainly
        raise UnsupportedModelError(
            f"the Keras twin of {type(model).__name__} failed on a verification batch ({brief(exc)})"
        ) from None
    if got.shape != expected.shape or not np.allclose(got, expected, rtol=0.0, atol=_EXPORT_ATOL):
        diff = float(np.abs(got - expected).max()) if got.shape == expected.shape else float("nan")
        raise UnsupportedModelError(
            f"the Keras twin of {type(model).__name__} differs from it (max difference {diff:.3g}, shapes "
            f"{expected.shape} vs {got.shape}): its forward() is not the chain of its layers in registration order"
        )


@contextlib.contextmanager
def _reference_mode(model: nn.Module) -> Iterator[None]:
    """Inference mode, with weight-only quantized layers on their exact dequantize path (the
    function the Keras twin computes; their int kernels add bf16 rounding), then put back as it was."""
    modes = [(m, m.training) for m in model.modules()]
    from nnopt.layers.protocol import CompressedLayer

    computes = [(m, m.compute) for m in model.modules() if isinstance(m, CompressedLayer) and hasattr(m, "compute")]
    model.eval()
    try:
        for module, _ in computes:
            module.compute = "dequantize"
        yield
    finally:
        for module, training in modes:
            module.training = training
        for module, compute in computes:
            module.compute = compute
