"""Cumulative energy counters: RAPL through powercap, NVML total energy; a small protocol for fakes.

A counter reads a cumulative energy in joules. ``max_range`` is where it wraps to 0 (RAPL's
``max_energy_range_uj``), or None when unknown; ``update_period_s`` is how often the hardware refreshes it
(RAPL about 1 ms, NVML about 100 ms): windows shorter than that read noise or nothing.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Protocol, runtime_checkable

from nnopt.errors import NnoptError

POWERCAP = Path("/sys/class/powercap")


class CounterUnavailableError(NnoptError):
    """No energy counter can be read on this machine (no RAPL/powercap access, no NVML GPU)."""


@runtime_checkable
class EnergyCounter(Protocol):
    name: str
    max_range: float | None  # joules at which the counter wraps to 0, None when unknown
    update_period_s: float

    def read(self) -> float:
        """Cumulative energy, joules."""
        ...


@dataclasses.dataclass
class RaplCounter:
    """One RAPL domain (e.g. ``intel-rapl:0``, a CPU package) via powercap's ``energy_uj``."""

    path: Path
    update_period_s: float = 0.001

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        label = (self.path / "name").read_text().strip() if (self.path / "name").is_file() else self.path.name
        self.name = f"RAPL {self.path.name} ({label})"
        range_file = self.path / "max_energy_range_uj"
        self.max_range = int(range_file.read_text()) / 1e6 if range_file.is_file() else None

    def read(self) -> float:
        return int((self.path / "energy_uj").read_text()) / 1e6


@dataclasses.dataclass
class NvmlCounter:
    """A GPU's total energy since driver load via ``nvmlDeviceGetTotalEnergyConsumption`` (mJ)."""

    index: int = 0
    update_period_s: float = 0.1

    def __post_init__(self) -> None:
        import pynvml

        pynvml.nvmlInit()
        self._nvml = pynvml
        self._handle = pynvml.nvmlDeviceGetHandleByIndex(self.index)
        self.name = f"NVML GPU {self.index} total energy"
        self.max_range: float | None = None  # a 64-bit mJ count: never wraps in practice

    def read(self) -> float:
        millijoules: int = self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)
        return millijoules / 1e3


def rapl_counters(root: Path = POWERCAP) -> list[RaplCounter]:
    """Top-level RAPL domains (packages; subdomains would count twice) whose ``energy_uj`` is readable."""
    found = []
    for path in sorted(root.glob("intel-rapl:*")):
        if path.name.count(":") != 1:
            continue
        try:
            counter = RaplCounter(path)
            counter.read()
        except (OSError, ValueError):
            continue  # absent, or root-only since the PLATYPUS mitigation
        found.append(counter)
    return found


def nvml_counters() -> list[NvmlCounter]:
    try:
        import pynvml

        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
        found = []
        for index in range(count):
            counter = NvmlCounter(index)
            counter.read()  # raises NVMLError_NotSupported on GPUs before Volta
            found.append(counter)
        return found
    except Exception:  # pynvml missing, no driver, no GPU, unsupported: no counter
        return []


def available_counters(device: str = "cpu") -> list[EnergyCounter]:
    """Counters that can be read now: RAPL packages for ``"cpu"``, NVML for ``"cuda"``."""
    return list(nvml_counters()) if device.startswith("cuda") else list(rapl_counters())


def describe_unavailable(device: str = "cpu") -> str:
    if device.startswith("cuda"):
        return "no NVML energy counter (pynvml not importable, no GPU, or the GPU does not report total energy)"
    if not POWERCAP.exists():
        return f"no energy counter: {POWERCAP} is absent (no RAPL, e.g. a virtual machine)"
    return f"no readable RAPL counter under {POWERCAP} (absent, or energy_uj readable by root only)"
