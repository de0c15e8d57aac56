"""Quantization-aware training: the STE, the observers, fine-tuning and conversion to real int8."""

import copy

import pytest
import torch
from torch import nn

import nnopt
from nnopt.data import Split
from nnopt.errors import ConfigError
from nnopt.layers import primitives as P
from nnopt.layers.int8 import Int8StaticConv2d, Int8StaticLinear
from nnopt.lineage import get_lineage
from nnopt.quantization.ptq import StaticQuantConfig
from nnopt.quantization.qat import (
    FakeQuantConv2d,
    FakeQuantLinear,
    QATConfig,
    convert_qat,
    fake_quantize_ste,
    finetune_qat,
    prepare_qat,
)

LAYERS = ("features.0", "features.2", "classifier")
HALF_POINT = 0.005  # "within 0.5 point": of accuracy, as a fraction


@pytest.fixture(scope="module")
def qat_model(trained_simplenet, digits):
    return nnopt.quantize(trained_simplenet, QATConfig(), data=digits.train, progress=False)


def _outputs(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


def _fake_and_converted(model, config, data, x):
    """Outputs of the fine-tuned fake-quant model and of its int8 conversion (and the converted model)."""
    model = copy.deepcopy(model)
    prepare_qat(model, config, data)
    finetune_qat(model, config, data, progress=False)
    fake = _outputs(model, x)
    convert_qat(model)
    return fake, _outputs(model, x), model


# --------------------------------------------------------------------------- the estimator


def test_ste_forward_fake_quantizes_and_gradient_passes_only_inside_the_range():
    scale, zero = P.qparams_from_range(-1.0, 1.0, 8, symmetric=False)  # S = 127.5, z = 0: codes -128..127
    assert float(scale) == 127.5 and int(zero) == 0
    # Inside: everything that rounds to a code in -128..127, up to half a step past the end codes.
    x = torch.tensor(
        [-3.0, -128.6 / 127.5, -128.4 / 127.5, -0.3, 0.0, 0.2, 0.7, 127.4 / 127.5, 127.6 / 127.5, 4.0],
        requires_grad=True,
    )
    out = fake_quantize_ste(x, scale, zero, 8, symmetric=False)
    assert torch.equal(out, P.fake_quantize(x.detach(), scale, zero, 8, symmetric=False))
    upstream = torch.arange(1.0, 11.0)
    out.backward(upstream)
    inside = torch.tensor([0, 0, 1, 1, 1, 1, 1, 1, 0, 0], dtype=torch.bool)
    assert torch.equal(x.grad, torch.where(inside, upstream, torch.zeros(())))
    # Outside, the output is the clamped end value: a constant, hence the zero gradient.
    assert out[0] == out[1] == -128 / 127.5 and out[-1] == out[-2] == 127 / 127.5


def test_ste_per_channel_weights_get_an_identity_gradient_and_zeros_stay_zero():
    w = torch.randn(5, 7)
    w[1, 3] = w[4, 0] = 0.0
    w.requires_grad_(True)
    scale, _ = P.compute_qparams(w, 8, symmetric=True, channel_axis=0)
    out = fake_quantize_ste(w, scale, 0, 8, symmetric=True)
    assert out[1, 3] == 0 and out[4, 0] == 0
    assert (out - w).abs().max() <= 0.5 / scale.min() + 1e-6
    out.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))  # min–max scales: every weight is inside its range


# --------------------------------------------------------------------------- fake-quant layers


def test_input_range_follows_an_ema_in_training_only():
    layer = FakeQuantLinear(nn.Linear(4, 3), lo=-1.0, hi=1.0, momentum=0.9)
    x = torch.tensor([[-3.0, 0.0, 1.0, 5.0]])
    layer.train()
    layer(x)
    torch.testing.assert_close(layer.input_lo, torch.tensor(0.9 * -1.0 + 0.1 * -3.0))
    torch.testing.assert_close(layer.input_hi, torch.tensor(0.9 * 1.0 + 0.1 * 5.0))
    before = (layer.input_lo.clone(), layer.input_hi.clone())
    layer.eval()
    layer(x * 10)
    layer.train()
    layer.observing = False
    layer(x * 10)
    assert torch.equal(layer.input_lo, before[0]) and torch.equal(layer.input_hi, before[1])


