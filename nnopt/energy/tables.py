"""Versioned energy tables: picojoules per arithmetic operation and per 64-bit memory read.

A table is a YAML file (see ``nnopt/resources/energy/horowitz-45nm.yaml``) with ``version``, ``name``,
``source``, ``process``, ``uncertainty_factor``, ``compute_pj`` (``add``/``multiply`` per dtype), ``mac``
(each MAC dtype as a multiply dtype plus an accumulate dtype) and ``memory_pj_per_64bit`` (SRAM levels with
``size_bytes`` and ``pj``, and ``dram`` with ``pj: [low, high]``). Every problem is a ConfigError naming the key.
"""

from __future__ import annotations

import dataclasses
import math
from importlib import resources
from pathlib import Path
from typing import Any

from nnopt.errors import ConfigError

DEFAULT_TABLE = "horowitz-45nm"
SUPPORTED_VERSIONS = (1,)
_OPS = ("add", "multiply")


@dataclasses.dataclass(frozen=True)
class MemoryLevel:
    """One SRAM level of the table: capacity and energy of a 64-bit read."""

    name: str
    size_bytes: int
    pj_per_64bit: float

    @property
    def pj_per_byte(self) -> float:
        return self.pj_per_64bit / 8.0


@dataclasses.dataclass(frozen=True)
class EnergyTable:
    name: str
    version: int
    source: str
    process: str
    uncertainty_factor: float
    compute_pj: dict[str, dict[str, float]]  # op -> dtype -> pJ
    mac: dict[str, tuple[str, str]]  # MAC dtype -> (multiply dtype, accumulate dtype)
    sram: tuple[MemoryLevel, ...]  # ascending size
    dram_pj_per_64bit: tuple[float, float]  # (low, high)

    @property
    def label(self) -> str:
        return f"estimated: analytic table {self.name} ({self.source}; {self.process})"

    def op_pj(self, op: str, dtype: str) -> float:
        try:
            return self.compute_pj[op][dtype]
        except KeyError:
            raise ConfigError(f"energy table {self.name}: no compute_pj.{op}.{dtype} (unknown dtype {dtype!r}; "
                              f"known: {', '.join(sorted(self.compute_pj.get(op, {})))})") from None

    def mac_pj(self, dtype: str) -> float:
        """Energy of one multiply-accumulate of ``dtype`` (multiply + add at the accumulate precision)."""
        if dtype not in self.mac:
            raise ConfigError(f"energy table {self.name}: no mac.{dtype} (unknown dtype {dtype!r}; "
                              f"known: {', '.join(sorted(self.mac))})")
        multiply, accumulate = self.mac[dtype]
        return self.op_pj("multiply", multiply) + self.op_pj("add", accumulate)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "version": self.version, "source": self.source, "process": self.process,
            "uncertainty_factor": self.uncertainty_factor, "compute_pj": self.compute_pj,
            "mac": {k: {"multiply": m, "accumulate": a} for k, (m, a) in self.mac.items()},
            "memory_pj_per_64bit": {
                **{lv.name: {"size_bytes": lv.size_bytes, "pj": lv.pj_per_64bit} for lv in self.sram},
                "dram": {"pj": list(self.dram_pj_per_64bit)},
            },
        }


def available_tables() -> list[str]:
    """Names of the tables shipped with nnopt."""
    folder = resources.files("nnopt.resources") / "energy"
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_energy_table(path_or_name: str | Path = DEFAULT_TABLE) -> EnergyTable:
    """Load a shipped table by name (``"horowitz-45nm"``) or a user YAML file by path.

    >>> load_energy_table().mac_pj("int8")  # int8 multiply + int32 add, pJ
    0.30000000000000004
    """
    import yaml

    text, origin = _read(path_or_name)
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"energy table {origin}: not valid YAML ({str(exc).splitlines()[0]})") from None
    return parse_energy_table(doc, origin)


def _read(path_or_name: str | Path) -> tuple[str, str]:
    candidate = Path(path_or_name)
    if candidate.suffix in (".yaml", ".yml") or candidate.exists():
        if not candidate.is_file():
            raise ConfigError(f"energy table {candidate}: no such file")
        return candidate.read_text(encoding="utf-8"), str(candidate)
    name = str(path_or_name)
    resource = resources.files("nnopt.resources") / "energy" / f"{name}.yaml"
    if "/" in name or not resource.is_file():
        raise ConfigError(f"unknown energy table {name!r}; shipped: {', '.join(available_tables())}, "
                          "or give the path of a .yaml file")
    return resource.read_text(encoding="utf-8"), name


def _require(doc: dict[str, Any], key: str, where: str, origin: str) -> Any:
    if key not in doc:
        raise ConfigError(f"energy table {origin}: missing key {where}{key}")
    return doc[key]


def _energy(value: Any, key: str, origin: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"energy table {origin}: {key} must be a finite number, got {value!r}")
    if value < 0:
        raise ConfigError(f"energy table {origin}: {key} must be >= 0, got {value}")
    return float(value)


