"""Analytic energy estimate: Σ MACs executed × e_MAC(dtype) + Σ bytes moved × e_byte(memory level).

Per layer, forward hooks on one batch of zeros record what the layer's kernel executes (nnopt's compressed
layers say it themselves, through :meth:`nnopt.layers.protocol.CompressedLayer.kernel_cost`):

- dense kernels (nn.Linear, nn.Conv*) execute every MAC, zeros included: a pruned dense layer costs the same;
- :class:`~nnopt.layers.sparse.SparseLinear` (CSR) executes one MAC per stored non-zero per row;
- int8 kernels (Int8DynamicLinear, Int8StaticLinear/Conv2d) execute int8 MACs (int32 accumulate) plus the
  activation quantization pass (a scale and round per input element; dynamic layers also a min/max pass) and
  the requantization of each output (a multiply and an add in fp32);
- weight-only int8/int4 layers dequantize their codes: fp32 MACs on the "dequantize" path (plus a multiply and
  add per weight), bf16 MACs on the CPU int8pack/int4pack kernels; clustered layers gather fp32 weights from
  a codebook (fp32 MACs). Fewer weight bytes are moved than for fp32 weights;
- structured-pruned layers are simply smaller layers.

Bytes moved = the layer's weights (read once per batch, as stored) + its input and output activations at the
batch (writes costed like reads). The memory level is the smallest CPU cache (from sysfs) that holds that
working set, costed at the table's SRAM level nearest in size; a working set larger than every cache is DRAM.
Not counted: elementwise and normalization layers, attention products (functional matmuls in MiniLM),
activations of layers without weights. Every figure is an estimate, labelled with its table.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nnopt.energy.tables import DEFAULT_TABLE, EnergyTable, MemoryLevel, load_energy_table
from nnopt.errors import ConfigError
from nnopt.layers.protocol import float_dtype_name, own_bytes

CACHE_ROOT = Path("/sys/devices/system/cpu/cpu0/cache")
DRAM = "dram"
NOT_COUNTED = ("elementwise and normalization layers, attention products (functional matmuls), "
               "activations of layers without weights")


@dataclasses.dataclass(frozen=True)
class Cache:
    """One CPU data cache as the system reports it (or a table level when the system reports none)."""

    name: str
    size_bytes: int


@dataclasses.dataclass(frozen=True)
class LayerEnergy:
    """One layer at the estimate's batch: what its kernel executes and moves, and the energy in pJ."""

    name: str
    type: str
    kernel: str
    dtype: str  # the MAC dtype
    macs: int  # executed, whole batch
    extra_ops: tuple[tuple[str, str, int], ...]  # (op, dtype, count), e.g. the activation quantization pass
    weight_bytes: int
    activation_bytes: int
    level: str  # cache that holds the working set, or "dram"
    table_level: str  # the table entry used to cost it
    compute_pj: float
    compute_pj_low: float
    compute_pj_high: float
    memory_pj: float
    memory_pj_low: float
    memory_pj_high: float

    @property
    def bytes_moved(self) -> int:
        return self.weight_bytes + self.activation_bytes

    @property
    def total_pj(self) -> float:
        return self.compute_pj + self.memory_pj

    @property
    def total_pj_low(self) -> float:
        return self.compute_pj_low + self.memory_pj_low

    @property
    def total_pj_high(self) -> float:
        return self.compute_pj_high + self.memory_pj_high

    def to_dict(self) -> dict[str, Any]:
        return {
            **{k: v for k, v in dataclasses.asdict(self).items() if k != "extra_ops"},
            "extra_ops": [{"op": op, "dtype": dt, "count": n} for op, dt, n in self.extra_ops],
            "bytes_moved": self.bytes_moved, "total_pj": self.total_pj,
            "total_pj_low": self.total_pj_low, "total_pj_high": self.total_pj_high,
        }