def test_fake_quant_layers_share_the_source_parameters():
    linear, conv = nn.Linear(4, 3), nn.Conv2d(2, 3, 3, padding=1)
    fake_linear = FakeQuantLinear(linear, -1.0, 1.0, 0.9)
    fake_conv = FakeQuantConv2d(conv, -1.0, 1.0, 0.9)
    assert fake_linear.weight is linear.weight and fake_linear.bias is linear.bias
    assert fake_conv.weight is conv.weight and fake_conv.bias is conv.bias
    assert isinstance(fake_linear, nn.Linear) and isinstance(fake_conv, nn.Conv2d)  # MaskKeeper finds them
    x = torch.randn(2, 2, 5, 5).clamp(-1, 1)
    assert fake_conv(x).shape == conv(x).shape == (2, 3, 5, 5)


# --------------------------------------------------------------------------- accuracy and conversion


def test_qat_int8_is_within_half_a_point_of_fp32_and_of_static_ptq(trained_simplenet, qat_model, digits):
    fp32 = nnopt.accuracy(trained_simplenet, digits.test)
    ptq = nnopt.accuracy(nnopt.quantize(trained_simplenet, StaticQuantConfig(), data=digits.train), digits.test)
    qat = nnopt.accuracy(qat_model, digits.test)
    # Measured on this fixture: fp32 0.9694, static PTQ 0.9694, QAT 0.9667 (one test digit of 360).
    assert abs(qat - fp32) <= HALF_POINT
    assert qat >= ptq - HALF_POINT
    for name in LAYERS:
        layer = qat_model.get_submodule(name)
        assert isinstance(layer, Int8StaticLinear) and layer.weight_q.dtype == torch.int8
    applied = get_lineage(qat_model).applied[-1]
    assert applied.name == "qat"
    assert set(applied.details["layers"]) == set(LAYERS)
    assert len(applied.details["training"]["loss"]) == 3
    training = applied.details["training"]
    assert len(training["validation_loss"]) == 4 and 0 <= training["kept_epoch"] <= 3
    assert training["validation_loss"][training["kept_epoch"]] == min(training["validation_loss"])


def test_converted_model_matches_the_fake_quant_model(trained_simplenet, qat_model, digits):
    config = QATConfig(validation_fraction=0.0)  # train on every row, keep the last epoch, as the pieces do
    fake, converted, model = _fake_and_converted(trained_simplenet, config, digits.train, digits.test.x)
    assert (fake.argmax(-1) == converted.argmax(-1)).float().mean() >= 0.99
    # Same codes on both sides; only float summation order differs (measured 3.8e-6 on logits up to ~18).
    assert (fake - converted).abs().max() < 1e-4
    # The pieces are what quantize() runs: the same int8 model.
    whole = nnopt.quantize(trained_simplenet, config, data=digits.train)
    assert torch.equal(converted, _outputs(whole, digits.test.x))


def test_zero_epochs_is_static_minmax_ptq(trained_simplenet, digits):
    qat = nnopt.quantize(trained_simplenet, QATConfig(epochs=0, calibration_samples=256), data=digits.train)
    ptq = nnopt.quantize(
        trained_simplenet, StaticQuantConfig(observer="minmax", calibration_samples=256), data=digits.train
    )
    for name in LAYERS:
        a, b = qat.get_submodule(name), ptq.get_submodule(name)
        for buffer in ("weight_q", "weight_scale", "input_scale", "input_zero_point"):
            assert torch.equal(getattr(a, buffer), getattr(b, buffer)), (name, buffer)


def test_ranges_stop_updating_at_the_freeze_epoch(trained_simplenet, digits):
    def ranges(config):
        model = copy.deepcopy(trained_simplenet)
        prepare_qat(model, config, digits.train)
        calibrated = {n: (float(model.get_submodule(n).input_lo), float(model.get_submodule(n).input_hi))
                      for n in LAYERS}
        finetune_qat(model, config, digits.train, progress=False)
        final = {n: (float(model.get_submodule(n).input_lo), float(model.get_submodule(n).input_hi)) for n in LAYERS}
        return calibrated, final

    calibrated, frozen_from_start = ranges(QATConfig(epochs=1, freeze_observers_epoch=0))
    assert frozen_from_start == calibrated
    _, one_epoch = ranges(QATConfig(epochs=1, freeze_observers_epoch=None))
    assert one_epoch != calibrated
    # Training is deterministic, so epoch 1 is the same run; frozen afterwards, the ranges stay there.
    _, frozen_after_one = ranges(QATConfig(epochs=2, freeze_observers_epoch=1))
    assert frozen_after_one == one_epoch
    _, never_frozen = ranges(QATConfig(epochs=2, freeze_observers_epoch=None))
    assert never_frozen != one_epoch


