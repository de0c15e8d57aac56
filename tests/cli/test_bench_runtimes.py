"""`nnopt bench --backend openvino|all` and `nnopt advise --runtimes`: every runtime available here side by
side, rows labelled per backend, outputs checked against torch eager, missing runtimes named with the fix."""

from __future__ import annotations

import importlib.util
import json

import pytest

import nnopt
from nnopt.cli import main
from nnopt.pipeline.advice import FASTER, MIN_SPEEDUP, NOT_FASTER
from nnopt.pipeline.bench import BACKENDS, BenchOptions, skipped_backends

FAST = ["--threads", "1", "--seconds", "0.02"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("runtimes")
    nnopt.save_model(nnopt.create_model("simplenet", seed=0), root / "simplenet")
    nnopt.save_model(nnopt.create_model("resnet8", seed=0), root / "resnet8")
    return root


def _json(capsys, argv):
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _hide(monkeypatch, *names):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in names else real(name, *a))


def _available():
    have = {name: importlib.util.find_spec(name) is not None for name in ("onnx", "onnxruntime", "openvino")}
    return [b for b in BACKENDS if b in ("torch", "compiled") or (have["onnx"] and have[b])]


def test_openvino_backend_rows(saved, capsys):
    pytest.importorskip("openvino")
    pytest.importorskip("onnx")
    doc = _json(capsys, ["bench", str(saved / "resnet8"), "--backend", "openvino", "--batch", "1,3", *FAST])
    env = doc["env"]
    assert env["backend"] == "openvino" and env["openvino"] and env["onnx_bytes"] > 0
    assert env["openvino_settings"]["INFERENCE_NUM_THREADS"] == "1"
    assert [(r["variant"], r["batch"]) for r in doc["rows"]] == [("openvino", 1), ("openvino", 3)]
    assert all(r["latency_ms_median"] > 0 and r["calls"] >= 20 for r in doc["rows"])


def test_all_backends_side_by_side_agree_with_torch(saved, capsys):
    doc = _json(capsys, ["bench", str(saved / "simplenet"), "--backend", "all", "--batch", "4", *FAST])
    env = doc["env"]
    assert env["backend"] == "all" and env["backends"] == _available()
    assert set(env["skipped_backends"]) == set(BACKENDS) - set(_available())
    assert [r["variant"] for r in doc["rows"]] == _available()  # one row per backend, in one run
    for row in doc["rows"]:
        assert row["backend"] == row["variant"] and row["batch"] == 4 and row["latency_ms_median"] > 0
        assert row["top1_agreement_vs_torch"] == 1.0 and row["max_abs_diff_vs_torch"] < 1e-4, row
    assert env["agreement_method"].startswith("measured:")
    if "compiled" in env["backends"]:
        assert env["compile_seconds"] > 0


def test_all_lists_a_missing_runtime_with_the_fix(monkeypatch):
    _hide(monkeypatch, "openvino")
    options = BenchOptions(backend="all", threads=(1,), batches=(1, 2))
    assert skipped_backends(options)["openvino"] == "the openvino backend needs openvino; pip install 'nnopt[openvino]'"
    assert "openvino" not in options.backends()
    assert {v for v, _, _ in options.grid()} == set(options.backends())
    assert skipped_backends(BenchOptions(backend="torch")) == {}


def test_openvino_backend_without_openvino_names_the_fix(saved, tmp_path, expect_error, monkeypatch):
    _hide(monkeypatch, "openvino")
    out = tmp_path / "never.json"
    expect_error(["bench", str(saved / "simplenet"), "--backend", "openvino", "--out", str(out)],
                 "pip install 'nnopt[openvino]'")
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--backend", "all", "--dtype", "bf16"], "--dtype bf16 runs the torch and compiled backends"),
        (["--backend", "openvino", "--dtype", "bf16"], "--dtype bf16 runs the torch and compiled backends"),
        (["--backend", "fastest"], "choose torch, onnxruntime, compiled, openvino or all"),
    ],
)
def test_bad_backend_options(saved, expect_error, args, message):
    expect_error(["bench", str(saved / "simplenet"), *args], message)


def test_advise_runtimes_rows_are_timed_with_the_others_and_checked(saved, capsys):
    pytest.importorskip("onnxruntime")
    doc = _json(capsys, ["advise", str(saved / "resnet8"), "--batch", "4", "--runtimes", *FAST])
    rows = {r["key"]: r for r in doc["advice"]}
    skipped = {s["technique"]: s["reason"] for s in doc["skipped"]}
    assert "onnxruntime" in rows
    assert ("openvino" in rows) == (importlib.util.find_spec("openvino") is not None)
    for key in ("onnxruntime", "openvino"):
        if key not in rows:
            assert "nnopt[openvino]" in skipped["OpenVINO (exported model, CPU)"]
            continue
        row = rows[key]
        assert row["agreement"]["ok"] and row["agreement"]["argmax_agreement"] == 1.0
        assert row["agreement"]["max_abs_diff"] < 1e-4
        faster = row["speedup"] >= MIN_SPEEDUP
        assert row["verdict"] == (FASTER if faster else NOT_FASTER) and (row["reason"] is None) == faster
        assert row["facts"]["setup_seconds"] > 0 and row["calls"] >= 20
    assert set(doc["env"]["runtime_setup_seconds"]) == {k for k in ("onnxruntime", "openvino") if k in rows}


def test_advise_runtimes_without_openvino_says_why(saved, capsys, monkeypatch):
    _hide(monkeypatch, "openvino")
    assert main(["advise", str(saved / "simplenet"), "--batch", "2", "--runtimes", *FAST]) == 0
    out = capsys.readouterr().out
    assert "OpenVINO (exported model, CPU): openvino is not installed; pip install 'nnopt[openvino]'" in out


def test_convert_writes_an_openvino_ir_that_computes_what_the_model_does(tmp_path) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("openvino")
    import torch

    from nnopt.io.openvino_export import OpenVinoRunner

    model = nnopt.create_model("simplenet", seed=0).eval()
    nnopt.save_model(model, tmp_path / "m")
    assert main(["convert", str(tmp_path / "m"), "-o", str(tmp_path / "m.xml")]) == 0
    assert (tmp_path / "m.bin").stat().st_size > 0
    x = torch.randn(4, 64)
    torch.testing.assert_close(OpenVinoRunner(tmp_path / "m.xml", threads=1)(x), model(x), atol=1e-4, rtol=1e-4)
