"""The Keras example end to end, and the Keras adapter's conversion and refusals."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import nnopt
from nnopt.errors import UnsupportedModelError

# The backend is fixed when Keras is first imported; without this Keras would look for TensorFlow.
os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras")

# Keras' own fit/evaluate logging converts torch tensors with np.array(), which NumPy 2 flags
# for this torch; it is upstream noise, not something nnopt or the example does.
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "classic_simplenet_keras.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("classic_simplenet_keras", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _mlp(*layers):
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((64,)), *layers])


@pytest.mark.slow
def test_example_trains_prunes_and_quantizes(capsys):
    results = _load_example().main(["--epochs", "3"])
    assert results["keras_accuracy"] >= 0.85
    assert abs(results["quantized_accuracy"] - results["keras_accuracy"]) <= 0.03
    assert results["sparsity"] > 0
    assert "isinstance(model, torch.nn.Module): True" in capsys.readouterr().out


def test_from_keras_matches_keras_and_round_trips(digits, tmp_path):
    km = _mlp(
        keras.layers.Dense(32, activation="relu"),
        keras.layers.Dropout(0.2),
        keras.layers.Dense(16, activation="tanh"),
        keras.layers.Dense(10, activation="softmax"),
    )
    x = digits.test.x
    model = nnopt.from_keras(km, sample=x)
    assert model.config.output == "softmax"

    expected = km(x, training=False).detach().cpu().numpy()
    with torch.inference_mode():
        logits = model(x)
        probs = torch.softmax(logits, dim=-1).numpy()
    np.testing.assert_allclose(probs, expected, rtol=0, atol=1e-5)

    nnopt.save_model(model, tmp_path / "converted")
    reloaded = nnopt.load_model(tmp_path / "converted")
    with torch.inference_mode():
        torch.testing.assert_close(reloaded(x), logits, rtol=0, atol=0)


@pytest.mark.parametrize(
    "make_layer, class_name",
    [
        (lambda: keras.layers.LayerNormalization(name="odd_layer"), "LayerNormalization"),
        (lambda: keras.layers.Reshape((8, 8), name="odd_layer"), "Reshape"),
    ],
)
def test_unsupported_layer_is_named(make_layer, class_name):
    km = _mlp(make_layer(), keras.layers.Flatten(), keras.layers.Dense(10))
    with pytest.raises(UnsupportedModelError, match=rf"'odd_layer' \({class_name}\)"):
        nnopt.from_keras(km)


def test_conv1d_is_unsupported():
    keras.utils.set_random_seed(0)
    km = keras.Sequential(
        [keras.Input((8, 8)), keras.layers.Conv1D(4, 3, name="conv"), keras.layers.Flatten()]
    )
    with pytest.raises(UnsupportedModelError, match=r"'conv' \(Conv1D\)"):
        nnopt.from_keras(km)


def test_softmax_before_the_last_layer_is_refused():
    km = _mlp(keras.layers.Dense(16, activation="softmax", name="early"), keras.layers.Dense(10))
    with pytest.raises(UnsupportedModelError, match="'early'.*softmax.*not the last"):
        nnopt.from_keras(km)


def test_model_that_is_not_a_chain_is_refused():
    class Residual(keras.Model):
        def __init__(self):
            super().__init__()
            self.a = keras.layers.Dense(64)
            self.b = keras.layers.Dense(64)

        def call(self, x):
            return x + self.b(self.a(x))

    km = Residual()
    km(np.zeros((1, 64), dtype=np.float32))
    with pytest.raises(UnsupportedModelError, match="simple chain"):
        nnopt.from_keras(km)


def test_unbuilt_model_is_refused():
    km = keras.Sequential([keras.layers.Dense(10)])
    with pytest.raises(UnsupportedModelError, match="call it on data first"):
        nnopt.from_keras(km)


def test_structured_pruning_of_the_keras_simplenet(digits, tmp_path):
    km = _mlp(
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(32, activation="relu"),
        keras.layers.Dense(10, activation="softmax"),
    )
    model = nnopt.from_keras(km, sample=digits.test.x)
    nnopt.train(model, digits.train, nnopt.TrainConfig(epochs=5), progress=False)
    config = nnopt.StructuredPruneConfig(ratio=0.5, importance="gradient", finetune_epochs=3)
    small = nnopt.prune(model, config, data=digits.train)
    widths = [m.out_features for m in small.modules() if isinstance(m, torch.nn.Linear)]
    assert widths == [32, 16, 10]  # hidden layers halved, the 10 outputs kept
    nnopt.save_model(small, tmp_path / "small")
    reloaded = nnopt.load_model(tmp_path / "small")
    with torch.inference_mode():
        torch.testing.assert_close(reloaded(digits.test.x), small(digits.test.x), rtol=0, atol=0)
        accuracy = (small(digits.test.x).argmax(-1) == digits.test.y).float().mean()
    assert accuracy > 0.85
