"""Per-unit sensitivity: what changing only one unit does, one-shot, on the validation split.

For every knob of the space, every unit and every level, the input model gets exactly that change
(one layer pruned to a sparsity, quantized to a width, one channel group cut by a ratio, one block
made int8) through a one-step recipe, with no fine-tuning, and is scored on the validation split:

- ``drop``: baseline quality minus the probe's (accuracy, or mean cosine for encoders);
- ``error``: a continuous measure of the output change (validation cross-entropy increase, or 1 − cosine), which
  separates small changes that a few hundred rows of accuracy cannot, and adds up roughly over units;
  pruning probes get ``recover_epochs`` of fine-tuning first when plans fine-tune after pruning (one-shot
  pruning errors overstate what remains after recovery many times over: LeNet-300-100 loses 20 points at
  95% one-shot and none after recovery), less the error of that fine-tuning alone (a control probe);
- ``cost``: the objective's proxy cost of the probe model (see :mod:`nnopt.search.costs`), where the
  objective's cost is additive over units; None for size, which is modelled analytically.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from torch import nn

from nnopt.errors import NnoptError
from nnopt.progress import track
from nnopt.search.space import BuildOptions, SearchSpace

ONE_SHOT = BuildOptions(finetune_epochs=0, fold=False)
Probe = dict[str, float | None]  # {"drop", "error", "cost"}


@dataclasses.dataclass(frozen=True)
class Sensitivity:
    """``probes[knob][unit][level]``: the probe's figures, or None where it failed (not an option)."""

    metric: str
    baseline: float
    base_cost: float | None
    probes: dict[str, dict[str, dict[float, Probe | None]]]
    failures: dict[str, str] = dataclasses.field(default_factory=dict)  # "knob unit level" -> reason

    def levels(self, knob: str, unit: str) -> dict[float, Probe | None]:
        return self.probes.get(knob, {}).get(unit, {})

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "baseline": self.baseline, "base_cost": self.base_cost,
                "failures": self.failures,
                "probes": {k: {u: [[lv, p] for lv, p in levels.items()] for u, levels in units.items()}
                           for k, units in self.probes.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Sensitivity:
        probes = {k: {u: {float(lv): p for lv, p in pairs} for u, pairs in units.items()}
                  for k, units in data["probes"].items()}
        return cls(str(data["metric"]), float(data["baseline"]), data.get("base_cost"), probes,
                   dict(data.get("failures", {})))

    def rows(self) -> list[dict[str, Any]]:
        """One row per (knob, unit, level), for reports."""
        return [{"knob": k, "unit": u, "level": lv, **(p or {"failed": True})}
                for k, units in self.probes.items() for u, levels in units.items() for lv, p in levels.items()]


def probe_count(space: SearchSpace) -> int:
    return sum(len(space.units[k.name]) * len(k.levels) for k in space.knobs)


def measure_sensitivity(model: nn.Module, task: Any, space: SearchSpace, progress: bool | None = None,
                        recover_epochs: int = 0) -> Sensitivity:
    """Score every one-unit, one-level change of ``model`` on the validation split."""
    from nnopt.recipe import Recipe, apply_recipe
    from nnopt.search.costs import probe_cost
    from nnopt.training import TrainConfig

    data = task.search_data()
    reference = task.outputs(model, "validation")
    baseline = task.score(reference, "validation")
    probes: dict[str, dict[str, dict[float, Probe | None]]] = {}
    failures: dict[str, str] = {}
    recovery = (TrainConfig(epochs=recover_epochs),) if recover_epochs and data is not None else ()
    drift = 0.0
    if recovery:  # what the recovery alone changes, so that it is not charged to the unit
        drift = task.error(task.outputs(apply_recipe(model, Recipe(steps=recovery), data=data), "validation"),
                           reference)
    with track("sensitivity", total=probe_count(space), enabled=progress) as bar:
        for knob in space.knobs:
            per_unit = probes.setdefault(knob.name, {})
            for unit in space.units[knob.name]:
                levels = per_unit.setdefault(unit.name, {})
                for level in knob.levels:
                    try:
                        steps = knob.steps({unit.name: level}, space, ONE_SHOT)
                        recovers = recovery if knob.order < 2 else ()
                        probe = apply_recipe(model, Recipe(steps=(*steps, *recovers)), data=data, progress=False)
                        outputs = task.outputs(probe, "validation")
                        raw = task.error(outputs, reference)
                        levels[level] = {"drop": baseline - task.score(outputs, "validation"),
                                         "error": max(0.0, raw - drift) if recovers else raw, "raw_error": raw,
                                         "cost": probe_cost(space.objective, probe)}
                    except NnoptError as exc:  # e.g. a group too small to cut: that level is not an option
                        levels[level] = None
                        failures[f"{knob.name} {unit.name} {level:g}"] = str(exc)
                    bar.advance(status=f"{knob.name} {unit.name}")
    return Sensitivity(task.metric, baseline, probe_cost(space.objective, model), probes, failures)
