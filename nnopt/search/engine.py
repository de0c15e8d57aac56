"""The search: sensitivity, candidate plans, trials (in parallel where asked), serial latency timing,
the Pareto front and the choice within the accuracy budget, checkpointed after every step.

Energy is ranked as active power × measured time (:func:`nnopt.search.trials.timed_energy`): every plan is timed
beside the baseline as for latency, at one power for all of them, so the ranking follows the measured time."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nnopt.metrics.speed import MIN_SPEEDUP
from nnopt.progress import track
from nnopt.search.checkpoint import Checkpoint
from nnopt.search.config import AutoConfig
from nnopt.search.pareto import choose, closest, meets, pareto_front
from nnopt.search.plans import Plan, make_plans
from nnopt.search.sensitivity import Sensitivity, measure_sensitivity
from nnopt.search.trials import (
    TrialContext,
    energy_fields,
    energy_method,
    run_trials,
    screen_latency,
    time_models,
    timed_energy,
)

if TYPE_CHECKING:
    from nnopt.energy import ActivePower

TRIAL_SHARE = 0.9  # of budget_minutes in which trials may start; screening and confirmation get the rest
# Objectives ranked by a timing beside the baseline: latency, and energy (power × that time). A plan must be
# measurably faster than the input to be chosen for either: at equal power, slower means more energy.
TIMED = ("latency", "energy")


@dataclasses.dataclass
class SearchOutcome:
    """Every trial (in plan order), the front (cheapest first) and the chosen trial, or None."""

    baseline: float
    sensitivity: Sensitivity
    trials: list[dict[str, Any]]
    front: list[dict[str, Any]]
    chosen: dict[str, Any] | None
    closest: list[dict[str, Any]]
    budget: dict[str, Any]
    objective_method: str
    deadline: float = float("inf")  # time.monotonic() at which budget_minutes runs out (the report's timing too)
    power: ActivePower | None = None  # the active power every energy figure of this search is taken at

    @property
    def only_slower(self) -> bool:
        """Nothing chosen although plans met the accuracy budget: none was faster than the baseline."""
        return self.chosen is None and bool(self.closest) and all(
            (t.get("latency_ms") or {}).get("speedup", MIN_SPEEDUP) < MIN_SPEEDUP and t.get("meets_budget")
            for t in self.closest)

    def seconds_left(self) -> float:
        return max(0.0, self.deadline - time.monotonic())


def objective_method(objective: str, batch: int, threads: int, counter: str | None = None,
                     power: ActivePower | None = None) -> str:
    from nnopt.energy import cpu_active_power
    from nnopt.energy.counters import describe_unavailable

    latency = (f"median ms per call at batch {batch}, {threads} threads, time.perf_counter, alternated with the "
               "baseline")
    # Plans are ranked at one power, by their measured time; a counter's readings (whole package or board, a
    # window per plan) are reported beside as energy_measured_nj, never mixed into the ranking.
    measured = (f"each plan also measured with {counter} (energy_measured_nj, idle power subtracted; "
                "nnopt.measure_energy), reported beside, not ranked" if counter
                else f"not measured: {describe_unavailable()}")
    energy = (f"{energy_method(batch, power or cpu_active_power(threads))}; ranked at equal power, so by the "
              f"measured time ({latency}); {measured}")
    return {
        "size": "measured (bytes of the weights file written, nnopt's packed format)",
        "latency": f"measured ({latency})",
        "energy": energy,
    }[objective]


# What each objective reads from a trial: lower is better.
OBJECTIVE_VALUE: dict[str, Callable[[dict[str, Any]], float | None]] = {
    "size": lambda t: t.get("bytes"),
    "latency": lambda t: (t.get("latency_ms") or {}).get("median"),
    "energy": lambda t: t.get("energy_nj"),
}


def energy_counter() -> Any:
    """The first readable RAPL/NVML counter, or None (then energy is estimated, and the report says why)."""
    from nnopt.energy import available_counters

    found = available_counters()
    return found[0] if found else None


def objective_value(trial: dict[str, Any], objective: str, batch: int, power: ActivePower | None) -> float | None:
    """What ``trial`` is ranked by (lower is better; None: not ranked). A timed trial gets its energy here first:
    ``power`` × its measured time, one power for every plan, so energy ranks as the measured time does."""
    latency = trial.get("latency_ms") or {}
    if power is not None and latency.get("median") is not None:
        trial.update(energy_fields(timed_energy(latency["median"], batch, power, trial.get("energy_shares"))))
    return OBJECTIVE_VALUE[objective](trial)


def search(ctx: TrialContext, settings: AutoConfig, checkpoint: Checkpoint, baseline: float,
           progress: bool | None = None) -> SearchOutcome:
    """Run (or continue) the search; ``checkpoint`` is saved after the sensitivity pass and every trial."""
    import torch

    from nnopt.energy import cpu_active_power

    state = checkpoint.state
    clock_start = time.monotonic() - float(state.get("elapsed_s", 0.0))

    def save() -> None:
        state["elapsed_s"] = time.monotonic() - clock_start
        checkpoint.save()

    if "sensitivity" not in state:
        recover = settings.probe_epochs if settings.finetune_epochs else 0
        state["sensitivity"] = measure_sensitivity(ctx.model, ctx.task, ctx.space, progress, recover).to_dict()
        save()
    sensitivity = Sensitivity.from_dict(state["sensitivity"])
    plans = make_plans(ctx.space, sensitivity, ctx.model, settings.targets)
    jobs = [(i, plan, checkpoint.trial_dir(i)) for i, plan in enumerate(plans) if plan.name not in state["trials"]]
    with track("trials", total=len(jobs), enabled=progress) as bar:
        def keep(index: int, result: dict[str, Any]) -> None:
            state["trials"][plans[index].name] = {"index": index, "plan": plans[index].to_dict(), **result}
            save()
            bar.advance(status=plans[index].name)

        # Trials start in the first TRIAL_SHARE of the budget: the timings after them need the rest.
        started = run_trials(jobs, ctx, settings.workers, keep, may_start=lambda: time.monotonic() - clock_start
                             < settings.budget_minutes * 60 * TRIAL_SHARE)
    # Timing and counters run here, one model at a time, never beside a running trial. The budget bounds
    # the whole run: timings left after it shrink to what remains (each keeps its minimum call count).
    deadline = clock_start + settings.budget_minutes * 60

    def left_s() -> float:
        return max(0.0, deadline - time.monotonic())

    if settings.objective in TIMED:
        _screen(ctx, settings, state, save, progress, left_s())
    counter = energy_counter() if settings.objective == "energy" else None
    if counter is not None:
        _measure_energy(ctx, settings, state, save, counter)

    threads = torch.get_num_threads()
    power = cpu_active_power(threads)  # the threads every timing runs on
    trials = _scored(plans, state, settings, baseline, power)
    valid = [t for t in trials if t.get("objective_value") is not None]
    front = pareto_front(valid, _quality, _cost)
    if settings.objective in TIMED and front:
        front = _confirm(ctx, settings, state, save, front, left_s(), power)
    # For latency and energy a plan must also be measurably faster than the input model: on a CPU where int8 or
    # pruned layers run slower (no VNNI, overhead-bound layers) the right answer is "keep the model".
    faster = [t for t in front if settings.objective not in TIMED or t["latency_ms"]["speedup"] >= MIN_SPEEDUP]
    chosen = choose(faster, _quality, _cost, baseline, settings.max_drop)
    budget = {"minutes": settings.budget_minutes, "spent_s": round(time.monotonic() - clock_start, 1),
              "plans": len(plans), "evaluated": len(trials), "started_this_run": started,
              "not_started": len(plans) - len(trials), "resumed": checkpoint.resumed}
    slower = [t for t in front if t not in faster and meets(t["quality"], baseline, settings.max_drop)]
    return SearchOutcome(baseline, sensitivity, trials, front, chosen,
                         [] if chosen else (slower or closest(valid, _quality, _cost)), budget,
                         objective_method(settings.objective, settings.batch, threads, getattr(counter, "name", None),
                                          power),
                         deadline=deadline, power=power)


def _quality(trial: dict[str, Any]) -> float:
    return float(trial["quality"])


def _cost(trial: dict[str, Any]) -> float:
    return float(trial["objective_value"])


def _screen(ctx: TrialContext, settings: AutoConfig, state: dict[str, Any], save: Callable[[], None],
            progress: bool | None, left_s: float) -> None:
    """A short timing of every trial not timed yet, each alternated with the baseline, within half of
    the budget that is left (the confirmation of the front gets the other half)."""
    todo = [(name, Path(t["dir"])) for name, t in state["trials"].items()
            if "error" not in t and name not in state["latency"]]
    seconds = min(settings.screen_seconds, left_s / 2 / max(1, 2 * len(todo)))  # trial + baseline per trial

    def keep(name: str, timing: dict[str, Any]) -> None:
        state["latency"][name] = timing
        save()

    screen_latency(ctx.model, todo, ctx.task.timing_inputs(ctx.model, settings.batch), settings.batch,
                   seconds, keep, progress, load=ctx.spec.load)


def _measure_energy(ctx: TrialContext, settings: AutoConfig, state: dict[str, Any], save: Callable[[], None],
                    counter: Any) -> None:
    inputs = ctx.task.timing_inputs(ctx.model, settings.batch)
    for trial in state["trials"].values():
        if "error" not in trial and "energy_measured_nj" not in trial:
            model = ctx.spec.load(trial["dir"])
            trial["energy_measured_nj"] = measure_energy_nj(model, inputs, settings.batch, counter)
            save()


def _scored(plans: list[Plan], state: dict[str, Any], settings: AutoConfig, baseline: float,
            power: ActivePower | None = None) -> list[dict[str, Any]]:
    """Every evaluated trial in plan order, with its objective value (or why it has none), drop and verdict."""
    trials = []
    for plan in plans:
        trial = state["trials"].get(plan.name)
        if trial is None:
            continue
        trial = dict(trial)
        timing = state["latency"].get(plan.name)
        if timing and "error" not in timing:
            trial["latency_ms"] = timing
        if "error" not in trial:
            trial["objective_value"] = objective_value(trial, settings.objective, settings.batch, power)
            if trial["objective_value"] is None:  # not ranked: say why
                trial["not_ranked"] = (timing or {}).get("error", f"no {settings.objective} figure (not timed)")
            trial["drop"] = baseline - trial["quality"]
            trial["meets_budget"] = meets(trial["quality"], baseline, settings.max_drop)
        trials.append(trial)
    return trials


def _confirm(ctx: TrialContext, settings: AutoConfig, state: dict[str, Any], save: Callable[[], None],
             front: list[dict[str, Any]], left_s: float, power: ActivePower | None = None) -> list[dict[str, Any]]:
    """Time the screened front again side by side, at the protocol's length (shortened to the budget that
    is left, never below ``min_calls`` calls); the choice (and the energy of each plan) uses these figures."""
    names = [t["name"] for t in front]
    if state.get("confirmed", {}).get("names") != names:
        models = {"baseline": ctx.model, **{t["name"]: ctx.spec.load(t["dir"]) for t in front}}
        seconds = min(settings.latency_seconds, left_s / len(models))
        timing = time_models(models, ctx.task.timing_inputs(ctx.model, settings.batch), settings.batch,
                             seconds, settings.min_calls)
        state["confirmed"] = {"names": names, "timing": timing}
        save()
    timing = state["confirmed"]["timing"]
    base = timing["baseline"]["median"]
    for trial in front:
        own = timing[trial["name"]]
        trial["latency_ms"] = {**own, "baseline_median": base, "speedup": base / own["median"]}
        trial["objective_value"] = objective_value(trial, settings.objective, settings.batch, power)
    return pareto_front(front, _quality, _cost)


def measure_energy_nj(model: Any, inputs: Any, batch: int, counter: Any) -> float | None:
    """Energy per inference from a hardware counter; None when the counter gave no valid window."""
    import torch

    from nnopt.energy import measure_energy
    from nnopt.search.trials import bind

    with torch.inference_mode():
        measured = measure_energy(bind(model, inputs), counter=counter, runs=3)
    joules = measured.median_j
    return None if joules is None else joules / batch * 1e9


def plan_of(trial: dict[str, Any]) -> Plan:
    return Plan.from_dict(trial["plan"])