def parse_energy_table(doc: Any, origin: str = "<dict>") -> EnergyTable:
    """Validate a table document (already parsed YAML) and build an :class:`EnergyTable`."""
    if not isinstance(doc, dict):
        raise ConfigError(f"energy table {origin}: expected a mapping at the top level, got {type(doc).__name__}")
    known = {"version", "name", "source", "process", "uncertainty_factor", "compute_pj", "mac", "memory_pj_per_64bit"}
    unknown = sorted(set(doc) - known)
    if unknown:
        raise ConfigError(f"energy table {origin}: unknown key {unknown[0]}")
    version = _require(doc, "version", "", origin)
    if version not in SUPPORTED_VERSIONS:
        raise ConfigError(f"energy table {origin}: version {version!r} is not supported (supported: 1)")
    source = str(_require(doc, "source", "", origin))
    process = str(_require(doc, "process", "", origin))
    name = str(doc.get("name") or Path(origin).stem)
    factor = _energy(_require(doc, "uncertainty_factor", "", origin), "uncertainty_factor", origin)
    if factor < 1:
        raise ConfigError(f"energy table {origin}: uncertainty_factor must be >= 1, got {factor}")

    compute = _require(doc, "compute_pj", "", origin)
    if not isinstance(compute, dict):
        raise ConfigError(f"energy table {origin}: compute_pj must be a mapping of add/multiply to dtypes")
    compute_pj: dict[str, dict[str, float]] = {}
    for op in _OPS:
        per_dtype = _require(compute, op, "compute_pj.", origin)
        if not isinstance(per_dtype, dict) or not per_dtype:
            raise ConfigError(f"energy table {origin}: compute_pj.{op} must map dtypes to pJ")
        compute_pj[op] = {str(d): _energy(v, f"compute_pj.{op}.{d}", origin) for d, v in per_dtype.items()}
    extra_ops = sorted(set(compute) - set(_OPS))
    if extra_ops:
        raise ConfigError(f"energy table {origin}: unknown key compute_pj.{extra_ops[0]} (ops: add, multiply)")

    mac_doc = _require(doc, "mac", "", origin)
    if not isinstance(mac_doc, dict) or not mac_doc:
        raise ConfigError(f"energy table {origin}: mac must map MAC dtypes to {{multiply, accumulate}}")
    mac: dict[str, tuple[str, str]] = {}
    for dtype, parts in mac_doc.items():
        if not isinstance(parts, dict):
            raise ConfigError(f"energy table {origin}: mac.{dtype} must be {{multiply: DTYPE, accumulate: DTYPE}}")
        multiply = str(_require(parts, "multiply", f"mac.{dtype}.", origin))
        accumulate = str(_require(parts, "accumulate", f"mac.{dtype}.", origin))
        if multiply not in compute_pj["multiply"]:
            raise ConfigError(f"energy table {origin}: mac.{dtype}.multiply names unknown dtype {multiply!r} "
                              f"(not in compute_pj.multiply)")
        if accumulate not in compute_pj["add"]:
            raise ConfigError(f"energy table {origin}: mac.{dtype}.accumulate names unknown dtype {accumulate!r} "
                              f"(not in compute_pj.add)")
        mac[str(dtype)] = (multiply, accumulate)

    memory = _require(doc, "memory_pj_per_64bit", "", origin)
    if not isinstance(memory, dict):
        raise ConfigError(f"energy table {origin}: memory_pj_per_64bit must be a mapping of levels")
    dram = _require(memory, "dram", "memory_pj_per_64bit.", origin)
    dram_pj = _require(dram, "pj", "memory_pj_per_64bit.dram.", origin) if isinstance(dram, dict) else None
    if not (isinstance(dram_pj, list) and len(dram_pj) == 2):
        raise ConfigError(f"energy table {origin}: memory_pj_per_64bit.dram.pj must be a [low, high] range")
    low = _energy(dram_pj[0], "memory_pj_per_64bit.dram.pj[0]", origin)
    high = _energy(dram_pj[1], "memory_pj_per_64bit.dram.pj[1]", origin)
    if low > high:
        raise ConfigError(f"energy table {origin}: memory_pj_per_64bit.dram.pj must be [low, high] with low <= high")
    sram = []
    for level, spec in memory.items():
        if level == "dram":
            continue
        where = f"memory_pj_per_64bit.{level}."
        if not isinstance(spec, dict):
            raise ConfigError(f"energy table {origin}: {where[:-1]} must be {{size_bytes: N, pj: X}}")
        size = _require(spec, "size_bytes", where, origin)
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ConfigError(f"energy table {origin}: {where}size_bytes must be an integer >= 1, got {size!r}")
        sram.append(MemoryLevel(str(level), size, _energy(_require(spec, "pj", where, origin), f"{where}pj", origin)))
    if not sram:
        raise ConfigError(f"energy table {origin}: memory_pj_per_64bit needs at least one SRAM level besides dram")
    sram.sort(key=lambda lv: lv.size_bytes)
    return EnergyTable(name=name, version=int(version), source=source, process=process, uncertainty_factor=factor,
                       compute_pj=compute_pj, mac=mac, sram=tuple(sram), dram_pj_per_64bit=(low, high))
