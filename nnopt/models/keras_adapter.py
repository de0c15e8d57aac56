"""Convert Keras 3 models (torch backend) into nnopt ``sequential`` models; the other way,
nnopt → Keras, is :func:`nnopt.models.keras_export.to_keras` (also importable from here).

Only plain chains are converted: Dense, Conv2D, BatchNormalization, pooling, Flatten, Dropout,
ReLU and Activation layers applied one after another. Each conversion is checked numerically
against the other framework before it is returned, so a model whose ``call``/``forward`` does
something other than chain its layers is refused instead of silently converted wrongly.

Layouts: Keras images are channels-last (batch, H, W, C), torch convolutions channels-first. A
converted image model takes the same (H, W, C) input as the Keras model and starts with an
``nhwc_to_nchw`` permute. Where Keras flattens an (H, W, C) map, torch flattens (C, H, W), so the
next Dense's input columns (and any BatchNormalization in between) are permuted to match exactly.

>>> import os; os.environ["KERAS_BACKEND"] = "torch"  # before Keras is first imported
>>> import keras, nnopt
>>> km = keras.Sequential([keras.Input((64,)), keras.layers.Dense(10, activation="softmax")])
>>> model = nnopt.from_keras(km)  # doctest: +SKIP
>>> model.config.layers, model.config.output  # doctest: +SKIP
(('linear:64:10',), 'softmax')
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import nn

from nnopt.errors import UnsupportedModelError, brief

# Keras activations with an exact torch twin (Keras' gelu defaults to the erf form, as torch's).
_ACTIVATIONS = ("relu", "tanh", "sigmoid", "gelu", "linear")
_ATOL = 1e-5
_RANDOM_ROWS = 16
SUPPORTED_KERAS_LAYERS = (
    "InputLayer", "Dense", "Conv2D", "BatchNormalization", "Dropout", "Flatten", "Activation", "ReLU",
    "MaxPooling2D", "AveragePooling2D", "GlobalAveragePooling2D",
)


def import_keras() -> ModuleType:
    """Keras 3 on the torch backend; an :class:`UnsupportedModelError` when that is not available."""
    # Under the torch backend Keras models are torch modules; other backends cannot be mixed in.
    os.environ.setdefault("KERAS_BACKEND", "torch")
    try:
        keras = importlib.import_module("keras")
    except ImportError:
        raise UnsupportedModelError("Keras 3 is not installed; pip install 'nnopt[keras]'") from None
    if keras.backend.backend() != "torch":
        raise UnsupportedModelError(
            f"Keras is using the {keras.backend.backend()!r} backend; set KERAS_BACKEND=torch "
            "before importing keras"
        )
    return keras


# -- Keras -> nnopt ------------------------------------------------------------------------------


@dataclasses.dataclass
class _Chain:
    """The nnopt chain being built, and what the current tensor looks like on both sides."""

    shape: tuple[int, ...]  # Keras' shape of the current tensor, batch dimension left out
    specs: list[str] = dataclasses.field(default_factory=list)
    loads: list[tuple[int, Callable[[nn.Module], None]]] = dataclasses.field(default_factory=list)
    image: bool = False  # Keras holds (H, W, C) while torch holds (C, H, W)
    # Flat features after flattening an image: torch position t holds Keras feature perm[t].
    perm: torch.Tensor | None = None

    def add(self, spec: str, load: Callable[[nn.Module], None] | None = None) -> None:
        if load is not None:
            self.loads.append((len(self.specs), load))
        self.specs.append(spec)


def from_keras(model: Any, sample: Any = None) -> nn.Module:
    """Return an nnopt model computing the same function as the Keras ``model``.

    ``sample`` (array or tensor of inputs) is used to verify the conversion; without it, 16
    fixed random rows are used. Raises :class:`UnsupportedModelError` for anything that is not
    a chain of supported layers, or when the outputs differ by more than 1e-5.
    """
    keras = import_keras()
    if not isinstance(model, keras.Model):
        raise UnsupportedModelError(f"expected a Keras model, got {type(model).__name__}")
    if not model.built:
        raise UnsupportedModelError(
            f"Keras model {model.name!r} is not built; call it on data first (or give it an Input)"
        )

    layers = list(model.layers)
    input_shape = _input_shape(model, layers)
    chain = _Chain(shape=input_shape)
    if len(input_shape) == 3:
        chain.add("nhwc_to_nchw")
        chain.image = True
    output = "none"
    for i, layer in enumerate(layers):
        convert = _converter(layer, keras)
        if not layer.built:
            raise UnsupportedModelError(f"layer {layer.name!r} is not built; call the model on data first")
        in_shape = chain.shape
        convert(layer, chain)
        if hasattr(layer, "activation") and _activation(layer, chain, keras, last=i == len(layers) - 1):
            output = "softmax"
        if isinstance(layer, keras.layers.InputLayer):
            continue  # its output is the model input, already described
        try:
            chain.shape = tuple(int(d) for d in layer.compute_output_shape((None, *in_shape))[1:])
        except Exception as exc:  # Keras raises ValueError/TypeError for shapes it cannot follow
            raise UnsupportedModelError(
                f"layer {layer.name!r} ({type(layer).__name__}): cannot follow its output shape ({brief(exc)})"
            ) from None
    if not chain.loads:
        raise UnsupportedModelError(f"Keras model {model.name!r} has no Dense or Conv2D layer to convert")

    from nnopt.models.registry import create_model

    net = create_model(
        "sequential", input_shape=input_shape, layers=chain.specs, output=output, source="keras"
    )
    with torch.no_grad():
        for index, load in chain.loads:
            load(net.layers[index])
    net.eval()
    _verify(model, net, sample, keras)
    return net


def _converter(layer: Any, keras: ModuleType) -> Callable[[Any, _Chain], None]:
    name = type(layer).__name__
    # Exact Keras classes only: a subclass may compute anything in its call().
    if name not in _FROM_KERAS or type(layer) is not getattr(keras.layers, name, None):
        raise UnsupportedModelError(
            f"layer {layer.name!r} ({name}) is not supported; the Keras adapter converts "
            + ", ".join(SUPPORTED_KERAS_LAYERS)
        )
    return _FROM_KERAS[name]


def _skip(layer: Any, chain: _Chain) -> None:
    """InputLayer, Dropout (a no-op at inference, which is all nnopt evaluates) and Activation."""


def _dense(layer: Any, chain: _Chain) -> None:
    if chain.image:
        raise UnsupportedModelError(
            f"layer {layer.name!r} (Dense) is applied to a feature map of shape {chain.shape}; "
            "nnopt converts Dense layers on flat features only (add a Flatten before it)"
        )
    n_in, n_out = (int(d) for d in layer.kernel.shape)
    perm = chain.perm

    def load(linear: nn.Module) -> None:
        # Keras kernels are (in, out); torch Linear weights are (out, in).
        weight = _tensor(layer.kernel).T
        linear.weight.copy_(weight if perm is None else weight[:, perm])
        if layer.use_bias:
            linear.bias.copy_(_tensor(layer.bias))

    chain.add(f"linear:{n_in}:{n_out}" + ("" if layer.use_bias else ":nobias"), load)
    chain.perm = None


def _conv2d(layer: Any, chain: _Chain) -> None:
    _require_image(layer, chain)
    if tuple(layer.dilation_rate) != (1, 1) or layer.groups != 1:
        raise UnsupportedModelError(
            f"layer {layer.name!r} (Conv2D): dilation_rate {tuple(layer.dilation_rate)} and groups "
            f"{layer.groups} are not supported (only 1)"
        )
    kh, kw = (int(k) for k in layer.kernel_size)
    sh, sw = (int(s) for s in layer.strides)
    ph, pw = _keras_padding(layer, chain.shape[:2], (kh, kw), (sh, sw))
    n_in, n_out = int(layer.kernel.shape[2]), int(layer.kernel.shape[3])

    def load(conv: nn.Module) -> None:
        # Keras kernels are (KH, KW, in, out); torch's are (out, in, KH, KW).
        conv.weight.copy_(_tensor(layer.kernel).permute(3, 2, 0, 1))
        if layer.use_bias:
            conv.bias.copy_(_tensor(layer.bias))

    bias = "" if layer.use_bias else ":nobias"
    chain.add(f"conv2d:{n_in}:{n_out}:{kh}:{kw}:{sh}:{sw}:{ph}:{pw}{bias}", load)


def _batch_norm(layer: Any, chain: _Chain) -> None:
    rank = len(chain.shape)
    axes = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
    if [int(a) % (rank + 1) for a in axes] != [rank] or (rank != 1 and not chain.image):
        raise UnsupportedModelError(
            f"layer {layer.name!r} (BatchNormalization): only the channel axis of images or of flat "
            f"features is supported (axis {layer.axis} on a tensor of shape {chain.shape})"
        )
    channels = chain.shape[-1]
    perm = chain.perm

    def load(norm: nn.Module) -> None:
        def take(value: Any) -> torch.Tensor:
            t = _tensor(value)
            return t if perm is None else t[perm]

        norm.running_mean.copy_(take(layer.moving_mean))
        norm.running_var.copy_(take(layer.moving_variance))
        # Keras without scale/center is torch's affine layer with weight 1 and bias 0.
        norm.weight.copy_(take(layer.gamma) if layer.scale else torch.ones(channels))
        norm.bias.copy_(take(layer.beta) if layer.center else torch.zeros(channels))

    kind = "batchnorm2d" if chain.image else "batchnorm1d"
    chain.add(f"{kind}:{channels}:{float(layer.epsilon)!r}", load)


def _relu(layer: Any, chain: _Chain) -> None:
    if layer.max_value is not None or float(layer.negative_slope) != 0.0 or float(layer.threshold) != 0.0:
        raise UnsupportedModelError(
            f"layer {layer.name!r} (ReLU): max_value, negative_slope and threshold are not supported"
        )
    chain.add("relu")


def _pooling(layer: Any, chain: _Chain) -> None:
    _require_image(layer, chain)
    kh, kw = (int(k) for k in layer.pool_size)
    sh, sw = (int(s) for s in layer.strides)
    if _keras_padding(layer, chain.shape[:2], (kh, kw), (sh, sw)) != (0, 0):
        raise UnsupportedModelError(
            f"layer {layer.name!r} ({type(layer).__name__}): padding that adds pixels is not supported "
            "(torch pools would count or ignore them differently)"
        )
    kind = "maxpool2d" if type(layer).__name__ == "MaxPooling2D" else "avgpool2d"
    chain.add(f"{kind}:{kh}:{kw}:{sh}:{sw}")


def _global_average(layer: Any, chain: _Chain) -> None:
    _require_image(layer, chain)
    chain.add("globalavgpool2d")
    if not layer.keepdims:
        # (C, 1, 1) flattens to the same order on both sides.
        chain.add("flatten")
        chain.image = False


def _flatten(layer: Any, chain: _Chain) -> None:
    if chain.image:
        h, w, c = chain.shape
        # Keras reads (H, W, C) in order, torch (C, H, W); a channels_first Flatten reads as torch does.
        if layer.data_format != "channels_first":
            chain.perm = torch.arange(h * w * c).reshape(h, w, c).permute(2, 0, 1).flatten()
        chain.image = False
    chain.add("flatten")


_FROM_KERAS: dict[str, Callable[[Any, _Chain], None]] = {
    "InputLayer": _skip,
    "Dropout": _skip,
    "Activation": _skip,
    "Dense": _dense,
    "Conv2D": _conv2d,
    "BatchNormalization": _batch_norm,
    "ReLU": _relu,
    "MaxPooling2D": _pooling,
    "AveragePooling2D": _pooling,
    "GlobalAveragePooling2D": _global_average,
    "Flatten": _flatten,
}


def _activation(layer: Any, chain: _Chain, keras: ModuleType, last: bool) -> bool:
    """Append the layer's activation; True when it is the final softmax (kept as metadata)."""
    act_names = {keras.activations.get(name): name for name in _ACTIVATIONS}
    activation = layer.activation
    if activation is keras.activations.get("softmax") and last:
        # Stored as metadata so forward() returns logits, as every nnopt model does.
        return True
    if activation in act_names:
        if act_names[activation] != "linear":
            chain.add(act_names[activation])
        return False
    where = "on a layer that is not the last" if activation is keras.activations.get("softmax") else "unsupported"
    raise UnsupportedModelError(
        f"layer {layer.name!r} ({type(layer).__name__}): activation "
        f"{getattr(activation, '__name__', activation)!r} {where}; supported: "
        + ", ".join(_ACTIVATIONS) + ", and softmax on the last layer"
    )


