"""Accuracy-aware static int8 of CNNs: equalization, bias correction, ONNX Runtime QDQ with float fallback."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from nnopt.errors import ConfigError
from nnopt.models.registry import create_model
from nnopt.quantization.equalize import (
    bias_shifts,
    correct_bias,
    equalization_pairs,
    equalize,
    input_means,
    weight_grid,
)

pytest.importorskip("onnxruntime")


def _relu_cnn() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),
        nn.Conv2d(8, 16, 1), nn.ReLU6(), nn.Conv2d(16, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5),
    )
    with torch.no_grad():  # uneven channel ranges, as BatchNorm folding leaves them
        model[0].weight.mul_(torch.logspace(-2, 1, 8).view(-1, 1, 1, 1))
    return model.eval()


def test_equalization_keeps_the_function_and_evens_out_channel_ranges() -> None:
    model = _relu_cnn()
    x = torch.randn(4, 3, 16, 16)
    before = model(x)
    spread = lambda w: float(w.detach().abs().flatten(1).amax(1).max() / w.detach().abs().flatten(1).amax(1).min())  # noqa: E731
    spread_before = spread(model[0].weight)
    info = equalize(model)
    assert ["0", "2"] in info["pairs"] and ["2", "4"] in info["pairs"]
    assert any("ReLU6" in reason for reason in info["skipped"].values())  # 4 -> ReLU6 -> 6 is not rescaled
    torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-5)
    assert spread(model[0].weight) < spread_before / 3


def test_equalization_pairs_skip_grouped_second_layers() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2))
    pairs, skipped = equalization_pairs(model)
    assert pairs == [] and "grouped" in next(iter(skipped.values()))


def test_weight_grid_matches_onnxruntime_symmetric_steps() -> None:
    w = torch.tensor([[1.0, -0.5, 0.25], [0.0, 0.0, 0.0]])
    grid = weight_grid(w, "int8")
    assert torch.equal(grid[1], torch.zeros(3)) and float(grid[0, 0]) == pytest.approx(1.0)
    step = float((weight_grid(w, "uint8")[0] - w[0]).abs().max())
    assert step <= 2 * 1.0 / 255 / 2 + 1e-7
    with pytest.raises(ConfigError):
        weight_grid(w, "int4")


def test_bias_correction_removes_the_mean_shift_of_weight_rounding() -> None:
    torch.manual_seed(1)
    layer = nn.Conv2d(4, 6, 3, bias=True)
    x = torch.rand(64, 4, 8, 8) + 1.0  # inputs with a large mean: rounding errors shift outputs
    exact = layer(x)
    rounded = copy.deepcopy(layer)
    means = input_means(rounded, [""], [x], lambda m, b: m(b))
    def shift(conv: nn.Conv2d) -> torch.Tensor:
        return (nn.functional.conv2d(x, weight_grid(conv.weight, "uint8"), conv.bias) - exact).mean(dim=(0, 2, 3))

    shift_before = shift(layer)
    correct_bias(rounded, bias_shifts(rounded, means, "uint8"))
    shift_after = shift(rounded)
    assert float(shift_after.abs().max()) < float(shift_before.abs().max()) / 10


def test_int8_onnx_keeps_sensitive_layers_in_float_until_the_target_is_met() -> None:
    from nnopt.pipeline.int8_onnx import Int8OnnxOptions, int8_onnx
    from nnopt.quantization.onnx_static import run_onnx

    model = create_model("mobilenet_v2", image_size=32, width=0.25, num_classes=10, seed=0).eval()
    torch.manual_seed(0)
    data = torch.randn(48, 3, 32, 32)
    full = int8_onnx(model, data, Int8OnnxOptions(calibration_samples=32, target_agreement=0.0))
    assert full.float_layers == () and len(full.steps) == 1 and full.met_target
    result = int8_onnx(model, data, Int8OnnxOptions(calibration_samples=32, target_agreement=1.0,
                                                     max_float_layers=2))
    # steps stop at the first that meets the target, else every step up to max_float_layers is tried
    counts = [s["float_layers"] for s in result.steps]
    assert counts == [0, 1, 2][:len(counts)]
    assert result.met_target == (result.steps[-1]["agreement"] >= 1.0)
    assert result.met_target or counts == [0, 1, 2]
    assert len(result.float_layers) == counts[-1] if result.met_target else len(result.float_layers) <= 2
    assert set(result.float_layers) <= set(result.sensitivity) and result.preparation["folded"] > 0
    with torch.no_grad():
        reference = model(data[32:]).numpy()
    out = run_onnx(result.onnx, data[32:].numpy())
    assert out.shape == reference.shape
    assert float(abs(out - reference).max()) < 0.5 * float(abs(reference).max())
    assert "validation" in str(result) and result.to_dict()["file_bytes"] == len(result.onnx)


def test_int8_onnx_refuses_bad_input_with_a_clear_error() -> None:
    from nnopt.pipeline.int8_onnx import Int8OnnxOptions, int8_onnx

    model = create_model("mobilenet_v2", image_size=32, width=0.25, num_classes=10, seed=0)
    with pytest.raises(ConfigError, match="more than calibration_samples"):
        int8_onnx(model, torch.randn(8, 3, 32, 32), Int8OnnxOptions(calibration_samples=8))
    with pytest.raises(ConfigError, match="calibration must be one of"):
        Int8OnnxOptions(calibration="mse2").validate()
    with pytest.raises(ConfigError, match="float tensor"):
        int8_onnx(model, torch.zeros(8, 3, 32, 32, dtype=torch.long))


def test_equalization_reaches_through_folded_batchnorms_and_names_relu6_pairs() -> None:
    from nnopt.simplification.fold import FoldBatchNormConfig, fold_batchnorm

    model = create_model("mobilenet_v2", image_size=32, width=0.25, num_classes=10, seed=0).eval()
    folded = copy.deepcopy(model)
    fold_batchnorm(folded, FoldBatchNormConfig(), data=torch.randn(2, 3, 32, 32))
    pairs, skipped = equalization_pairs(folded)
    assert ["features.17.conv.2", "features.18.0"] in [list(p) for p in pairs]  # through the folded BatchNorm
    assert sum("ReLU6" in reason for reason in skipped.values()) >= 30  # expand -> dw -> project, every block


def test_every_conv_and_linear_maps_to_its_onnx_node() -> None:
    from nnopt.io.onnx_export import export_onnx
    from nnopt.quantization.onnx_static import layer_nodes

    for name in ("mobilenet_v2", "resnet18"):
        model = create_model(name, image_size=32, width=0.25, num_classes=10, seed=0).eval()
        layers = {n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
        assert set(layer_nodes(export_onnx(model, torch.randn(1, 3, 32, 32)))) == layers


def test_entropy_calibration_clips_heavy_tails_where_quantize_static_alone_gives_min_max() -> None:
    """ONNX Runtime's quantize_static builds its entropy calibrator with 128 bins for 128 levels: one candidate
    threshold, the full range. nnopt calibrates with 2048 bins, so entropy chooses a narrower range."""
    import json
    from pathlib import Path

    from nnopt.io.onnx_export import export_onnx
    from nnopt.quantization.onnx_static import QdqQuantizer, run_onnx

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 12 * 12, 10)).eval()
    x = torch.randn(64, 3, 16, 16) ** 3  # heavy-tailed inputs: a few values far out
    graph = export_onnx(model, x[:1])
    batches = [x[i:i + 16].numpy() for i in range(0, 64, 16)]
    spans, files = {}, {}
    for method in ("minmax", "entropy"):
        with QdqQuantizer(graph, batches, method, "uint8") as quantizer:
            files[method] = quantizer.quantize()
            assert files[method] == quantizer.quantize(fp32_onnx=graph)  # the kept graph is what quantizing again gives
            data = json.loads(Path(quantizer._cache).read_text())["data"]  # the ranges the file was quantized with
        spans[method] = {name: _number(r["highest"]) - _number(r["lowest"]) for name, r in data.items()}
    assert files["entropy"] != files["minmax"]
    assert spans["entropy"].keys() == spans["minmax"].keys()
    assert all(spans["entropy"][n] <= spans["minmax"][n] + 1e-6 for n in spans["minmax"])
    assert any(spans["entropy"][n] < 0.9 * spans["minmax"][n] for n in spans["minmax"])  # a tail was clipped
    reference = model(x).detach().numpy()
    for method in ("minmax", "entropy"):  # both still compute the model
        out = run_onnx(files[method], x.numpy())
        assert float(((out - reference) ** 2).mean()) < float((reference ** 2).mean())


def _number(value: object) -> float:
    """A scalar from ONNX Runtime's calibration cache (a number, or an encoded array holding one)."""
    import numpy as np

    return float(np.asarray(value["data"] if isinstance(value, dict) else value).reshape(-1)[0])


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.inner, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.stem(x))
        y = torch.relu(self.inner(y) + y)
        return self.head(y.mean((2, 3)))


