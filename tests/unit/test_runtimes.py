"""Runtimes side by side (nnopt.metrics.runtimes) and OpenVINO conversion, IR writing and running
(nnopt.io.openvino_export): outputs agree with torch, every available runtime gets a row, unavailable ones
carry the reason, and the fastest is the faithful row with the smallest measured median."""

from __future__ import annotations

import importlib.util
import json
import sys

import numpy as np
import pytest
import torch

import nnopt
from nnopt.errors import ConfigError, UnsupportedModelError
from nnopt.metrics.runtimes import RUNTIMES, time_runtimes

FAST = {"seconds": 0.02, "warmup": 1, "min_calls": 3, "rounds": 2, "threads": 1}


@pytest.fixture(scope="module")
def cnn():
    """A small ResNet-style CNN (BatchNorm, residual adds) and a seeded batch of its inputs."""
    model = nnopt.create_model("resnet18", image_size=32, width=0.25, seed=0).eval()
    return model, torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def onnx_file(cnn, tmp_path_factory):
    pytest.importorskip("onnxruntime")
    from nnopt.io.onnx_export import export_onnx

    model, x = cnn
    path = tmp_path_factory.mktemp("onnx") / "cnn.onnx"
    export_onnx(model, x[:1], path)
    return path


def _hide(monkeypatch, *names):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in names else real(name, *a))


# --- OpenVINO ------------------------------------------------------------------------------------------------


def test_openvino_runner_matches_torch_for_tensors_and_arrays(cnn, onnx_file):
    pytest.importorskip("openvino")
    from nnopt.io.openvino_export import OpenVinoRunner

    model, x = cnn
    expected = model(x)
    runner = OpenVinoRunner(onnx_file, threads=1)
    out = runner(x)
    assert isinstance(out, torch.Tensor) and out.shape == expected.shape
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(runner(x.numpy()), out)  # NumPy in, same answer
    torch.testing.assert_close(runner(input_0=x), out)  # by input name
    settings = runner.settings()
    assert settings["INFERENCE_NUM_THREADS"] == "1" and settings["PERFORMANCE_HINT"] == "LATENCY"
    assert "32" in settings["INFERENCE_PRECISION_HINT"]  # float32, not bf16 on CPUs that have it
    throughput = OpenVinoRunner(onnx_file.read_bytes(), threads=1, hint="throughput")
    torch.testing.assert_close(throughput(x), expected, atol=1e-4, rtol=1e-4)


def test_openvino_runner_refuses_bad_settings(onnx_file):
    pytest.importorskip("openvino")
    from nnopt.io.openvino_export import OpenVinoRunner

    with pytest.raises(ConfigError, match="threads must be >= 1"):
        OpenVinoRunner(onnx_file, threads=0)
    with pytest.raises(ConfigError, match="hint must be one of latency, throughput"):
        OpenVinoRunner(onnx_file, hint="fast")
    with pytest.raises(ConfigError, match="unknown input 'pixels'"):
        OpenVinoRunner(onnx_file, threads=1)(pixels=torch.zeros(1, 3, 32, 32))


def test_write_openvino_writes_both_files_atomically_and_they_reload(cnn, onnx_file, tmp_path):
    pytest.importorskip("openvino")
    from nnopt.io.openvino_export import OpenVinoRunner, write_openvino

    model, x = cnn
    out = tmp_path / "deploy" / "cnn.xml"
    xml, weights = write_openvino(onnx_file, out)
    assert (xml, weights) == (out, out.with_suffix(".bin"))
    assert sorted(p.name for p in out.parent.iterdir()) == ["cnn.bin", "cnn.xml"]  # no temporary left behind
    params = sum(p.numel() for p in model.parameters())
    assert weights.stat().st_size >= 4 * params * 0.9  # float32 weights, not halved to fp16
    torch.testing.assert_close(OpenVinoRunner(xml, threads=1)(x), model(x), atol=1e-4, rtol=1e-4)
    write_openvino(onnx_file, out)  # replacing an earlier IR works and leaves nothing else
    assert sorted(p.name for p in out.parent.iterdir()) == ["cnn.bin", "cnn.xml"]
    with pytest.raises(ConfigError, match="NAME.xml"):
        write_openvino(onnx_file, tmp_path / "cnn.bin")


