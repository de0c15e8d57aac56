"""Post-training int8: integer kernels against a reference, accuracy gates, ONNX export, bad input."""

from __future__ import annotations

import pytest
import torch

import nnopt
from nnopt.errors import ConfigError
from nnopt.layers import kernels as K
from nnopt.layers.int8 import Int8DynamicLinear, Int8Embedding, Int8StaticConv2d, Int8StaticLinear


def test_int8_linear_equals_integer_reference():
    gen = torch.Generator().manual_seed(0)
    x_q = torch.randint(-128, 128, (7, 33), generator=gen, dtype=torch.int8)
    w_q = torch.randint(-127, 128, (5, 33), generator=gen, dtype=torch.int8)
    zero, x_scale, w_step = 17, torch.tensor(3.0), torch.rand(5, generator=gen) + 0.1
    out = K.int8_linear(x_q, x_scale, torch.tensor(float(zero)), w_q, w_step, w_q.sum(1, dtype=torch.int32), None)
    exact = (x_q.long() - zero) @ w_q.long().t()  # int64 reference, no int8 kernel involved
    torch.testing.assert_close(out, exact.double().float() * w_step / 3.0, rtol=1e-6, atol=1e-5)


def test_dynamic_qparams_cover_the_range_and_zero():
    x = torch.tensor([[0.5, 2.0, 3.0]])
    scale, zero = K.dynamic_qparams(x)
    codes = K.quantize_activation(x, scale, zero)
    assert int(codes.min()) >= -128 and int(codes.max()) == 127
    assert int(K.quantize_activation(torch.zeros(1), scale, zero)) == int(zero)  # 0.0 is exact


def test_dynamic_int8_keeps_digits_accuracy(trained_simplenet, digits):
    fp32 = nnopt.accuracy(trained_simplenet, digits.test)
    q = nnopt.quantize(trained_simplenet, nnopt.DynamicQuantConfig())
    assert all(isinstance(m, Int8DynamicLinear) for m in (q.features[0], q.classifier))
    assert q.classifier.weight_q.dtype == torch.int8
    assert nnopt.accuracy(q, digits.test) >= fp32 - 0.005


def test_smoothing_moves_outlier_channels_into_the_weights(digits):
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(16, 8))
    x = torch.randn(256, 16)
    x[:, 3] *= 50  # one outlier channel, as transformer activations have
    reference = layer(x)
    plain = nnopt.quantize(layer, nnopt.DynamicQuantConfig())
    smooth = nnopt.quantize(layer, nnopt.DynamicQuantConfig(smoothing=0.5), data=[x])
    err_plain = (plain(x) - reference).pow(2).mean()
    err_smooth = (smooth(x) - reference).pow(2).mean()
    assert err_smooth < 0.5 * err_plain


def test_static_int8_within_half_a_point(trained_simplenet, digits):
    fp32 = nnopt.accuracy(trained_simplenet, digits.test)
    for observer in ("minmax", "percentile", "mse"):
        q = nnopt.quantize(trained_simplenet, nnopt.StaticQuantConfig(observer=observer), data=digits.train)
        assert isinstance(q.classifier, Int8StaticLinear)
        assert nnopt.accuracy(q, digits.test) >= fp32 - 0.005, observer


def test_static_conv_matches_float_closely(digits):
    model = nnopt.create_model("resnet8", seed=0).eval()
    q = nnopt.quantize(model, nnopt.StaticQuantConfig(), data=digits.train)
    assert any(isinstance(m, Int8StaticConv2d) for m in q.modules())
    with torch.inference_mode():
        ref, out = model(digits.test.x[:64]), q(digits.test.x[:64])
    assert (out - ref).pow(2).mean() < 0.01 * ref.pow(2).mean()


