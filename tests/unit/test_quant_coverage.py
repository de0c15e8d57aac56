"""Quantization on user-written models' layer types: every scheme applies (output close to fp32) or skips a
layer with a recorded reason, and replaying the pass on a fresh copy then loading the state dict (strict)
reproduces the outputs exactly."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nnopt.data import Split
from nnopt.errors import UnsupportedModelError
from nnopt.layers import kernels as K
from nnopt.layers import primitives as P
from nnopt.layers.attention_parts import MultiheadAttentionParts
from nnopt.layers.int8 import Int8StaticConv1d, Int8StaticConv2d
from nnopt.layers.protocol import CompressedLayer
from nnopt.layers.recurrent import Int8DynamicRNN, RecurrentParts, rnn_kernel_choice
from nnopt.layers.weight_only import QuantizedConv1d, QuantizedEmbedding
from nnopt.lineage import AppliedPass
from nnopt.quantization import (
    ClusterConfig,
    DynamicQuantConfig,
    QATConfig,
    StaticQuantConfig,
    WeightQuantConfig,
    quantize,
)
from nnopt.techniques import technique_for

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _user_models():
    spec = importlib.util.spec_from_file_location("user_models", EXAMPLES / "user_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


U = _user_models()


def _model(kind: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if kind == "timeseries":
        model, x = U.TimeSeriesCNN(width=8), torch.randn(6, 3, 48)
    elif kind == "mobilenet":
        model, x = U.MobileNetSE(width=8), torch.randn(2, 3, 32, 32)
    elif kind == "vit":
        model, x = U.TinyViT(image=16, patch=4, dim=32, depth=2, heads=4, mlp=64), torch.randn(4, 3, 16, 16)
    else:
        model, x = U.LSTMClassifier(vocab=50, embed=16, hidden=24), torch.randint(0, 50, (5, 10))
    _randomize_batchnorm(model)
    return model.eval(), x


def _randomize_batchnorm(model: nn.Module) -> None:
    """Fresh BatchNorm layers are near-identities of N(0, 1); trained-like statistics make outputs vary."""
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(n, generator=generator) * 0.5 + 0.5)


MODELS = ("timeseries", "mobilenet", "vit", "lstm")
# (config, minimum cosine of the outputs against fp32)
SCHEMES = {
    "weight-int8": (WeightQuantConfig(bits=8, per_channel=True), 0.999),
    "weight-int4": (WeightQuantConfig(bits=4, per_channel=True), 0.95),
    "weight-int4-g8": (WeightQuantConfig(bits=4, group_size=8), 0.95),
    "dynamic-int8": (DynamicQuantConfig(), 0.99),
    "static-int8": (StaticQuantConfig(calibration_samples=8), 0.99),
    "cluster-4bit": (ClusterConfig(bits=4, iterations=10), 0.95),
}


def _apply(model: nn.Module, config, x: torch.Tensor) -> tuple[nn.Module, dict]:
    quantized = copy.deepcopy(model)
    data = Split(x, torch.zeros(x.shape[0], dtype=torch.long))
    details = technique_for(config).apply(quantized, config, data=data)
    return quantized.eval(), details


def _replayed(model: nn.Module, config, details: dict, quantized: nn.Module) -> nn.Module:
    fresh = copy.deepcopy(model)
    # details go through JSON, as a saved model's record does
    applied = AppliedPass(config.kind, config.to_dict(), json.loads(json.dumps(details)))
    technique_for(config).replay(fresh, applied)
    fresh.load_state_dict(quantized.state_dict(), strict=True)
    return fresh.eval()


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.detach().flatten().double(), b.detach().flatten().double(), dim=0))


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_scheme_applies_or_skips_with_reason_and_replays(kind, scheme):
    config, min_cosine = SCHEMES[scheme]
    model, x = _model(kind)
    with torch.no_grad():
        reference = model(x)
    quantized, details = _apply(model, config, x)
    with torch.no_grad():
        out = quantized(x)
    assert _cosine(out, reference) >= min_cosine
    assert details["layers"], "something must be quantized"
    # every weighted layer is either quantized or listed with a reason
    weighted = {n for n, m in model.named_modules()
                if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding, nn.LSTM, nn.MultiheadAttention))
                and not n.endswith("out_proj")}
    skipped = details.get("skipped", {})
    assert weighted == set(details["layers"]) | set(skipped)
    assert all(isinstance(why, str) and len(why) > 10 for why in skipped.values())
    replayed = _replayed(model, config, details, quantized)
    with torch.no_grad():
        assert torch.equal(replayed(x), out)


COVERED = {  # scheme -> layer types it must reach by default on the user models
    "weight-int8": (nn.Conv1d, nn.Conv2d, nn.Linear, nn.Embedding, nn.LSTM, nn.MultiheadAttention),
    "cluster-4bit": (nn.Conv1d, nn.Conv2d, nn.Linear, nn.Embedding, nn.LSTM, nn.MultiheadAttention),
    "dynamic-int8": (nn.Linear, nn.Embedding, nn.LSTM),
    "static-int8": (nn.Conv1d, nn.Conv2d, nn.Linear),
}


@pytest.mark.parametrize("scheme", COVERED)
def test_default_targets_reach_the_user_models_layer_types(scheme):
    config, _ = SCHEMES[scheme]
    reached: set[type] = set()
    for kind in MODELS:
        model, x = _model(kind)
        _, details = _apply(model, config, x)
        reached |= {type(model.get_submodule(name)) for name in details["layers"]}
    assert set(COVERED[scheme]) <= reached


def test_depthwise_and_grouped_conv_layers_are_covered_by_static_int8():
    model, x = _model("mobilenet")
    quantized, details = _apply(model, StaticQuantConfig(calibration_samples=8), x)
    depthwise = quantized.blocks[1].depthwise[0]
    assert isinstance(depthwise, Int8StaticConv2d) and depthwise.groups == depthwise.in_channels > 1
    assert not details.get("skipped")


@pytest.mark.parametrize("groups,padding,padding_mode,stride,dilation", [
    (1, 2, "zeros", 1, 1), (4, 1, "zeros", 2, 1), (8, "same", "zeros", 1, 2), (2, 3, "reflect", 1, 1),
    (1, 1, "circular", 3, 1), (8, 0, "replicate", 1, 3),
])
@pytest.mark.parametrize("dims", [1, 2])
def test_static_int8_conv_equals_its_fake_quantized_float_twin(dims, groups, padding, padding_mode, stride, dilation):
    """The int8 integer sums are exact: output == conv(dequantized input codes, dequantized weights) up to fp32
    rounding of the epilogue, for every geometry (groups, padding modes, stride, dilation)."""
    torch.manual_seed(0)
    conv_type = nn.Conv1d if dims == 1 else nn.Conv2d
    if padding == "same" and stride != 1:
        pytest.skip("padding='same' needs stride 1")
    conv = conv_type(8, 16, 3, stride=stride, padding=padding, dilation=dilation, groups=groups,
                     padding_mode=padding_mode)
    x = torch.randn(2, 8, *([17] * dims))
    q = Int8StaticConv1d(conv) if dims == 1 else Int8StaticConv2d(conv)
    q.set_weight(conv.weight.detach())
    scale, zero = P.qparams_from_range(x.min(), x.max(), 8, symmetric=False)
    q.set_input(scale, zero)
    x_fq = P.fake_quantize(x, scale, zero, 8, symmetric=False)
    expected = conv._conv_forward(x_fq, q.dense_weight(), conv.bias)
    with torch.no_grad():
        got = q(x)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_int8_conv_blocks_deep_windows_exactly():
    """Depth (in / groups · kernel) beyond 1024 codes is summed in exact float32 blocks: equal to float64."""
    if not K.conv_fp32_exact():
        pytest.skip("float32 convolutions are not exact on this machine")
    torch.manual_seed(0)
    for channels, groups in ((300, 2), (250, 1)):  # depths 1350 and 2250: two and three blocks
        codes = torch.where(torch.rand(1, channels, 9, 9) > 0.5, 127.0, -128.0)
        weights = torch.where(torch.rand(4, channels // groups, 3, 3) > 0.5, 127.0, -127.0)  # the largest sums
        conv = lambda a, w, g=groups: F.conv2d(a, w, None, 1, 1, 1, g)  # noqa: E731
        want = conv(codes.double(), weights.double())
        got = K.int8_conv(codes, weights, conv, groups, "fp32-exact")
        assert got.dtype == torch.float64 and torch.equal(got, want)
        assert torch.equal(K.int8_conv(codes[:, :8], weights[:, :8 // groups], conv, groups, "fp32-exact").double(),
                           conv(codes[:, :8].double(), weights[:, :8 // groups].double()))  # one block: float32


def test_linear_on_nd_inputs_for_every_int8_scheme():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8)).eval()
    x = torch.randn(4, 7, 16)  # (n, T, d)
    reference = model(x)
    for config in (DynamicQuantConfig(), StaticQuantConfig(calibration_samples=4), WeightQuantConfig(bits=8)):
        quantized, _ = _apply(model, config, x)
        with torch.no_grad():
            out = quantized(x)
        assert out.shape == reference.shape
        assert _cosine(out, reference) > 0.999


def test_dynamic_int8_lstm_and_gru_are_close_to_fp32_and_record_the_kernel_choice():
    torch.manual_seed(0)
    for rnn in (nn.LSTM(12, 20, num_layers=2, batch_first=True, bidirectional=True), nn.GRU(12, 20)):
        model = nn.Sequential(rnn).eval()
        x = torch.randn(3, 9, 12)
        reference = rnn(x)[0]
        quantized, details = _apply(model, DynamicQuantConfig(), x)
        layer = quantized[0]
        assert isinstance(layer, Int8DynamicRNN) and isinstance(layer, CompressedLayer)
        with torch.no_grad():
            out = layer(x)[0]
        assert P.sqnr_db(reference, out) > 30.0  # int8 weights per row; 7-bit activations on the fbgemm path
        measured = details["layers"]["0"]["measured"]
        assert measured["kernel"] in ("fbgemm-int8", "float") and measured["float_ms"] > 0
        assert layer.kernel_path() == rnn_kernel_choice(layer).path
        # the protocol: flat codes and dense weights, the stored codes named with their bits
        assert layer.weight_codes().shape == layer.dense_weight().shape
        assert set(layer.stored_codes()) <= set(layer.state_dict())
        layer.check_loaded()


def test_int8_rnn_refuses_bad_scales_on_load():
    layer = Int8DynamicRNN(nn.LSTM(4, 6))
    state = layer.state_dict()
    state["weight_ih_l0_scale"] = torch.zeros_like(state["weight_ih_l0_scale"])
    layer.load_state_dict(state)
    from nnopt.errors import ModelFormatError

    with pytest.raises(ModelFormatError, match="scales must be finite"):
        layer.check_loaded()


def test_recurrent_and_attention_parts_compute_like_torch_with_the_dense_weights():
    """The wrappers add nothing of their own: with unquantized matrices they equal the torch layer."""
    torch.manual_seed(0)
    identity = lambda w: _Dense(w)  # noqa: E731
    lstm = nn.LSTM(5, 7, num_layers=2, bidirectional=True)
    parts = RecurrentParts(lstm, {n: identity(getattr(lstm, n)) for n in ("weight_ih_l0", "weight_hh_l0",
        "weight_ih_l0_reverse", "weight_hh_l0_reverse", "weight_ih_l1", "weight_hh_l1", "weight_ih_l1_reverse",
        "weight_hh_l1_reverse")})
    x = torch.randn(6, 2, 5)
    assert torch.allclose(parts(x)[0], lstm(x)[0], atol=1e-6)
    assert torch.allclose(parts(x[:, 0])[0], lstm(x[:, 0])[0], atol=1e-6)  # unbatched
    attention = nn.MultiheadAttention(8, 2, batch_first=True, kdim=6, vdim=6).eval()
    wrapped = MultiheadAttentionParts(attention, {
        "q_proj_weight": identity(attention.q_proj_weight), "k_proj_weight": identity(attention.k_proj_weight),
        "v_proj_weight": identity(attention.v_proj_weight), "out_proj_weight": identity(attention.out_proj.weight),
    }).eval()
    q, kv = torch.randn(2, 3, 8), torch.randn(2, 4, 6)
    mask = torch.tensor([[False, False, True, False], [False, False, False, False]])
    want = attention(q, kv, kv, key_padding_mask=mask)
    got = wrapped(q, kv, kv, key_padding_mask=mask)
    assert torch.allclose(got[0], want[0], atol=1e-6) and torch.allclose(got[1], want[1], atol=1e-6)


class _Dense(nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())

    def dense_weight(self) -> torch.Tensor:
        return self.weight


def test_weight_only_covers_conv1d_transposed_and_embedding_lookups():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(4, 8, 3, padding=1, padding_mode="reflect"), nn.ConvTranspose1d(8, 4, 4, stride=2),
                          nn.Conv1d(4, 6, 3, groups=2)).eval()
    x = torch.randn(2, 4, 16)
    quantized, details = _apply(model, WeightQuantConfig(bits=8, per_channel=True), x)
    assert isinstance(quantized[0], QuantizedConv1d) and set(details["layers"]) == {"0", "1", "2"}
    assert _cosine(quantized(x), model(x)) > 0.999
    table = nn.Embedding(20, 8, padding_idx=0)
    for config in (WeightQuantConfig(bits=8, per_channel=True), WeightQuantConfig(bits=4, group_size=4)):
        q, _ = _apply(nn.Sequential(table), config, torch.zeros(1, 1, dtype=torch.long))
        assert isinstance(q[0], QuantizedEmbedding)
        ids = torch.tensor([[3, 0, 19], [7, 7, 1]])
        assert torch.equal(q[0](ids), F.embedding(ids, q[0].dense_weight()))  # gathered rows == whole table


def test_named_layer_of_an_uncovered_type_is_refused_with_its_name():
    model, x = _model("lstm")
    with pytest.raises(UnsupportedModelError, match="lstm"):
        _apply(model, StaticQuantConfig(layers=("lstm",)), x)


def test_a_model_with_nothing_coverable_is_refused_naming_what_was_skipped():
    model = nn.Sequential(nn.LSTM(4, 4)).eval()
    with pytest.raises(UnsupportedModelError, match="no recurrent kernel"):
        _apply(model, StaticQuantConfig(), torch.randn(2, 3, 4))


def _depthwise_block() -> tuple[nn.Module, torch.Tensor]:
    """MobileNet's inverted residual in miniature: expand, depthwise 3×3, project (MobileNetSE itself is
    too slow to fine-tune in a unit test)."""
    torch.manual_seed(0)
    block = U.InvertedResidual(4, 4, stride=1, expand=2, se=True)
    _randomize_batchnorm(block)
    model = nn.Sequential(block, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))
    return model.eval(), torch.randn(12, 4, 8, 8)


@pytest.mark.parametrize("kind", ["timeseries", "depthwise"])
def test_qat_covers_conv1d_and_depthwise_conv2d_and_replays(kind):
    model, x = _depthwise_block() if kind == "depthwise" else _model(kind)
    x = torch.cat([x, x])
    y = torch.randint(0, 5, (x.shape[0],))
    config = QATConfig(epochs=1, batch_size=8, calibration_samples=8, validation_fraction=0.0)
    quantized = copy.deepcopy(model)
    details = technique_for(config).apply(quantized, config, data=Split(x, y))
    quantized.eval()
    if kind == "timeseries":
        assert sum(isinstance(m, Int8StaticConv1d) for m in quantized.modules()) == 3
    else:
        assert any(isinstance(m, Int8StaticConv2d) and m.groups == m.in_channels > 1 for m in quantized.modules())
    with torch.no_grad():
        assert _cosine(quantized(x), model(x)) > 0.95
        assert torch.equal(_replayed(model, config, details, quantized)(x), quantized(x))


def test_quantize_verb_runs_on_a_user_model():
    model, x = _model("lstm")
    quantized = quantize(model, DynamicQuantConfig())
    assert isinstance(quantized.lstm, Int8DynamicRNN)
    with torch.no_grad():
        assert _cosine(quantized(x), model(x)) > 0.99