def _require_image(layer: Any, chain: _Chain) -> None:
    if not chain.image or len(chain.shape) != 3:
        raise UnsupportedModelError(
            f"layer {layer.name!r} ({type(layer).__name__}) needs an (H, W, C) image input, got shape {chain.shape}"
        )
    if layer.data_format != "channels_last":
        raise UnsupportedModelError(
            f"layer {layer.name!r} ({type(layer).__name__}): only data_format='channels_last' is supported"
        )


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """Pixels Keras' ``padding="same"`` adds before and after one spatial axis of ``size``."""
    total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2  # the odd pixel goes after, as in Keras and torch


def _keras_padding(
    layer: Any, hw: tuple[int, ...], kernel: tuple[int, int], stride: tuple[int, int]
) -> tuple[int, int]:
    if layer.padding == "valid":
        return 0, 0
    pads = [same_padding(n, k, s) for n, k, s in zip(hw, kernel, stride)]
    if any(before != after for before, after in pads):
        raise UnsupportedModelError(
            f"layer {layer.name!r} ({type(layer).__name__}): padding='same' pads unevenly here "
            f"({pads} for input {tuple(hw)}), which a torch layer cannot express"
        )
    return pads[0][0], pads[1][0]


def _tensor(value: Any) -> torch.Tensor:
    # Under the torch backend a Keras variable's ``.value`` is a torch Parameter (possibly on GPU);
    # reading it directly avoids numpy's copy-keyword deprecation in Keras' own conversion.
    return torch.as_tensor(getattr(value, "value", value)).detach().to("cpu", torch.float32)