@pytest.mark.parametrize(
    "config", [nnopt.StaticQuantConfig(), nnopt.DynamicQuantConfig(smoothing=0.5)], ids=["static", "dynamic"]
)
def test_int8_save_load_round_trip(trained_simplenet, digits, tmp_path, config):
    q = nnopt.quantize(trained_simplenet, config, data=digits.train)
    nnopt.save_model(q, tmp_path / "m")
    loaded = nnopt.load_model(tmp_path / "m")
    with torch.inference_mode():
        assert torch.equal(q(digits.test.x), loaded(digits.test.x))


def test_onnx_exports_match_nnopt(trained_simplenet, digits):
    pytest.importorskip("onnxruntime")
    for config in (nnopt.StaticQuantConfig(), nnopt.DynamicQuantConfig()):
        q = nnopt.quantize(trained_simplenet, config, data=digits.train)
        runner = nnopt.OnnxRunner(nnopt.export_onnx(q, digits.test.x[:2]), threads=1)
        with torch.inference_mode():
            ours = q(digits.test.x)
        theirs = runner(digits.test.x)
        agree = (ours.argmax(1) == theirs.argmax(1)).float().mean()
        assert agree >= 0.99, config.kind
        assert (ours - theirs).abs().max() < 0.1, config.kind  # measured: 0.0 dynamic, ~0.02-0.03 static


@pytest.mark.parametrize("config", [nnopt.StaticQuantConfig(), nnopt.DynamicQuantConfig()], ids=lambda c: c.kind)
def test_int8_weight_exports_only_where_exact_and_auto_picks_the_exact_form(trained_simplenet, digits, config,
                                                                           monkeypatch):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from nnopt.io.onnx_export import resolve_int8_weights
    from nnopt.layers import kernel_checks as KC

    q = nnopt.quantize(trained_simplenet, config, data=digits.train)
    with torch.inference_mode():
        ours = q(digits.test.x)

    def weight_types(data: bytes) -> set[str]:
        graph = onnx.load_from_string(data).graph
        tensors = [*graph.initializer, *(n.attribute[0].t for n in graph.node if n.op_type == "Constant")]
        return {onnx.TensorProto.DataType.Name(t.data_type) for t in tensors if len(t.dims) == 2}

    if KC.kernel_passes("onnxruntime-u8s8"):  # a CPU with VNNI: the faster U8S8/S8S8 file, still nnopt's integers
        data = nnopt.export_onnx(q, digits.test.x[:2], int8_weights="int8")
        assert weight_types(data) == {"INT8"} and resolve_int8_weights("auto") == "int8"
        theirs = nnopt.OnnxRunner(data, threads=1)(digits.test.x)
        assert (ours.argmax(1) == theirs.argmax(1)).float().mean() >= 0.99
        assert (ours - theirs).abs().max() < 0.1
    monkeypatch.setitem(KC._RESULTS, "onnxruntime-u8s8", KC.KernelCheck("onnxruntime-u8s8", False, 8e6, "forced"))
    with pytest.raises(nnopt.NnoptError, match="known-answer check on this CPU"):
        nnopt.export_onnx(q, digits.test.x[:2], int8_weights="int8")
    assert resolve_int8_weights("auto") == "uint8"
    assert weight_types(nnopt.export_onnx(q, digits.test.x[:2], int8_weights="auto")) == {"UINT8"}
    with pytest.raises(ConfigError, match="int8_weights must be one of uint8, int8, auto"):
        nnopt.export_onnx(q, digits.test.x[:2], int8_weights="s8")


