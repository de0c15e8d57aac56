"""Learned rounding (AdaRound) on ONNX Runtime's grid: better layer outputs, the codes reach the int8 file, and the
layer inputs gathered in one pass over the traced model equal those of running the model again for each layer."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import nnopt.quantization.learned_rounding as learned_rounding
from nnopt.errors import ConfigError
from nnopt.quantization.learned_rounding import LearnedRoundingConfig, grid_step, learn_rounding

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small models: one thread is fastest


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 12, 3, padding=1), nn.ReLU(), nn.Conv2d(12, 12, 3, padding=1, groups=12), nn.ReLU6(),
        nn.Conv2d(12, 8, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    )
    return model.eval()


class _Residual(nn.Module):
    """A skip connection (MobileNetV2's inverted residual), an in-place ReLU, functional calls and a head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.block = nn.Sequential(nn.Conv2d(8, 16, 1), nn.ReLU6(), nn.Conv2d(16, 16, 3, padding=1, groups=16),
                                   nn.ReLU6(), nn.Conv2d(16, 8, 1))
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.stem(x))
        x = x + self.block(x)
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class _Branching(_Residual):
    """Control flow on values: torch.fx cannot trace it, so the inputs are gathered the slow way."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.stem(x))
        if float(x.mean()) > 0:
            x = x + self.block(x)
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _onnx_weight_codes(onnx_bytes: bytes, layer: str, weights: str) -> np.ndarray:
    """The integer weight codes ONNX Runtime's quantizer wrote for ``layer`` (zero point removed)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load_from_string(onnx_bytes).graph
    codes = [numpy_helper.to_array(t) for t in graph.initializer
             if t.name.startswith(f"{layer}.weight") and t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
             and len(t.dims) > 1]
    assert len(codes) == 1, [t.name for t in graph.initializer]
    return codes[0].astype(np.int32) - (128 if weights == "uint8" else 0)


@pytest.mark.parametrize("weights", ["uint8", "int8"])
def test_onnxruntime_writes_exactly_the_learned_codes(weights: str) -> None:
    from nnopt.io.onnx_export import export_onnx
    from nnopt.quantization.onnx_static import QdqQuantizer

    model = _cnn()
    before = copy.deepcopy(model.state_dict())
    data = torch.randn(32, 3, 10, 10)
    rounded, layers = learn_rounding(model, data, weights, LearnedRoundingConfig(steps=60))
    assert list(layers) == ["0", "2", "4", "8"]  # the order the model calls them
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the input is untouched
    with QdqQuantizer(export_onnx(rounded, data[:1]), [data[:16].numpy()], "minmax", weights) as quantizer:
        int8 = quantizer.quantize()
    flipped = 0
    for name, module in rounded.named_modules():
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            continue
        w = module.weight.detach()
        learned = torch.round(w / grid_step(w, weights))
        original = dict(model.named_modules())[name].weight.detach()
        pinned = original.abs() == original.abs().amax(dim=tuple(range(1, w.ndim)), keepdim=True)
        codes = torch.from_numpy(_onnx_weight_codes(int8, name, weights))
        assert torch.equal(codes[~pinned], learned[~pinned].to(codes.dtype)), name
        flipped += int((learned != torch.round(original / grid_step(original, weights)))[~pinned].sum())
        assert torch.equal(w[pinned], original[pinned])  # the step ONNX Runtime derives is unchanged
    assert flipped > 0  # something was learned: not every weight went to its nearest grid point


def test_learned_rounding_lowers_the_layer_output_error_of_nearest() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(64, 32)).eval()
    # correlated inputs (as a network's activations are): nearest rounding, optimal for white inputs, is not here
    data = torch.randn(256, 8) @ torch.randn(8, 64) + 0.1 * torch.randn(256, 64)
    config = LearnedRoundingConfig(steps=400, batch=64, quantize_inputs=False)
    rounded, layers = learn_rounding(model, data, "int8", config)
    result = layers["0"]
    assert result.learned_error < 0.8 * result.nearest_error and 0 < result.flipped < 0.5
    # the errors are what they say: measured again on the data, nearest vs the rounded copy
    with torch.no_grad():
        target = model(data)
        w = model[0].weight
        nearest = copy.deepcopy(model)
        nearest[0].weight.copy_(torch.round(w / grid_step(w, "int8")) * grid_step(w, "int8"))
        relative = lambda m: float((m(data) - target).double().pow(2).mean() / target.double().pow(2).mean())  # noqa: E731
        assert relative(rounded) == pytest.approx(result.learned_error, rel=1e-3)
        assert relative(nearest) == pytest.approx(result.nearest_error, rel=1e-3)


