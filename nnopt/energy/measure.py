"""Measured energy from a cumulative counter, and the fallback: latency × a share of the CPU's power.

Measurement protocol (``measure_energy``): idle power over an idle window; then ``runs`` windows, each
repeating the workload until at least ``window_s`` (default: ``window_periods`` counter update periods) has
passed; energy per call = (Δcounter − idle power × elapsed) / calls. A counter that decreases wraps once
(``max_range`` added, flagged); one that decreases without a known range, a window shorter than the update
period, or a counter that did not advance are flagged, never reported as a silent zero.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import Any

from nnopt.energy.counters import CounterUnavailableError, EnergyCounter, available_counters, describe_unavailable
from nnopt.errors import ConfigError

WRAPPED = "wrapped"
BACKWARDS = "backwards"
SHORT_WINDOW = "window shorter than the counter update period"
NO_CHANGE = "counter did not advance"
IDLE_BACKWARDS = "idle window: counter went backwards, idle power not subtracted"
BELOW_IDLE = "below idle: workload energy not above the idle baseline"


@dataclasses.dataclass(frozen=True)
class EnergyRun:
    joules_per_call: float | None  # None when the run is invalid (see flags)
    calls: int
    window_s: float
    raw_joules: float | None
    flags: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "flags": list(self.flags)}


@dataclasses.dataclass(frozen=True)
class EnergyMeasurement:
    counter: str
    update_period_s: float
    idle_watts: float | None
    runs: tuple[EnergyRun, ...]

    @property
    def valid(self) -> list[float]:
        return [r.joules_per_call for r in self.runs if r.joules_per_call is not None]

    @property
    def flags(self) -> tuple[str, ...]:
        return tuple(sorted({f for r in self.runs for f in r.flags}))

    @property
    def median_j(self) -> float | None:
        return statistics.median(self.valid) if self.valid else None

    @property
    def min_j(self) -> float | None:
        return min(self.valid) if self.valid else None

    @property
    def max_j(self) -> float | None:
        return max(self.valid) if self.valid else None

    @property
    def method(self) -> str:
        idle = "idle power subtracted" if self.idle_watts is not None else "idle power NOT subtracted"
        return (f"measured: {self.counter}, {len(self.runs)} runs, each ≥ the counter's update period "
                f"{self.update_period_s:g} s repeated, {idle}")

    def summary(self) -> str:
        if self.median_j is None:
            return f"no valid measurement ({'; '.join(self.flags)}) — {self.method}"
        text = (f"{self.median_j * 1e3:.4g} mJ per call (median of {len(self.valid)}, min–max "
                f"{self.min_j * 1e3:.4g}–{self.max_j * 1e3:.4g} mJ) — {self.method}")  # type: ignore[operator]
        return text + (f"; flags: {', '.join(self.flags)}" if self.flags else "")

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method, "counter": self.counter, "update_period_s": self.update_period_s,
            "idle_watts": self.idle_watts, "median_j": self.median_j, "min_j": self.min_j, "max_j": self.max_j,
            "flags": list(self.flags), "runs": [r.to_dict() for r in self.runs],
        }


def _delta(before: float, after: float, max_range: float | None) -> tuple[float | None, tuple[str, ...]]:
    if after >= before:
        return after - before, ()
    if max_range is not None and max_range > 0:
        return after + max_range - before, (WRAPPED,)  # wrapped once (windows are far shorter than a wrap)
    return None, (BACKWARDS,)


def measure_energy(
    fn: Callable[[], object],
    counter: EnergyCounter | None = None,
    runs: int = 5,
    window_s: float | None = None,
    window_periods: float = 20.0,
    idle_s: float | None = None,
    device: str = "cpu",
    clock: Callable[[], float] = time.perf_counter,
    sleep: Callable[[float], None] = time.sleep,
) -> EnergyMeasurement:
    """Energy per call of ``fn`` from ``counter`` (default: the first available RAPL/NVML counter).

    Raises :class:`CounterUnavailableError` when no counter can be read.
    """
    if counter is None:
        found = available_counters(device)
        if not found:
            raise CounterUnavailableError(describe_unavailable(device))
        counter = found[0]
    if runs < 1:
        raise ConfigError(f"runs must be >= 1, got {runs}")
    period = float(counter.update_period_s)
    if window_s is None:
        window_s = window_periods * period
    if not window_s > 0:
        raise ConfigError(f"window_s must be > 0, got {window_s}")
    idle_window = window_s if idle_s is None else idle_s

    idle_watts: float | None = None
    idle_flags: tuple[str, ...] = ()
    if idle_window > 0:
        e0, t0 = counter.read(), clock()
        sleep(idle_window)
        e1, t1 = counter.read(), clock()
        idle_j, idle_flags = _delta(e0, e1, counter.max_range)
        if idle_j is not None and t1 > t0:
            idle_watts = idle_j / (t1 - t0)
        elif BACKWARDS in idle_flags:
            idle_flags = (IDLE_BACKWARDS,)

    results = []
    for _ in range(runs):
        e0, t0 = counter.read(), clock()
        calls = 0
        while True:
            fn()
            calls += 1
            if clock() - t0 >= window_s:
                break
        e1, t1 = counter.read(), clock()
        elapsed = t1 - t0
        raw, flags = _delta(e0, e1, counter.max_range)
        flags = tuple(f for f in idle_flags if f != WRAPPED) + flags
        if elapsed < period:
            flags += (SHORT_WINDOW,)
        per_call = None
        if raw is not None:
            if raw == 0:
                flags += (NO_CHANGE,)
            net = raw - (idle_watts or 0.0) * elapsed
            if net <= 0 and raw > 0:
                flags += (BELOW_IDLE,)
            if raw > 0 and SHORT_WINDOW not in flags:
                per_call = max(net, 0.0) / calls
        results.append(EnergyRun(per_call, calls, elapsed, raw, flags))
    return EnergyMeasurement(counter.name, period, idle_watts, tuple(results))


# -- fallback: latency × power share -------------------------------------------------------------------

# Thermal design power of the whole package by CPU model substring (W), and the logical CPUs that package has:
# a VM or a container sees only some of them, so a thread's share is TDP / the package's logical CPUs, not / the
# CPUs this machine shows (2 vCPUs of a 280 W, 128-thread EPYC 7763 draw about 4.4 W, not 280 W).
TDP_LOOKUP: dict[str, tuple[float, int]] = {
    "Xeon(R) Platinum 8480": (350.0, 112),
    "Xeon(R) Platinum 8380": (270.0, 80),
    "EPYC 7763": (280.0, 128),
    "EPYC 9654": (360.0, 192),
    "Core(TM) i9-13900K": (125.0, 32),
    "Core(TM) i7-12700": (65.0, 20),
    "Apple M1": (20.0, 8),
}
DEFAULT_WATTS_PER_CORE = 10.0  # a guess: server CPUs run roughly 5–15 W per logical core under load
LOW_SHARE, HIGH_SHARE = 0.5, 1.0  # of the TDP share: a loaded core draws between half and all of it


@dataclasses.dataclass(frozen=True)
class EnergyRange:
    low_j: float
    high_j: float
    latency_s: float
    threads: int
    logical_cores: int
    tdp_w: float
    tdp_source: str

    @property
    def method(self) -> str:
        return ("estimated: proportional to latency (time × power share): measured latency "
                f"{self.latency_s * 1e3:.4g} ms × TDP {self.tdp_w:g} W ({self.tdp_source}) × "
                f"{self.threads}/{self.logical_cores} cores × "
                f"{LOW_SHARE:g}–{HIGH_SHARE:g}")

    def summary(self) -> str:
        return f"{self.low_j * 1e3:.4g}–{self.high_j * 1e3:.4g} mJ per call — {self.method}"

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "method": self.method}


def latency_energy(
    latency_s: float, threads: int, tdp_w: float | None = None, cpu_model: str | None = None,
    logical_cores: int | None = None,
) -> EnergyRange:
    """Energy range of a call from its measured latency: latency × TDP × threads / logical cores × 0.5–1.0.

    The TDP is ``tdp_w`` (given), else looked up by CPU model string, else ``DEFAULT_WATTS_PER_CORE`` per
    logical core (a guess, said so in ``tdp_source``).

    >>> r = latency_energy(0.01, threads=1, tdp_w=40.0, logical_cores=4)
    >>> round(r.low_j, 6), round(r.high_j, 6)
    (0.05, 0.1)
    """
    if not (latency_s >= 0):
        raise ConfigError(f"latency must be >= 0 seconds, got {latency_s}")
    watts, tdp, source, cores = _tdp_share(threads, tdp_w, cpu_model, logical_cores)
    return EnergyRange(latency_s * watts * LOW_SHARE, latency_s * watts * HIGH_SHARE, latency_s, threads, cores,
                       tdp, source)


def _tdp(tdp_w: float | None, cpu_model: str | None, logical_cores: int | None) -> tuple[float, str, int]:
    """(TDP in W, where it came from, the logical CPUs it is shared by): given (for the CPUs this machine shows),
    looked up by CPU model (the whole package's), else a per-core guess."""
    import os

    cores = logical_cores or os.cpu_count() or 1
    if tdp_w is not None:
        if not (tdp_w > 0 and tdp_w < float("inf")):
            raise ConfigError(f"--tdp must be a positive number of watts, got {tdp_w}")
        return float(tdp_w), "given by the user", cores
    if cpu_model is None:
        from nnopt.envinfo import cpu_model as read_model

        cpu_model = read_model()
    match = next((key for key in TDP_LOOKUP if key in cpu_model), None)
    if match is not None:
        tdp, package = TDP_LOOKUP[match]
        return tdp, f"looked up for {cpu_model!r}, a package of {package} logical CPUs", package
    return (DEFAULT_WATTS_PER_CORE * cores,
            f"a guess: {DEFAULT_WATTS_PER_CORE:g} W per logical core × {cores} (CPU {cpu_model!r} not in the "
            "lookup; pass --tdp)", cores)


def cpu_power_source(threads: int, tdp_w: float | None = None, cpu_model: str | None = None,
                     logical_cores: int | None = None) -> tuple[float, str]:
    """The TDP share of the cores ``threads`` use (W), and a sentence saying where the TDP came from."""
    watts, tdp, source, cores = _tdp_share(threads, tdp_w, cpu_model, logical_cores)
    return watts, f"TDP {tdp:g} W ({source}) × {min(threads, cores)}/{cores} cores"


def _tdp_share(threads: int, tdp_w: float | None, cpu_model: str | None,
               logical_cores: int | None) -> tuple[float, float, str, int]:
    """(watts of the threads' share, TDP, where it came from, logical CPUs it is shared by): one lookup."""
    tdp, source, cores = _tdp(tdp_w, cpu_model, logical_cores)
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ConfigError(f"threads must be an integer >= 1, got {threads}")
    return tdp * min(threads, cores) / cores, tdp, source, cores
