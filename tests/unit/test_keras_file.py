"""Keras 3 .keras files: safe loading (refusals before Keras runs anything) and faithful round trips."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import nnopt
from nnopt.errors import ModelFormatError, NnoptError, OutputError, UnsafeFileError, UnsupportedModelError

# The backend is fixed when Keras is first imported; without this Keras would look for TensorFlow.
os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras")

from nnopt.io import keras_file  # noqa: E402
from nnopt.io.keras_file import load_keras, save_keras  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)


def _simplenet() -> keras.Model:
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((64,)),
        # Explicit names: Keras numbers unnamed layers per process, so names would depend on earlier tests.
        keras.layers.Dense(64, activation="relu", name="dense"),
        keras.layers.Dense(32, activation="relu", name="dense_1"),
        keras.layers.Dense(10, activation="softmax", name="dense_2"),
    ])


def _convnet() -> keras.Model:
    keras.utils.set_random_seed(0)
    km = keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(4, 3, padding="same"),
        keras.layers.BatchNormalization(),
        keras.layers.ReLU(),
        keras.layers.Flatten(),
        keras.layers.Dropout(0.25),
        keras.layers.Dense(10, activation="softmax"),
    ])
    # Non-trivial statistics, so that a wrong epsilon, variance or channel order shows.
    rng = np.random.default_rng(0)
    km.layers[1].set_weights([
        rng.uniform(0.5, 1.5, 4).astype("float32"), rng.normal(size=4).astype("float32"),
        rng.normal(size=4).astype("float32"), rng.uniform(0.05, 2.0, 4).astype("float32"),
    ])
    return km


def _keras_out(km, x: torch.Tensor) -> np.ndarray:
    return km(keras.ops.convert_to_tensor(x), training=False).detach().cpu().numpy()


def _torch_out(model, x: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        return model.predict_proba(x).numpy()


def _kernels(km) -> list[np.ndarray]:
    # Under the torch backend a variable's value is a torch Parameter.
    return [layer.kernel.value.detach().cpu().numpy() for layer in km.layers if hasattr(layer, "kernel")]


def _rewrite(src: Path, dst: Path, config=None, extra: dict[str, bytes] | None = None) -> Path:
    """Copy a real .keras archive, replacing config.json and adding members."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename == "config.json" and config is not None:
                data = config if isinstance(config, bytes) else json.dumps(config).encode()
            zout.writestr(info.filename, data)
        for name, data in (extra or {}).items():
            zout.writestr(name, data)
    return dst


@pytest.fixture(scope="module")
def simplenet_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("keras") / "simplenet.keras"
    _simplenet().save(path)
    return path


def _config(path: Path) -> dict:
    with zipfile.ZipFile(path) as archive:
        return json.loads(archive.read("config.json"))


# -- refusals ------------------------------------------------------------------------------------


def test_lambda_layer_is_refused_before_keras_reads_it(tmp_path):
    keras.utils.set_random_seed(0)
    km = keras.Sequential([
        keras.Input((64,)), keras.layers.Lambda(lambda t: t * 2, name="doubler"), keras.layers.Dense(10),
    ])
    path = tmp_path / "lambda.keras"
    km.save(path)
    with pytest.raises(UnsafeFileError, match=r"layer 'doubler' is a Lambda"):
        load_keras(path)


CANARY_MODULE = "nnopt_keras_canary_payload"


def _payloads(canary: Path) -> dict[str, object]:
    command = f"touch {canary}"
    return {
        # A layer class from a module whose import would run its code.
        "foreign-module": {"module": CANARY_MODULE, "class_name": "Payload", "config": {"name": "dense_1"}},
        "custom-object": {
            "module": "keras.layers", "class_name": "Dense", "registered_name": f"{CANARY_MODULE}>Payload",
            "config": {"name": "dense_1", "units": 10},
        },
        "builtins-exec": {"activation": {
            "module": "builtins", "class_name": "function", "config": "exec", "registered_name": "function",
        }},
        "os-system": {"kernel_initializer": {"module": "os", "class_name": "system", "config": {"command": command}}},
        "keras-internal-function": {"activation": {
            "module": "keras.src.utils.python_utils", "class_name": "func_load", "config": {},
            "registered_name": None,
        }},
    }


