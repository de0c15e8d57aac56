"""nnopt auto's search: the Pareto front, plans as recipes, checkpoints, and whole runs on SimpleNet."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
import torch

import nnopt
from nnopt.errors import ConfigError, ResumeError
from nnopt.pipeline.auto_run import NOTHING_MEETS, run_auto
from nnopt.search import (
    KNOBS,
    AutoConfig,
    BuildOptions,
    Checkpoint,
    Plan,
    SearchSettings,
    Sensitivity,
    build_space,
    checkpoint_dir,
    choose,
    dominates,
    load_task,
    pareto_front,
    plan_recipe,
    validation_split,
)
from nnopt.search.space import SPACE_VERSION

# A tiny search: two tolerances, a few levels, two fine-tuning epochs; seconds per run.
TINY = {"finetune_epochs": 2, "stages": 2, "targets": (0.25, 0.1), "latency_seconds": 0.02, "screen_seconds": 0.01,
        "levels": {"sparsity": (0.5, 0.8), "bits": (8, 4)}}




@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny models train fastest on one thread, and far faster when the machine is shared.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------ pure parts


def test_pareto_front_is_exactly_the_non_dominated_points():
    rng = random.Random(0)
    points = [(round(rng.random(), 2), rng.randint(1, 20)) for _ in range(200)] + [(0.5, 3), (0.5, 3)]
    front = pareto_front(points, lambda p: p[0], lambda p: p[1])
    for p in front:
        assert not any(dominates(q, p) for q in points)
    for p in points:
        if p not in front:
            assert any(dominates(q, p) for q in front) or p in front
    assert [p[1] for p in front] == sorted(p[1] for p in front)  # cheapest first
    assert len(front) == len(set(front))  # identical points once


def test_choose_takes_the_cheapest_plan_within_the_drop_and_none_when_nothing_fits():
    front = [(0.90, 1), (0.96, 5), (0.97, 9)]
    pick = choose(front, lambda p: p[0], lambda p: p[1], baseline=0.97, max_drop=0.01)
    assert pick == (0.96, 5)
    assert choose(front, lambda p: p[0], lambda p: p[1], baseline=0.99, max_drop=0.01) is None
    assert choose(front, lambda p: p[0], lambda p: p[1], baseline=0.97, max_drop=0.0) == (0.97, 9)


def test_greedy_path_spends_error_where_it_buys_the_most_cost_and_respects_the_cap():
    from nnopt.search.costs import SizeCost
    from nnopt.search.plans import greedy_path
    from nnopt.search.space import SearchSpace, Unit

    units = (Unit("big", ("big",)), Unit("small", ("small",)))
    space = SearchSpace("size", (dataclasses.replace(KNOBS["bits"], levels=(8, 4)),), {"bits": units}, False, False,
                        "packed")
    probe = {"drop": 0.0, "cost": None}
    sens = Sensitivity("accuracy", 0.9, None, {"bits": {
        "big": {8: {**probe, "error": 0.01}, 4: {**probe, "error": 0.05}},
        "small": {8: {**probe, "error": 0.01}, 4: None}}})  # 4 bits failed on "small": never an option
    path = greedy_path(space, sens, SizeCost({"big": 1000, "small": 10}), max_error=0.04)
    states = [p[0] for p in path]
    assert states[1] == {("bits", "big"): 8}  # same error, far more bytes saved: the big layer first
    assert states[-1] == {("bits", "big"): 8, ("bits", "small"): 8}  # big at 4 bits would pass the cap
    assert [round(p[1], 6) for p in path] == [0, 0.01, 0.02] and path[-1][2] < path[0][2]
    assert Sensitivity.from_dict(json.loads(json.dumps(sens.to_dict()))) == sens


def test_validation_split_is_disjoint_stratified_and_seeded(digits):
    fit, val = validation_split(digits.train)
    again, _ = validation_split(digits.train)
    assert len(fit) + len(val) == len(digits.train) and torch.equal(fit.x, again.x)
    rows = {tuple(r.tolist()) for r in fit.x}
    assert not any(tuple(r.tolist()) in rows for r in val.x)
    assert set(val.y.tolist()) == set(range(10))


def test_settings_are_validated_on_construction_and_errors_name_the_field():
    for bad, message in [({"max_drop": 1.5}, r"AutoConfig\.max_drop must be a fraction in \[0, 1\]"),
                         ({"max_drop": -0.1}, "AutoConfig.max_drop"),
                         ({"max_drop": float("nan")}, "AutoConfig.max_drop"),
                         ({"objective": "speed"}, "AutoConfig.objective must be one of size, latency, energy"),
                         ({"batch": 0}, "AutoConfig.batch"), ({"workers": 0}, "AutoConfig.workers"),
                         ({"budget_minutes": 0}, "AutoConfig.budget_minutes must be a number > 0"),
                         ({"finetune_epochs": -1}, "AutoConfig.finetune_epochs"), ({"batch": "32"}, "AutoConfig.batch"),
                         ({"targets": (0.0,)}, "AutoConfig.targets"), ({"levels": {"speed": (1,)}}, "unknown knob"),
                         ({"levels": {"bits": ()}}, r"AutoConfig\.levels\['bits'\]")]:
        with pytest.raises(ConfigError, match=message):
            AutoConfig(**{"objective": "size", "max_drop": 0.01, **bad})
    assert SearchSettings is AutoConfig  # the earlier name stays


def test_auto_config_round_trips_through_plain_data():
    config = AutoConfig(objective="latency", max_drop=0.02, targets=(0.5,), levels={"structured": (0.5, 0.75)})
    data = json.loads(json.dumps(config.to_dict()))
    assert data["kind"] == "auto" and AutoConfig.from_dict(data) == config
    with pytest.raises(ConfigError, match="unknown key"):
        AutoConfig.from_dict({"objective": "size", "max-drop": 0.01})


# ------------------------------------------------------------------------------------ plans → recipes


@pytest.fixture(scope="module")
def fit_model(digits):
    """SimpleNet trained on the fit part only, so that the validation rows are unseen by it."""
    fit, _ = validation_split(digits.train)
    model = nnopt.create_model("simplenet", seed=0)
    nnopt.train(model, fit, nnopt.TrainConfig(epochs=15, seed=0), progress=False)
    return model


def test_a_plan_is_a_recipe_with_exact_per_layer_sparsity_held_through_fine_tuning(fit_model, digits):
    from nnopt.recipe import apply_recipe, recipe_to_yaml

    task = load_task("digits")
    space = build_space(fit_model, task, "size")
    plan = Plan("p", (("bits", "classifier", 8.0), ("bits", "features.0", 4.0), ("sparsity", "features.0", 0.9),
                      ("sparsity", "features.2", 0.5)), "test")
    recipe = plan_recipe(plan, space, BuildOptions(finetune_epochs=5, stages=3))  # ramp: 3 of the 5 epochs
    kinds = [s.kind for s in recipe.steps]
    assert kinds.count("train") == 3 and kinds[-2:] == ["quantize-weights", "quantize-weights"]
    assert recipe.weights_format == "packed"
    built = apply_recipe(fit_model, recipe, data=task.search_data())
    profile = {layer.name: layer for layer in nnopt.profile_model(built).layers}
    assert profile["features.0"].dtype.startswith("int4") and profile["classifier"].dtype == "int8"
    # Exactly the planned share of each layer is zero (the last stage reaches the target; training holds it).
    assert int((built.features[2].weight == 0).sum()) == round(0.5 * 64 * 32)
    codes = built.features[0].weight_codes()
    assert int((codes == 0).sum()) >= round(0.9 * 64 * 64)
    assert load_recipe_text(recipe_to_yaml(recipe)) == recipe


def load_recipe_text(text):
    import yaml

    from nnopt.recipe import parse_recipe

    return parse_recipe(yaml.safe_load(text))


# ------------------------------------------------------------------------------------------ checkpoints


def test_checkpoint_refuses_a_missing_stale_or_foreign_state(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ResumeError, match="no checkpoint"):
        Checkpoint.open(out, {"a": 1}, resume=True)
    first = Checkpoint.open(out, {"objective": "size", "batch": 32}, resume=False)
    first.state["trials"]["x"] = {"quality": 0.9}
    first.save()
    assert checkpoint_dir(out).is_dir() and not out.exists()
    with pytest.raises(ResumeError, match="resume=True"):
        Checkpoint.open(out, {"objective": "size", "batch": 32}, resume=False)
    with pytest.raises(ResumeError, match="batch: checkpoint 32, now 64"):
        Checkpoint.open(out, {"objective": "size", "batch": 64}, resume=True)
    again = Checkpoint.open(out, {"objective": "size", "batch": 32}, resume=True)
    assert again.resumed and again.state["trials"] == {"x": {"quality": 0.9}}
    (checkpoint_dir(out) / "state.json").write_text("{ not json")
    with pytest.raises(ResumeError, match="corrupt"):
        Checkpoint.open(out, {"objective": "size", "batch": 32}, resume=True)


def test_a_checkpoint_from_an_older_search_space_says_so_and_to_start_fresh(tmp_path):
    out = tmp_path / "out"
    current = {"objective": "size", "batch": 32, "space_version": SPACE_VERSION}
    Checkpoint.open(out, {**current, "space_version": SPACE_VERSION - 1}, resume=False).save()
    with pytest.raises(ResumeError) as caught:
        Checkpoint.open(out, current, resume=True)
    message = str(caught.value)
    assert "older nnopt whose search space or trial fields differ" in message
    assert f"delete {checkpoint_dir(out)} to start fresh" in message and "same model" not in message


# ------------------------------------------------------------------------------------------ whole runs


@pytest.fixture(scope="module")
def saved(tmp_path_factory, fit_model):
    path = tmp_path_factory.mktemp("in") / "simplenet"
    nnopt.save_model(fit_model, path)
    return path


@pytest.fixture(scope="module")
def tiny_run(saved, tmp_path_factory):
    out = tmp_path_factory.mktemp("auto") / "out"
    settings = SearchSettings(objective="size", max_drop=0.02, **TINY)
    return run_auto(saved, "digits", settings, out), out


def test_chosen_plan_meets_the_budget_on_the_test_split_and_the_front_is_non_dominated(tiny_run):
    result, out = tiny_run
    report = json.loads((out / "report.json").read_text())
    assert result.exit_code == 0 and report["chosen"] and report["kind"] == "auto"
    assert report["result"]["test_drop"] <= 0.02 and report["result"]["test_meets_budget"]
    front = [(f["accuracy"], f["objective_value"]) for f in report["front"]]
    assert front and all(not dominates(q, p) for p in front for q in front)
    chosen = next(f for f in report["front"] if f["chosen"])
    assert chosen["meets_budget"] and chosen["objective_method"].startswith("measured")
    assert all(f["objective_value"] >= chosen["objective_value"] for f in report["front"] if f["meets_budget"])
    assert report["result"]["bytes"] < report["baseline"]["bytes"] / 2  # smaller, and by a real factor
    assert {"device", "cpu", "threads", "batch", "torch", "nnopt"} <= set(report["environment"])
    assert {row["name"] for row in report["layers"]} == {"features.0", "features.2", "classifier"}
    assert (out / "report.html").is_file() and (out / "report.md").is_file()
    assert not checkpoint_dir(out).exists()  # a finished run leaves no checkpoint


def test_recipe_yaml_reproduces_the_chosen_model(tiny_run, saved, digits):
    from nnopt.recipe import apply_recipe, load_recipe

    _, out = tiny_run
    rebuilt = apply_recipe(nnopt.load_model(saved), load_recipe(out / "recipe.yaml"), data=digits)
    written = nnopt.load_model(out / "model")
    with torch.inference_mode():
        assert torch.equal(rebuilt(digits.test.x), written(digits.test.x))


def test_nothing_within_the_budget_is_said_plainly_and_the_front_is_still_written(saved, tmp_path):
    out = tmp_path / "none"
    harsh = {**TINY, "finetune_epochs": 0, "levels": {"sparsity": (0.98,), "bits": (2,)}, "targets": (0.05,)}
    result = run_auto(saved, "digits", SearchSettings(objective="size", max_drop=0.0, **harsh), out)
    report = json.loads((out / "report.json").read_text())
    assert result.exit_code == NOTHING_MEETS and report["chosen"] is None and report["result"] is None
    assert report["message"].startswith("No plan meets --max-drop 0") and report["closest"]
    assert report["front"] and not any(f["meets_budget"] for f in report["front"])
    assert not (out / "model").exists() and not (out / "recipe.yaml").exists()


def test_ctrl_c_leaves_no_output_and_resume_finishes_like_an_uninterrupted_run(saved, tmp_path, monkeypatch,
                                                                                tiny_run):
    import nnopt.search.trials as trials

    real = trials.evaluate_plan
    calls = []

    def interrupted(plan, ctx, out_dir):
        calls.append(plan.name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(plan, ctx, out_dir)

    out = tmp_path / "out"
    settings = SearchSettings(objective="size", max_drop=0.02, **TINY)
    monkeypatch.setattr(trials, "evaluate_plan", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_auto(saved, "digits", settings, out)
    assert not out.exists() and not list(tmp_path.glob(".out.tmp*"))
    state = json.loads((checkpoint_dir(out) / "state.json").read_text())
    assert len(state["trials"]) == 1
    monkeypatch.setattr(trials, "evaluate_plan", real)
    with pytest.raises(ResumeError, match="resume=True"):
        run_auto(saved, "digits", settings, out)
    with pytest.raises(ResumeError, match="max_drop"):
        run_auto(saved, "digits", SearchSettings(objective="size", max_drop=0.03, **TINY), out, resume=True)
    resumed = run_auto(saved, "digits", settings, out, resume=True)
    assert resumed.report["budget"]["resumed"] and resumed.report["budget"]["started_this_run"] == \
        resumed.report["budget"]["plans"] - 1
    uninterrupted = tiny_run[0].report

    def essence(report):
        return report["chosen"], [(f["name"], f["accuracy"], f["bytes"]) for f in report["front"]], \
            report["result"]["bytes"], report["result"]["accuracy"]

    assert essence(resumed.report) == essence(uninterrupted)
    assert not checkpoint_dir(out).exists()


def test_latency_objective_times_trials_serially_and_confirms_the_front(saved, tmp_path):
    settings = SearchSettings(objective="latency", max_drop=0.05, **{**TINY, "levels": {"structured": (0.5,)}})
    result = run_auto(saved, "digits", settings, tmp_path / "lat")
    report = result.report
    assert report["front"] and all(f["objective_method"].startswith("measured (median ms") for f in report["front"])
    for f in report["front"]:
        assert f["objective_value"] == f["latency_ms"]["median"] > 0
    assert all("latency_ms" in t for t in report["trials"] if "error" not in t)
    if report["chosen"]:
        assert report["layers"] and any(row["structured_ratio"] > 0 for row in report["layers"])


def test_energy_objective_ranks_power_times_measured_time_and_says_so(saved, tmp_path):
    """Energy is ranked and reported as one active power × each plan's measured time per inference: the
    chosen plan's energy is that power × its latency, and the energies are in the order of the latencies."""
    from nnopt.energy import cpu_active_power

    settings = SearchSettings(objective="energy", max_drop=0.05,
                              **{**TINY, "levels": {"structured": (0.5,), "int8": (8,)}, "targets": (0.5,)})
    report = run_auto(saved, "digits", settings, tmp_path / "energy").report
    assert report["objective_method"].startswith("estimated: active power × measured time per inference at batch")
    assert "ranked at equal power" in report["objective_method"] and "never ranked" in report["objective_method"]
    watts = cpu_active_power(torch.get_num_threads()).mid_w  # the power the search took, at the threads it timed on
    assert report["energy_power"]["mid_w"] == pytest.approx(watts)
    front = report["front"]
    rows = [report["baseline"], *front] + ([report["result"]] if report["result"] else [])
    for row in rows:  # every figure: power × the row's own measured median ÷ batch (ms -> nJ: × 1e6)
        assert row["energy_nj"] == pytest.approx(watts * row["latency_ms"]["median"] / settings.batch * 1e6)
        assert row["energy_low_nj"] < row["energy_nj"] < row["energy_high_nj"]
        assert row["energy_compute_nj"] + row["energy_memory_nj"] == pytest.approx(row["energy_nj"])
    assert front and all(f["objective_value"] == f["energy_nj"] for f in front)
    by_energy = sorted(front, key=lambda f: f["energy_nj"])
    assert by_energy == sorted(front, key=lambda f: f["latency_ms"]["median"])
    for f in front:  # a choice needs a measurable speed-up: at equal power, less energy than the baseline timed
        # in the same round (the front's round: the report's baseline row comes from another round, and on a loaded
        # machine rounds minutes apart can differ by more than the speed-up)
        if f["chosen"]:
            same_round_baseline_nj = watts * f["latency_ms"]["median"] * f["speedup"] / settings.batch * 1e6
            assert f["speedup"] >= 1.05 and f["energy_nj"] < same_round_baseline_nj
    timed = [t for t in report["trials"] if "error" not in t]
    assert timed and all(t["objective_value"] == t["energy_nj"] and "latency_ms" in t for t in timed)
    assert sorted(timed, key=lambda t: t["energy_nj"]) == sorted(timed, key=lambda t: t["latency_ms"]["median"])
    assert all(t["energy_analytic_nj"] > 0 and "energy_analytic_nj" not in f for t in timed for f in rows)
    assert report["methods"]["energy_analytic_nj"].startswith("estimated (analytic table")


