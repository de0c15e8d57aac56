"""Energy: per inference on the device (active power × measured time), analytic estimates from versioned
tables (where the energy goes), counter measurements (RAPL, NVML).

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
from nnopt.energy.device_energy import (
    ActivePower,
    DeviceEnergy,
    cpu_active_power,
    device_energy,
    measured_power,
)
from nnopt.energy.estimate import Cache, EnergyEstimate, LayerEnergy, estimate_energy, system_caches
from nnopt.energy.measure import EnergyMeasurement, EnergyRange, EnergyRun, latency_energy, measure_energy
from nnopt.energy.tables import EnergyTable, available_tables, load_energy_table, parse_energy_table

__all__ = [
    "ActivePower", "Cache", "CounterUnavailableError", "DeviceEnergy", "EnergyCounter", "EnergyEstimate",
    "EnergyMeasurement", "EnergyRange", "EnergyRun", "EnergyTable", "LayerEnergy", "NvmlCounter", "RaplCounter",
    "available_counters", "available_tables", "cpu_active_power", "device_energy", "estimate_energy",
    "latency_energy", "load_energy_table", "measure_energy", "measured_power", "parse_energy_table",
    "system_caches",
]
