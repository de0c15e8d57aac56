"""Convert a Keras 3 model (torch backend) into an nnopt ``sequential`` model.

Only plain chains are converted: Dense, Flatten, Dropout and Activation layers applied one after
another. The result is checked numerically against the Keras model before it is returned, so a
model whose ``call`` does something other than chain its layers is refused instead of silently
converted wrongly.

>>> import os; os.environ["KERAS_BACKEND"] = "torch"  # before Keras is first imported
>>> import keras, nnopt
>>> km = keras.Sequential([keras.Input((64,)), keras.layers.Dense(10, activation="softmax")])
>>> model = nnopt.from_keras(km)  # doctest: +SKIP
>>> model.config.layers, model.config.output  # doctest: +SKIP
(('linear:64:10',), 'softmax')
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from torch import nn

from nnopt.errors import UnsupportedModelError

# Keras activations with an exact torch twin (Keras' gelu defaults to the erf form, as torch's).
_ACTIVATIONS = ("relu", "tanh", "sigmoid", "gelu", "linear")
_ATOL = 1e-5
_RANDOM_ROWS = 16


def from_keras(model: Any, sample: Any = None) -> nn.Module:
    """Return an nnopt model computing the same function as the Keras ``model``.

    ``sample`` (array or tensor of inputs) is used to verify the conversion; without it, 16
    fixed random rows are used. Raises :class:`UnsupportedModelError` for anything that is not
    a chain of supported layers, or when the outputs differ by more than 1e-5.
    """
    # Under the torch backend Keras models are torch modules; other backends cannot be mixed in.
    os.environ.setdefault("KERAS_BACKEND", "torch")
    import keras

    if keras.backend.backend() != "torch":
        raise UnsupportedModelError(
            f"Keras is using the {keras.backend.backend()!r} backend; set KERAS_BACKEND=torch "
            "before importing keras"
        )
    if not isinstance(model, keras.Model):
        raise UnsupportedModelError(f"expected a Keras model, got {type(model).__name__}")
    if not model.built:
        raise UnsupportedModelError(
            f"Keras model {model.name!r} is not built; call it on data first (or give it an Input)"
        )

    act_names = {keras.activations.get(name): name for name in _ACTIVATIONS}
    softmax = keras.activations.get("softmax")
    layers = list(model.layers)
    specs: list[str] = []
    weights: list[tuple[int, Any]] = []  # (index in specs, Dense layer)
    output = "none"
    for i, layer in enumerate(layers):
        last = i == len(layers) - 1
        if isinstance(layer, keras.layers.InputLayer):
            continue
        if isinstance(layer, keras.layers.Dropout):
            continue  # a no-op at inference, which is all nnopt evaluates
        if isinstance(layer, keras.layers.Flatten):
            specs.append("flatten")
            continue
        if isinstance(layer, keras.layers.Dense):
            if not layer.built:
                raise UnsupportedModelError(
                    f"layer {layer.name!r} is not built; call the model on data first"
                )
            n_in, n_out = (int(d) for d in layer.kernel.shape)
            weights.append((len(specs), layer))
            specs.append(f"linear:{n_in}:{n_out}" + ("" if layer.use_bias else ":nobias"))
        elif not isinstance(layer, keras.layers.Activation):
            raise UnsupportedModelError(
                f"layer {layer.name!r} ({type(layer).__name__}) is not supported; the Keras "
                "adapter converts Dense, Flatten, Dropout, Activation and InputLayer"
            )
        activation = layer.activation
        if activation is softmax and last:
            # Stored as metadata so forward() returns logits, as every nnopt model does.
            output = "softmax"
        elif activation in act_names:
            if act_names[activation] != "linear":
                specs.append(act_names[activation])
        else:
            where = "on a layer that is not the last" if activation is softmax else "unsupported"
            raise UnsupportedModelError(
                f"layer {layer.name!r} ({type(layer).__name__}): activation "
                f"{getattr(activation, '__name__', activation)!r} {where}; supported: "
                + ", ".join(_ACTIVATIONS) + ", and softmax on the last layer"
            )
    if not weights:
        raise UnsupportedModelError(f"Keras model {model.name!r} has no Dense layer to convert")

    from nnopt.models.registry import create_model

    in_features = int(weights[0][1].kernel.shape[0])
    net = create_model(
        "sequential", input_shape=_input_shape(model, in_features), layers=specs, output=output,
        source="keras",
    )
    with torch.no_grad():
        for index, layer in weights:
            linear = net.layers[index]
            # Keras kernels are (in, out); torch Linear weights are (out, in).
            linear.weight.copy_(_tensor(layer.kernel).T)
            if layer.use_bias:
                linear.bias.copy_(_tensor(layer.bias))
    net.eval()
    _verify(model, net, sample, keras)
    return net


def _tensor(value: Any) -> torch.Tensor:
    # Under the torch backend a Keras variable's ``.value`` is a torch Parameter (possibly on GPU);
    # reading it directly avoids numpy's copy-keyword deprecation in Keras' own conversion.
    return torch.as_tensor(getattr(value, "value", value)).detach().to("cpu", torch.float32)


def _input_shape(model: Any, in_features: int) -> tuple[int, ...]:
    # Functional and Sequential models declare their input shape; subclassed models do not.
    try:
        shape = model.input_shape
    except (AttributeError, ValueError):
        return (in_features,)
    if isinstance(shape, tuple) and len(shape) >= 2 and all(isinstance(d, int) for d in shape[1:]):
        return tuple(shape[1:])
    return (in_features,)


def _verify(model: Any, net: nn.Module, sample: Any, keras: Any) -> None:
    """Refuse the conversion unless both models agree on ``sample`` (or fixed random rows)."""
    if sample is None:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn((_RANDOM_ROWS, *net.input_shape), generator=gen)
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
            f"{tuple(x.shape)} ({type(exc).__name__}: {exc}); pass sample= with real inputs"
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
