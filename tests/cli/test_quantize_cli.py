"""`nnopt quantize` end to end on a saved SimpleNet: every scheme, and the bad-input contract."""

from __future__ import annotations

import pytest
import torch

import nnopt
from nnopt.cli import main


@pytest.fixture(scope="module")
def saved(tmp_path_factory, trained_simplenet):
    path = tmp_path_factory.mktemp("in") / "simplenet"
    nnopt.save_model(trained_simplenet, path)
    return path


@pytest.mark.parametrize(
    ("args", "buffer", "dtype"),
    [
        (["--scheme", "int8-dynamic"], "weight_q", torch.int8),
        (["--scheme", "int8-static", "--data", "digits", "--calib", "128"], "weight_q", torch.int8),
        (["--scheme", "int8-weight"], "weight_q", torch.int8),
        (["--scheme", "int4-weight", "--group", "32", "--data", "digits"], None, None),
        (["--scheme", "cluster", "--bits", "4"], "weight_indices", torch.uint8),
        (["--scheme", "qat", "--data", "digits", "--epochs", "1"], "weight_q", torch.int8),
    ],
    ids=["int8-dynamic", "int8-static", "int8-weight", "int4-weight", "cluster", "qat"],
)
def test_schemes_save_reload_and_report(saved, tmp_path, capsys, digits, args, buffer, dtype):
    out = tmp_path / "out"
    assert main(["quantize", str(saved), *args, "-o", str(out), "--overwrite"]) == 0
    printed = capsys.readouterr().out
    assert "file bytes" in printed and "latency ms, batch 32" in printed
    model = nnopt.load_model(out)
    if buffer is not None:
        assert getattr(model.classifier, buffer).dtype == dtype
    assert nnopt.accuracy(model, digits.test) > 0.9
    original = (saved / "model.safetensors").stat().st_size
    written = next(p for p in out.iterdir() if p.name.startswith("model.")).stat().st_size
    assert written < original


def test_bad_input_is_named_and_nothing_written(saved, tmp_path, expect_error):
    out = tmp_path / "out"
    expect_error(["quantize", str(saved), "--scheme", "int4-weight", "--group", "1000", "-o", str(out)], "1000")
    expect_error(["quantize", str(saved), "--scheme", "int8-static", "-o", str(out)], "--data")
    expect_error(["quantize", str(saved), "--scheme", "int8-static", "--data", "digits", "--calib", "0",
                  "-o", str(out)], "--calib")
    expect_error(["quantize", str(saved), "--scheme", "int8-dynamic", "--bits", "4", "-o", str(out)], "--bits")
    expect_error(["quantize", str(saved), "--scheme", "cluster", "--bits", "9", "-o", str(out)], "bits")
    expect_error(["quantize", str(saved), "--scheme", "int8-dynamic", "--group", "32", "-o", str(out)], "--group")
    expect_error(["quantize", str(saved), "--scheme", "int8-dynamic", "--smoothing", "2", "--data", "digits",
                  "-o", str(out)], "smoothing")
    expect_error(["quantize", str(saved), "--scheme", "int8-dynamic", "-o", str(saved)], "input")
    expect_error(["quantize", str(saved), "--scheme", "int8-weight", "--kernels", "measured", "-o", str(out)],
                 "--kernels applies to int8-dynamic, not int8-weight")
    expect_error(["quantize", str(saved), "--scheme", "int8-dynamic", "--kernels", "measured", "--kernel-batch", "0",
                  "-o", str(out)], "kernel_batch must be >= 1")
    assert not out.exists()


def test_measured_kernel_choice_is_reported_and_saved(saved, tmp_path, capsys):
    from nnopt.cli import main
    from nnopt.lineage import get_lineage

    out = tmp_path / "q"
    assert main(["quantize", str(saved), "--scheme", "int8-dynamic", "--kernels", "measured", "--kernel-batch", "8",
                 "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    details = get_lineage(nnopt.load_model(out)).applied[-1].details
    int8 = [n for n, info in details["layers"].items() if "measured" in info]
    assert len(int8) + len(details["kernel_choice"]["kept_fp32"]) == 3
    assert "Linear layers on the int8 kernel (measured choice)" in printed
    for name in details["kernel_choice"]["kept_fp32"]:
        assert f"{name}: stays fp32" in printed
