import dataclasses
import json

import pytest
import torch

import nnopt
from nnopt.data import Split
from nnopt.errors import ConfigError, UnsupportedModelError
from nnopt.lineage import get_lineage
from nnopt.quantization import mixed
from nnopt.quantization.mixed import (
    LayerSensitivity,
    MixedPrecisionConfig,
    SensitivityReport,
    assign_bits,
    sensitivity,
)

LAYERS = ("features.0", "features.2", "classifier")


@pytest.fixture(scope="module")
def calib(digits):
    return digits.calibration(256)


@pytest.fixture(scope="module")
def report(trained_simplenet, calib):
    return sensitivity(trained_simplenet, calib, bits_options=(8, 4, 2))


def relative_mse(model, reference, x):
    with torch.no_grad():
        ref, out = reference(x).double(), model(x).double()
    return float(((out - ref) ** 2).mean() / ref.var(unbiased=False))


def details(model):
    return get_lineage(model).applied[-1].details


def uniform_ratio(report, bits):
    return report.bytes_of(dict.fromkeys(LAYERS, bits)) / report.fp32_bytes


def test_sensitivity_grows_as_bits_shrink(report, trained_simplenet, calib):
    assert [item.name for item in report.layers] == list(LAYERS)
    assert report.bits_options == (8, 4, 2) and report.rows == len(calib)
    for item in report.layers:
        assert all(e >= 0 for e in item.error.values())
        assert item.error[2] >= item.error[4] >= item.error[8]
        assert item.error[2] > 10 * item.error[8]
        assert item.bytes[8] > item.bytes[4] > item.bytes[2]
    # Bit-packed codes plus an fp32 scale and int32 zero point per output channel.
    assert report.layer("features.0").bytes[4] == 64 * 64 * 4 // 8 + 8 * 64
    assert report.layer("features.0").fp32_bytes == 64 * 64 * 4
    # The metric is the relative output MSE with only that layer quantized, as documented.
    only = nnopt.quantize(trained_simplenet, nnopt.WeightQuantConfig(bits=4, per_channel=True, layers=("classifier",)))
    expected = relative_mse(only, trained_simplenet, calib.x)
    assert report.layer("classifier").error[4] == pytest.approx(expected, rel=1e-6)
    text = str(report)
    assert "features.0" in text and "error @2b" in text and "bytes @4b" in text
    assert json.loads(json.dumps(report.to_dict()))["layers"][2]["error"]["2"] == report.layers[2].error[2]


def test_sensitivity_leaves_the_model_unchanged_and_accepts_batches(trained_simplenet, calib, report):
    before = {k: v.clone() for k, v in trained_simplenet.state_dict().items()}
    was_training = trained_simplenet.training
    trained_simplenet.train()
    try:
        batches = (x for x in (calib.x[:100], calib.x[100:]))  # a one-shot generator of input batches
        again = sensitivity(trained_simplenet, batches, bits_options=(8, 4, 2))
        assert trained_simplenet.training  # mode restored after measuring in eval mode
    finally:
        trained_simplenet.train(was_training)
    assert all(torch.equal(v, trained_simplenet.state_dict()[k]) for k, v in before.items())
    assert all(type(trained_simplenet.get_submodule(n)) is torch.nn.Linear for n in LAYERS)
    for a, b in zip(report.layers, again.layers):
        assert a.error == pytest.approx(b.error, rel=1e-6)


def test_accuracy_metric(trained_simplenet, calib):
    acc = sensitivity(trained_simplenet, calib, bits_options=(8, 2), layers=("classifier",), metric="accuracy")
    assert [item.name for item in acc.layers] == ["classifier"]
    assert acc.reference == nnopt.accuracy(trained_simplenet, calib)
    q = nnopt.quantize(trained_simplenet, nnopt.WeightQuantConfig(bits=2, per_channel=True, layers=("classifier",)))
    assert acc.layer("classifier").error[2] == pytest.approx(acc.reference - nnopt.accuracy(q, calib))
    assert acc.layer("classifier").error[2] > 0.05  # 2-bit classifier visibly hurts
    with pytest.raises(ConfigError, match="needs labels"):
        sensitivity(trained_simplenet, [calib.x], metric="accuracy")


