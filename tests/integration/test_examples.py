import importlib.util
from pathlib import Path

import nnopt

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pytorch_classic_example_end_to_end(tmp_path, capsys):
    results = _load("classic_simplenet").main(["--epochs", "15", "--out", str(tmp_path / "m")])
    assert results["baseline_accuracy"] >= 0.95
    assert results["quantized_accuracy"] >= results["baseline_accuracy"] - 0.01
    reloaded = nnopt.load_model(tmp_path / "m")
    assert nnopt.accuracy(reloaded, nnopt.load_digits().test) == results["quantized_accuracy"]
    assert "QuantizedLinear" in capsys.readouterr().out


def test_minilm_int8_example(tmp_path, capsys):
    import pytest

    pytest.importorskip("transformers")
    pytest.importorskip("onnxruntime")
    results = _load("minilm_int8").main(["--out", str(tmp_path / "m"), "--seconds", "0.2"])
    assert results["cosine_mean"] >= 0.995 and results["cosine_min"] >= 0.98
    assert results["compression_ratio"] > 3.8
    assert results["time_ratio"] > 0  # a measured ratio; its size depends on the machine
    assert "measured" in capsys.readouterr().out


# ------------------------------------------------------------------ user-written models (examples/user_models.py)


def test_timeseries_cnn_example_halves_channels_without_labels_and_reloads(tmp_path):
    results = _load("timeseries_cnn").main(["--samples", "300", "--length", "128", "--width", "16", "--epochs", "2",
                                            "--seconds", "0.05", "--out", str(tmp_path / "m")])
    assert results["macs_optimized"] < 0.3 * results["macs_original"]  # half the channels: about a quarter of MACs
    assert results["reloaded_equal"] == 1.0
    assert results["agreement"] >= 0.6


def test_depthwise_cnn_example_cuts_inverted_residuals_and_reloads(tmp_path):
    results = _load("depthwise_cnn").main(["--samples", "96", "--size", "32", "--epochs", "1", "--seconds", "0.05",
                                           "--out", str(tmp_path / "m")])
    assert results["macs_optimized"] < 0.4 * results["macs_original"]
    assert results["reloaded_equal"] == 1.0 and results["cosine_mean"] > 0.5


def test_small_vit_example_cuts_heads_and_reloads(tmp_path):
    results = _load("small_vit").main(["--samples", "96", "--size", "16", "--dim", "32", "--epochs", "1",
                                       "--seconds", "0.05", "--out", str(tmp_path / "m")])
    assert results["macs_optimized"] < 0.7 * results["macs_original"]
    assert results["reloaded_equal"] == 1.0 and results["compression_ratio"] > 4


def test_lstm_example_quantizes_recurrent_weights_and_reloads(tmp_path):
    results = _load("lstm_classifier").main(["--samples", "300", "--vocab", "500", "--epochs", "2",
                                             "--seconds", "0.05", "--out", str(tmp_path / "m")])
    assert results["reloaded_equal"] == 1.0 and results["compression_ratio"] > 3
    assert results["cosine_mean"] > 0.8
