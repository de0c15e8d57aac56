"""Energy per inference on the device that runs it: active power × measured time.

Energy is power × time. The analytic table (:mod:`nnopt.energy.estimate`) counts only arithmetic and data
movement at 45 nm, four orders of magnitude below what a CPU package draws while it runs the inference, and
it can rank a slower kernel as cheaper (int8 on a CPU without VNNI: fewer picojoules per MAC, ten times the
time). So every ranking and every headline figure uses this model instead:

    E per inference = P_active(device, threads) × t_measured per inference

- ``P_active`` is measured where a counter exists (RAPL, NVML: :func:`measured_power`, idle power subtracted);
  otherwise it is the device's published power (TDP by CPU model, or a per-core guess) × the share of the
  logical cores the threads use × 0.5–1.0 (a loaded core draws between half and all of its share), the same
  bounds as :func:`nnopt.energy.measure.latency_energy`. The package's idle power is not charged to the
  inference, as a measurement subtracts it too.
- The analytic compute/memory split is kept, as *shares* of that total (where the joules go), never as the
  joules of an inference on their own. It is not added to the total: the active power already includes
  the dynamic power the table models, and adding it would count it twice.

At equal power the figure is proportional to time, so a variant measured slower is never reported as using
less energy (property-tested). Variants of one model on one device are compared at equal power: their power
draw differs by less than the stated bounds, which a counter, where present, replaces with a measurement.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

from nnopt.energy.measure import HIGH_SHARE, LOW_SHARE, cpu_power_source
from nnopt.errors import ConfigError

if TYPE_CHECKING:
    from nnopt.energy.estimate import EnergyEstimate
    from nnopt.energy.measure import EnergyMeasurement


IDLE_NOISE = 0.01  # a workload drawing less than 1% of idle power above it is within the counter's noise


@dataclasses.dataclass(frozen=True)
class ActivePower:
    """Watts the device draws above idle while running the inference, as a range, with where it came from."""

    low_w: float
    high_w: float
    source: str
    measured: bool = False
    typical_w: float | None = None  # a measurement's median; None: the middle of the bounds

    @property
    def mid_w(self) -> float:
        """The power the headline figure uses: a measurement's median, else the middle of the bounds."""
        return self.typical_w if self.typical_w is not None else (self.low_w + self.high_w) / 2

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "mid_w": self.mid_w}


def cpu_active_power(threads: int, tdp_w: float | None = None, cpu_model: str | None = None,
                     logical_cores: int | None = None) -> ActivePower:
    """Published power of the cores ``threads`` use: TDP × threads / logical cores × 0.5–1.0 (estimated)."""
    watts, source = cpu_power_source(threads, tdp_w, cpu_model, logical_cores)
    return ActivePower(watts * LOW_SHARE, watts * HIGH_SHARE,
                       f"estimated: {source}, × {LOW_SHARE:g}–{HIGH_SHARE:g} for how loaded the cores are")


def measured_power(measurement: EnergyMeasurement, seconds_per_call: float) -> ActivePower:
    """Active power from a counter measurement of calls that each took ``seconds_per_call`` (idle subtracted):
    the median run's, with the runs' min–max as bounds. A run at or below idle power is no measurement."""
    from nnopt.energy.measure import BELOW_IDLE

    median = measurement.median_j
    if median is None or median <= 0 or BELOW_IDLE in measurement.flags or not seconds_per_call > 0:
        raise ConfigError(f"no valid measurement to take the power from ({measurement.summary()})")
    typical = median / seconds_per_call
    if measurement.idle_watts and typical < IDLE_NOISE * measurement.idle_watts:
        raise ConfigError(f"the counter's reading is indistinguishable from idle power ({typical:.3g} W above "
                          f"{measurement.idle_watts:.3g} W idle): no valid measurement to take the power from")
    low, high = measurement.min_j / seconds_per_call, measurement.max_j / seconds_per_call  # type: ignore[operator]
    return ActivePower(low, high, f"{measurement.method}; median (min–max) of its runs ÷ the median call time",
                       measured=True, typical_w=typical)


@dataclasses.dataclass(frozen=True)
class DeviceEnergy:
    """Energy per inference on the device: active power × measured time per inference, with bounds."""

    latency_s: float  # measured, per inference (a call's time ÷ its batch)
    batch: int
    power: ActivePower
    compute_share: float | None = None  # of the analytic estimate (where the energy goes), None when absent
    memory_share: float | None = None
    analytic_table: str | None = None

    @property
    def joules(self) -> float:
        return self.power.mid_w * self.latency_s

    @property
    def low_j(self) -> float:
        return self.power.low_w * self.latency_s

    @property
    def high_j(self) -> float:
        return self.power.high_w * self.latency_s

    @property
    def method(self) -> str:
        kind = "measured power" if self.power.measured else "estimated"
        text = (f"{kind}: active power × measured time per inference at batch {self.batch} "
                f"({self.power.low_w:.3g}–{self.power.high_w:.3g} W; {self.power.source})")
        if self.compute_share is not None:
            text += f"; compute/memory shares from the analytic table {self.analytic_table}"
        return text

    def to_nj_dict(self) -> dict[str, Any]:
        """The ``energy_nj`` mapping reports read: total, bounds and the analytic split as parts of the total."""
        total = self.joules * 1e9
        compute = None if self.compute_share is None else total * self.compute_share
        memory = None if self.memory_share is None else total * self.memory_share
        return {"total_nj": total, "low_nj": self.low_j * 1e9, "high_nj": self.high_j * 1e9,
                "compute_nj": compute, "memory_nj": memory, "compute_share": self.compute_share,
                "memory_share": self.memory_share, "latency_ms": self.latency_s * 1e3, "batch": self.batch,
                "watts": self.power.to_dict(), "method": self.method}

    def summary(self) -> str:
        shares = ("" if self.compute_share is None else
                  f"; {self.compute_share:.0%} compute, {self.memory_share:.0%} memory by the analytic split")
        return (f"{self.joules * 1e3:.4g} mJ per inference ({self.low_j * 1e3:.4g}–{self.high_j * 1e3:.4g}){shares}"
                f" — {self.method}")


def device_energy(latency_s_per_call: float, batch: int, power: ActivePower,
                  estimate: EnergyEstimate | None = None) -> DeviceEnergy:
    """Energy per inference from one call's measured time at ``batch`` and the device's active ``power``;
    ``estimate`` (the analytic one, any batch) gives the compute/memory shares."""
    if not (math.isfinite(latency_s_per_call) and latency_s_per_call > 0):
        raise ConfigError(f"latency must be a finite number of seconds > 0, got {latency_s_per_call}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ConfigError(f"batch must be an integer >= 1, got {batch}")
    compute = memory = None
    table = None
    if estimate is not None and estimate.total_mj > 0:
        compute, memory = estimate.compute_mj / estimate.total_mj, estimate.memory_mj / estimate.total_mj
        table = estimate.table.name
    return DeviceEnergy(latency_s_per_call / batch, batch, power, compute, memory, table)