@pytest.mark.parametrize("payload", ["foreign-module", "custom-object", "builtins-exec", "os-system",
                                     "keras-internal-function"])
def test_references_outside_keras_are_refused_and_never_run(payload, simplenet_file, tmp_path, monkeypatch):
    canary = tmp_path / "canary"
    (tmp_path / f"{CANARY_MODULE}.py").write_text(
        f"from pathlib import Path\nPath({str(canary)!r}).touch()\nPayload = object\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    config = _config(simplenet_file)
    layers = config["config"]["layers"]
    target = next(i for i, layer in enumerate(layers) if layer["config"]["name"] == "dense_1")
    crafted = _payloads(canary)[payload]
    if "module" in crafted:  # the layer itself
        layers[target] = {**layers[target], **crafted}
    else:  # one of its attributes
        layers[target]["config"].update(crafted)
    path = _rewrite(simplenet_file, tmp_path / "crafted.keras", config)

    with pytest.raises(UnsafeFileError, match="'dense_1'"):
        load_keras(path)
    assert not canary.exists()
    assert CANARY_MODULE not in sys.modules
    # The canary is live: importing its module does create the file the refusal prevented.
    __import__(CANARY_MODULE)
    assert canary.exists()
    sys.modules.pop(CANARY_MODULE, None)


def test_h5_files_are_refused(tmp_path, simplenet_file):
    h5 = tmp_path / "legacy.h5"
    _simplenet().save(h5)
    with pytest.raises(UnsafeFileError, match=r"\.h5"):
        load_keras(h5)
    disguised = tmp_path / "disguised.keras"  # HDF5 content under a .keras name
    disguised.write_bytes(h5.read_bytes())
    with pytest.raises(UnsafeFileError, match="HDF5"):
        load_keras(disguised)


def _flip_byte(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 0xFF]) + data[offset + 1:]