def _input_shape(model: Any, layers: list[Any]) -> tuple[int, ...]:
    # Functional and Sequential models declare their input shape; subclassed models do not.
    try:
        shape = model.input_shape
    except (AttributeError, ValueError):
        shape = None
    if isinstance(shape, tuple) and len(shape) >= 2 and all(isinstance(d, int) for d in shape[1:]):
        return tuple(shape[1:])
    dense = [layer for layer in layers if type(layer).__name__ == "Dense" and layer.built]
    if dense:
        return (int(dense[0].kernel.shape[0]),)
    raise UnsupportedModelError(f"Keras model {model.name!r} declares no input shape; build it with keras.Input")


def _verify(model: Any, net: nn.Module, sample: Any, keras: Any) -> None:
    """Refuse the conversion unless both models agree on ``sample`` (or fixed random rows)."""
    if sample is None:
        x = _random_rows(net.input_shape)
    elif isinstance(sample, torch.Tensor):
        x = sample.detach().to("cpu", torch.float32)
    else:
        x = torch.as_tensor(np.asarray(sample, dtype=np.float32))
    # Torch tensors throughout: Keras' numpy conversion warns under NumPy 2 with this torch.
    try:
        expected = _tensor(model(keras.ops.convert_to_tensor(x), training=False)).numpy()
    except Exception as exc:  # any Keras failure here means the model is not a plain chain
        raise UnsupportedModelError(
            f"Keras model {model.name!r} failed on a verification batch of shape "
            f"{tuple(x.shape)} ({brief(exc)}); pass sample= with real inputs"
        ) from exc
    with torch.inference_mode():
        got = net.predict_proba(x).numpy()
    if got.shape != expected.shape or not np.allclose(got, expected, rtol=0.0, atol=_ATOL):
        diff = (
            float(np.abs(got - expected).max()) if got.shape == expected.shape else float("nan")
        )
        raise UnsupportedModelError(
            f"Keras model {model.name!r} could not be converted faithfully (max difference "
            f"{diff:.3g}, shapes {expected.shape} vs {got.shape}): the layers are not applied "
            "as a simple chain in the order Keras lists them"
        )


def _random_rows(shape: tuple[int, ...]) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn((_RANDOM_ROWS, *shape), generator=gen)



def __getattr__(name: str) -> Any:
    # nnopt -> Keras lives in keras_export, which imports this module; loaded here only when asked for.
    if name == "to_keras":
        from nnopt.models.keras_export import to_keras

        return to_keras
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