def test_size_budget_between_uniform_widths_mixes_widths(trained_simplenet, calib, digits, report):
    r8, r4 = uniform_ratio(report, 8), uniform_ratio(report, 4)
    budget = (r8 + r4) / 2
    q = nnopt.quantize(trained_simplenet, MixedPrecisionConfig(bits_options=(8, 4), max_bytes_ratio=budget), data=calib)
    d = details(q)
    bits = {name: d["layers"][name]["bits"] for name in LAYERS}
    assert set(bits.values()) == {8, 4}, bits
    assert {name: q.get_submodule(name).bits for name in LAYERS} == bits
    assert d["bytes_ratio"] <= budget
    assert d["bytes_ratio"] == pytest.approx(report.bytes_of(bits) / report.fp32_bytes)
    assert d["measured_error"] == pytest.approx(relative_mse(q, trained_simplenet, calib.x), rel=1e-6)
    # Spending the bytes where they matter beats uniform 4 bits on held-out data.
    uniform4 = nnopt.quantize(trained_simplenet, nnopt.WeightQuantConfig(bits=4, per_channel=True))
    x = digits.test.x
    assert relative_mse(q, trained_simplenet, x) < relative_mse(uniform4, trained_simplenet, x)
    assert nnopt.accuracy(q, digits.test) >= nnopt.accuracy(uniform4, digits.test)
    # The same plan comes out of the report alone.
    assert assign_bits(dataclasses.replace(report, bits_options=(8, 4)), max_bytes_ratio=budget) == bits


def test_mixed_beats_uniform_two_bit(trained_simplenet, calib, digits, report):
    budget = (uniform_ratio(report, 4) + uniform_ratio(report, 2)) / 2
    q = nnopt.quantize(trained_simplenet, MixedPrecisionConfig(bits_options=(8, 4, 2), max_bytes_ratio=budget),
                       data=calib)
    assert details(q)["bytes_ratio"] <= budget < uniform_ratio(report, 4)
    uniform2 = nnopt.quantize(trained_simplenet, nnopt.WeightQuantConfig(bits=2, per_channel=True))
    assert nnopt.accuracy(q, digits.test) >= nnopt.accuracy(uniform2, digits.test) + 0.1


def test_error_budget_is_met_on_data(trained_simplenet, calib, report):
    q = nnopt.quantize(trained_simplenet, MixedPrecisionConfig(bits_options=(8, 4, 2), max_error=0.01), data=calib)
    d = details(q)
    assert d["measured_error"] <= 0.01
    assert d["measured_error"] == pytest.approx(relative_mse(q, trained_simplenet, calib.x), rel=1e-6)
    assert d["bytes_ratio"] < uniform_ratio(report, 8)  # it did compress
    # Errors add only approximately: with a budget between the predicted and the measured total,
    # the plan must back off until the measured error fits.
    predicted, measured = d["predicted_error"], d["measured_error"]
    assert measured > predicted
    tight = (predicted + measured) / 2
    q2 = nnopt.quantize(trained_simplenet, MixedPrecisionConfig(bits_options=(8, 4, 2), max_error=tight), data=calib)
    d2 = details(q2)
    assert d2["backed_off_steps"] >= 1
    assert d2["measured_error"] <= tight
    assert d2["predicted_error"] <= tight


@pytest.mark.parametrize("weights_format", ["safetensors", "packed"])
def test_save_load_round_trip(trained_simplenet, calib, digits, report, tmp_path, weights_format):
    budget = (uniform_ratio(report, 4) + uniform_ratio(report, 2)) / 2
    q = nnopt.quantize(trained_simplenet, MixedPrecisionConfig(bits_options=(8, 4, 2), max_bytes_ratio=budget),
                       data=calib)
    saved = nnopt.save_model(q, tmp_path / "mixed", weights_format=weights_format)
    loaded = nnopt.load_model(tmp_path / "mixed")
    with torch.no_grad():
        assert torch.equal(loaded(digits.test.x), q(digits.test.x))
    assert {n: loaded.get_submodule(n).bits for n in LAYERS} == {n: q.get_submodule(n).bits for n in LAYERS}
    if weights_format == "packed":
        uniform8 = nnopt.quantize(trained_simplenet, nnopt.WeightQuantConfig(bits=8, per_channel=True))
        eight = nnopt.save_model(uniform8, tmp_path / "eight", weights_format="packed")
        assert saved.file_bytes < eight.file_bytes


def synthetic(**layers):
    """A report from (bytes at 8 bits, bytes at 4 bits, error at 4 bits) per layer; error 0 at 8 bits."""
    items = tuple(
        LayerSensitivity(name, (b8,), 4 * b8, {8: b8, 4: b4}, {8: 0.0, 4: e4}) for name, (b8, b4, e4) in layers.items()
    )
    return SensitivityReport("output_error", (8, 4), items, 1.0, 100)


