"""`nnopt advise` end to end: every candidate timed side by side, verdicts consistent with the measured
speed-ups (never a fixed outcome: timings on a shared machine vary), reasons from facts, JSON, bad input."""

from __future__ import annotations

import json

import pytest

import nnopt
from nnopt import cpu
from nnopt.cli import main
from nnopt.pipeline.advice import FASTER, MIN_SPEEDUP, NOT_FASTER

FAST = ["--threads", "1", "--seconds", "0.05"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A SimpleNet MLP (no BatchNorm, Linear layers of 64 and 32 inputs), a ResNet-style CNN with BatchNorm,
    and a SimpleNet with 95% of its Linear weights zero."""
    root = tmp_path_factory.mktemp("advise")
    nnopt.save_model(nnopt.create_model("simplenet", seed=0), root / "simplenet")
    nnopt.save_model(nnopt.create_model("resnet8", seed=0), root / "resnet8")
    pruned = nnopt.prune(nnopt.create_model("simplenet", seed=0), nnopt.MagnitudePruneConfig(sparsity=0.95))
    nnopt.save_model(pruned, root / "sparse")
    return root


def _advise_json(capsys, argv):
    assert main(["advise", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _by_key(doc):
    return {row["key"]: row for row in doc["advice"]}


def _assert_consistent(row):
    """The verdict follows from the measured figures, whatever they came out as on this run."""
    faster = row["speedup"] >= MIN_SPEEDUP and row["agreement"]["ok"]
    assert row["verdict"] == (FASTER if faster else NOT_FASTER), row
    assert (row["reason"] is None) == faster, row
    if not faster:
        assert f"measured {row['speedup']:.2f}x" in row["reason"] or "disagree" in row["reason"], row


def test_simplenet_int8_verdict_matches_the_measurement(saved, capsys):
    doc = _advise_json(capsys, [str(saved / "simplenet"), "--batch", "32", *FAST])
    rows = _by_key(doc)
    timed_bf16 = ["bf16"] if cpu.bf16_support()[0] is not False else []  # emulated bf16 is not timed
    assert list(rows) == ["fp32", *timed_bf16, "int8"]  # no BatchNorm, no zeros, no --compile
    assert rows["fp32"]["verdict"] == "baseline" and rows["fp32"]["speedup"] == 1.0
    int8 = rows["int8"]
    assert int8["agreement"]["ok"] and int8["agreement"]["argmax_agreement"] >= 0.9
    assert 0 < int8["agreement"]["max_abs_diff"] < 0.1  # int8 rounding: close to fp32, not identical
    for row in doc["advice"][1:]:
        _assert_consistent(row)
    if int8["verdict"] == NOT_FASTER:
        # SimpleNet's widest Linear has 64 inputs: the reason names the small layers
        assert "layers of at most 64 inputs: quantizing activations costs more than the int8 product saves" \
            in int8["reason"]
    speedup = rows["fp32"]["latency_ms_median"] / int8["latency_ms_median"]
    assert int8["speedup"] == pytest.approx(speedup, rel=1e-2)
    skipped = {s["technique"]: s["reason"] for s in doc["skipped"]}
    assert skipped["BatchNorm folding"] == "the model has no BatchNorm layer"
    assert "no Linear has >= 50% zeros" in skipped["CSR sparse kernels"]


def test_resnet8_bn_folding_agrees_and_the_table_says_measured(saved, capsys):
    assert main(["advise", str(saved / "resnet8"), "--batch", "4", *FAST]) == 0
    printed = capsys.readouterr().out
    assert "nnopt advise: resnet8" in printed and "BatchNorm folding" in printed
    assert "median ms (measured)" in printed and "speed-up (measured)" in printed
    assert "on cpu (" in printed and "1 thread, batch 4; measured:" in printed
    doc = _advise_json(capsys, [str(saved / "resnet8"), "--batch", "4", *FAST])
    fold = _by_key(doc)["bn-fold"]
    assert fold["technique"] == "BatchNorm folding"
    assert fold["facts"]["batchnorm_folded"] == fold["facts"]["batchnorm_layers"] == 6
    # folding is exact in eval mode: same argmax everywhere and float-rounding differences only
    assert fold["agreement"]["ok"] and fold["agreement"]["argmax_agreement"] == 1.0
    assert fold["agreement"]["max_abs_diff"] < 1e-4
    _assert_consistent(fold)
    int8 = _by_key(doc)["int8"]
    _assert_consistent(int8)
    if int8["verdict"] == NOT_FASTER and int8["agreement"]["ok"]:
        assert "convolutions in fp32" in int8["reason"]  # resnet8's only Linear is the classifier


def test_json_document_fields(saved, capsys):
    doc = _advise_json(capsys, [str(saved / "simplenet"), "--batch", "3", *FAST])
    assert set(doc) == {"advice", "skipped", "env"}
    env = doc["env"]
    for key in ("device", "cpu", "threads", "batch", "torch", "nnopt", "cpu_features", "timing_method",
                "agreement_method", "load_average"):
        assert key in env, key
    assert env["threads"] == 1 and env["batch"] == 3 and env["device"] == "cpu"
    assert env["timing_method"].startswith("measured:") and env["agreement_method"].startswith("measured:")
    for row in doc["advice"]:
        for key in ("technique", "key", "method", "device", "threads", "batch", "latency_ms_median",
                    "latency_ms_p10", "latency_ms_p90", "calls", "speedup", "agreement", "verdict", "reason"):
            assert key in row, key
        assert row["method"] == "measured" and row["threads"] == 1 and row["batch"] == 3 and row["device"] == "cpu"
        assert 0 < row["latency_ms_p10"] <= row["latency_ms_median"] <= row["latency_ms_p90"]
        assert row["calls"] >= 20
    if cpu.bf16_support()[0] is False:
        assert "bf16" not in _by_key(doc) and "bf16 autocast" in {s["technique"] for s in doc["skipped"]}
    else:
        bf16 = _by_key(doc)["bf16"]
        assert bf16["facts"]["bf16_native"] in (True, None) and bf16["facts"]["bf16_support"]


def test_bf16_is_not_timed_on_a_cpu_without_bf16(saved, capsys, monkeypatch):
    """Emulated bf16 can take minutes per call: advise lists it as not tried, with the reason, and the
    int8 kernels' known-answer verdicts for this machine."""
    from nnopt import cpu
    from nnopt.envinfo import CPU_FEATURES

    monkeypatch.setattr(cpu, "cpu_features", lambda cpuinfo=None: dict.fromkeys(CPU_FEATURES, False))
    doc = _advise_json(capsys, [str(saved / "simplenet"), "--batch", "8", *FAST])
    assert "bf16" not in _by_key(doc)
    skipped = {s["technique"]: s["reason"] for s in doc["skipped"]}
    assert "neither AVX-512 BF16 nor AMX-BF16, so bf16 would be emulated" in skipped["bf16 autocast"]
    assert doc["env"]["isa"] == "other" and "fp32-exact" in doc["env"]["int8_kernels"]
    assert main(["advise", str(saved / "simplenet"), "--batch", "8", *FAST]) == 0
    out = capsys.readouterr().out
    assert "bf16 autocast: not timed" in out and "int8 kernels (known-answer check on this machine)" in out


def test_sparse_model_gets_the_csr_candidate(saved, capsys):
    doc = _advise_json(capsys, [str(saved / "sparse"), "--batch", "1", *FAST])
    rows, skipped = _by_key(doc), {s["technique"]: s["reason"] for s in doc["skipped"]}
    # sparsify keeps CSR only for layers it measured faster; either way the advice says what happened
    assert ("csr" in rows) != ("CSR sparse kernels" in skipped)
    if "csr" in rows:
        _assert_consistent(rows["csr"])
        assert rows["csr"]["agreement"]["max_abs_diff"] < 1e-4
    else:
        assert "sparsify measured every Linear slower with CSR than dense at batch 1" in skipped["CSR sparse kernels"]


def test_compile_candidate_on_request(saved, capsys):
    doc = _advise_json(capsys, [str(saved / "simplenet"), "--batch", "2", "--compile", *FAST])
    compiled = _by_key(doc)["compiled"]
    assert compiled["agreement"]["ok"] and compiled["agreement"]["max_abs_diff"] < 1e-4
    _assert_consistent(compiled)
    assert doc["env"]["compile_seconds"] > 0 and doc["env"]["compile_method"].startswith("measured:")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--batch", "0"], "--batch must be an integer >= 1, got '0'"),
        (["--batch", "x"], "--batch must be an integer >= 1, got 'x'"),
        (["--threads", "0"], "--threads must be an integer >= 1, got '0'"),
        (["--threads", "-2"], "--threads must be an integer >= 1"),
        (["--seconds", "-1"], "--seconds must be a number >= 0"),
        (["--device", "tpu"], "unknown device 'tpu'"),
    ],
)
def test_bad_options(saved, expect_error, args, message):
    expect_error(["advise", str(saved / "simplenet"), *args], message)


def test_missing_model_path(tmp_path, expect_error):
    expect_error(["advise", str(tmp_path / "nothing")], "no such file or directory")
