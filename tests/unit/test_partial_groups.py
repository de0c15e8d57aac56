"""Group-wise weight quantization with a partial last group (576 inputs in groups of 128 = 4 × 128 + 64)."""

import copy

import pytest
import torch
from torch import nn

import nnopt
from nnopt.errors import ConfigError
from nnopt.io import save_model
from nnopt.layers import primitives as P
from nnopt.layers.weight_only import QuantizedConv2d, QuantizedLinear
from nnopt.loading import load_model
from nnopt.quantization.weights import WeightQuantConfig


def _linear(in_f: int, out_f: int, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [4, 8])
def test_every_group_including_the_partial_one_has_its_own_scale_and_bounded_error(symmetric, bits):
    linear = _linear(576, 32)
    with torch.no_grad():
        linear.weight[:, 512:] *= 0.01  # the partial group's range is far narrower than the rest's
    q = nnopt.quantize(nn.Sequential(copy.deepcopy(linear)), WeightQuantConfig(bits=bits, group_size=128,
                                                                              symmetric=symmetric))[0]
    assert isinstance(q, QuantizedLinear) and q.weight_scale.shape == (32, 5)
    w, dense = linear.weight.detach(), q.dense_weight()
    for g, (lo, hi) in enumerate([(0, 128), (128, 256), (256, 384), (384, 512), (512, 576)]):
        part = w[:, lo:hi]
        alone, alone_zero = P.compute_qparams(part, bits, symmetric, channel_axis=0)
        assert torch.equal(q.weight_scale[:, g:g + 1], alone)
        if not symmetric:
            assert torch.equal(q.weight_zero_point[:, g:g + 1], alone_zero)
        error = (dense[:, lo:hi] - part).abs().double()
        assert bool((error <= 0.5 / alone.double() * (1 + 1e-6) + 1e-7).all()), g
    # The partial group's own scale keeps its small weights: error ~100× below what a full-width range gives.
    assert float((dense[:, 512:] - w[:, 512:]).abs().max()) < 0.02 * float((dense[:, :512] - w[:, :512]).abs().max())


@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_kernel_runs_a_partial_last_group_as_exact_subgroups(symmetric):
    linear = _linear(576, 48)
    config = WeightQuantConfig(bits=4, group_size=128, symmetric=symmetric, compute="kernel")
    q = nnopt.quantize(nn.Sequential(copy.deepcopy(linear)), config)[0]
    assert q.compute_path == "int4pack_mm"  # groups of 64 on the kernel side: 128s in pairs, the 64 alone
    x = torch.randn(3, 576)
    with torch.no_grad():
        reference = torch.nn.functional.linear(x, q.dense_weight(), q.bias)
        y = q(x)
    # The kernel runs bf16 activations: ≈3e-3 relative error, the same as for groups that divide.
    assert float((y - reference).norm() / reference.norm()) < 1e-2
    deq = copy.deepcopy(q)
    deq.compute = "dequantize"
    with torch.no_grad():
        assert torch.equal(deq(x), reference)


def test_kernel_falls_back_to_dequantize_where_no_kernel_group_fits():
    q = nnopt.quantize(nn.Sequential(_linear(100, 32)), WeightQuantConfig(bits=4, group_size=64, compute="kernel"))[0]
    assert q.weight_scale.shape == (32, 2) and q.compute_path == "dequantize"  # 100 = 64 + 36: no 32 divides both
    x = torch.randn(2, 100)
    with torch.no_grad():
        torch.testing.assert_close(q(x), torch.nn.functional.linear(x, q.dense_weight(), q.bias))


@pytest.mark.parametrize("weights_format", ["safetensors", "packed"])
def test_save_load_round_trip_with_partial_groups_is_exact(tmp_path, weights_format):
    model = nnopt.create_model("simplenet", seed=0).eval()  # Linear inputs 64, 64, 32
    for config in (WeightQuantConfig(bits=4, group_size=24), WeightQuantConfig(bits=4, group_size=24, symmetric=False),
                   WeightQuantConfig(bits=8, group_size=24)):
        q = nnopt.quantize(model, config)
        scales = [m.weight_scale.shape[1] for m in q.modules() if isinstance(m, QuantizedLinear)]
        assert scales == [3, 3, 2]  # 24+24+16 and 24+8
        path = tmp_path / f"{config.bits}-{config.symmetric}"
        save_model(q, path, weights_format=weights_format)
        loaded = load_model(path)
        original, restored = q.state_dict(), loaded.state_dict()
        assert original.keys() == restored.keys()
        assert all(torch.equal(original[k], restored[k]) for k in original)
        x = torch.randn(4, 64)
        with torch.no_grad():
            assert torch.equal(q(x), loaded(x))


def test_named_conv_and_embedding_get_partial_groups_default_selection_leaves_them_float():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 16))
    default = nnopt.quantize(model, WeightQuantConfig(bits=8, group_size=8))
    assert isinstance(default[0], nn.Conv2d)  # 27 inputs: as before partial groups existed
    named = nnopt.quantize(model, WeightQuantConfig(bits=8, group_size=8, layers=("0",)))
    conv = named[0]
    assert isinstance(conv, QuantizedConv2d) and conv.weight_scale.shape == (8, 4)  # 8+8+8+3
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(named(x), model(x), atol=0.05, rtol=0.05)
    table = nn.Sequential(nn.Embedding(10, 20))
    q = nnopt.quantize(table, WeightQuantConfig(bits=8, group_size=8, layers=("0",)))[0]
    assert q.weight_scale.shape == (10, 3)
    ids = torch.tensor([[1, 7, 7, 0]])
    assert torch.equal(q(ids), q.dense_weight()[ids])
    torch.testing.assert_close(q(ids), table[0](ids), atol=0.02, rtol=0)


def test_group_wider_than_the_input_is_refused():
    with pytest.raises(ConfigError, match="group_size: 128 exceeds the input dimension 96"):
        nnopt.quantize(nn.Sequential(nn.Linear(96, 16)), WeightQuantConfig(bits=4, group_size=128))