def test_static_onnx_is_qdq_with_u8u8_codes(trained_simplenet, digits):
    """Static exports are U8U8 (right on CPUs without VNNI): uint8 weight codes = int8 codes + 128, zero point
    128, and uint8 activation zero points = int8 zero points + 128; no int8 tensor is left in the graph."""
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    q = nnopt.quantize(trained_simplenet, nnopt.StaticQuantConfig(), data=digits.train)
    graph = onnx.load_from_string(nnopt.export_onnx(q, digits.test.x[:2])).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("QuantizeLinear") == 3 and ops.count("DequantizeLinear") == 6
    tensors = [numpy_helper.to_array(t) for t in graph.initializer]
    tensors += [numpy_helper.to_array(n.attribute[0].t) for n in graph.node if n.op_type == "Constant"]
    assert not [t for t in tensors if t.dtype.name == "int8"]
    weights = sorted((t for t in tensors if t.dtype.name == "uint8" and t.ndim == 2), key=lambda t: -t.size)
    layers = [m for m in q.modules() if isinstance(m, nnopt.layers.int8.Int8StaticLinear)]
    assert len(weights) == 3
    for module, codes in zip(sorted(layers, key=lambda m: -m.weight_q.numel()), weights):
        assert (codes.astype(int) - 128 == module.weight_q.numpy()).all()
    zero_points = [t for t in tensors if t.dtype.name == "uint8" and t.ndim == 1]
    assert zero_points and all((t == 128).all() for t in zero_points)
    activation_zeros = {int(t) for t in tensors if t.dtype.name == "uint8" and t.ndim == 0}  # equal ones shared
    assert activation_zeros == {int(m.input_zero_point) + 128 for m in layers}


def test_conv_onnx_export_runs(digits):
    pytest.importorskip("onnxruntime")
    model = nnopt.create_model("resnet8", seed=0).eval()
    q = nnopt.quantize(model, nnopt.StaticQuantConfig(calibration_samples=64), data=digits.train)
    runner = nnopt.OnnxRunner(nnopt.export_onnx(q, digits.test.x[:2]), threads=1)
    with torch.inference_mode():
        ours = q(digits.test.x[:64])
    assert (ours - runner(digits.test.x[:64])).abs().max() < 0.05 * ours.abs().max()


def test_bad_input_is_named(trained_simplenet, digits):
    with pytest.raises(ConfigError, match="needs data"):
        nnopt.quantize(trained_simplenet, nnopt.DynamicQuantConfig(smoothing=0.5))
    with pytest.raises(ConfigError, match="calibration needs data"):
        nnopt.quantize(trained_simplenet, nnopt.StaticQuantConfig())
    with pytest.raises(ConfigError, match="empty"):
        nnopt.quantize(trained_simplenet, nnopt.StaticQuantConfig(), data=[])
    with pytest.raises(ConfigError, match=r"shape \(4, 3\)"):
        nnopt.quantize(trained_simplenet, nnopt.StaticQuantConfig(), data=[torch.randn(4, 3)])
    with pytest.raises(ConfigError, match="observer"):
        nnopt.StaticQuantConfig(observer="median")
    with pytest.raises(ConfigError, match="smoothing"):
        nnopt.DynamicQuantConfig(smoothing=1.5)
    with pytest.raises(nnopt.NnoptError, match="already int8"):
        nnopt.quantize(nnopt.quantize(trained_simplenet, nnopt.DynamicQuantConfig()), nnopt.DynamicQuantConfig())


def test_a_device_without_int8_gemm_is_named(trained_simplenet, monkeypatch):
    monkeypatch.setitem(K._INT8_GEMM_OK, "cpu", False)
    with pytest.raises(nnopt.NnoptError, match="no int8 matrix kernel"):
        nnopt.quantize(trained_simplenet, nnopt.DynamicQuantConfig())


def test_int8_embedding_rows_dequantize_within_half_a_step():
    torch.manual_seed(0)
    table = torch.nn.Embedding(50, 8)
    q = Int8Embedding(table)
    q.set_weight(table.weight.detach())
    ids = torch.tensor([[0, 7, 49], [3, 3, 1]])
    step = q.weight_step[ids].unsqueeze(-1)
    assert ((q(ids) - table(ids)).abs() <= step / 2 + 1e-7).all()
    assert q.weight_q.dtype == torch.int8 and q.state_dict().keys() == {"weight_q", "weight_scale"}