def test_corrupt_and_malformed_files_are_model_format_errors(simplenet_file, tmp_path):
    data = simplenet_file.read_bytes()
    cases = {
        "garbage.keras": random.Random(0).randbytes(512),
        "truncated.keras": data[: len(data) // 2],
        "flipped.keras": _flip_byte(data, len(data) // 2),  # inside the weights: a CRC mismatch
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
    _rewrite(simplenet_file, tmp_path / "badjson.keras", b"{not json")
    _rewrite(simplenet_file, tmp_path / "notamodel.keras", [1, 2, 3])
    _rewrite(simplenet_file, tmp_path / "extra.keras", extra={"payload.py": b"print('hi')"})
    for path in sorted(tmp_path.iterdir()):
        with pytest.raises(ModelFormatError):
            load_keras(path)
    with pytest.raises(ModelFormatError, match="no such file"):
        load_keras(tmp_path / "missing.keras")
    (tmp_path / "folder.keras").mkdir()
    with pytest.raises(ModelFormatError, match="not a file"):
        load_keras(tmp_path / "folder.keras")
    renamed = tmp_path / "model.zip"
    renamed.write_bytes(data)
    with pytest.raises(ModelFormatError, match=r"expected a Keras 3 \.keras file"):
        load_keras(renamed)


def test_unsafe_member_names_and_zip_bombs_are_refused(simplenet_file, tmp_path, monkeypatch):
    escape = _rewrite(simplenet_file, tmp_path / "escape.keras", extra={"../outside.txt": b"x"})
    with pytest.raises(UnsafeFileError, match="unsafe member name"):
        load_keras(escape)
    # The bound is on the sizes the archive declares; lower it below this small file's.
    monkeypatch.setattr(keras_file, "MAX_UNCOMPRESSED_BYTES", 1024)
    with pytest.raises(ModelFormatError, match="zip bomb"):
        load_keras(simplenet_file)


def test_config_cannot_declare_more_weights_than_the_file_holds(simplenet_file, tmp_path):
    config = _config(simplenet_file)
    dense = next(layer for layer in config["config"]["layers"] if layer["config"]["name"] == "dense_1")
    dense["config"]["units"] = 100_000  # 64 × 100,000 floats: Keras would allocate them first
    path = _rewrite(simplenet_file, tmp_path / "inflated.keras", config)
    with pytest.raises(ModelFormatError, match="declares at least"):
        load_keras(path)


def test_unsupported_keras_layer_is_named_before_loading(tmp_path):
    km = keras.Sequential([
        keras.Input((64,)), keras.layers.LayerNormalization(name="norm"), keras.layers.Dense(10),
    ])
    path = tmp_path / "norm.keras"
    km.save(path)
    with pytest.raises(UnsupportedModelError, match=r"'norm' \(LayerNormalization\)"):
        load_keras(path)


def test_mutated_files_raise_only_nnopt_errors(simplenet_file, tmp_path):
    data = simplenet_file.read_bytes()
    rng = random.Random(0)
    for i in range(12):
        mutated = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        path = tmp_path / f"m{i}.keras"
        path.write_bytes(bytes(mutated))
        try:
            load_keras(path)
        except NnoptError:
            pass  # anything else fails the test with the library's own exception


# -- round trips ---------------------------------------------------------------------------------


def _threshold(model: torch.nn.Module) -> float:
    # Between the smallest weights, so that pruning zeros some but not all of them.
    weights = torch.cat([m.weight.detach().abs().flatten() for m in model.modules()
                         if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))])
    return float(weights.quantile(0.3))


@pytest.mark.parametrize("make, shape", [(_simplenet, (64,)), (_convnet, (8, 8, 1))], ids=["simplenet", "conv"])
def test_round_trip_through_pruning_keeps_outputs_and_zeros(make, shape, tmp_path):
    km = make()
    src = tmp_path / "model.keras"
    km.save(src)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    x = torch.randn((32, *shape), generator=torch.Generator().manual_seed(1))

    model = load_keras(src)
    np.testing.assert_allclose(_torch_out(model, x), _keras_out(km, x), rtol=0, atol=1e-5)

    pruned = nnopt.prune(model, nnopt.ThresholdPruneConfig(threshold=_threshold(model)))
    out = save_keras(pruned, tmp_path / "pruned.keras")
    assert out == tmp_path / "pruned.keras"
    assert hashlib.sha256(src.read_bytes()).hexdigest() == digest  # the input is untouched
    back = keras.saving.load_model(out)
    np.testing.assert_allclose(_keras_out(back, x), _torch_out(pruned, x), rtol=0, atol=1e-5)

    torch_weights = [m.weight.detach() for m in pruned.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    kernels = _kernels(back)
    assert len(kernels) == len(torch_weights)
    for kernel, weight in zip(kernels, torch_weights):
        assert int((kernel == 0).sum()) == int((weight == 0).sum())
    zeros = sum(int((w == 0).sum()) for w in torch_weights)
    assert 0 < zeros < sum(w.numel() for w in torch_weights)
    assert not any((k == 0).any() for k in _kernels(km))  # the zeros come from pruning
    # Pruned weights stay in place: the first layer's zero pattern is the same in both layouts.
    first = torch_weights[0]
    expected = (first == 0).permute(2, 3, 1, 0) if first.dim() == 4 else (first == 0).T
    np.testing.assert_array_equal(kernels[0] == 0, expected.numpy())
    # nnopt's own reader accepts what it wrote.
    np.testing.assert_allclose(_torch_out(load_keras(out), x), _torch_out(pruned, x), rtol=0, atol=1e-5)


def test_pooling_and_functional_models_round_trip(tmp_path):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 2))
    h = keras.layers.Conv2D(6, 3, padding="valid", use_bias=False, activation="relu")(inputs)
    h = keras.layers.MaxPooling2D(2)(h)
    h = keras.layers.Conv2D(5, 1)(h)
    h = keras.layers.AveragePooling2D(1)(h)
    h = keras.layers.Flatten()(h)
    h = keras.layers.BatchNormalization(epsilon=0.01)(h)
    h = keras.layers.Activation("tanh")(h)
    outputs = keras.layers.Dense(3)(h)
    km = keras.Model(inputs, outputs)
    rng = np.random.default_rng(0)
    norm = next(layer for layer in km.layers if isinstance(layer, keras.layers.BatchNormalization))
    norm.set_weights([rng.uniform(0.5, 1.5, 45).astype("float32") for _ in range(2)]
                     + [rng.normal(size=45).astype("float32"), rng.uniform(0.1, 2, 45).astype("float32")])
    path = tmp_path / "functional.keras"
    km.save(path)
    x = torch.randn(16, 8, 8, 2, generator=torch.Generator().manual_seed(2))

    model = load_keras(path)
    np.testing.assert_allclose(_torch_out(model, x), _keras_out(km, x), rtol=0, atol=1e-5)
    back = keras.saving.load_model(save_keras(model, tmp_path / "again.keras"))
    np.testing.assert_allclose(_keras_out(back, x), _keras_out(km, x), rtol=0, atol=1e-5)


