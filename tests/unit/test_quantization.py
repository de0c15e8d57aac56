import pytest
import torch

import nnopt
from nnopt.errors import ConfigError, UnsupportedModelError
from nnopt.layers import primitives as P
from nnopt.layers.weight_only import QuantizedConv2d, QuantizedLinear


def test_weights_are_stored_as_integers_plus_scale(trained_simplenet):
    q = nnopt.quantize(trained_simplenet, nnopt.WeightQuantConfig(bits=8))
    for name in ("features.0", "features.2", "classifier"):
        layer = q.get_submodule(name)
        assert isinstance(layer, QuantizedLinear)
        assert layer.weight_q.dtype == torch.int8
        w = trained_simplenet.get_submodule(name).weight.detach()
        expected_scale = 127 / w.abs().max()
        torch.testing.assert_close(layer.weight_scale.flatten()[0], expected_scale)
        assert torch.equal(layer.weight_q, torch.round(w.double() * layer.weight_scale.double()).to(torch.int8))
        error = (layer.dense_weight() - w).abs().max()
        assert error <= 1 / (2 * layer.weight_scale.flatten()[0]) + 1e-6


def test_quantized_model_tracks_the_float_model(trained_simplenet, digits):
    q = nnopt.quantize(trained_simplenet)
    x = digits.test.x[:64]
    with torch.no_grad():
        ref, out = trained_simplenet(x), q(x)
    assert (ref - out).abs().max() < 0.05 * ref.abs().max()
    assert (ref.argmax(-1) == out.argmax(-1)).float().mean() > 0.97


def test_low_bits_lose_more_than_high_bits(trained_simplenet, digits):
    x = digits.test.x[:64]
    errors = {}
    for bits in (3, 5, 8):
        with torch.no_grad():
            errors[bits] = float((nnopt.quantize(trained_simplenet, nnopt.WeightQuantConfig(bits=bits))(x)
                                  - trained_simplenet(x)).abs().mean())
    assert errors[3] > errors[5] > errors[8]


def test_per_channel_scales_and_bits_above_eight_are_refused(trained_simplenet):
    q = nnopt.quantize(trained_simplenet, nnopt.WeightQuantConfig(bits=8, per_channel=True))
    assert q.classifier.weight_q.dtype == torch.int8
    assert q.classifier.weight_scale.shape == (10, 1)
    for bits in (9, 16):
        with pytest.raises(ConfigError, match=r"WeightQuantConfig\.bits.*2\.\.8"):
            nnopt.WeightQuantConfig(bits=bits)


def test_pruned_zeros_stay_zero_after_quantization(trained_simplenet):
    pruned = nnopt.prune(trained_simplenet, nnopt.ThresholdPruneConfig(threshold=0.05))
    q = nnopt.quantize(pruned, nnopt.WeightQuantConfig(bits=8, symmetric=False))
    zeros = pruned.features[0].weight == 0
    assert (q.features[0].dense_weight()[zeros] == 0).all()


def test_conv_layers_quantize(digits):
    model = nnopt.create_model("resnet8", seed=0).eval()
    q = nnopt.quantize(model, nnopt.WeightQuantConfig(bits=8, per_channel=True))
    assert isinstance(q.stem[0][0], QuantizedConv2d)
    with torch.no_grad():
        torch.testing.assert_close(q(digits.test.x[:8]), model(digits.test.x[:8]), atol=0.05, rtol=0.05)


def test_errors(trained_simplenet):
    q = nnopt.quantize(trained_simplenet)
    with pytest.raises(UnsupportedModelError, match="already quantized"):
        nnopt.quantize(q)
    with pytest.raises(UnsupportedModelError, match="ReLU"):
        nnopt.quantize(trained_simplenet, nnopt.WeightQuantConfig(layers=("type:ReLU",)))
    with pytest.raises(ConfigError, match="not a quantization config"):
        nnopt.quantize(trained_simplenet, nnopt.ThresholdPruneConfig())
    assert P.storage_dtype(2) == torch.int8
