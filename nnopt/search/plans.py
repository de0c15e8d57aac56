"""Candidate plans: a level per (knob, unit), built from measured sensitivity, and the recipe that
realizes each one (a plan *is* a recipe: the search evaluates exactly what `nnopt optimize` replays).

Sensitivity plans follow one greedy path: starting from the input model, each step moves one
(knob, unit) to its next level, choosing the step that adds the least measured output error per
unit of proxy cost saved (:mod:`nnopt.search.costs`), with errors added over units. Plans are the
first points on that path whose predicted cost falls below each target share of the baseline's
(increasing global aggressiveness); sensitive units stay gentle because their steps cost more error.
Fine-tuning in the recipe recovers much of what one-shot probes lose, so the trials, not the
prediction, decide. Uniform plans (one level on every unit) are the controls.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from nnopt.config import Config
from nnopt.search.sensitivity import Sensitivity
from nnopt.search.space import BuildOptions, SearchSpace

# Predicted cost as a share of the baseline's, one plan per target (gentlest first).
TARGETS: dict[str, tuple[float, ...]] = {
    "size": (1 / 4, 1 / 8, 1 / 16, 1 / 24, 1 / 32, 1 / 40, 1 / 48, 1 / 64),
    "latency": (0.8, 0.6, 0.45, 0.33, 0.25, 0.18),
    "energy": (0.8, 0.6, 0.45, 0.33, 0.25, 0.18),
}
# The path stops before its predicted error passes this: validation cross-entropy up by 0.5 nats (from
# ~0.1 for a trained digits model: accuracy is then lost), or 1 − cosine 0.1 for encoders.
MAX_ERROR = {"accuracy": 0.5, "cosine": 0.1}
# Controls per objective: ({knob: level} applied to every unit, flags). Sparsity spares the final layer, as
# pruning does by default. Flags: "global-sparsity" reaches the sparsity with one magnitude threshold
# across layers (GradualPruneConfig, Zhu & Gupta) instead of per layer; "bf16-attention" runs an int8
# encoder's attention in bfloat16.
UNIFORM: dict[str, tuple[tuple[dict[str, float], tuple[str, ...]], ...]] = {
    "size": (({"sparsity": 0.9, "bits": 4}, ()), ({"sparsity": 0.95, "bits": 4}, ()),
             ({"sparsity": 0.95, "bits": 4}, ("global-sparsity",)),
             ({"sparsity": 0.96, "bits": 4}, ("global-sparsity",))),
    "latency": (({"structured": 0.5}, ()), ({"structured": 0.625}, ()), ({"int8": 8}, ()),
                ({"int8": 8}, ("bf16-attention",))),
    "energy": (({"structured": 0.5}, ()), ({"structured": 0.5, "int8": 8}, ()), ({"int8": 8}, ())),
}
FLAGS = ("global-sparsity", "bf16-attention")


@dataclasses.dataclass(frozen=True)
class Plan:
    """A level per (knob, unit); units not named keep the input model's layer as it is."""

    name: str
    assignment: tuple[tuple[str, str, float], ...]  # (knob, unit, level), sorted
    origin: str
    flags: tuple[str, ...] = ()  # see FLAGS
    predicted: dict[str, float] | None = None  # {"error", "cost_share"} on the greedy path

    def levels(self, knob: str) -> dict[str, float]:
        return {unit: level for k, unit, level in self.assignment if k == knob}

    def key(self) -> tuple[Any, ...]:
        return self.assignment, self.flags

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "assignment": [list(a) for a in self.assignment], "origin": self.origin,
                "flags": list(self.flags), "predicted": self.predicted}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        return cls(str(data["name"]), tuple((str(k), str(u), float(v)) for k, u, v in data["assignment"]),
                   str(data["origin"]), tuple(data.get("flags", ())), data.get("predicted"))


def greedy_path(space: SearchSpace, sensitivity: Sensitivity, cost: Any,
                max_error: float) -> list[tuple[dict[tuple[str, str], float], float, float]]:
    """``(state, predicted error, predicted cost)`` after each step, starting with the input model."""
    options: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for knob in space.knobs:
        for unit in space.units[knob.name]:
            envelope, worst = [], 0.0
            for level, probe in sensitivity.levels(knob.name, unit.name).items():
                if probe is None:
                    break  # a level that failed, and every harsher one, is not an option
                worst = max(worst, float(probe["error"] or 0.0))  # harsher is never predicted better
                envelope.append((level, worst))
            if envelope:
                options[(knob.name, unit.name)] = envelope
    position = dict.fromkeys(options, -1)
    state: dict[tuple[str, str], float] = {}
    error, current = 0.0, cost.total(state)
    path = [(dict(state), error, current)]
    while True:
        best = None
        for order, (key, levels) in enumerate(options.items()):
            step = position[key] + 1
            if step >= len(levels):
                continue
            level, level_error = levels[step]
            added = level_error - (levels[step - 1][1] if step else 0.0)
            if error + added > max_error:
                continue
            saved = current - cost.total({**state, key: level})
            if saved <= 0:
                continue
            rank = (added / saved, -saved, order)
            if best is None or rank < best[0]:
                best = (rank, key, step, level, added, saved)
        if best is None:
            return path
        _, key, step, level, added, saved = best
        position[key], state[key] = step, level
        error, current = error + added, current - saved
        path.append((dict(state), error, current))