def test_planner_prefers_insensitive_layers_per_byte():
    same_size = synthetic(a=(1000, 500, 0.5), b=(1000, 500, 0.01))
    assert assign_bits(same_size, max_bytes_ratio=1500.5 / 8000) == {"a": 8, "b": 4}
    # big: 1e-4 error per byte saved, small: 5e-4. A large gap goes to the cheaper-per-byte layer.
    report = synthetic(big=(2000, 1000, 0.1), small=(200, 100, 0.05))
    fp32 = report.fp32_bytes
    assert assign_bits(report, max_bytes_ratio=1200.5 / fp32) == {"big": 4, "small": 8}
    # A gap that either layer closes alone goes to the one adding less error.
    assert assign_bits(report, max_bytes_ratio=2100.5 / fp32) == {"big": 8, "small": 4}
    assert assign_bits(report, max_bytes_ratio=1.0) == {"big": 8, "small": 8}
    # Two cheap small steps beat one big expensive one, although the big one alone saves enough.
    three = synthetic(big=(2000, 1000, 0.5), s1=(600, 300, 0.001), s2=(600, 300, 0.001))
    assert assign_bits(three, max_bytes_ratio=2600.5 / three.fp32_bytes) == {"big": 8, "s1": 4, "s2": 4}
    # A cheap first step made unnecessary by a later big one is widened back.
    two = synthetic(big=(2000, 1000, 0.1), s1=(200, 100, 0.001))
    assert assign_bits(two, max_bytes_ratio=1200.5 / two.fp32_bytes) == {"big": 4, "s1": 8}
    # Error budget: predicted (summed) error must fit.
    assert assign_bits(report, max_error=0.06) == {"big": 8, "small": 4}
    assert assign_bits(report, max_error=0.12) == {"big": 4, "small": 8}
    assert assign_bits(report, max_error=0.2) == {"big": 4, "small": 4}
    assert assign_bits(report, max_error=0.0) == {"big": 8, "small": 8}


def test_config_validation():
    cfg = MixedPrecisionConfig(bits_options=[4, 8], max_bytes_ratio=0.2)
    assert cfg.bits_options == (4, 8) and cfg.widths == (8, 4)
    assert MixedPrecisionConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="exactly one budget"):
        MixedPrecisionConfig()
    with pytest.raises(ConfigError, match="exactly one budget"):
        MixedPrecisionConfig(max_bytes_ratio=0.2, max_error=0.01)
    for bad in ({"max_bytes_ratio": 0.0}, {"max_bytes_ratio": 1.5}, {"max_error": -1.0},
                {"max_error": float("nan")}):
        with pytest.raises(ConfigError):
            MixedPrecisionConfig(**bad)
    with pytest.raises(ConfigError, match="bits_options"):
        MixedPrecisionConfig(bits_options=(8, 1), max_error=0.1)
    with pytest.raises(ConfigError, match="duplicates"):
        MixedPrecisionConfig(bits_options=(8, 8), max_error=0.1)
    with pytest.raises(ConfigError, match="at least one"):
        MixedPrecisionConfig(bits_options=(), max_error=0.1)
    with pytest.raises(ConfigError, match="metric"):
        MixedPrecisionConfig(metric="loss", max_error=0.1)
    with pytest.raises(ConfigError, match="unknown key"):
        MixedPrecisionConfig.from_dict({"kind": "mixed-precision", "max_error": 0.1, "budget": 3})


def test_group_size_follows_weight_quantization():
    if mixed._weight_config_has("group_size"):
        cfg = MixedPrecisionConfig(max_error=0.1, group_size=16)
        assert cfg.group_size == 16
    else:
        with pytest.raises(ConfigError, match="group_size"):
            MixedPrecisionConfig(max_error=0.1, group_size=16)


def test_errors(trained_simplenet, calib):
    cfg = MixedPrecisionConfig(max_error=0.01)
    with pytest.raises(ConfigError, match=r"needs data=\.\.\. for sensitivity"):
        nnopt.quantize(trained_simplenet, cfg)
    with pytest.raises(ConfigError, match="empty"):
        nnopt.quantize(trained_simplenet, cfg, data=Split(calib.x[:0], calib.y[:0]))
    with pytest.raises(ConfigError, match="empty"):
        nnopt.quantize(trained_simplenet, cfg, data=[])
    with pytest.raises(ConfigError, match=r"smallest achievable ratio is 0\.15"):
        nnopt.quantize(trained_simplenet, MixedPrecisionConfig(bits_options=(8, 4), max_bytes_ratio=0.1), data=calib)
    with pytest.raises(ConfigError, match="max_error=0 cannot be met"):
        nnopt.quantize(trained_simplenet, MixedPrecisionConfig(max_error=0.0), data=calib)
    with pytest.raises(ConfigError, match="exactly one budget"):
        assign_bits(sensitivity(trained_simplenet, calib, bits_options=(8,)))
    q = nnopt.quantize(trained_simplenet, nnopt.WeightQuantConfig(bits=8))
    with pytest.raises(UnsupportedModelError, match="already quantized"):
        nnopt.quantize(q, cfg, data=calib)
    with pytest.raises(UnsupportedModelError, match="ReLU"):
        sensitivity(trained_simplenet, calib, layers=("type:ReLU",))