def test_trials_in_spawned_workers_give_the_same_front_as_in_process(saved, tmp_path, tiny_run):
    # One torch thread per worker, as this module runs in-process: the same arithmetic, the same results.
    settings = SearchSettings(objective="size", max_drop=0.02, workers=2, **TINY)
    report = run_auto(saved, "digits", settings, tmp_path / "workers").report
    assert report["budget"]["evaluated"] == report["budget"]["plans"]
    assert [(f["name"], f["bytes"], f["accuracy"]) for f in report["front"]] == \
        [(f["name"], f["bytes"], f["accuracy"]) for f in tiny_run[0].report["front"]]


def test_trial_analytic_energy_is_per_inference_like_the_estimator_with_its_split_as_shares():
    import nnopt
    from nnopt.search.trials import analytic_energy

    model = nnopt.create_model("simplenet", seed=0)
    for batch in (1, 32):
        estimate = nnopt.estimate_energy(model, batch=batch)
        analytic = analytic_energy(model, batch)
        assert analytic["energy_analytic_nj"] == pytest.approx(estimate.total_mj * 1e6)
        shares = analytic["energy_shares"]
        assert shares["compute"] == pytest.approx(estimate.compute_mj / estimate.total_mj)
        assert shares["compute"] + shares["memory"] == pytest.approx(1.0) and shares["table"] == "horowitz-45nm"