def test_a_layer_kept_in_float_keeps_its_additions_and_activations_in_float() -> None:
    """ONNX Runtime quantizes the tensors of every addition or activation not excluded by name, so a layer
    excluded alone still reads 8-bit tensors; float_region takes the nodes around it along."""
    import onnx

    from nnopt.io.onnx_export import export_onnx
    from nnopt.quantization.onnx_static import QdqQuantizer, float_region, layer_nodes, run_onnx

    torch.manual_seed(0)
    model = _Residual().eval()
    x = torch.randn(32, 3, 12, 12)
    graph = export_onnx(model, x[:1])
    nodes = layer_nodes(graph)
    graph_nodes = onnx.load_from_string(graph).graph.node
    ops = {n.name: n.op_type for n in graph_nodes}
    stem_output = next(n.output[0] for n in graph_nodes if n.name == nodes["stem"])
    stem_relu = next(n.name for n in graph_nodes if n.op_type == "Relu" and n.input[0] == stem_output)
    region = float_region(graph, [nodes["inner"]])
    kinds = sorted(ops[name] for name in region)
    assert nodes["inner"] in region and nodes["stem"] not in region and nodes["head"] not in region
    assert kinds.count("Add") == 1 and kinds.count("Relu") == 1  # the addition and the ReLU after it
    # the ReLU after the int8 stem stays with it, so the stem's output is quantized over the ReLU's range
    assert stem_relu not in region and float_region(graph, [nodes["stem"]]).count(stem_relu) == 1
    assert float_region(graph, []) == []
    batches = [x[i:i + 16].numpy() for i in range(0, 32, 16)]
    reference = model(x).detach().numpy()
    with QdqQuantizer(graph, batches, "minmax", "uint8") as quantizer:
        all_float = quantizer.quantize(exclude=tuple(nodes))
        assert not any(n.op_type == "QuantizeLinear" for n in onnx.load_from_string(all_float).graph.node)
        assert abs(run_onnx(all_float, x.numpy()) - reference).max() < 1e-4  # every layer in float: the float model
        int8 = run_onnx(quantizer.quantize(), x.numpy())
        assert abs(int8 - reference).max() > 1e-3  # while the all-int8 graph does round


