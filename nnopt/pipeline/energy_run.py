"""`nnopt energy`: energy per inference on this CPU (active power × measured time; the power measured where a
counter exists), split by layer and by compute/memory with the analytic table's shares.

On a machine without energy counters (a VM: no /sys/class/powercap) every figure is an estimate and says so;
``--measure`` then fails with the reason instead.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import torch

from nnopt.energy import (
    CounterUnavailableError,
    DeviceEnergy,
    EnergyEstimate,
    EnergyMeasurement,
    EnergyRange,
    available_counters,
    cpu_active_power,
    device_energy,
    estimate_energy,
    latency_energy,
    measure_energy,
    measured_power,
)
from nnopt.energy.counters import describe_unavailable
from nnopt.energy.estimate import NOT_COUNTED
from nnopt.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class EnergyOptions:
    batch: int = 1
    table: str = "horowitz-45nm"
    tdp_w: float | None = None
    seconds: float = 0.5  # latency timing per measurement

    def validate(self) -> None:
        if isinstance(self.batch, bool) or not isinstance(self.batch, int) or self.batch < 1:
            raise ConfigError(f"--batch must be an integer >= 1, got {self.batch}")
        if self.tdp_w is not None and not (math.isfinite(self.tdp_w) and self.tdp_w > 0):
            raise ConfigError(f"--tdp must be a positive number of watts, got {self.tdp_w}")
        if not (math.isfinite(self.seconds) and self.seconds > 0):
            raise ConfigError(f"--seconds must be > 0, got {self.seconds}")


@dataclasses.dataclass(frozen=True)
class EnergyRunResult:
    path: str
    architecture: str
    device: str
    threads: int
    estimate: EnergyEstimate  # the analytic table: where the energy goes (shares), never the headline
    latency_ms: float
    latency_method: str
    latency_energy: EnergyRange  # per call of the whole batch
    measured: EnergyMeasurement | None
    measured_note: str
    on_device: DeviceEnergy  # the headline: active power (measured where a counter is) × measured time

    def to_dict(self) -> dict[str, Any]:
        b = self.estimate.batch
        latency = self.latency_energy
        return {
            "path": self.path, "architecture": self.architecture, "device": self.device, "threads": self.threads,
            "batch": b,
            "energy": {**self.on_device.to_nj_dict(), "mj_per_inference": self.on_device.joules * 1e3,
                       "low_mj_per_inference": self.on_device.low_j * 1e3,
                       "high_mj_per_inference": self.on_device.high_j * 1e3},
            "estimate": {**self.estimate.to_dict(), "use": ANALYTIC_USE},
            "latency": {"median_ms": self.latency_ms, "method": self.latency_method},
            "latency_energy": {**latency.to_dict(), "low_mj_per_inference": latency.low_j * 1e3 / b,
                               "high_mj_per_inference": latency.high_j * 1e3 / b},
            "measured": None if self.measured is None else {
                **self.measured.to_dict(),
                "median_mj_per_inference": None if self.measured.median_j is None else self.measured.median_j * 1e3 / b,
            },
            "measured_note": self.measured_note,
        }

    def __str__(self) -> str:
        b = self.estimate.batch
        lines = [
            f"{self.path}: {self.architecture}, batch {b}, {self.device}, {self.threads} threads "
            f"(latency {self.latency_ms:.4g} ms per batch: {self.latency_method})",
            f"energy:    {self.on_device.summary()}",
        ]
        if self.measured is not None:
            m = self.measured
            if m.median_j is None:
                lines.append(f"measured:  {m.summary()}")
            else:
                lines.append(f"measured:  {m.median_j * 1e3 / b:.4g} mJ per inference (min–max "
                             f"{m.min_j * 1e3 / b:.4g}–{m.max_j * 1e3 / b:.4g}) — {m.method}"  # type: ignore[operator]
                             + (f"; flags: {', '.join(m.flags)}" if m.flags else ""))
        else:
            lines.append(f"measured:  none — {self.measured_note}; the energy above is estimated")
        lines += ["", f"Where it goes: {ANALYTIC_USE}", _shares_table(self.estimate, self.on_device)]
        return "\n".join(lines)


ANALYTIC_USE = ("shares of the total by the analytic table (MACs executed × pJ per MAC + bytes moved × pJ per "
                "byte): arithmetic and data movement only, far below what the device draws, so it splits the "
                "total and never ranks variants on its own")


def _shares_table(estimate: EnergyEstimate, total: DeviceEnergy) -> str:
    from nnopt.metrics.table import render_table

    b, analytic = estimate.batch, sum(layer.total_pj for layer in estimate.layers) or 1.0
    rows = [(lv.name, lv.kernel, lv.dtype, round(lv.macs / b), round(lv.bytes_moved / b), lv.level,
             f"{lv.total_pj / analytic:.1%}", f"{lv.compute_pj / max(lv.total_pj, 1e-30):.0%}",
             total.joules * 1e3 * lv.total_pj / analytic) for lv in estimate.layers]
    columns = ("layer", "kernel", "MAC dtype", "MACs", "bytes moved", "memory level", "share", "of it compute",
               "≈ mJ of the total")
    return render_table(columns, rows, caption=f"{estimate.method}; per inference at batch {b}. Not counted: "
                        f"{NOT_COUNTED}.")


def run_energy(path: str | Path, options: EnergyOptions, require_counter: bool = False) -> EnergyRunResult:
    """Energy per inference of the saved model at ``path``: active power × measured time, measured with a counter
    where one exists (``require_counter``: an error, naming why, where none does)."""
    from nnopt.io.model_dir import read_meta
    from nnopt.loading import load_model
    from nnopt.metrics.profile import model_input_shape
    from nnopt.metrics.speed import bind_call, compare_calls, example_batch

    options.validate()
    meta = read_meta(path)  # a bad path is named before anything else
    counters = available_counters("cpu")
    if require_counter and not counters:
        raise CounterUnavailableError(f"--measure: {describe_unavailable('cpu')}; "
                                      "without --measure, nnopt energy estimates (active power × measured time)")
    model = load_model(path)
    model.eval()
    shape = model_input_shape(model)
    estimate = estimate_energy(model, batch=options.batch, input_shape=shape, table=options.table)
    call = bind_call(model, example_batch(model, options.batch))
    threads = torch.get_num_threads()
    with torch.inference_mode():
        timing = compare_calls({"model": call}, options.batch, warmup=5, min_calls=10,
                               min_seconds=options.seconds, rounds=1)["model"]
        latency_s = timing.median_ms / 1e3
        fallback = latency_energy(latency_s, threads, options.tdp_w)
        measured, note = None, ""
        if counters:
            measured = measure_energy(call, counters[0], runs=5, window_s=max(0.05, 20 * counters[0].update_period_s))
            note = "measured with a hardware counter (includes the whole package: other load adds to it)"
        else:
            note = describe_unavailable("cpu")
    power = cpu_active_power(threads, options.tdp_w)
    if measured is not None:
        try:
            power = measured_power(measured, latency_s)
        except ConfigError:  # no valid reading (below idle, too short): estimated, and said so
            note = f"the counter gave no valid reading ({measured.summary()})"
            if require_counter:
                raise CounterUnavailableError(f"--measure: {note}") from None
    method = f"measured: time.perf_counter, median of {timing.calls} calls after warm-up"
    return EnergyRunResult(str(path), str(meta.get("architecture")), "cpu", threads, estimate, timing.median_ms,
                           method, fallback, measured, note, device_energy(latency_s, options.batch, power, estimate))