@dataclasses.dataclass(frozen=True)
class EnergyEstimate:
    """Per-layer estimates at ``batch``; totals per inference (the batch's energy / batch)."""

    layers: tuple[LayerEnergy, ...]
    batch: int
    table: EnergyTable
    caches: tuple[Cache, ...]
    cache_source: str

    @property
    def method(self) -> str:
        return self.table.label

    def _sum(self, field: str) -> float:
        return sum(getattr(layer, field) for layer in self.layers) / self.batch

    @property
    def macs_per_inference(self) -> float:
        return self._sum("macs")

    @property
    def compute_mj(self) -> float:
        return self._sum("compute_pj") * 1e-9

    @property
    def memory_mj(self) -> float:
        return self._sum("memory_pj") * 1e-9

    @property
    def total_mj(self) -> float:
        return self._sum("total_pj") * 1e-9

    @property
    def total_mj_low(self) -> float:
        return self._sum("total_pj_low") * 1e-9

    @property
    def total_mj_high(self) -> float:
        return self._sum("total_pj_high") * 1e-9

    def summary(self) -> str:
        return (f"{self.total_mj:.4g} mJ per inference (bounds {self.total_mj_low:.4g}–{self.total_mj_high:.4g} mJ; "
                f"compute {self.compute_mj:.4g}, memory {self.memory_mj:.4g}) at batch {self.batch} — {self.method}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method, "table": self.table.to_dict(), "batch": self.batch,
            "caches": [dataclasses.asdict(c) for c in self.caches], "cache_source": self.cache_source,
            "per_inference": {
                "macs": self.macs_per_inference, "compute_mj": self.compute_mj, "memory_mj": self.memory_mj,
                "total_mj": self.total_mj, "total_mj_low": self.total_mj_low, "total_mj_high": self.total_mj_high,
            },
            "layers": [layer.to_dict() for layer in self.layers],
            "layer_figures": f"whole batch of {self.batch}",
            "not_counted": NOT_COUNTED,
            "bounds": (f"compute and SRAM energies within ÷/× {self.table.uncertainty_factor:g} "
                       "(process-node scaling); DRAM over the table's [low, high] range"),
        }

    def __str__(self) -> str:
        from nnopt.metrics.table import render_table

        b = self.batch
        rows: list[tuple[object, ...]] = [
            (lv.name, lv.type, lv.kernel, lv.dtype, round(lv.macs / b), lv.compute_pj / b * 1e-3,
             round(lv.bytes_moved / b), _level_label(lv), lv.memory_pj / b * 1e-3, lv.total_pj / b * 1e-3,
             f"{lv.total_pj_low / b * 1e-3:.4g}–{lv.total_pj_high / b * 1e-3:.4g}")
            for lv in self.layers
        ]
        rows.append(("total", "", "", "", round(self.macs_per_inference), self.compute_mj * 1e6,
                     round(self._sum("bytes_moved")), "", self.memory_mj * 1e6, self.total_mj * 1e6,
                     f"{self.total_mj_low * 1e6:.4g}–{self.total_mj_high * 1e6:.4g}"))
        columns = ("layer", "type", "kernel", "MAC dtype", "MACs", "compute nJ", "bytes moved", "memory level",
                   "memory nJ", "total nJ", "bounds nJ")
        caches = ", ".join(f"{c.name} {c.size_bytes // 1024} KiB" for c in self.caches)
        caption = (f"{self.method}. Per inference at batch {b} (weights read once per batch). Caches: {caches} "
                   f"({self.cache_source}). Bounds: compute and SRAM ÷/× {self.table.uncertainty_factor:g}, "
                   f"DRAM {self.table.dram_pj_per_64bit[0]:g}–{self.table.dram_pj_per_64bit[1]:g} pJ per 64 bits. "
                   f"Not counted: {NOT_COUNTED}.")
        return render_table(columns, rows, caption=caption)


def _level_label(layer: LayerEnergy) -> str:
    return layer.level if layer.level == DRAM else f"{layer.level} ≈ {layer.table_level}"


# -- caches ------------------------------------------------------------------------------------------


def system_caches(root: Path = CACHE_ROOT) -> tuple[Cache, ...]:
    """CPU 0's data and unified caches from sysfs (``index*/level``, ``type``, ``size``), smallest first;
    empty when the system does not report them."""
    caches = []
    for index in sorted(root.glob("index*")):
        try:
            level = (index / "level").read_text().strip()
            kind = (index / "type").read_text().strip()
            size = _parse_size((index / "size").read_text().strip())
        except (OSError, ValueError):
            continue
        if kind == "Instruction" or size is None:
            continue
        caches.append(Cache(f"L{level}{'d' if kind == 'Data' else ''}", size))
    return tuple(sorted(set(caches), key=lambda c: c.size_bytes))


def _parse_size(text: str) -> int | None:
    units = {"K": 1024, "M": 1024**2, "G": 1024**3}
    if text and text[-1].upper() in units:
        return int(text[:-1]) * units[text[-1].upper()]
    return int(text) if text.isdigit() else None


def _caches_for(table: EnergyTable, caches: Sequence[Cache] | None) -> tuple[tuple[Cache, ...], str]:
    if caches is not None:
        return tuple(sorted(caches, key=lambda c: c.size_bytes)), "given"
    found = system_caches()
    if found:
        return found, f"read from {CACHE_ROOT}"
    return (tuple(Cache(lv.name, lv.size_bytes) for lv in table.sram),
            f"system caches unreadable ({CACHE_ROOT}): the table's SRAM sizes used instead")


def memory_level(working_set: int, caches: Sequence[Cache], table: EnergyTable) -> tuple[str, MemoryLevel | None]:
    """The smallest cache that holds ``working_set`` bytes and the table level nearest to it in size
    (log scale); ``("dram", None)`` when no cache holds it."""
    for cache in caches:
        if working_set <= cache.size_bytes:
            nearest = min(table.sram, key=lambda lv: abs(math.log(lv.size_bytes / cache.size_bytes)))
            return cache.name, nearest
    return DRAM, None


# -- the estimate ------------------------------------------------------------------------------------