def test_a_layer_kept_in_float_is_not_requantized_by_onnxruntime() -> None:
    """ONNX Runtime's WeightBiasQuantization optimizer gives a float Conv fed by a per-tensor DequantizeLinear
    per-tensor int8 weights; the file's float layers read their input through a per-channel one instead."""
    import onnx
    import onnxruntime as ort

    from nnopt.io.onnx_export import export_onnx
    from nnopt.quantization.onnx_static import QdqQuantizer, layer_nodes

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3),
                          nn.Flatten(), nn.Linear(8 * 6 * 6, 4)).eval()
    with torch.no_grad():
        model[2].weight[0] *= 50  # one wide channel: per-tensor int8 weights would crush the others
    x = torch.randn(32, 3, 12, 12)
    graph = export_onnx(model, x[:1])
    batches = [x[i:i + 16].numpy() for i in range(0, 32, 16)]
    with QdqQuantizer(graph, batches, "minmax", "uint8") as quantizer:
        int8 = quantizer.quantize(exclude=("2",))
    inner = layer_nodes(graph)["2"]
    nodes = onnx.load_from_string(int8).graph.node
    feed = next(n for n in nodes if n.output[0] == next(m for m in nodes if m.name == inner).input[0])
    per_channel_feed = feed.op_type == "DequantizeLinear" and any(a.name == "axis" for a in feed.attribute)

    def run(disabled: list[str]) -> np.ndarray:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(int8, options, providers=["CPUExecutionProvider"],
                                       disabled_optimizers=disabled)
        return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]

    assert np.array_equal(run([]), run(["WeightBiasQuantization"]))
    assert per_channel_feed


def test_float_transposed_convolutions_and_gemms_read_a_per_channel_input() -> None:
    from nnopt.io.onnx_export import export_onnx
    from nnopt.quantization.onnx_static import QdqQuantizer, layer_nodes, run_onnx

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.ConvTranspose2d(8, 6, 3, stride=2), nn.ReLU(),
                          nn.Conv2d(6, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 19 * 19, 16), nn.ReLU(),
                          nn.Linear(16, 3)).eval()
    with torch.no_grad():
        model[2].weight[0] *= 50
        model[9].weight[0] *= 50
    x = torch.randn(16, 3, 12, 12)
    graph = export_onnx(model, x[:1])
    with QdqQuantizer(graph, [x.numpy()], "minmax", "uint8") as quantizer:
        int8 = quantizer.quantize(exclude=("2", "9"))  # each reads the output of an int8 layer's ReLU
    nodes = onnx_nodes(int8)
    for name in ("2", "9"):
        layer = next(n for n in nodes if n.name == layer_nodes(graph)[name])
        feed = next(n for n in nodes if n.output[0] == layer.input[0])
        assert feed.op_type == "DequantizeLinear" and any(a.name == "axis" for a in feed.attribute)
    assert run_onnx(int8, x.numpy()).shape == (16, 3)


def onnx_nodes(onnx_bytes: bytes) -> list:  # type: ignore[type-arg]
    import onnx

    return list(onnx.load_from_string(onnx_bytes).graph.node)
