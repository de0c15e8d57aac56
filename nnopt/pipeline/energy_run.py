"""`nnopt energy`: analytic estimate per layer, the latency-based range and, where a counter exists, a measurement.

On a machine without energy counters (a VM: no /sys/class/powercap) every figure is an estimate and says so.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import torch

from nnopt.energy import (
    EnergyEstimate,
    EnergyMeasurement,
    EnergyRange,
    available_counters,
    estimate_energy,
    latency_energy,
    measure_energy,
)
from nnopt.energy.counters import describe_unavailable
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
    estimate: EnergyEstimate
    latency_ms: float
    latency_method: str
    latency_energy: EnergyRange  # per call of the whole batch
    measured: EnergyMeasurement | None
    measured_note: str

    def to_dict(self) -> dict[str, Any]:
        b = self.estimate.batch
        latency = self.latency_energy
        return {
            "path": self.path, "architecture": self.architecture, "device": self.device, "threads": self.threads,
            "batch": b,
            "estimate": self.estimate.to_dict(),
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
        lat = self.latency_energy
        lines = [
            f"{self.path}: {self.architecture}, batch {b}, {self.device}, {self.threads} threads",
            str(self.estimate),
            "",
            f"analytic:  {self.estimate.summary()}",
            f"latency:   {lat.low_j * 1e3 / b:.4g}–{lat.high_j * 1e3 / b:.4g} mJ per inference — {lat.method} "
            f"(latency {self.latency_ms:.4g} ms per batch of {b}: {self.latency_method})",
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
            lines.append(f"measured:  none — {self.measured_note}; every figure above is estimated")
        return "\n".join(lines)



def run_energy(path: str | Path, options: EnergyOptions) -> EnergyRunResult:
    from nnopt.io.model_dir import read_meta
    from nnopt.loading import load_model
    from nnopt.metrics.profile import model_input_shape
    from nnopt.metrics.speed import bind_call, compare_calls, example_batch

    options.validate()
    meta = read_meta(path)
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
        counters = available_counters("cpu")
        if counters:
            measured = measure_energy(call, counters[0], runs=5, window_s=max(0.05, 20 * counters[0].update_period_s))
            note = "measured with a hardware counter (includes the whole package: other load adds to it)"
        else:
            note = describe_unavailable("cpu")
    method = f"measured: time.perf_counter, median of {timing.calls} calls after warm-up"
    return EnergyRunResult(str(path), str(meta.get("architecture")), "cpu", threads, estimate, timing.median_ms,
                           method, fallback, measured, note)