def test_pruned_model_keeps_its_zeros_through_qat(trained_simplenet, digits):
    pruned = nnopt.prune(trained_simplenet, nnopt.MagnitudePruneConfig(sparsity=0.7))
    q = nnopt.quantize(pruned, QATConfig(epochs=2), data=digits.train)
    for name in ("features.0", "features.2"):  # the classifier is not pruned by default
        zeros = pruned.get_submodule(name).weight == 0
        assert zeros.float().mean() == pytest.approx(0.7, abs=0.01)
        assert torch.equal(q.get_submodule(name).weight_q == 0, zeros), name
    # Fine-tuning also recovers some of what pruning lost (measured 0.942 → 0.964).
    assert nnopt.accuracy(q, digits.test) >= nnopt.accuracy(pruned, digits.test) - HALF_POINT


def test_selected_layers_only(trained_simplenet, digits):
    q = nnopt.quantize(trained_simplenet, QATConfig(epochs=1, layers=("classifier",)), data=digits.train)
    assert isinstance(q.classifier, Int8StaticLinear)
    assert type(q.features[0]) is nn.Linear and type(q.features[2]) is nn.Linear


def test_conv_model_converts_to_int8_conv(digits):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 10)
    )
    nnopt.train(model, digits.train, nnopt.TrainConfig(epochs=2, seed=0), progress=False)
    fake, converted, q = _fake_and_converted(model, QATConfig(epochs=1), digits.train, digits.test.x)
    assert isinstance(q[1], Int8StaticConv2d) and isinstance(q[4], Int8StaticLinear)
    assert (fake.argmax(-1) == converted.argmax(-1)).float().mean() >= 0.99
    assert (fake - converted).abs().max() < 1e-3


# --------------------------------------------------------------------------- saving and export


def test_save_load_round_trip(qat_model, digits, tmp_path):
    nnopt.save_model(qat_model, tmp_path / "qat")
    loaded = nnopt.load_model(tmp_path / "qat")
    assert isinstance(loaded.features[0], Int8StaticLinear)
    assert torch.equal(_outputs(loaded, digits.test.x), _outputs(qat_model, digits.test.x))


def test_onnx_export_matches(qat_model, digits):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from nnopt.io.onnx_export import OnnxRunner, export_onnx

    runner = OnnxRunner(export_onnx(qat_model, digits.test.x[:2]), threads=1)
    ours, theirs = _outputs(qat_model, digits.test.x), runner(digits.test.x)
    assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean() >= 0.99


# --------------------------------------------------------------------------- errors


def test_missing_or_unusable_data_is_a_config_error(trained_simplenet, digits):
    with pytest.raises(ConfigError, match="needs data="):
        nnopt.quantize(trained_simplenet, QATConfig())
    with pytest.raises(ConfigError, match="different sample shapes"):
        nnopt.quantize(trained_simplenet, QATConfig(), data=[digits.train.x, torch.zeros(2, 3)])
    empty = Split(digits.train.x[:0], digits.train.y[:0])
    with pytest.raises(ConfigError, match="empty"):
        nnopt.quantize(trained_simplenet, QATConfig(), data=empty)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("epochs", -1), ("epochs", 2.5), ("lr", 0.0), ("lr", float("nan")), ("lr", "fast"), ("batch_size", 0),
        ("layers", ("",)), ("layers", ("re:[",)), ("observer_momentum", 1.0), ("observer_momentum", -0.1),
        ("freeze_observers_epoch", -1), ("freeze_observers_epoch", "2"), ("calibration_samples", 0),
        ("seed", -1), ("seed", 2**32),
    ],
)
def test_bad_config_fields_are_named(field, value):
    with pytest.raises(ConfigError, match=f"QATConfig.{field}"):
        QATConfig(**{field: value})


def test_config_round_trips_through_a_dict():
    config = QATConfig(epochs=2, layers=("classifier",), freeze_observers_epoch=None)
    assert QATConfig.from_dict(config.to_dict()) == config
    assert config.to_dict()["kind"] == "qat"
    with pytest.raises(ConfigError, match="unknown key"):
        QATConfig.from_dict({"kind": "qat", "epoch": 2})


def test_without_labels_qat_distils_from_the_float_model(trained_simplenet, digits, monkeypatch):
    import nnopt.quantization.qat as qat_module

    seen = {}
    real_train = qat_module.train

    def spy(*args, **kwargs):
        seen["teacher"] = kwargs.get("teacher")
        return real_train(*args, **kwargs)

    monkeypatch.setattr(qat_module, "train", spy)
    nnopt.quantize(trained_simplenet, QATConfig(epochs=1), data=digits.train.x[:256])  # inputs only
    teacher = seen["teacher"]
    assert teacher is not None and type(teacher.features[0]) is torch.nn.Linear  # not a fake-quant twin
    assert torch.equal(teacher.features[0].weight, trained_simplenet.features[0].weight)