def test_openvino_missing_names_the_extra(monkeypatch, onnx_file):
    from nnopt.io import openvino_export

    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino now raises ImportError
    with pytest.raises(UnsupportedModelError, match=r"pip install 'nnopt\[openvino\]'"):
        openvino_export.OpenVinoRunner(onnx_file)
    with pytest.raises(UnsupportedModelError, match=r"nnopt\[openvino\]"):
        openvino_export.write_openvino(onnx_file, onnx_file.with_suffix(".xml"))


# --- time_runtimes -------------------------------------------------------------------------------------------


def test_every_available_runtime_is_timed_checked_and_the_fastest_is_the_min_median():
    """A tiny MLP so that torch.compile stays cheap: every runtime installed here gets a timed, faithful row."""
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10)).eval()
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    table = time_runtimes(x, model=model, **FAST)
    assert [r.runtime for r in table.rows] == list(RUNTIMES)
    installed = {"onnxruntime": importlib.util.find_spec("onnxruntime") is not None,
                 "openvino": importlib.util.find_spec("openvino") is not None}
    for row in table.rows:
        assert row.available == installed.get(row.runtime, True), row
        if not row.available:
            assert "not installed" in row.reason and "pip install 'nnopt[" in row.reason
            continue
        assert row.timed and 0 < row.p10_ms <= row.median_ms <= row.p90_ms and row.calls >= 3
        assert row.faithful and row.top1_agreement == 1.0 and row.max_abs_diff < 1e-4, row
    assert table.row("torch").max_abs_diff == 0 and table.row("torch").speedup == 1.0
    timed = [r for r in table.rows if r.timed]
    assert table.fastest.median_ms == min(r.median_ms for r in timed)
    doc = json.loads(json.dumps(table.to_dict()))
    assert doc["fastest"] == table.fastest.runtime and doc["threads"] == 1 and doc["batch"] == 8
    assert doc["method"] == "measured" and doc["reference"] == "torch eager outputs"
    text = str(table)
    assert "measured on cpu" in text and "1 thread, batch 8" in text and "fastest faithful: " in text


def test_unavailable_runtimes_carry_the_reason(cnn, monkeypatch):
    _hide(monkeypatch, "onnxruntime", "openvino")
    model, x = cnn
    table = time_runtimes(x, model=model, runtimes=("torch", "onnxruntime", "openvino"), **FAST)
    reasons = {r.runtime: r.reason for r in table.rows if not r.available}
    assert reasons == {"onnxruntime": "onnxruntime is not installed; pip install 'nnopt[onnx]'",
                       "openvino": "openvino is not installed; pip install 'nnopt[openvino]'"}
    assert table.fastest.runtime == "torch"
    assert "not timed:" in str(table) and "nnopt[openvino]" in str(table)


def test_onnx_only_form_runs_onnxruntime_and_openvino_against_a_given_reference(cnn, onnx_file):
    model, x = cnn
    reference = model(x).detach()
    table = time_runtimes(x, onnx=onnx_file, reference=reference, **FAST)
    rows = {r.runtime: r for r in table.rows}
    assert rows["torch"].reason == rows["compiled"].reason == "no torch model given (ONNX only)"
    assert table.reference == "the given reference outputs" and table.baseline == "onnxruntime"
    for name in ("onnxruntime", "openvino"):
        if rows[name].available:
            assert rows[name].faithful and rows[name].max_abs_diff < 1e-4
    assert table.fastest is not None and table.fastest.runtime in ("onnxruntime", "openvino")


def test_int8_qdq_file_is_timed_and_judged_against_the_fp32_reference(cnn, onnx_file, tmp_path):
    """What the int8 work does: a QDQ file (uint8 weights: exact in ONNX Runtime on every x86 CPU), no torch
    model, the fp32 outputs as reference. int8 differs from fp32, so the figures say how much."""
    pytest.importorskip("onnxruntime.quantization")
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    model, x = cnn

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input_0": x[i:i + 2].numpy()} for i in range(0, 4, 2)])

        def get_next(self):
            return next(self.batches, None)

    qdq = tmp_path / "cnn.int8.onnx"
    quantize_static(str(onnx_file), str(qdq), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QUInt8)
    reference = model(x).detach()
    table = time_runtimes(x, onnx=qdq, reference=reference, min_agreement=0.5, **FAST)
    ran = [r for r in table.rows if r.timed]
    assert ran and {r.runtime for r in ran} <= {"onnxruntime", "openvino"}
    for row in ran:
        assert 0 < row.max_abs_diff < reference.abs().max(), row  # int8 rounding: close, not identical
        assert row.cosine_min > 0.9, row