def estimate_energy(
    model: nn.Module,
    batch: int = 1,
    input_shape: Sequence[int] | None = None,
    table: str | Path | EnergyTable = DEFAULT_TABLE,
    caches: Sequence[Cache] | None = None,
    input_dtype: torch.dtype | None = None,
) -> EnergyEstimate:
    """Analytic energy of one forward pass of ``model`` on ``(batch, *input_shape)`` zeros, per layer
    (integer ids for a model that starts with an embedding, unless ``input_dtype`` says otherwise).

    >>> import nnopt
    >>> est = estimate_energy(nnopt.create_model("simplenet", seed=0))
    >>> est.total_mj > 0 and est.method.startswith("estimated: analytic table horowitz-45nm")
    True
    """
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ConfigError(f"batch must be an integer >= 1, got {batch!r}")
    energy_table = table if isinstance(table, EnergyTable) else load_energy_table(table)
    from nnopt.metrics.profile import model_input_shape

    shape = tuple(input_shape or model_input_shape(model))
    cache_list, cache_source = _caches_for(energy_table, caches)
    records = _trace(model, batch, shape, input_dtype)
    layers = tuple(_cost(name, module, rec, energy_table, cache_list) for name, module, rec in records)
    return EnergyEstimate(layers, batch, energy_table, cache_list, cache_source)


@dataclasses.dataclass
class _Record:
    kernel: str
    dtype: str
    macs: int
    extra_ops: list[tuple[str, str, int]]
    weight_bytes: int
    activation_bytes: int


def _trace(model: nn.Module, batch: int, shape: tuple[int, ...],
           input_dtype: torch.dtype | None = None) -> list[tuple[str, nn.Module, _Record]]:
    from nnopt.metrics.profile import hooked_forward, probe_input

    records: dict[str, _Record] = {}

    def on_call(name: str, module: nn.Module, args: tuple, output: Any) -> None:
        record = _record(module, args, output)
        if record is None:
            return
        if name in records:  # a layer called twice (weight sharing): both calls execute
            old = records[name]
            old.macs += record.macs
            old.extra_ops += record.extra_ops
            old.activation_bytes += record.activation_bytes
        else:
            records[name] = record

    modules = dict(model.named_modules())
    hooked_forward(model, probe_input(model, batch, shape, input_dtype), on_call)
    return [(name, modules[name], records[name]) for name in modules if name in records]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _record(module: nn.Module, args: tuple, output: Any) -> _Record | None:
    from nnopt.layers.protocol import CompressedLayer
    from nnopt.metrics.profile import layer_macs

    outputs = [o for o in (output if isinstance(output, tuple) else (output,)) if isinstance(o, torch.Tensor)]
    if not outputs:
        return None
    inputs = [a for a in args if isinstance(a, torch.Tensor)]
    act_bytes = sum(_nbytes(a) for a in inputs) + sum(_nbytes(o) for o in outputs)

    if isinstance(module, CompressedLayer):  # the layer says what its kernel executes here
        cost = module.kernel_cost(inputs, outputs[0])
        return _Record(cost.kernel, cost.dtype, cost.macs, list(cost.extra_ops), cost.weight_bytes,
                       act_bytes + cost.extra_bytes)
    if isinstance(module, nn.Embedding):
        # A lookup reads only the gathered rows; no MACs.
        return _Record("lookup", float_dtype_name(outputs[0].dtype), 0, [],
                       outputs[0].numel() * module.weight.element_size(), act_bytes)
    macs = layer_macs(module, output, args)
    if not macs:
        return None
    # A composite layer (nn.MultiheadAttention, compressed recurrent/attention parts) reads its children's
    # weights too; its arithmetic runs in its float weights' dtype, or its output's when all are codes.
    weights = [p for p in module.parameters() if p.is_floating_point()]
    weight_bytes = own_bytes(module) + sum(own_bytes(child) for child in module.modules() if child is not module)
    if callable(getattr(module, "own_macs", None)):  # its layers report their own weights and activations
        weight_bytes, act_bytes = own_bytes(module), 0
    dtype = weights[0].dtype if weights else outputs[0].dtype
    return _Record("dense", float_dtype_name(dtype), macs, [], weight_bytes, act_bytes)


def _cost(name: str, module: nn.Module, rec: _Record, table: EnergyTable, caches: Sequence[Cache]) -> LayerEnergy:
    f = table.uncertainty_factor
    compute = rec.macs * table.mac_pj(rec.dtype) if rec.macs else 0.0
    compute += sum(n * table.op_pj(op, dt) for op, dt, n in rec.extra_ops)
    moved = rec.weight_bytes + rec.activation_bytes
    level, sram = memory_level(moved, caches, table)
    if sram is None:
        low, high = (moved / 8.0 * pj for pj in table.dram_pj_per_64bit)
        memory, table_level = (low + high) / 2, DRAM
    else:
        memory, table_level = moved * sram.pj_per_byte, sram.name
        low, high = memory / f, memory * f
    return LayerEnergy(
        name=name, type=type(module).__name__, kernel=rec.kernel, dtype=rec.dtype, macs=rec.macs,
        extra_ops=tuple(rec.extra_ops), weight_bytes=rec.weight_bytes, activation_bytes=rec.activation_bytes,
        level=level, table_level=table_level, compute_pj=compute, compute_pj_low=compute / f,
        compute_pj_high=compute * f, memory_pj=memory, memory_pj_low=low, memory_pj_high=high,
    )
