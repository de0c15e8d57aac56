"""`nnopt energy`: every figure labelled (estimated/measured, method, bounds), JSON fields, one-line errors."""

from __future__ import annotations

import json
import time

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
    energy_line = next(line for line in out.splitlines() if line.startswith("energy:"))
    assert "active power × measured time per inference at batch 1" in energy_line
    assert "compute" in energy_line and "memory" in energy_line  # the analytic split, as shares
    assert "estimated: analytic table horowitz-45nm (M. Horowitz" in out and "share" in out
    assert "measured:" in out  # either a counter reading or "none — ..., the energy above is estimated"


def test_measure_needs_a_counter_and_says_so_plainly(saved, capsys, monkeypatch, expect_error):
    import nnopt.pipeline.energy_run as energy_run

    monkeypatch.setattr(energy_run, "available_counters", lambda device="cpu": [])
    expect_error(["energy", str(saved / "simplenet"), "--measure", *FAST], "--measure: no energy counter")


def test_measure_with_a_counter_reports_measured_power_times_time(saved, capsys, monkeypatch):
    import nnopt.pipeline.energy_run as energy_run

    class FakeRapl:  # 2 W over the idle window (its first two reads), 14 W after: 12 W above idle
        name, max_range, update_period_s = "RAPL fake (package-0)", None, 0.001

        def __init__(self):
            self.reads, self.joules, self.last = 0, 0.0, time.perf_counter()

        def read(self) -> float:
            now = time.perf_counter()
            self.joules += (2.0 if self.reads < 2 else 14.0) * (now - self.last)
            self.reads, self.last = self.reads + 1, now
            return self.joules

    monkeypatch.setattr(energy_run, "available_counters", lambda device="cpu": [FakeRapl()])
    assert main(["energy", str(saved / "simplenet"), "--measure", "--json", *FAST]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["measured"]["median_j"] > 0 and doc["energy"]["method"].startswith("measured power")
    assert doc["energy"]["watts"]["measured"] is True
    assert doc["measured"]["idle_watts"] == pytest.approx(2.0, rel=0.05)
    # the headline is the measured power × the measured time per inference
    per_inference_s = doc["latency"]["median_ms"] / 1e3 / doc["batch"]
    assert doc["energy"]["total_nj"] == pytest.approx(doc["energy"]["watts"]["mid_w"] * per_inference_s * 1e9)


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
    energy = doc["energy"]  # the headline: active power × the measured time, bounded by the power's range
    assert energy["low_mj_per_inference"] < energy["mj_per_inference"] < energy["high_mj_per_inference"]
    assert energy["mj_per_inference"] == pytest.approx(
        energy["watts"]["mid_w"] * doc["latency"]["median_ms"] / 1e3 / 4 * 1e3)
    assert energy["compute_nj"] + energy["memory_nj"] == pytest.approx(energy["total_nj"])


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


def test_a_counter_reading_below_idle_is_never_a_silent_zero(saved, capsys, monkeypatch, tmp_path, expect_error):
    import nnopt.pipeline.energy_run as energy_run

    class FlatRapl:  # the same 5 W idle and loaded: every run is at or below idle
        name, max_range, update_period_s = "RAPL flat (package-0)", None, 0.001

        def read(self) -> float:
            return 5.0 * time.perf_counter()

    monkeypatch.setattr(energy_run, "available_counters", lambda device="cpu": [FlatRapl()])
    assert main(["energy", str(saved / "simplenet"), "--json", *FAST]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["energy"]["method"].startswith("estimated") and doc["energy"]["total_nj"] > 0
    assert "no valid reading" in doc["measured_note"]
    expect_error(["energy", str(saved / "simplenet"), "--measure", *FAST], "--measure: the counter gave no valid")
    expect_error(["energy", str(tmp_path / "missing"), "--measure"], "no such file or directory")
