"""Energy per inference on the device: active power × measured time, never inverted by the analytic table."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

import nnopt
from nnopt.energy import ActivePower, cpu_active_power, device_energy, estimate_energy, measured_power
from nnopt.energy.measure import EnergyMeasurement, EnergyRun
from nnopt.errors import ConfigError

POWER = ActivePower(10.0, 20.0, "estimated: a test's power")
seconds = st.floats(min_value=1e-7, max_value=10.0, allow_nan=False, allow_infinity=False)


@given(seconds, st.floats(min_value=1.0001, max_value=1e4), st.integers(1, 512), st.integers(1, 512))
def test_a_slower_variant_is_never_reported_as_using_less_energy_at_equal_power(t, k, batch_a, batch_b):
    fast = device_energy(t * batch_a, batch_a, POWER)
    slow = device_energy(k * t * batch_b, batch_b, POWER)  # k times slower per inference
    assert slow.joules > fast.joules and slow.low_j > fast.low_j and slow.high_j > fast.high_j


def test_the_analytic_split_is_shares_of_the_device_total_and_cannot_rank():
    model = nnopt.create_model("simplenet")
    estimate = estimate_energy(model, batch=1)
    energy = device_energy(2e-4, 1, POWER, estimate=estimate)
    assert energy.joules == pytest.approx(15.0 * 2e-4)
    assert energy.compute_share + energy.memory_share == pytest.approx(1.0)
    parts = energy.to_nj_dict()
    assert parts["compute_nj"] + parts["memory_nj"] == pytest.approx(parts["total_nj"])
    assert parts["low_nj"] < parts["total_nj"] < parts["high_nj"]
    # the analytic table's own total is orders of magnitude smaller: it is never the headline figure
    assert estimate.total_mj * 1e-3 < energy.joules / 100
    assert "active power × measured time" in energy.method and "shares" in energy.method


def test_cpu_power_is_the_tdp_share_of_the_threads_with_bounds_and_its_source():
    power = cpu_active_power(2, tdp_w=80.0, logical_cores=8)
    assert (power.low_w, power.high_w) == (10.0, 20.0) and not power.measured
    assert "TDP 80 W (given by the user)" in power.source and "2/8 cores" in power.source
    guess = cpu_active_power(1, cpu_model="Some Unknown CPU", logical_cores=4)
    assert "a guess" in guess.source and guess.high_w == pytest.approx(10.0)
    with pytest.raises(ConfigError, match="threads"):
        cpu_active_power(0)


def test_measured_power_comes_from_the_runs_and_refuses_an_invalid_measurement():
    runs = (EnergyRun(0.010, 10, 0.1, 1.1, ()), EnergyRun(0.012, 10, 0.1, 1.3, ()),
            EnergyRun(None, 1, 0.1, None, ("x",)))
    power = measured_power(EnergyMeasurement("RAPL test", 0.001, 3.0, runs), seconds_per_call=0.001)
    assert power.measured and (power.low_w, power.high_w) == pytest.approx((10.0, 12.0))
    assert power.mid_w == pytest.approx(11.0)  # the median run's, not the middle of min and max
    skewed = (*runs[:2], *[EnergyRun(0.010, 10, 0.1, 1.1, ())] * 2, EnergyRun(0.030, 10, 0.1, 3.1, ()))
    assert measured_power(EnergyMeasurement("RAPL test", 0.001, 3.0, skewed), 0.001).mid_w == pytest.approx(10.0)
    assert device_energy(0.001, 1, power).method.startswith("measured power")
    with pytest.raises(ConfigError, match="no valid measurement"):
        measured_power(EnergyMeasurement("RAPL test", 0.001, None, runs[2:]), seconds_per_call=0.001)
    below = (EnergyRun(0.0, 10, 0.1, 0.2, ("below idle: workload energy not above the idle baseline",)),)
    with pytest.raises(ConfigError, match="no valid measurement"):  # never a silent 0 mJ headline
        measured_power(EnergyMeasurement("RAPL test", 0.001, 3.0, below), seconds_per_call=0.001)


@pytest.mark.parametrize("latency, batch", [(0.0, 1), (-1.0, 1), (math.nan, 1), (math.inf, 1), (0.1, 0), (0.1, True)])
def test_bad_latency_or_batch_is_one_clear_error(latency, batch):
    with pytest.raises(ConfigError, match="latency|batch"):
        device_energy(latency, batch, POWER)
