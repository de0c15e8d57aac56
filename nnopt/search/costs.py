"""Predicted cost of a plan before it is built: only to rank candidate plans, never reported as a result.

- size: an analytic byte count per layer, ``n·(1 − s)·b / 8`` for the non-zero codes plus ``n·H(s) / 8``
  for their positions (H: binary entropy), which is what the packed format approaches; sparsity and
  width interact here (narrowing a 95%-sparse layer saves little), so it is computed on the whole plan;
- latency: MACs per sample, an int8 MAC counted as :data:`INT8_MAC_COST` of an fp32 one (the MAC
  reduction is what structured pruning's speed-up approaches, BENCHMARKS.md), saved per unit as its
  probe measured and added over units;
- energy: the latency proxy. Energy is active power × time, and plans of one model run at one power, so the
  predicted energy is the predicted time (the analytic table's picojoules would call int8 cheap on a CPU
  where it runs ten times slower).

The trials then measure what each plan really costs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

INT8_MAC_COST = 1 / 3  # about the int8 GEMM speed-up measured on MiniLM's layers (2.8x); the ceiling is 4x
State = Mapping[tuple[str, str], float]  # (knob, unit) -> level


def mac_cost(model: nn.Module) -> float:
    from nnopt.metrics import profile_model

    return float(sum(layer.macs * (INT8_MAC_COST if layer.dtype.startswith("int8") else 1.0)
                     for layer in profile_model(model).layers))


PROBE_COSTS: dict[str, Callable[[nn.Module], float] | None] = {"size": None, "latency": mac_cost,
                                                               "energy": mac_cost}


def probe_cost(objective: str, model: nn.Module) -> float | None:
    fn = PROBE_COSTS[objective]
    return None if fn is None else fn(model)


class AdditiveCost:
    """The base cost less what each unit's probe saved at its level."""

    def __init__(self, base: float, saved: Mapping[tuple[str, str, float], float]) -> None:
        self.base = base
        self.saved = saved

    def total(self, state: State) -> float:
        return self.base - sum(self.saved.get((knob, unit, level), 0.0) for (knob, unit), level in state.items())


class SizeCost:
    """Analytic bytes of every Linear/Conv2d weight under a plan's sparsity and width per layer."""

    def __init__(self, numels: Mapping[str, int]) -> None:
        self.numels = numels

    def total(self, state: State) -> float:
        total = 0.0
        for layer, n in self.numels.items():
            s = state.get(("sparsity", layer), 0.0)
            bits = state.get(("bits", layer), 32.0)
            total += n * ((1 - s) * bits + _entropy(s)) / 8
        return total


def _entropy(p: float) -> float:
    return 0.0 if p <= 0 or p >= 1 else -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def cost_model(objective: str, model: nn.Module, sensitivity: Any) -> AdditiveCost | SizeCost:
    """The proxy cost the planner ranks plans by (see the module docstring)."""
    if objective == "size":
        numels = {name: m.weight.numel() for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
        return SizeCost(numels)
    saved = {}
    for knob, units in sensitivity.probes.items():
        for unit, levels in units.items():
            for level, probe in levels.items():
                if probe is not None and probe.get("cost") is not None:
                    saved[(knob, unit, level)] = float(sensitivity.base_cost) - float(probe["cost"])
    return AdditiveCost(float(sensitivity.base_cost), saved)