def test_a_plan_that_crashes_is_a_failed_trial(monkeypatch, tmp_path):
    from nnopt.search import trials

    def broken(plan, ctx, out_dir):
        raise RuntimeError("shape mismatch\nwith a second line")

    monkeypatch.setattr(trials, "evaluate_plan", broken)
    plan = type("P", (), {"name": "p"})()
    result = trials.safe_evaluate(plan, None, tmp_path)
    assert result["name"] == "p" and "RuntimeError: shape mismatch with a second line" in result["error"]


@pytest.mark.parametrize("native", [True, False, None])
def test_bf16_attention_plans_only_where_the_cpu_has_native_bf16(fit_model, monkeypatch, native):
    """On a CPU without native bf16 (AVX2) the bf16-attention control would be emulated and take minutes to
    time: auto does not propose it there (nor where it cannot tell)."""
    from nnopt import cpu
    from nnopt.search import plans

    space = dataclasses.replace(build_space(fit_model, load_task("digits"), "energy", levels={"int8": (8,)}),
                                encoder=True)
    monkeypatch.setattr(cpu, "bf16_support", lambda device="cpu": (native, "test"))
    plan = plans._uniform(space, {"int8": 8}, ("bf16-attention",))
    assert (plan is not None) is (native is True)
    assert plans._uniform(space, {"int8": 8}, ()) is not None  # the plain int8 control stays either way