def test_learned_rounding_refuses_bad_input() -> None:
    model = _cnn()
    with pytest.raises(ConfigError, match="steps >= 1"):
        learn_rounding(model, torch.randn(4, 3, 8, 8), config=LearnedRoundingConfig(steps=0))
    with pytest.raises(ConfigError, match="weights must be"):
        learn_rounding(model, torch.randn(4, 3, 8, 8), "int4")
    with pytest.raises(ConfigError, match="no layer named"):
        learn_rounding(model, torch.randn(4, 3, 8, 8), layers=["head"])
    with pytest.raises(ConfigError, match="Conv1d/Conv2d/Linear"):
        learn_rounding(model, torch.randn(4, 3, 8, 8), layers=["1"])
    with pytest.raises(ConfigError, match="calibration inputs"):
        learn_rounding(model, torch.randn(0, 3, 8, 8))


def test_int8_onnx_with_learned_rounding_keeps_float_layers_at_their_float_weights(monkeypatch) -> None:
    import onnx
    from onnx import numpy_helper

    import nnopt.pipeline.int8_onnx as pipeline
    from nnopt.pipeline.int8_onnx import Int8OnnxOptions, int8_onnx, prepare_for_int8

    calls: list[int] = []

    def never_agreeing(outputs: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
        calls.append(1)  # each step closer than the last: the fallback keeps its last step, one float layer
        return 0.0, 1.0 / len(calls)

    monkeypatch.setattr(pipeline, "agreement_and_kl", never_agreeing)

    model = _cnn()
    data = torch.randn(40, 3, 10, 10)
    options = Int8OnnxOptions(rounding="learned", rounding_steps=30, rounding_samples=16, calibration_samples=24,
                              target_agreement=1.0, max_float_layers=1)
    result = int8_onnx(model, data, options)
    learned = result.preparation["learned_rounding"]
    assert set(learned["layers"]) == {"0", "2", "4", "8"} and "bias_correction" not in result.preparation
    assert all(layer["learned_error"] <= layer["nearest_error"] for layer in learned["layers"].values())
    (kept,) = result.float_layers  # a layer kept in float carries its float weight, not the learned grid's
    graph = onnx.load_from_string(result.onnx).graph
    stored = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    prepared, _ = prepare_for_int8(model, data[:24], options)  # folded and equalized, as int8_onnx does
    folded = dict(prepared.named_modules())[kept].weight.detach().numpy()
    assert any(v.shape == folded.shape and np.array_equal(v, folded) for v in stored.values())
    with pytest.raises(ConfigError, match="rounding must be one of"):
        Int8OnnxOptions(rounding="stochastic").validate()


@pytest.mark.parametrize("quantize_inputs", [True, False])
def test_one_pass_gathering_gives_the_inputs_of_running_the_model_again(quantize_inputs: bool) -> None:
    model = _Residual().eval()
    data = torch.randn(40, 3, 8, 8)  # two chunks of GATHER_BATCH rows: each keeps its own paused values
    order = learned_rounding._call_order(model, data[:1], None)
    assert order == ["stem", "block.0", "block.2", "block.4", "head"]
    ranges = learned_rounding._input_ranges(model, order, data) if quantize_inputs else {}
    traced = learned_rounding._trace(model, data[:1], order)
    assert traced is not None
    stream = learned_rounding._InputStream(model, traced, data, ranges)
    modules = dict(model.named_modules())
    for name in order:
        streamed = stream.inputs(name)
        assert torch.equal(streamed, learned_rounding._layer_inputs(model, name, data, ranges)), name
        with torch.no_grad():  # as learning the layer does: what follows must see the new weights
            modules[name].weight.mul_(0.8).add_(0.01)


def test_learned_rounding_is_the_same_with_one_pass_gathering(monkeypatch) -> None:
    model = _Residual().eval()
    data = torch.randn(40, 3, 8, 8)
    config = LearnedRoundingConfig(steps=20)
    fast, fast_layers = learn_rounding(model, data, "uint8", config)
    monkeypatch.setattr(learned_rounding, "_trace", lambda *_: None)  # every layer's inputs by a new pass
    slow, slow_layers = learn_rounding(model, data, "uint8", config)
    assert fast_layers == slow_layers
    assert all(torch.equal(v, slow.state_dict()[k]) for k, v in fast.state_dict().items())


def test_gathering_takes_the_slow_way_where_the_model_does_not_trace() -> None:
    from nnopt.models.registry import create_model

    branching = _Branching().eval()
    data = torch.randn(8, 3, 8, 8)
    order = learned_rounding._call_order(branching, data[:1], None)
    assert learned_rounding._trace(branching, data[:1], order) is None
    _, layers = learn_rounding(branching, data, "int8", LearnedRoundingConfig(steps=5))
    assert list(layers) == order
    mobilenet = create_model("mobilenet_v2").eval()  # the model this is for traces: the fast way
    example = torch.randn(1, 3, 32, 32)
    assert learned_rounding._trace(mobilenet, example, learned_rounding._call_order(mobilenet, example, None))