def test_structured_pruned_simplenet_is_saved_narrower(simplenet_file, tmp_path):
    model = load_keras(simplenet_file)
    small = nnopt.prune(model, nnopt.StructuredPruneConfig(ratio=0.5, importance="l1"))
    back = keras.saving.load_model(save_keras(small, tmp_path / "small.keras"))
    assert [layer.units for layer in back.layers] == [32, 16, 10]
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(3))
    np.testing.assert_allclose(_keras_out(back, x), _torch_out(small, x), rtol=0, atol=1e-5)


def test_weight_quantized_layers_are_written_dequantized(simplenet_file, tmp_path):
    quantized = nnopt.quantize(load_keras(simplenet_file), nnopt.WeightQuantConfig(bits=4))
    back = keras.saving.load_model(save_keras(quantized, tmp_path / "q.keras"))
    layers = [m for m in quantized.modules() if hasattr(m, "compute")]
    assert layers and all(m.compute == "auto" for m in layers)  # save_keras gave the modes back
    kernels = _kernels(back)
    for layer in layers:
        weight = layer.dense_weight().detach().T.numpy()
        assert any(k.shape == weight.shape and np.array_equal(k, weight) for k in kernels)
    # The Keras model computes with those float weights; so does the dequantize path in torch
    # (the int kernels of the auto path round activations to bf16).
    reference = copy.deepcopy(quantized)
    for module in reference.modules():
        if hasattr(module, "compute"):
            module.compute = "dequantize"
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(4))
    np.testing.assert_allclose(_keras_out(back, x), _torch_out(reference, x), rtol=0, atol=1e-5)


def test_nnopt_simplenet_is_written_with_its_softmax(tmp_path):
    model = nnopt.create_model("simplenet", seed=0)
    model.train()  # save_keras must evaluate in inference mode and give the mode back
    back = keras.saving.load_model(save_keras(model, tmp_path / "simplenet.keras"))
    assert model.training
    assert back.layers[-1].get_config()["activation"] == "softmax"
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(5))
    np.testing.assert_allclose(_keras_out(back, x), _torch_out(model.eval(), x), rtol=0, atol=1e-5)


# -- writing refusals ----------------------------------------------------------------------------


def test_save_refuses_existing_files_the_source_and_wrong_suffixes(simplenet_file, tmp_path):
    model = load_keras(simplenet_file)
    target = tmp_path / "out.keras"
    target.write_bytes(b"user data")
    with pytest.raises(OutputError, match="exists"):
        save_keras(model, target)
    assert target.read_bytes() == b"user data"
    save_keras(model, target, overwrite=True)
    assert zipfile.is_zipfile(target)

    digest = hashlib.sha256(simplenet_file.read_bytes()).hexdigest()
    pruned = nnopt.prune(model, nnopt.ThresholdPruneConfig(threshold=0.01))  # remembers its source too
    with pytest.raises(OutputError, match="input"):
        save_keras(pruned, simplenet_file, overwrite=True)
    assert hashlib.sha256(simplenet_file.read_bytes()).hexdigest() == digest
    with pytest.raises(OutputError, match=r"\.keras"):
        save_keras(model, tmp_path / "out.h5")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.keras"]  # no temporary files left


@pytest.mark.parametrize("make, layer", [
    (lambda: nnopt.create_model("resnet8", seed=0), "stem.0"),  # channels-first input
    (lambda: nnopt.quantize(nnopt.create_model("simplenet", seed=0), nnopt.DynamicQuantConfig()), "features.0"),
])
def test_layers_without_a_keras_twin_are_named(make, layer, tmp_path):
    with pytest.raises(UnsupportedModelError, match=rf"'{layer}"):
        save_keras(make(), tmp_path / "x.keras")
    assert not list(tmp_path.iterdir())