def make_plans(space: SearchSpace, sensitivity: Sensitivity, model: Any,
               targets: Sequence[float] | None = None) -> list[Plan]:
    """Sensitivity plans at each target share of the baseline's predicted cost, then the uniform controls;
    duplicates dropped."""
    from nnopt.search.costs import cost_model

    plans: list[Plan] = []
    seen: set[tuple[Any, ...]] = set()

    def add(plan: Plan) -> None:
        if plan.assignment and plan.key() not in seen:
            seen.add(plan.key())
            plans.append(plan)

    cost = cost_model(space.objective, model, sensitivity)
    path = greedy_path(space, sensitivity, cost, MAX_ERROR.get(sensitivity.metric, 1.0))
    base = path[0][2]
    for target in sorted(targets or TARGETS[space.objective], reverse=True):
        point = next((p for p in path if p[2] <= target * base), None)
        if point is None:
            continue  # the path ends (error cap, or every unit at its harshest) before this target
        state, error, predicted = point
        assignment = tuple(sorted((k, u, float(v)) for (k, u), v in state.items()))
        add(Plan(f"sensitivity @{target:.3g}", assignment,
                 f"greedy on measured sensitivity down to {target:.3g}x the baseline's predicted {space.objective}",
                 predicted={"error": round(error, 6), "cost_share": round(predicted / base, 6)}))
    for uniform, flags in UNIFORM[space.objective]:
        plan = _uniform(space, uniform, flags)
        if plan is not None:
            add(plan)
    return plans


def _uniform(space: SearchSpace, levels: Mapping[str, float], flags: tuple[str, ...]) -> Plan | None:
    if not set(levels) <= {k.name for k in space.knobs}:
        return None  # a control for knobs this model does not have
    if "bf16-attention" in flags and (not space.encoder or not _bf16_native()):
        return None  # only plans this CPU runs natively: emulated bf16 takes minutes to time
    chosen = []
    for knob, level in levels.items():
        units = space.units[knob]
        if knob == "sparsity" and len(units) > 1:
            units = units[:-1]  # the classifier keeps its weights, as pruning's default does
        chosen += [(knob, u.name, float(level)) for u in units]
    label = " + ".join(f"{k} {v:g}" for k, v in levels.items()) + "".join(f" + {f}" for f in flags)
    origin = "one magnitude threshold across layers (control)" if "global-sparsity" in flags else \
        "the same level on every unit (control)"
    return Plan(f"uniform {label}", tuple(sorted(chosen)), origin, flags)


def _bf16_native() -> bool:
    from nnopt.cpu import bf16_support

    return bf16_support()[0] is True


def plan_recipe(plan: Plan, space: SearchSpace, options: BuildOptions) -> Any:
    """The :class:`nnopt.recipe.Recipe` that builds ``plan``: pruning (structured, then per-layer sparsity
    in stages with fine-tuning), recovery, BatchNorm folding, then quantization."""
    from nnopt.recipe import Recipe
    from nnopt.simplification import FoldBatchNormConfig

    options = dataclasses.replace(options, fold=space.has_batchnorm,
                                  attention_dtype="bfloat16" if "bf16-attention" in plan.flags else "float32")
    steps: list[Config] = []
    pruning = [k for k in space.knobs if k.order < 2]
    quantization = [k for k in space.knobs if k.order >= 2]
    # Structured steps recover on their own, unless staged sparsity follows: its fine-tuning recovers both.
    structured = dataclasses.replace(options, finetune_epochs=0) if plan.levels("sparsity") else options
    for knob in pruning:
        if "global-sparsity" in plan.flags and knob.name == "sparsity" and plan.levels("sparsity"):
            steps.append(_global_sparsity(plan, space, options))
        elif plan.levels(knob.name):
            steps += knob.steps(plan.levels(knob.name), space, structured if knob.name == "structured" else options)
    if options.fold:
        steps.append(FoldBatchNormConfig())  # exact: no accuracy to lose, one pass per BatchNorm saved
    for knob in quantization:
        if plan.levels(knob.name):
            steps += knob.steps(plan.levels(knob.name), space, options)
    return Recipe(steps=tuple(steps), name=plan.name, description=describe_plan(plan),
                  weights_format=space.weights_format)


def _global_sparsity(plan: Plan, space: SearchSpace, options: BuildOptions) -> Config:
    from nnopt.errors import ConfigError
    from nnopt.pruning import GradualPruneConfig

    levels = plan.levels("sparsity")
    if len(set(levels.values())) != 1:
        raise ConfigError(f"plan {plan.name!r}: global sparsity needs one level, got {sorted(set(levels.values()))}")
    layers = tuple(p for unit in levels for p in space.unit("sparsity", unit).patterns)
    return GradualPruneConfig(final_sparsity=next(iter(levels.values())), epochs=max(1, options.finetune_epochs),
                              allocation="global", layers=layers)


def describe_plan(plan: Plan) -> str:
    """One line: what each knob does, and to how many units."""
    parts = []
    for knob in dict.fromkeys(k for k, _, _ in plan.assignment):
        levels = plan.levels(knob)
        spread = sorted(set(levels.values()))
        shown = ", ".join(f"{v:g}" for v in spread)
        parts.append(f"{knob} {shown} on {len(levels)} unit{'s' if len(levels) != 1 else ''}")
    text = "; ".join(parts + list(plan.flags))
    return f"nnopt auto plan ({plan.origin}): {text}"
