"""The CLI end to end: the demo, profile on every variant, and every bad input."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys

import pytest

from nnopt._version import __version__
from nnopt.cli import main

VARIANTS = (
    "baseline", "pruned", "quantized", "pruned+quantized", "gradual", "gradual+quantized",
    "int8-static", "qat-int8", "int4-weight-g32", "structured-50", "cluster-4bit", "int8-dynamic-measured",
)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "report"
    assert main(["demo", "--out", str(out), "--epochs", "20", "--latency-seconds", "0.05"]) == 0
    return out


def test_demo_writes_report_and_variants(demo_dir):
    report = json.loads((demo_dir / "report.json").read_text())
    assert report["nnopt_version"] == __version__
    assert report["dataset"] == {"name": "digits", "train": 1437, "test": 360}
    assert report["device"] == "cpu" and report["threads"] >= 1
    rows = {v["name"]: v for v in report["variants"]}
    assert tuple(rows) == VARIANTS
    for row in rows.values():
        assert set(row) >= {"accuracy", "params", "nonzeros", "file_bytes", "macs", "latency_ms"}
        assert set(row["latency_ms"]) == {"1", "256"}
        assert row["latency_ms"]["1"]["median"] <= row["latency_ms"]["1"]["p90"]
        weights = [p for p in (demo_dir / row["directory"]).iterdir() if p.name.startswith("model.")]
        assert len(weights) == 1 and weights[0].stat().st_size == row["file_bytes"]
        assert row["compression_ratio"] == pytest.approx(base_bytes(report) / row["file_bytes"], rel=1e-6)
    base, both = rows["baseline"], rows["pruned+quantized"]
    assert base["accuracy"] >= 0.95
    assert both["accuracy"] >= base["accuracy"] - 0.01
    assert both["file_bytes"] <= base["file_bytes"] / 3
    assert rows["pruned"]["nonzeros"] < base["nonzeros"]
    gradual = rows["gradual+quantized"]
    assert gradual["accuracy"] >= base["accuracy"] - 0.02
    assert gradual["nonzeros"] < 0.25 * base["nonzeros"]
    assert gradual["compression_ratio"] > 8 and rows["gradual"]["compression_ratio"] > 3  # zeros not stored
    assert rows["int8-static"]["accuracy"] >= base["accuracy"] - 0.005
    assert rows["qat-int8"]["accuracy"] >= base["accuracy"] - 0.01
    assert rows["int4-weight-g32"]["accuracy"] >= base["accuracy"] - 0.01
    assert rows["int4-weight-g32"]["file_bytes"] < rows["quantized"]["file_bytes"]  # two codes per byte
    assert rows["cluster-4bit"]["accuracy"] >= base["accuracy"] - 0.015
    structured = rows["structured-50"]  # physically smaller: fewer parameters and MACs, not zeros
    assert structured["params"] < 0.6 * base["params"] and structured["macs"] < 0.6 * base["macs"]
    assert structured["nonzeros"] == pytest.approx(structured["params"], rel=0.05)
    assert structured["accuracy"] >= base["accuracy"] - 0.03
    # the kernel this CPU runs: an int8 GEMM, or (no exact int8 kernel, or a slower one) the exact fp32 product
    assert any(label in rows["int8-static"]["compute"] for label in ("int8 × int8 GEMM", "multiplied exactly in fp32"))
    md = (demo_dir / "report.md").read_text()
    assert "| pruned+quantized |" in md and "measured" in md
    # energy: the CPU's active power × each variant's measured time at batch 1, so it orders the variants as their
    # latencies do (a slower int8 kernel is never cheaper); the analytic table only splits each total
    energy = {name: row["energy_nj"] for name, row in rows.items()}  # estimated, per inference
    assert all(e["method"].startswith("estimated: active power × measured time")
               and e["low_nj"] < e["total_nj"] < e["high_nj"] for e in energy.values())
    latency = {name: row["latency_ms"]["1"]["median"] for name, row in rows.items()}
    assert sorted(rows, key=lambda n: energy[n]["total_nj"]) == sorted(rows, key=lambda n: latency[n])
    watts = {e["total_nj"] / latency[n] for n, e in energy.items()}  # nJ per ms: the same power for every variant
    assert max(watts) == pytest.approx(min(watts), rel=1e-9)
    assert all(e["compute_nj"] + e["memory_nj"] == pytest.approx(e["total_nj"]) for e in energy.values())
    assert "Energy per inference (estimated)" in md


@pytest.mark.parametrize("variant", ["baseline", "pruned", "quantized", "pruned_quantized", "gradual",
                                     "gradual_quantized", "int8-static", "qat-int8", "int4-weight-g32"])
def test_profile_works_on_every_variant(demo_dir, variant, capsys):
    assert main(["profile", str(demo_dir / variant), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["architecture"] == "simplenet"
    assert [layer["name"] for layer in doc["layers"]] == ["features.0", "features.2", "classifier"]
    assert doc["macs"] == 6464 and doc["params"] == 6570
    weights = next(p for p in (demo_dir / variant).iterdir() if p.name.startswith("model."))
    assert doc["file_bytes"] == weights.stat().st_size
    assert main(["profile", str(demo_dir / variant)]) == 0
    assert "classifier" in capsys.readouterr().out


def test_rerunning_the_demo_replaces_its_own_report(demo_dir, tmp_path):
    out = tmp_path / "r"
    for _ in range(2):
        assert main(["demo", "--out", str(out), "--epochs", "1", "--latency-seconds", "0"]) == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def base_bytes(report):
    return next(v for v in report["variants"] if v["name"] == "baseline")["file_bytes"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--threshold", "-0.1"], "threshold"),
        (["--bits", "1"], "bits must be in 2..8"),
        (["--bits", "9"], "bits must be in 2..8"),
        (["--epochs", "0"], "epochs"),
        (["--seed", "-1"], "seed"),
        (["--latency-seconds", "nan"], "latency seconds"),
        (["--latency-seconds", "inf"], "latency seconds"),
    ],
)
def test_bad_demo_arguments_write_nothing(tmp_path, args, message, expect_error):
    out = tmp_path / "never"
    expect_error(["demo", "--out", str(out), *args], message)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_demo_refuses_a_foreign_directory(tmp_path, expect_error):
    (tmp_path / "mine.txt").write_text("keep")
    expect_error(["demo", "--out", str(tmp_path), "--epochs", "1"], "refusing to overwrite")
    assert (tmp_path / "mine.txt").read_text() == "keep"


def test_demo_keeps_user_files_next_to_an_old_report(demo_dir, tmp_path, expect_error):
    out = tmp_path / "r"
    out.mkdir()
    (out / "report.json").write_text("{}")
    (out / "my_notes.txt").write_text("precious")
    expect_error(["demo", "--out", str(out), "--epochs", "1"], "my_notes.txt")
    assert (out / "my_notes.txt").read_text() == "precious"


def test_demo_refuses_the_current_directory_and_unwritable_places(tmp_path, capsys, monkeypatch, expect_error):
    monkeypatch.chdir(tmp_path)
    expect_error(["demo", "--out", ".", "--epochs", "1"], "current directory")
    (tmp_path / "afile").write_text("x")
    expect_error(["demo", "--out", "afile", "--epochs", "1"], "it is a file")
    assert main(["demo", "--out", "afile/sub", "--epochs", "1", "--latency-seconds", "0"]) == 2
    assert "nnopt: error:" in capsys.readouterr().err


def test_profile_bad_inputs(tmp_path, demo_dir, expect_error):
    expect_error(["profile", str(tmp_path / "missing")], "no such file")
    (tmp_path / "empty").mkdir()
    expect_error(["profile", str(tmp_path / "empty")], "not an nnopt model directory")
    (tmp_path / "m.pkl").write_bytes(pickle.dumps({"a": 1}))
    expect_error(["profile", str(tmp_path / "m.pkl")], "pickle")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "nnopt.json").write_text("{oops")
    expect_error(["profile", str(corrupt)], "corrupt")
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    meta = json.loads((demo_dir / "baseline" / "nnopt.json").read_text())
    meta["architecture"] = "transformer-xl"
    (unknown / "nnopt.json").write_text(json.dumps(meta))
    (unknown / "model.safetensors").write_bytes((demo_dir / "baseline" / "model.safetensors").read_bytes())
    expect_error(["profile", str(unknown)], "unknown architecture 'transformer-xl'")


def test_argument_errors_exit_2():
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--bits", "eight"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2


@pytest.mark.parametrize("argv", [["--help"], ["demo", "--help"], ["profile", "--help"]])
def test_help_everywhere(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    assert "usage: nnopt" in capsys.readouterr().out


def test_console_script_version():
    result = subprocess.run([sys.executable, "-m", "nnopt", "--version"], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == f"nnopt {__version__}"


def test_importing_nnopt_is_cheap():
    code = (
        "import sys, nnopt; m = nnopt.create_model('simplenet'); nnopt.quantize(nnopt.prune(m)); "
        "heavy = [n for n in ('onnx', 'onnxruntime', 'keras', 'transformers', 'matplotlib') if n in sys.modules]; "
        "print(','.join(heavy))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""
    bare = subprocess.run([sys.executable, "-c", "import sys, nnopt; print('torch' in sys.modules)"],
                          capture_output=True, text=True, check=True)
    assert bare.stdout.strip() == "False"
