"""The int8 QDQ file run in torch (QdqSimulation): faithful to ONNX Runtime, other widths, distillation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from nnopt.errors import ConfigError, UnsupportedModelError

pytest.importorskip("onnxruntime")


class _Residual(nn.Module):
    """Conv, depthwise, ReLU6, a residual addition, pooling and a classifier: what MobileNet-style files hold."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU6())
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU6(), nn.Conv2d(8, 8, 1))
        self.head = nn.Sequential(nn.Conv2d(8, 16, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(16, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        return self.head(y + self.block(y))


class _Shared(nn.Module):
    """One convolution called twice, then another of the same shape, and a channel pruned to zero (with a bias)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.shared = nn.Conv2d(8, 8, 1)
        self.other = nn.Conv2d(8, 8, 1)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
        with torch.no_grad():
            self.other.weight[3].zero_()
            self.other.bias[3] = 0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.stem(x))
        return self.head(self.other(torch.relu(self.shared(torch.relu(self.shared(y))))))


def _files(seed: int = 0, model: nn.Module | None = None, weights: str = "uint8") -> tuple[bytes, bytes, torch.Tensor]:
    from nnopt.io.onnx_export import export_onnx
    from nnopt.quantization.onnx_static import QdqQuantizer

    torch.manual_seed(seed)
    if model is None:
        model = _Residual().eval()
        with torch.no_grad():  # logits of a trained model's size, so that int8's error shows in the softmax
            model.head[-1].weight.mul_(40)
    x = torch.randn(48, 3, 16, 16)
    float_onnx = export_onnx(model.eval(), x[:1])
    with QdqQuantizer(float_onnx, [x[:16].numpy(), x[16:32].numpy()], "minmax", weights) as quantizer:
        return float_onnx, quantizer.quantize(), x


def _unoptimized(onnx_bytes: bytes, x: torch.Tensor) -> np.ndarray:
    """ONNX Runtime with its graph optimizations off: the QDQ file's own arithmetic, not its fused kernels."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def _initializers(onnx_bytes: bytes) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    return {t.name: numpy_helper.to_array(t) for t in onnx.load_from_string(onnx_bytes).graph.initializer}


def test_the_simulation_computes_what_onnxruntime_computes_from_the_file() -> None:
    from nnopt.quantization.qdq_simulation import QdqSimulation

    float_onnx, int8, x = _files()
    expected = _unoptimized(int8, x)
    with torch.no_grad():
        simulated = QdqSimulation(int8, float_onnx)(x).numpy()
    # the output is quantized too: the two may differ where a float sum lands on a rounding boundary
    output_step = float(np.diff(np.unique(expected)).min())
    assert np.abs(simulated - expected).max() <= 2 * output_step + 1e-6
    assert (simulated.argmax(1) == expected.argmax(1)).mean() >= 0.95
    with torch.no_grad():  # started from the codes alone (no float file), the weights are the same
        assert np.abs(QdqSimulation(int8)(x).numpy() - expected).max() <= 2 * output_step + 1e-6


@pytest.mark.parametrize("weights", ["uint8", "int8"])
@pytest.mark.parametrize("model", [_Residual, _Shared])
def test_an_untrained_simulation_writes_back_the_file_it_read(weights: str, model: type[nn.Module]) -> None:
    from nnopt.quantization.qdq_simulation import QdqSimulation

    torch.manual_seed(0)
    float_onnx, int8, _ = _files(model=model(), weights=weights)
    before, after = _initializers(int8), _initializers(QdqSimulation(int8, float_onnx).export())
    assert before.keys() == after.keys()
    for name, value in before.items():  # a shared weight, an all-zero channel's scale and bias included
        np.testing.assert_array_equal(after[name], value, err_msg=name)


@pytest.mark.parametrize("weights", ["uint8", "int8"])
@pytest.mark.parametrize("model", [_Residual, _Shared])
def test_a_trained_simulation_exports_the_file_it_simulates(weights: str, model: type[nn.Module]) -> None:
    from nnopt.quantization.qdq_simulation import QdqSimulation

    torch.manual_seed(0)
    float_onnx, int8, x = _files(model=model(), weights=weights)
    simulation = QdqSimulation(int8, float_onnx)
    with torch.no_grad():  # as if trained: every weight and bias moved, the zero channel's weights too
        for parameter in simulation.params.values():
            parameter.add_(0.05 * parameter.abs().mean() * torch.randn_like(parameter))
        simulated = simulation(x).numpy()
    exported = _unoptimized(simulation.export(), x)
    output_step = float(np.diff(np.unique(exported)).min())
    assert np.abs(simulated - exported).max() <= 2 * output_step + 1e-6
    assert np.abs(simulated - _unoptimized(int8, x)).max() > 4 * output_step  # the training did change it


def test_float_widths_give_the_float_model_and_fewer_activation_bits_give_more_error() -> None:
    from nnopt.quantization.onnx_static import run_onnx
    from nnopt.quantization.qdq_simulation import QdqSimulation

    float_onnx, int8, x = _files()
    reference = run_onnx(float_onnx, x.numpy())
    simulation = QdqSimulation(int8, float_onnx, activation_bits=None, weight_bits=None)
    errors = {}
    with torch.no_grad():
        # calibrated on the first 32 rows: their ranges cover them, up to half a step (the zero point is rounded)
        output_step = float(np.diff(np.unique(_unoptimized(int8, x))).min())
        assert np.abs(simulation(x[:32]).numpy() - reference[:32]).max() <= output_step / 2 + 1e-6
        for bits in (4, 8, 12):
            simulation.activation_bits = bits
            errors[bits] = float(np.abs(simulation(x).numpy() - reference).mean())
    assert errors[4] > errors[8] > errors[12]


def test_distillation_brings_the_file_closer_to_the_float_model_on_its_training_rows() -> None:
    from nnopt.pipeline.int8_onnx import agreement_and_kl
    from nnopt.quantization.onnx_static import run_onnx
    from nnopt.quantization.qdq_simulation import DistillConfig, distill_qdq

    float_onnx, int8, x = _files(seed=1)
    teacher = torch.from_numpy(run_onnx(float_onnx, x.numpy()))
    distilled, summary = distill_qdq(int8, float_onnx, x, teacher, DistillConfig(steps=60, lr=1e-3, train="all"))
    assert summary["kl_last_steps"] < summary["kl_first_steps"]
    _, kl_before = agreement_and_kl(run_onnx(int8, x.numpy()), teacher.numpy())
    _, kl_after = agreement_and_kl(run_onnx(distilled, x.numpy()), teacher.numpy())
    assert kl_after < kl_before
    import onnx

    # the same graph, only its numbers changed: it runs with the same integer kernels
    ops = lambda b: [n.op_type for n in onnx.load_from_string(b).graph.node]  # noqa: E731
    assert ops(distilled) == ops(int8)
    changed = [name for name, value in _initializers(distilled).items()
               if not np.array_equal(value, _initializers(int8)[name])]
    assert changed and all(name.endswith(("_quantized", "_scale")) for name in changed)


def test_bad_input_is_one_clear_error() -> None:
    from nnopt.quantization.qdq_simulation import DistillConfig, QdqSimulation, distill_qdq

    float_onnx, int8, x = _files()
    with pytest.raises(ConfigError, match="activation_bits"):
        QdqSimulation(int8, activation_bits=1)
    with pytest.raises(ConfigError, match="weight_bits"):
        QdqSimulation(int8, weight_bits=8.5)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="weight_bits=8"):
        QdqSimulation(int8, weight_bits=4).export()
    with pytest.raises(ConfigError, match="train"):
        distill_qdq(int8, float_onnx, x, x[:, 0, 0, :10], DistillConfig(train="scales"))
    with pytest.raises(ConfigError, match="as many"):
        distill_qdq(int8, float_onnx, x, x[:3, 0, 0, :10])
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Softmax", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    with pytest.raises(UnsupportedModelError, match="Softmax"):
        QdqSimulation(helper.make_model(graph).SerializeToString())


def test_int8_onnx_distills_where_the_target_is_missed_and_keeps_the_better_file() -> None:
    from nnopt.pipeline.int8_onnx import Int8OnnxOptions, int8_onnx

    torch.manual_seed(1)
    model = _Residual().eval()
    with torch.no_grad():
        model.head[-1].weight.mul_(40)
    data = torch.randn(96, 3, 16, 16)  # measured: int8 agrees on 61 of the 64 validation rows
    options = Int8OnnxOptions(calibration_samples=32, validation_samples=64, target_agreement=1.0, max_float_layers=0,
                              distill_steps=20, distill_train="all", equalize=False)
    result = int8_onnx(model, data, options)
    assert [s["float_layers"] for s in result.steps] == [0, 0] and result.steps[-1]["distilled"]
    summary = result.preparation["distillation"]
    assert summary["train"] == "all" and summary["steps"] == 20
    # the validation KL of the file returned is the lower of the two
    assert result.validation_kl == min(summary["validation_kl_after"], summary["validation_kl_before"])
    assert result.validation_kl == (result.steps[1]["kl"] if result.steps[1]["kept"] else result.steps[0]["kl"])
    assert "distilled" in str(result)
    json.dumps(result.to_dict())
    with pytest.raises(ConfigError, match="distill_train"):
        Int8OnnxOptions(distill_train="weights").validate()