def test_the_budget_bounds_the_final_timings(saved, tmp_path, monkeypatch):
    """Screening, confirming the front and the report's timing get only what is left of --budget-minutes (each
    keeps its minimum call count), instead of their full lengths."""
    import time

    from nnopt.search import engine

    seen: dict[str, list[float]] = {"screen": [], "confirm": []}
    real_screen, real_time = engine.screen_latency, engine.time_models

    def screen(baseline, trials, inputs, batch, seconds, *rest, **kw):
        seen["screen"].append(seconds)
        return real_screen(baseline, trials, inputs, batch, seconds, *rest, **kw)

    def confirm(models, inputs, batch, seconds, *rest, **kw):
        seen["confirm"].append(seconds)
        return real_time(models, inputs, batch, seconds, *rest, **kw)

    monkeypatch.setattr(engine, "screen_latency", screen)
    monkeypatch.setattr(engine, "time_models", confirm)
    real_run = engine.run_trials  # every trial runs although the budget is spent, so that timing follows
    monkeypatch.setattr(engine, "run_trials", lambda jobs, ctx, workers, keep, may_start:
                        real_run(jobs, ctx, workers, keep, lambda: True))
    settings = SearchSettings(objective="latency", max_drop=0.05, budget_minutes=0.001,
                              **{**TINY, "levels": {"structured": (0.5,)}, "latency_seconds": 30.0,
                                 "screen_seconds": 30.0})
    start = time.monotonic()
    report = run_auto(saved, "digits", settings, tmp_path / "budget").report
    assert time.monotonic() - start < 30  # 30 s per timed model was asked for, several times over
    assert seen["screen"] == [0.0] and seen["confirm"][0] == 0.0  # not the 30 s asked for: nothing is left
    assert seen["confirm"][-1] == 0.0  # the report's timing of baseline, front and final model
    assert report["front"] and all(f["latency_ms"]["median"] > 0 for f in report["front"])  # min calls still run


