"""Energy: analytic estimates from versioned tables, counter measurements (RAPL, NVML), latency fallback.

Every figure says how it was obtained: "estimated: analytic table ...", "measured: RAPL ...", or
"estimated: proportional to latency (time × power share)".
"""

from __future__ import annotations

from nnopt.energy.counters import (
    CounterUnavailableError,
    EnergyCounter,
    NvmlCounter,
    RaplCounter,
    available_counters,
)
from nnopt.energy.estimate import Cache, EnergyEstimate, LayerEnergy, estimate_energy, system_caches
from nnopt.energy.measure import EnergyMeasurement, EnergyRange, EnergyRun, latency_energy, measure_energy
from nnopt.energy.tables import EnergyTable, available_tables, load_energy_table, parse_energy_table

__all__ = [
    "Cache", "CounterUnavailableError", "EnergyCounter", "EnergyEstimate", "EnergyMeasurement", "EnergyRange",
    "EnergyRun", "EnergyTable", "LayerEnergy", "NvmlCounter", "RaplCounter", "available_counters",
    "available_tables", "estimate_energy", "latency_energy", "load_energy_table", "measure_energy",
    "parse_energy_table", "system_caches",
]
