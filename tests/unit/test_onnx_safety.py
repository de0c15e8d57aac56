"""ONNX files are checked before any ONNX Runtime session: external data stays in the model's
directory (on load and on save), the checker runs, and ORT int8 quantization writes a new file."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
import torch

import nnopt
from nnopt.errors import ConfigError, ModelFormatError, OutputError, UnsafeFileError

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper  # noqa: E402
from onnx.external_data_helper import set_external_data  # noqa: E402

from nnopt.io.onnx_import import load_onnx, quantize_onnx  # noqa: E402

W = np.arange(12, dtype=np.float32).reshape(4, 3) / 10  # (in, out)


def _matmul_model(location: str | None, length: int | None = None) -> onnx.ModelProto:
    """Y = X @ W, with W inline or named as external data at ``location``."""
    weight = helper.make_tensor("W", TensorProto.FLOAT, W.shape, W.tobytes(), raw=True)
    if location is not None:
        set_external_data(weight, location, offset=0, length=W.nbytes if length is None else length)
        weight.ClearField("raw_data")
        weight.data_location = TensorProto.EXTERNAL
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["Y"])], "mm",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", 3])],
        initializer=[weight],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture
def no_session(monkeypatch):
    """Any ONNX Runtime session creation fails the test: checks must refuse before one exists."""

    def refuse(*args, **kwargs):
        raise AssertionError("an InferenceSession was created for a model that should have been refused")

    monkeypatch.setattr(ort, "InferenceSession", refuse)


def _write(model, path):
    path.write_bytes(model.SerializeToString())
    return path


def test_external_data_beside_the_model_loads_and_runs(tmp_path):
    (tmp_path / "weights.bin").write_bytes(W.tobytes())
    path = _write(_matmul_model("weights.bin"), tmp_path / "m.onnx")
    model = load_onnx(path)
    assert model.graph.initializer[0].data_location == TensorProto.DEFAULT  # inlined from the checked file
    x = torch.randn(5, 4)
    out = nnopt.OnnxRunner(path)(x)
    torch.testing.assert_close(out, x @ torch.from_numpy(W))


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink", "nested-dotdot"])
def test_external_data_escaping_the_directory_is_refused_on_load(tmp_path, no_session, how):
    secret = tmp_path / "secret"
    secret.write_bytes(W.tobytes())  # exactly the right size: only the location gives it away
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "sub").mkdir()
    location = {
        "dotdot": "../secret",
        "absolute": str(secret),
        "symlink": "link.bin",
        "nested-dotdot": "sub/../../secret",
    }[how]
    if how == "symlink":
        os.symlink(secret, model_dir / "link.bin")
    path = _write(_matmul_model(location), model_dir / "m.onnx")
    with pytest.raises(UnsafeFileError, match="outside|absolute|climbs out"):
        load_onnx(path)
    with pytest.raises(UnsafeFileError):
        nnopt.OnnxRunner(path)  # the runner checks too, before any session (no_session)


def test_a_symlink_that_stays_inside_the_directory_is_fine(tmp_path):
    (tmp_path / "real.bin").write_bytes(W.tobytes())
    os.symlink(tmp_path / "real.bin", tmp_path / "alias.bin")
    model = load_onnx(_write(_matmul_model("alias.bin"), tmp_path / "m.onnx"))
    got = np.frombuffer(model.graph.initializer[0].raw_data, dtype=np.float32).reshape(W.shape)
    np.testing.assert_array_equal(got, W)


@pytest.mark.parametrize(
    ("setup", "length", "message"),
    [
        ("missing", None, "is missing"),
        ("short", None, "runs past the end"),
        ("right", 40, "need 48 bytes"),
        ("dir", None, "not a regular file"),
    ],
)
def test_bad_external_data_is_a_format_error(tmp_path, no_session, setup, length, message):
    if setup == "short":
        (tmp_path / "w.bin").write_bytes(W.tobytes()[:20])
    elif setup == "right":
        (tmp_path / "w.bin").write_bytes(W.tobytes())
    elif setup == "dir":
        (tmp_path / "w.bin").mkdir()
    path = _write(_matmul_model("w.bin", length=length), tmp_path / "m.onnx")
    with pytest.raises((ModelFormatError, UnsafeFileError), match=message):
        load_onnx(path)


def test_checker_invalid_model_is_refused_before_any_session(tmp_path, no_session):
    model = _matmul_model(None)
    model.graph.node[0].input[1] = "undefined_tensor"  # an input no one produces
    path = _write(model, tmp_path / "bad.onnx")
    with pytest.raises(ModelFormatError, match="ONNX checker"):
        load_onnx(path)
    with pytest.raises(ModelFormatError, match="ONNX checker"):
        nnopt.OnnxRunner(path)


def test_garbage_is_a_format_error(tmp_path, no_session):
    path = tmp_path / "junk.onnx"
    path.write_bytes(os.urandom(64) + b"\xff" * 64)
    with pytest.raises(ModelFormatError):
        load_onnx(path)


class _MLP(torch.nn.Module):
    def __init__(self, width: int = 256) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(64, width), torch.nn.ReLU(), torch.nn.Linear(width, 10))

    def forward(self, x):
        return self.net(x)


def test_export_with_external_data_writes_both_files_and_reloads(tmp_path):
    model, x = _MLP().eval(), torch.randn(8, 64)
    path = tmp_path / "out" / "m.onnx"
    path.parent.mkdir()
    nnopt.export_onnx(model, x[:2], path, external_data="m.weights")
    assert (path.parent / "m.weights").stat().st_size >= 64 * 256 * 4  # the weights moved out of the graph
    assert path.stat().st_size < 64 * 256 * 4
    with torch.inference_mode():
        torch.testing.assert_close(nnopt.OnnxRunner(path)(x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_export_refuses_external_data_escaping_the_output_directory(tmp_path, how):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    outside = tmp_path / "outside.bin"
    location = {"dotdot": "../outside.bin", "absolute": str(outside), "symlink": "link.bin"}[how]
    if how == "symlink":
        outside.write_bytes(b"keep me")
        os.symlink(outside, out_dir / "link.bin")
    with pytest.raises(OutputError, match="outside|absolute|climbs out"):
        nnopt.export_onnx(_MLP(), torch.randn(2, 64), out_dir / "m.onnx", external_data=location)
    assert not (out_dir / "m.onnx").exists()
    if how == "symlink":
        assert outside.read_bytes() == b"keep me"
    else:
        assert not outside.exists()


@pytest.fixture(scope="module")
def fp32_onnx(tmp_path_factory):
    path = tmp_path_factory.mktemp("q") / "mlp.onnx"
    nnopt.export_onnx(_MLP(), torch.randn(2, 64), path)
    return path


@pytest.mark.parametrize("per_channel", [True, False])
def test_quantize_onnx_is_smaller_runs_and_leaves_the_input_alone(fp32_onnx, tmp_path, per_channel):
    before = hashlib.sha256(fp32_onnx.read_bytes()).hexdigest()
    out = quantize_onnx(fp32_onnx, tmp_path / "mlp.int8.onnx", per_channel=per_channel)
    assert out.stat().st_size < 0.5 * fp32_onnx.stat().st_size  # int8 weights: about a quarter, plus graph
    assert hashlib.sha256(fp32_onnx.read_bytes()).hexdigest() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left
    ops = {node.op_type for node in onnx.load(str(out)).graph.node}
    assert ops & {"MatMulInteger", "DynamicQuantizeLinear", "DynamicQuantizeMatMul"}
    x = torch.randn(16, 64)
    fp32, int8 = nnopt.OnnxRunner(fp32_onnx)(x), nnopt.OnnxRunner(out)(x)
    err = (fp32 - int8).abs().max()
    assert 0 < err < 0.05 * fp32.abs().max()  # quantized (not identical), yet close


def _matmul_weight_types(path) -> set[str]:
    graph = onnx.load(str(path)).graph
    weights = {t.name: t for t in graph.initializer}
    return {TensorProto.DataType.Name(weights[n.input[1]].data_type) for n in graph.node
            if n.op_type == "MatMulInteger" and n.input[1] in weights}


def test_quantize_onnx_writes_u8u8_by_default_and_int8_weights_only_where_exact(fp32_onnx, tmp_path, monkeypatch):
    from nnopt.errors import UnsupportedModelError
    from nnopt.layers import kernel_checks as KC

    assert _matmul_weight_types(quantize_onnx(fp32_onnx, tmp_path / "u8.onnx")) == {"UINT8"}
    if KC.kernel_passes("onnxruntime-u8s8"):  # a CPU with VNNI: the faster U8S8 file is allowed
        assert _matmul_weight_types(quantize_onnx(fp32_onnx, tmp_path / "s8.onnx", weight_type="int8")) == {"INT8"}
    monkeypatch.setitem(KC._RESULTS, "onnxruntime-u8s8", KC.KernelCheck("onnxruntime-u8s8", False, 8e6, "saturating"))
    with pytest.raises(UnsupportedModelError, match="known-answer check on this CPU .*weight_type='uint8'"):
        quantize_onnx(fp32_onnx, tmp_path / "s8-refused.onnx", weight_type="int8")
    assert not (tmp_path / "s8-refused.onnx").exists()
    with pytest.raises(ConfigError, match="weight_type must be one of uint8, int8"):
        quantize_onnx(fp32_onnx, tmp_path / "x.onnx", weight_type="int4")


def test_quantize_onnx_refuses_to_write_over_its_input_or_an_existing_file(fp32_onnx, tmp_path):
    with pytest.raises(OutputError, match="overlaps the input"):
        quantize_onnx(fp32_onnx, fp32_onnx)
    existing = tmp_path / "taken.onnx"
    existing.write_bytes(b"mine")
    with pytest.raises(OutputError, match="exists"):
        quantize_onnx(fp32_onnx, existing)
    assert existing.read_bytes() == b"mine"
    with pytest.raises(ConfigError, match=".onnx"):
        quantize_onnx(fp32_onnx, tmp_path / "q.bin")


def test_onnx_runner_refuses_int8_weights_where_onnx_runtime_gets_them_wrong(tmp_path, monkeypatch):
    """A U8S8 file (fast on VNNI CPUs) copied to a CPU without VNNI would compute wrong results there: the
    runner refuses it with one error naming the fix; the U8U8 form of the same model runs."""
    from nnopt.errors import UnsupportedModelError
    from nnopt.io.onnx_checks import signed_int8_weights
    from nnopt.layers import kernel_checks as KC

    model = nnopt.quantize(_MLP(), nnopt.DynamicQuantConfig())
    x = torch.randn(4, 64)
    unsigned = nnopt.export_onnx(model, x[:2])
    assert signed_int8_weights(onnx.load_from_string(unsigned)) == []
    if KC.kernel_passes("onnxruntime-u8s8") and KC.kernel_passes("onnxruntime-qdq-s8s8"):
        signed = nnopt.export_onnx(model, x[:2], int8_weights="int8")
        assert len(signed_int8_weights(onnx.load_from_string(signed))) == 2  # both Linear layers
        assert torch.allclose(nnopt.OnnxRunner(signed)(x), nnopt.OnnxRunner(unsigned)(x), atol=1e-5)
        path = tmp_path / "u8s8.onnx"
        path.write_bytes(signed)
        monkeypatch.setitem(KC._RESULTS, "onnxruntime-u8s8",
                            KC.KernelCheck("onnxruntime-u8s8", False, 8e6, "saturating"))
        with pytest.raises(UnsupportedModelError, match=r"u8s8.onnx multiplies int8 weights \(MatMulInteger .* and 1 "
                                                        r"more\).*--int8-weights uint8"):
            nnopt.OnnxRunner(path)
    monkeypatch.setitem(KC._RESULTS, "onnxruntime-u8s8", KC.KernelCheck("onnxruntime-u8s8", False, 8e6, "saturating"))
    torch.testing.assert_close(nnopt.OnnxRunner(unsigned)(x), model(x), atol=1e-4, rtol=1e-4)  # U8U8 always runs
