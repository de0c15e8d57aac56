"""`nnopt convert` and `nnopt quantize-onnx` end to end, and their bad-input contract."""

from __future__ import annotations

import hashlib
import re
import sys
import uuid

import pytest
import torch
from safetensors.torch import save_file

import nnopt
from nnopt.cli import main

NETS = '''
import torch
from torch import nn


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 5))


def lstm():
    return nn.Sequential(nn.Linear(4, 4), nn.LSTM(4, 4))
'''


@pytest.fixture
def nets(tmp_path, monkeypatch):
    name = f"cli_nets_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(NETS)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


@pytest.fixture
def trained_weights(nets, tmp_path):
    """Weights that differ from what the factory initializes, as safetensors and as a pickle."""
    import importlib

    model = importlib.import_module(nets).mlp()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-1.5)
    save_file(model.state_dict(), tmp_path / "w.safetensors")
    torch.save(model.state_dict(), tmp_path / "w.pt")
    return model.eval()


def _number(pattern: str, text: str) -> int:
    match = re.search(pattern, text)
    assert match, text
    return int(match.group(1).replace(",", ""))


def test_factory_to_nnopt_dir_to_onnx_to_int8(nets, trained_weights, tmp_path, capsys):
    out_dir = tmp_path / "model"
    assert main(["convert", f"{nets}:mlp", "--weights", str(tmp_path / "w.safetensors"), "-o", str(out_dir)]) == 0
    text = capsys.readouterr().out
    params = sum(p.numel() for p in trained_weights.parameters())
    assert _number(r"\(factory\): ([\d,]+) params", text) == params
    assert _number(r"wrote .*: ([\d,]+) bytes", text) == sum(f.stat().st_size for f in out_dir.iterdir())
    x = torch.randn(6, 32)
    with torch.no_grad():
        expected = trained_weights(x)
        torch.testing.assert_close(nnopt.load_model(out_dir)(x), expected, rtol=0, atol=1e-6)

    onnx_path = tmp_path / "model.onnx"
    assert main(["convert", str(out_dir), "-o", str(onnx_path)]) == 0
    text = capsys.readouterr().out
    assert _number(r"wrote .*: ([\d,]+) bytes", text) == onnx_path.stat().st_size
    pytest.importorskip("onnxruntime")
    torch.testing.assert_close(nnopt.OnnxRunner(onnx_path)(x), expected, atol=1e-5, rtol=1e-5)

    int8_path = tmp_path / "model.int8.onnx"
    assert main(["quantize-onnx", str(onnx_path), "-o", str(int8_path)]) == 0
    text = capsys.readouterr().out
    before = _number(r"model\.onnx: ([\d,]+) bytes", text)
    after = _number(r"model\.int8\.onnx: ([\d,]+) bytes", text)
    assert (before, after) == (onnx_path.stat().st_size, int8_path.stat().st_size)
    assert after < 0.5 * before
    diff = float(re.search(r"random inputs.*: ([\d.e+-]+)", text).group(1))
    assert 0 < diff < 0.1 * float(expected.abs().max())


def test_pickled_weights_convert_only_with_the_flag(nets, trained_weights, tmp_path, expect_error, capsys):
    out = tmp_path / "m"
    expect_error(["convert", f"{nets}:mlp", "--weights", str(tmp_path / "w.pt"), "-o", str(out)], "--allow-pickle")
    assert not out.exists()
    assert main(["convert", f"{nets}:mlp", "--weights", str(tmp_path / "w.pt"), "--allow-pickle", "-o", str(out)]) == 0
    x = torch.randn(3, 32)
    with torch.no_grad():
        torch.testing.assert_close(nnopt.load_model(out)(x), trained_weights(x), rtol=0, atol=1e-6)


def test_existing_output_needs_overwrite(nets, tmp_path, expect_error, capsys):
    out = tmp_path / "m.onnx"
    out.write_bytes(b"keep")
    expect_error(["convert", f"{nets}:mlp", "-o", str(out)], "exists")
    assert out.read_bytes() == b"keep"
    foreign = tmp_path / "dir"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    expect_error(["convert", f"{nets}:mlp", "-o", str(foreign), "--overwrite"], "nnopt.json")
    assert (foreign / "notes.txt").read_text() == "mine"


def _saved(tmp_path):
    path = tmp_path / "saved"
    nnopt.save_model(nnopt.create_model("simplenet", seed=0), path)
    return path


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["convert", "{tmp}/nothing-here", "-o", "{tmp}/out"], "no such file or directory"),
        (["convert", "{tmp}/saved", "-o", "{tmp}/saved"], "overlaps the input"),
        (["convert", "{tmp}/saved", "--weights", "{tmp}/w.safetensors", "-o", "{tmp}/out"], "--weights applies"),
        (["convert", "{tmp}/model.h5", "-o", "{tmp}/out"], "HDF5"),
        (["convert", "{tmp}/model.onnx", "-o", "{tmp}/out"], "quantize-onnx"),
        (["convert", "{nets}:lstm", "-o", "{tmp}/out"], "LSTM"),
        (["convert", "{nets}:mlp", "--input-shape", "3,x", "-o", "{tmp}/out"], "--input-shape"),
        (["quantize-onnx", "{tmp}/model.onnx", "-o", "{tmp}/model.onnx"], "overlaps the input"),
        (["convert", "{tmp}/saved", "-o", "{tmp}/out", "--int8-weights", "int8"], "applies to an .onnx output only"),
        (["quantize-onnx", "{tmp}/bad.onnx", "-o", "{tmp}/out.onnx"], "not a valid ONNX file"),
        (["quantize-onnx", "{tmp}/model.onnx", "-o", "{tmp}/out.txt"], "must end in .onnx"),
    ],
)
def test_bad_input_is_one_error_line_and_writes_nothing(nets, tmp_path, expect_error, argv, message):
    pytest.importorskip("onnx")
    _saved(tmp_path)
    (tmp_path / "model.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(8))
    (tmp_path / "bad.onnx").write_bytes(b"\xff" * 50)
    nnopt.export_onnx(nnopt.create_model("simplenet", seed=0), torch.zeros(2, 64), tmp_path / "model.onnx")
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in tmp_path.rglob("*") if p.is_file()}
    expect_error([a.format(tmp=tmp_path, nets=nets) for a in argv], message)
    after = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before  # nothing new, nothing changed


def test_factory_to_keras_and_back(nets, trained_weights, tmp_path, capsys):
    pytest.importorskip("nnopt.io.keras_file")
    from nnopt.errors import UnsupportedModelError
    from nnopt.models.keras_adapter import import_keras

    try:
        import_keras()  # Keras 3 on the torch backend, as nnopt uses it
    except UnsupportedModelError as exc:
        pytest.skip(str(exc))
    keras_path = tmp_path / "model.keras"
    argv = ["convert", f"{nets}:mlp", "--weights", str(tmp_path / "w.safetensors"), "-o", str(keras_path)]
    assert main(argv) == 0
    assert _number(r"wrote .*: ([\d,]+) bytes", capsys.readouterr().out) == keras_path.stat().st_size
    assert main(["convert", str(keras_path), "-o", str(tmp_path / "back")]) == 0
    assert "(keras)" in capsys.readouterr().out
    x = torch.randn(4, 32)
    with torch.no_grad():
        torch.testing.assert_close(nnopt.load_model(tmp_path / "back")(x), trained_weights(x), atol=1e-5, rtol=1e-5)
