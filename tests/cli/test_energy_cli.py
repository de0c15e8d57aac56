"""`nnopt energy`: every figure labelled (estimated/measured, method, bounds), JSON fields, one-line errors."""

from __future__ import annotations

import json

import pytest

import nnopt
from nnopt.cli import main

FAST = ["--seconds", "0.05"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("energy")
    model = nnopt.create_model("simplenet", seed=0)
    nnopt.save_model(model, root / "simplenet")
    layers = ("features.0", "features.2", "classifier")
    pruned = nnopt.prune(model, nnopt.MagnitudePruneConfig(sparsity=0.9, layers=layers))
    csr = nnopt.sparsify(pruned, nnopt.SparseKernelConfig(min_speedup=0.0, min_seconds=0.0))
    nnopt.save_model(csr, root / "csr")
    return root


def test_table_says_estimated_with_method_and_bounds(saved, capsys):
    assert main(["energy", str(saved / "simplenet"), *FAST]) == 0
    out = capsys.readouterr().out
    assert "estimated: analytic table horowitz-45nm (M. Horowitz" in out
    assert "bounds" in out and "compute" in out and "memory" in out
    assert "estimated: proportional to latency (time × power share)" in out
    assert "measured:" in out  # either a counter reading or "none — ..., every figure above is estimated"


def test_json_fields(saved, capsys):
    assert main(["energy", str(saved / "simplenet"), "--batch", "4", "--tdp", "35", "--json", *FAST]) == 0
    doc = json.loads(capsys.readouterr().out)
    est = doc["estimate"]
    assert doc["batch"] == 4 and est["batch"] == 4
    assert est["method"].startswith("estimated: analytic table horowitz-45nm")
    per = est["per_inference"]
    assert 0 < per["total_mj_low"] < per["total_mj"] < per["total_mj_high"]
    assert per["total_mj"] == pytest.approx(per["compute_mj"] + per["memory_mj"])
    assert {"compute_pj", "memory_pj", "level", "dtype", "macs", "bytes_moved"} <= set(est["layers"][0])
    lat = doc["latency_energy"]
    assert lat["tdp_w"] == 35.0 and "given by the user" in lat["method"]
    assert 0 < lat["low_mj_per_inference"] < lat["high_mj_per_inference"]
    assert doc["latency"]["method"].startswith("measured:")
    assert doc["measured"] is not None or doc["measured_note"]


def test_csr_variant_estimates_less_than_dense(saved, capsys):
    totals = {}
    for name in ("simplenet", "csr"):
        assert main(["energy", str(saved / name), "--json", *FAST]) == 0
        totals[name] = json.loads(capsys.readouterr().out)["estimate"]
    assert {layer["kernel"] for layer in totals["csr"]["layers"]} == {"csr"}
    assert totals["csr"]["per_inference"]["total_mj"] < totals["simplenet"]["per_inference"]["total_mj"]


def test_bad_input(saved, tmp_path, expect_error):
    expect_error(["energy", str(tmp_path / "missing")], "no such file or directory")
    expect_error(["energy", str(saved / "simplenet"), "--batch", "0"], "--batch")
    expect_error(["energy", str(saved / "simplenet"), "--tdp", "-3"], "--tdp")
    expect_error(["energy", str(saved / "simplenet"), "--table", "no-such-table"], "unknown energy table")
    bad = tmp_path / "t.yaml"
    bad.write_text("version: 1\nsource: x\n")
    expect_error(["energy", str(saved / "simplenet"), "--table", str(bad)], "process")