def test_an_unfaithful_runtime_is_never_the_fastest(cnn):
    model, x = cnn
    wrong = -model(x).detach()  # every row's top-1 moves
    table = time_runtimes(x, model=model, runtimes=("torch",), reference=wrong, **FAST)
    row = table.row("torch")
    assert row.timed and row.faithful is False and row.top1_agreement < 0.99
    assert table.fastest is None and "fastest faithful: none" in str(table)
    strict = time_runtimes(x, model=model, runtimes=("torch",), reference=model(x).detach() + 1e-3, atol=1e-6, **FAST)
    assert strict.row("torch").faithful is False and strict.row("torch").top1_agreement == 1.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "needs a torch model, an ONNX model, or both"),
        ({"model": torch.nn.Linear(4, 2), "runtimes": ("tensorrt",)}, "runtimes must be distinct names"),
        ({"model": torch.nn.Linear(4, 2), "threads": 0}, "threads must be >= 1"),
        ({"model": torch.nn.Linear(4, 2), "seconds": -1.0}, "seconds must be a number >= 0"),
        ({"model": torch.nn.Linear(4, 2), "min_agreement": 2.0}, "min_agreement must be between 0 and 1"),
        ({"model": torch.nn.Linear(4, 2), "hint": "fast"}, "hint must be latency or throughput"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        time_runtimes(torch.randn(2, 4), **kwargs)


def test_keyword_inputs_reach_every_runtime_by_name(monkeypatch):
    """A model called with keyword inputs (as an encoder is) runs in the ONNX runtimes by input name."""
    pytest.importorskip("onnxruntime")

    class TwoInputs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(6, 5), torch.nn.Linear(6, 5)

        def forward(self, left, right):
            return self.a(left) - self.b(right)

    model = TwoInputs().eval()
    g = torch.Generator().manual_seed(1)
    inputs = {"left": torch.randn(3, 6, generator=g), "right": torch.randn(3, 6, generator=g)}
    table = time_runtimes(inputs, model=model, runtimes=("torch", "onnxruntime", "openvino"), **FAST)
    for row in table.rows:
        if row.available:
            assert row.faithful and row.max_abs_diff < 1e-5, row
    assert table.row("onnxruntime").available
    np.testing.assert_equal(table.batch, 3)


@pytest.mark.parametrize("weights", ["int8", "uint8"])
def test_openvino_refuses_8bit_weights_where_their_known_answer_check_fails(cnn, onnx_file, tmp_path, weights):
    """ONNX Runtime's quantize_static writes int8 (signed) weights by default; OpenVINO's u8×s8 kernels saturate
    on x86 CPUs without VNNI. uint8 weights (zero point 128) were exact there, and wrong on an AMD EPYC with
    AVX-512 VNNI, where signed ones were exact. Where a file's kind of codes fails its check here, the runner
    refuses the file and the table says why; one of the two kinds is exact on every CPU measured."""
    pytest.importorskip("openvino")
    pytest.importorskip("onnxruntime.quantization")
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from nnopt.io.openvino_export import OpenVinoRunner, check_openvino_kernel

    model, x = cnn

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input_0": x[:2].numpy()}])

        def get_next(self):
            return next(self.batches, None)

    path = tmp_path / f"cnn.{weights}.onnx"
    quantize_static(str(onnx_file), str(path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8 if weights == "int8" else QuantType.QUInt8)
    verdicts = {kind: check_openvino_kernel(kernel).passed
                for kind, kernel in (("int8", "openvino-qdq-u8s8"), ("uint8", "openvino-qdq-u8u8"))}
    assert any(verdicts.values()), verdicts
    if verdicts[weights] is False:
        other = "uint8 weights" if weights == "int8" else "int8 weights"
        refused = f"holds {weights} weights.*computes wrongly on this CPU.*{other}"
        with pytest.raises(UnsupportedModelError, match=refused):
            OpenVinoRunner(path, threads=1)
        table = time_runtimes(x, onnx=path, runtimes=("openvino",), **FAST)
        assert not table.row("openvino").available and "known-answer check" in table.row("openvino").reason
    else:
        OpenVinoRunner(path, threads=1)(x)
    OpenVinoRunner(path, threads=1, check_int8=False)(x)  # on request it runs, to measure the error
