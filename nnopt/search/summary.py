"""After the search: rebuild the chosen plan as `nnopt optimize` would (its recipe, the whole training
split), measure it on the test split, time it side by side with the baseline, and assemble the
report document (``report.json`` of ``nnopt auto``; every figure with the method behind it)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from nnopt.metrics.speed import MIN_SPEEDUP
from nnopt.search.config import AutoConfig
from nnopt.search.engine import TIMED, SearchOutcome, plan_of
from nnopt.search.plans import plan_recipe
from nnopt.search.trials import (
    ENERGY_FIELDS,
    TrialContext,
    analytic_energy,
    analytic_energy_method,
    energy_fields,
    energy_method,
    layer_summary,
    time_models,
    timed_energy,
)

if TYPE_CHECKING:
    from nnopt.energy import ActivePower

FINAL_DIR = "final"  # in the search's work directory: the rebuilt model, written to measure its bytes


@dataclasses.dataclass(frozen=True)
class InputModel:
    """The input model's identity and size: its weights file, read from the directory it was loaded from
    or written for the search."""

    architecture: str
    applied: tuple[str, ...]  # passes recorded in its lineage
    file_bytes: int
    sha256: str


@dataclasses.dataclass
class Final:
    """The chosen plan rebuilt: its recipe, the model (written once to measure its bytes) and its test figures."""

    recipe: Any
    model: nn.Module
    file_bytes: int
    compression_ratio: float
    test: dict[str, float]


def rebuild(ctx: TrialContext, outcome: SearchOutcome, work: Path) -> Final | None:
    """Apply the chosen plan's recipe to the input model with the data `nnopt optimize` would read, and
    write it to ``work/final`` (its bytes are measured from the file); None when nothing was chosen."""
    from nnopt.recipe import apply_recipe
    from nnopt.saving import save_model

    if outcome.chosen is None:
        return None
    recipe = plan_recipe(plan_of(outcome.chosen), ctx.space, ctx.spec.options)
    model = apply_recipe(ctx.model, recipe, data=ctx.task.final_data(), progress=False)
    test = _quality(ctx, model, "test")
    saved = save_model(model, work / FINAL_DIR, weights_format=recipe.weights_format, overwrite=True,
                       factory=ctx.spec.factory)
    return Final(recipe, model, saved.file_bytes, saved.compression_ratio, test)


def _quality(ctx: TrialContext, model: nn.Module, split: str) -> dict[str, float]:
    fidelity = getattr(ctx.task, "fidelity", None)
    if callable(fidelity):
        return dict(fidelity(model, split))
    return {_test_key(ctx.task.metric): ctx.task.quality(model, split)}


def build_report(ctx: TrialContext, settings: AutoConfig, outcome: SearchOutcome, final: Final | None,
                 input_model: InputModel) -> dict[str, Any]:
    """The report document of an auto run (see nnopt.report for the renderers)."""
    from nnopt.energy import cpu_active_power
    from nnopt.envinfo import environment
    from nnopt.io.model_dir import dense_fp32_bytes
    from nnopt.metrics import profile_model
    from nnopt.recipe import recipe_to_yaml

    metric = ctx.task.metric
    batch = settings.batch
    inputs = ctx.task.timing_inputs(ctx.model, batch)
    threads = torch.get_num_threads()
    power = outcome.power or cpu_active_power(threads)
    # Time the baseline, the front (unless the search already did, for latency and energy) and the final model
    # together.
    models: dict[str, nn.Module] = {"baseline": ctx.model}
    timed_front = settings.objective not in TIMED
    if timed_front:
        models.update({t["name"]: ctx.spec.load(t["dir"]) for t in outcome.front})
    if final is not None:
        models["final"] = final.model
    # within what is left of the budget (each model still gets min_calls calls)
    seconds = min(settings.latency_seconds, outcome.seconds_left() / len(models))
    timing = time_models(models, inputs, batch, seconds, settings.min_calls)
    base_ms = timing["baseline"]["median"]

    def energy(latency: dict[str, float], analytic: dict[str, Any]) -> dict[str, Any]:
        """Every row's energy: the one power × the row's own measured time; the analytic table only splits it
        (its own total stays in the trials, never a row's figure)."""
        return energy_fields(timed_energy(latency["median"], batch, power, analytic.get("energy_shares")))

    input_bytes = input_model.file_bytes
    dense_bytes = dense_fp32_bytes(ctx.model)
    baseline = {
        "name": "baseline", metric: outcome.baseline, "split": "validation",
        **{f"test_{k}" if k != "accuracy" else "test_accuracy": v for k, v in _quality(ctx, ctx.model, "test").items()},
        "bytes": input_bytes, "compression_ratio": dense_bytes / input_bytes,
        "latency_ms": _ms(timing["baseline"]), **energy(timing["baseline"], analytic_energy(ctx.model, batch)),
        "macs": profile_model(ctx.model).macs,
    }
    chosen_name = outcome.chosen["name"] if outcome.chosen else None
    front = []
    for trial in outcome.front:
        plan = plan_of(trial)
        latency: dict[str, float] = trial["latency_ms"] if not timed_front else timing[trial["name"]]
        front.append({
            "name": trial["name"], metric: trial["quality"], "split": "validation", "drop": trial["drop"],
            "objective_value": trial["objective_value"], "objective_method": outcome.objective_method,
            "bytes": trial["bytes"], "compression_ratio": trial["compression_ratio"],
            "latency_ms": _ms(latency), "speedup": base_ms / latency["median"] if timed_front
            else latency.get("speedup"), **energy(latency, trial), "macs": trial["macs"],
            "meets_budget": trial["meets_budget"], "origin": plan.origin, "chosen": trial["name"] == chosen_name,
            "recipe": recipe_to_yaml(plan_recipe(plan, ctx.space, ctx.spec.options)),
            **({"cosine_min": trial["cosine_min"]} if "cosine_min" in trial else {}),
        })
    result = None
    if final is not None:
        drop = (1.0 if metric == "cosine" else baseline[f"test_{_test_key(metric)}"]) - final.test[_test_key(metric)]
        result = {
            "name": chosen_name, "split": "test", **final.test, "test_drop": drop,
            "test_meets_budget": drop <= settings.max_drop + 1e-12, "bytes": final.file_bytes,
            "compression_ratio": final.compression_ratio, "compression_vs_input": input_bytes / final.file_bytes,
            "latency_ms": _ms(timing["final"]), "speedup": base_ms / timing["final"]["median"],
            **energy(timing["final"], analytic_energy(final.model, batch)), "macs": profile_model(final.model).macs,
        }
    env = environment()
    return {
        "kind": "auto", "objective": settings.objective, "max_drop": settings.max_drop, "metric": metric,
        "batch": batch, "chosen": chosen_name, "message": message(settings, outcome, result, metric),
        "objective_method": outcome.objective_method, "energy_power": power.to_dict(),
        "environment": {"device": env["device"], "cpu": env["cpu"], "isa": env["isa"],
                        "onednn_max_cpu_isa": env["onednn_max_cpu_isa"], "threads": threads, "batch": batch,
                        "torch": env["torch"], "nnopt": env["nnopt"], "allocator": env.get("allocator")},
        "dataset": ctx.task.describe(), "input": {"architecture": input_model.architecture,
                                                  "applied": list(input_model.applied)},
        "baseline": baseline, "front": front, "result": result,
        "layers": layer_summary(ctx.model, final.model) if final is not None else [],
        "trials": [_trial_row(t) for t in outcome.trials],
        "variants": _variants(baseline, front, result, metric),
        "sensitivity": outcome.sensitivity.to_dict(), "budget": outcome.budget,
        "closest": [t["name"] for t in outcome.closest],
        "settings": {"objective": settings.objective, "max_drop": settings.max_drop, "batch": batch,
                     "budget_minutes": settings.budget_minutes, "workers": settings.workers,
                     "finetune_epochs": settings.finetune_epochs, "stages": settings.stages,
                     "targets": list(settings.targets or ())},
        "space": ctx.space.describe(),
        "methods": methods(settings, metric, outcome.objective_method, threads, power),
    }


def _test_key(metric: str) -> str:
    return {"cosine": "cosine_mean", "agreement": "agreement"}.get(metric, "accuracy")


def _ms(timing: dict[str, float] | None) -> dict[str, float] | None:
    if not timing:
        return None
    return {k: timing[k] for k in ("median", "p10", "p90") if k in timing}


def _trial_row(trial: dict[str, Any]) -> dict[str, Any]:
    hidden = ("dir", "layers", "plan")
    row = {k: v for k, v in trial.items() if k not in hidden}
    row["assignment"] = trial["plan"]["assignment"]
    return row


def _variants(baseline: dict[str, Any], front: list[dict[str, Any]], result: dict[str, Any] | None,
              metric: str) -> list[dict[str, Any]]:
    keys = (metric, "bytes", "compression_ratio", "latency_ms", "speedup", *ENERGY_FIELDS)
    rows = [{"name": "baseline", "role": "baseline", **{k: baseline.get(k) for k in keys},
             "test": baseline.get(f"test_{_test_key(metric)}")}]
    rows += [{"name": f["name"], "role": "front", **{k: f.get(k) for k in keys}, "meets_budget": f["meets_budget"],
              "chosen": f["chosen"]} for f in front]
    if result is not None:
        rows.append({"name": f"{result['name']} (final model)", "role": "final", metric: None,
                     **{k: result.get(k) for k in keys[1:]}, "test": result[_test_key(metric)]})
    return rows


def methods(settings: AutoConfig, metric: str, objective_method: str, threads: int,
            power: ActivePower) -> dict[str, str]:
    quality = {"cosine": "measured: mean cosine between the plan's outputs (embeddings) and the input model's",
               "agreement": "measured: top-1 agreement with the input model's predictions (the data has no labels)",
               }.get(metric, "measured: top-1 accuracy")
    return {
        metric: f"{quality}; front and trials on the validation split, the final model on the test split",
        "objective_value": objective_method,
        "bytes": "measured: size of the weights file written",
        "compression_ratio": "measured: bytes of the same architecture as a dense fp32 safetensors file / bytes "
                             "written",
        "latency_ms": f"measured: time.perf_counter per forward call at batch {settings.batch}, {threads} threads, "
                      "after warm-up, models alternated in rounds in one process; median, p10, p90",
        "energy_nj": (energy_method(settings.batch, power) + "; each row's own measured time (its latency_ms ÷ "
                      "batch); energy_low_nj–energy_high_nj: the power's bounds; energy_compute_nj/energy_memory_nj: "
                      "the split"),
        "energy_analytic_nj": analytic_energy_method(settings.batch) + " (in the trials only)",
        "macs": "estimated: analytic multiply-accumulates per sample for the kernels used (zeros included)",
        "sensitivity": "measured: validation drop and cross-entropy increase (or 1 - cosine) with one unit changed; "
                       "pruning probes recover one epoch first, less what that epoch alone changes",
        "latency_rounds": "objectives latency and energy: the front was timed side by side with the baseline in one "
                          "round (its speed-ups and energy are from that round); the baseline and the final model "
                          "in another; otherwise all in one round",
    }


def message(settings: AutoConfig, outcome: SearchOutcome, result: dict[str, Any] | None, metric: str) -> str:
    """A plain summary of the outcome: what was chosen and how it did on the test split, or that nothing met
    the budget and which plans came closest."""
    budget = outcome.budget
    ran = (f"{budget['evaluated']} of {budget['plans']} plans evaluated"
           + (f" ({budget['not_started']} not started: the {settings.budget_minutes:g}-minute budget ran out)"
              if budget["not_started"] else ""))
    if result is None and outcome.only_slower:
        best = max(outcome.closest, key=lambda t: t["latency_ms"]["speedup"])
        why = (" (energy is power × time: at equal power, not faster is not less energy)"
               if settings.objective == "energy" else "")
        return (f"No plan within --max-drop {settings.max_drop:g} is faster than the baseline at batch "
                f"{settings.batch} ({ran}){why}: the fastest, {best['name']}, measured "
                f"{best['latency_ms']['speedup']:.2f}x the baseline's speed, below the {MIN_SPEEDUP}x a choice needs. "
                "Keep the input model here. No model was written; the front is in the report.")
    if result is None:
        near = "; ".join(f"{t['name']} (drop {t['drop']:.4f}, objective {t['objective_value']:.4g})"
                         for t in outcome.closest) or "none"
        return (f"No plan meets --max-drop {settings.max_drop:g} on the validation split ({ran}). Closest: {near}. "
                "No model was written; the front is in the report.")
    key = _test_key(metric)
    verdict = ("within" if result["test_meets_budget"] else "OVER") + f" the {settings.max_drop:g} budget"
    return (f"Chosen: {result['name']} ({ran}). On the test split: {metric} {result[key]:.4f}, drop "
            f"{result['test_drop']:.4f} ({verdict}); {result['bytes']:,} bytes "
            f"({result['compression_ratio']:.1f}x smaller than dense fp32), {result['speedup']:.2f}x the baseline's "
            f"speed at batch {settings.batch} (measured), {result['energy_nj']:.4g} nJ per inference (estimated: "
            "active power × measured time).")