def test_latency_plans_slower_than_the_input_are_not_chosen(saved, tmp_path, monkeypatch):
    """On a CPU where every plan runs slower (int8 without VNNI, overhead-bound layers), auto keeps the input
    model: exit 3 and a message that says so, not a 'chosen' plan that makes the model slower."""
    from nnopt.search import engine

    real_time = engine.time_models

    def slower(models, inputs, batch, seconds, *rest, **kw):
        timing = real_time(models, inputs, batch, seconds, *rest, **kw)
        base = timing["baseline"]["median"]
        return {name: ({**t, "median": base * 2} if name != "baseline" else t) for name, t in timing.items()}

    monkeypatch.setattr(engine, "time_models", slower)
    settings = SearchSettings(objective="latency", max_drop=0.05, **{**TINY, "levels": {"structured": (0.5,)}})
    result = run_auto(saved, "digits", settings, tmp_path / "slow")
    report = result.report
    assert result.exit_code == NOTHING_MEETS and report["chosen"] is None and report["front"]
    assert all(f["speedup"] == pytest.approx(0.5) for f in report["front"])
    assert "is faster than the baseline" in report["message"] and "Keep the input model here" in report["message"]
    assert report["environment"]["isa"] and "onednn_max_cpu_isa" in report["environment"]
