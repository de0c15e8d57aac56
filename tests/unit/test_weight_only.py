"""Weight-only int8 / int4: group-wise scales, packed int4 storage, save/load, the kernel compute path."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nnopt
from nnopt.errors import ConfigError, ModelFormatError
from nnopt.io import save_model
from nnopt.layers import primitives as P
from nnopt.layers.weight_only import QuantizedConv2d, QuantizedLinear
from nnopt.loading import load_model
from nnopt.metrics.accuracy import accuracy
from nnopt.metrics.profile import profile_model
from nnopt.quantization.weights import WeightQuantConfig, quantize_weights


def _quantize_layer(layer: nn.Module, **config) -> nn.Module:
    holder = nn.Sequential(layer)
    quantize_weights(holder, WeightQuantConfig(**config))
    return holder[0]


def test_group_scales_have_one_entry_per_group_and_bound_the_error():
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    q = _quantize_layer(copy.deepcopy(linear), bits=4, group_size=16)
    assert q.weight_scale.shape == (32, 4)
    error = (q.dense_weight() - linear.weight.detach()).abs().reshape(32, 4, 16)
    assert (error <= 1 / (2 * q.weight_scale.unsqueeze(-1)) + 1e-6).all()
    # Each group's scale comes from its own range: 7 / max|w| over those 16 weights.
    expected = 7 / linear.weight.detach().reshape(32, 4, 16).abs().amax(-1)
    torch.testing.assert_close(q.weight_scale, expected)
    # Conv2d groups run over the flattened in_channels·kh·kw dimension.
    conv = nn.Conv2d(8, 4, 3)
    qc = _quantize_layer(copy.deepcopy(conv), bits=8, group_size=24, symmetric=False)
    assert isinstance(qc, QuantizedConv2d) and qc.weight_scale.shape == (4, 3) and qc.weight_q.dtype == torch.int8
    error = (qc.dense_weight() - conv.weight.detach()).abs().reshape(4, 3, 24)
    assert (error <= 1 / (2 * qc.weight_scale.unsqueeze(-1)) + 1e-6).all()


def test_int4_is_packed_two_codes_per_byte(tmp_path):
    model = nnopt.create_model("simplenet", hidden=(256, 128), seed=0)
    int8 = nnopt.quantize(model, WeightQuantConfig(bits=8, per_channel=True))
    int4 = nnopt.quantize(model, WeightQuantConfig(bits=4, group_size=32))
    layer = int4.features[0]
    assert layer.weight_packed.dtype == torch.uint8 and layer.weight_packed.shape == (256, 32)
    assert not hasattr(layer, "weight_q") and not hasattr(layer, "weight_zero_point")
    torch.testing.assert_close(layer.weight_codes().float(), torch.round(
        model.features[0].weight.detach().reshape(256, 2, 32) * layer.weight_scale.unsqueeze(-1)).reshape(256, 64))
    sizes = {name: save_model(m, tmp_path / name).file_bytes
             for name, m in {"fp32": model, "int8": int8, "int4": int4}.items()}
    assert sizes["int4"] < 0.65 * sizes["int8"]
    assert sizes["int4"] < sizes["fp32"] / 5.5  # 4 bits + one fp32 scale per 32 weights, plus fp32 biases
    # The profile counts the bytes the state dict really holds.
    profile = profile_model(int4)
    assert profile.layers[0].bytes == 256 * 32 + 256 * 2 * 4 + 256 * 4
    every_byte = torch.arange(256, dtype=torch.uint8).reshape(8, 32)
    nibbles = torch.stack((every_byte.long() & 0xF, every_byte.long() >> 4), dim=-1).flatten(-2)
    reference = torch.where(nibbles >= 8, nibbles - 16, nibbles).to(torch.int8)  # two's complement by hand
    assert torch.equal(P.unpack_int4(every_byte), reference)
    # An odd input dimension cannot pair codes into bytes: that layer keeps int8 codes.
    odd = _quantize_layer(nn.Linear(9, 16), bits=4)
    assert not odd.packed and odd.weight_q.dtype == torch.int8


@pytest.mark.parametrize("weights_format", ["safetensors", "packed"])
def test_save_load_round_trip_is_exact(trained_simplenet, digits, tmp_path, weights_format):
    configs = {
        "int4_g32": WeightQuantConfig(bits=4, group_size=32),
        "int4_g16_asym": WeightQuantConfig(bits=4, group_size=16, symmetric=False),
        "int3_channel": WeightQuantConfig(bits=3, per_channel=True),
        "int8_g32": WeightQuantConfig(bits=8, group_size=32),
    }
    x = digits.test.x[:50]
    for name, config in configs.items():
        q = nnopt.quantize(trained_simplenet, config)
        save_model(q, tmp_path / name, weights_format=weights_format)
        loaded = load_model(tmp_path / name)
        original, restored = q.state_dict(), loaded.state_dict()
        assert original.keys() == restored.keys()
        for key in original:
            assert original[key].dtype == restored[key].dtype and torch.equal(original[key], restored[key]), key
        with torch.no_grad():
            assert torch.equal(q.eval()(x), loaded(x)), name


def test_conv_model_int4_round_trip(tmp_path):
    model = nnopt.quantize(nnopt.create_model("resnet8", seed=0).eval(), WeightQuantConfig(bits=4, per_channel=True))
    assert model.blocks[0].conv1[0].packed and not model.stem[0][0].packed  # 1·3·3 inputs: odd, int8 codes
    save_model(model, tmp_path / "cnn")
    loaded = load_model(tmp_path / "cnn")
    x = torch.randn(2, 64)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_tampered_packed_codes_are_refused(trained_simplenet, tmp_path):
    q = nnopt.quantize(trained_simplenet, WeightQuantConfig(bits=2, group_size=32))
    with torch.no_grad():
        q.features[0].weight_packed.fill_(0x77)  # nibbles of 7: outside the 2-bit range −1..1
    save_model(q, tmp_path / "m")
    with pytest.raises(ModelFormatError, match="2-bit range"):
        load_model(tmp_path / "m")


@pytest.mark.parametrize(("config", "max_drop"), [
    (WeightQuantConfig(bits=4, group_size=32), 0.01),
    (WeightQuantConfig(bits=4, group_size=16), 0.01),
    (WeightQuantConfig(bits=8, per_channel=True), 0.005),
    (WeightQuantConfig(bits=8), 0.005),
])
def test_digits_accuracy_stays_close_to_fp32(trained_simplenet, digits, config, max_drop):
    baseline = accuracy(trained_simplenet, digits.test)
    q = nnopt.quantize(trained_simplenet, config)
    assert accuracy(q, digits.test) >= baseline - max_drop


def test_bad_group_size_is_refused_before_any_layer_changes(trained_simplenet):
    model = copy.deepcopy(trained_simplenet)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # 64 fits the first two layers' inputs (64) but is wider than the classifier's (32): nothing may be half-done.
    message = r"group_size: 64 exceeds the input dimension 32 of layer 'classifier'"
    with pytest.raises(ConfigError, match=message):
        nnopt.quantize(model, WeightQuantConfig(bits=4, group_size=64), inplace=True)
    assert all(type(m) in (nn.Linear, nn.ReLU, nn.Sequential) for m in model.modules() if m is not model)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("bits", 9, r"bits.*2\.\.8"), ("bits", 1, r"bits.*2\.\.8"), ("group_size", 0, "group_size"),
    ("compute", "fast", "compute"),
])
def test_invalid_settings_are_refused(field, value, message):
    with pytest.raises(ConfigError, match=message):
        WeightQuantConfig(**{field: value})


@pytest.mark.parametrize(("config", "kernel"), [
    ({"bits": 4, "group_size": 32}, "int4pack_mm"),
    ({"bits": 4, "per_channel": True}, "int4pack_mm"),
    ({"bits": 4, "group_size": 64, "symmetric": False}, "int4pack_mm"),
    ({"bits": 8, "per_channel": True}, "int8pack_mm"),
    ({"bits": 8}, "int8pack_mm"),
    ({"bits": 4, "group_size": 16}, "dequantize"),  # the int4 kernel takes groups of 32..256 only
    ({"bits": 8, "per_channel": True, "symmetric": False}, "dequantize"),
])
def test_kernel_path_matches_the_dequantize_path(config, kernel):
    torch.manual_seed(0)
    q = _quantize_layer(nn.Linear(128, 48), **config, compute="kernel")
    assert q.compute_path == kernel
    reference = _quantize_layer(nn.Linear(128, 48), **config, compute="dequantize")
    reference.load_state_dict(q.state_dict())
    for shape in [(1, 128), (33, 128), (2, 3, 128), (128,)]:
        x = torch.randn(shape)
        with torch.inference_mode():
            out, expected = q(x), F.linear(x, q.dense_weight(), q.bias)
            assert torch.equal(reference(x), expected)
        assert out.shape == expected.shape and out.dtype == torch.float32
        # bf16 activations: ~3e-3 relative error, far below int4's/int8's own quantization error.
        assert float((out - expected).norm() / expected.norm()) < 1e-2


def test_auto_uses_the_int8_kernel_only_for_larger_layers():
    int4 = _quantize_layer(nn.Linear(64, 64), bits=4, group_size=32)
    assert int4.compute_path == "int4pack_mm"
    small_int8 = _quantize_layer(nn.Linear(256, 256), bits=8, per_channel=True)
    assert small_int8.compute_path == "dequantize"
    x = torch.randn(5, 256)
    with torch.no_grad():
        assert torch.equal(small_int8(x), F.linear(x, small_int8.dense_weight(), small_int8.bias))
    assert _quantize_layer(nn.Linear(512, 256), bits=8, per_channel=True).compute_path == "int8pack_mm"
    # The path depends on the layer only: a row's output is the same whatever batch it comes in.
    x = torch.randn(300, 64)
    with torch.no_grad():
        torch.testing.assert_close(int4(x)[:3], int4(x[:3]))


def test_kernel_cache_follows_new_codes_and_autograd_uses_dequantize():
    torch.manual_seed(0)
    a = _quantize_layer(nn.Linear(64, 32), bits=4, group_size=32)
    b = _quantize_layer(nn.Linear(64, 32), bits=4, group_size=32)
    x = torch.randn(4, 64)
    with torch.no_grad():
        a_out = a(x)  # builds a's kernel weights
        a_copy = copy.deepcopy(a)
        a.load_state_dict(b.state_dict())
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
        torch.testing.assert_close(a_copy(x), a_out, rtol=0, atol=0)  # a copy never shares a's kernel weights
    # Gradients with respect to the input flow through the dequantized weight (the kernels have no backward).
    x.requires_grad_(True)
    a(x).sum().backward()
    torch.testing.assert_close(x.grad, a.dense_weight().sum(0).expand(4, 64))


def test_quantized_linear_extra_repr_names_the_group():
    q = _quantize_layer(nn.Linear(64, 16), bits=4, group_size=32)
    assert isinstance(q, QuantizedLinear) and "group_size=32" in repr(q)
