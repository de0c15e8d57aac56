"""nnopt auto's energy objective: plans ranked by one active power × their measured time, never by the table."""

from __future__ import annotations

import types

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from nnopt.energy import ActivePower
from nnopt.search import AutoConfig, pareto_front
from nnopt.search.engine import _scored, objective_method
from nnopt.search.trials import screen_latency

POWER = ActivePower(5.0, 10.0, "estimated: a test's power")
SETTINGS = AutoConfig(objective="energy", max_drop=0.05, batch=8)
latency_ms = st.floats(min_value=1e-4, max_value=1e4, allow_nan=False, allow_infinity=False)
share = st.floats(min_value=0.0, max_value=1.0)


def _state(latencies: list[float], shares: list[float], analytic: list[float]) -> tuple[list, dict]:
    """Trials as the engine keeps them: the analytic figures from the trial, the timing beside it."""
    plans = [types.SimpleNamespace(name=f"p{i}") for i in range(len(latencies))]
    trials = {p.name: {"name": p.name, "quality": 0.9, "energy_analytic_nj": a,
                       "energy_shares": {"compute": c, "memory": 1 - c, "table": "horowitz-45nm"}}
              for p, c, a in zip(plans, shares, analytic)}
    timing = {p.name: {"median": ms, "p10": ms, "p90": ms, "baseline_median": 1.0, "speedup": 1.0 / ms}
              for p, ms in zip(plans, latencies)}
    return plans, {"trials": trials, "latency": timing}


@given(st.lists(st.tuples(latency_ms, share, st.floats(min_value=1e-3, max_value=1e9)), min_size=2, max_size=8))
def test_at_equal_power_a_slower_plan_never_ranks_as_using_less_energy(rows):
    latencies, shares, analytic = (list(column) for column in zip(*rows))
    plans, state = _state(latencies, shares, analytic)
    scored = _scored(plans, state, SETTINGS, baseline=0.9, power=POWER)
    for a in scored:
        # the ranked figure is power × measured time per inference, whatever the analytic table said
        assert a["objective_value"] == a["energy_nj"] == pytest.approx(
            POWER.mid_w * a["latency_ms"]["median"] / SETTINGS.batch * 1e6)
        for b in scored:
            if a["latency_ms"]["median"] > b["latency_ms"]["median"]:
                assert a["objective_value"] >= b["objective_value"]  # never lower (equal only by rounding)
            if a["latency_ms"]["median"] > b["latency_ms"]["median"] * (1 + 1e-9):
                assert a["objective_value"] > b["objective_value"]
    cheapest = pareto_front(scored, lambda t: t["quality"], lambda t: t["objective_value"])[0]
    assert cheapest["latency_ms"]["median"] == min(latencies)  # equal quality: the fastest plan, not the table's


def test_a_plan_that_could_not_be_timed_is_not_ranked_and_says_why():
    plans, state = _state([2.0, 1.0], [0.5, 0.5], [10.0, 1.0])
    state["latency"]["p1"] = {"error": "not timed: RuntimeError: it broke"}
    del state["latency"]["p0"]
    scored = {t["name"]: t for t in _scored(plans, state, SETTINGS, baseline=0.9, power=POWER)}
    for name, reason in (("p1", "RuntimeError: it broke"), ("p0", "not timed")):
        assert scored[name]["objective_value"] is None and reason in scored[name]["not_ranked"]
        assert "energy_nj" not in scored[name] and "latency_ms" not in scored[name]


def test_screening_records_a_plan_that_does_not_run_and_times_the_others(tmp_path):
    torch.manual_seed(0)
    models = {"good": nn.Linear(4, 2).eval()}

    def load(path):
        return models[path.name]  # "bad" is not there: a KeyError, as a trial that cannot be loaded

    seen: dict[str, dict] = {}
    screen_latency(nn.Linear(4, 2).eval(), [("bad", tmp_path / "bad"), ("good", tmp_path / "good")],
                   torch.randn(3, 4), 3, 0.0, seen.__setitem__, progress=False, load=load)
    assert seen["bad"]["error"].startswith("not timed: KeyError")
    assert seen["good"]["median"] > 0 and seen["good"]["baseline_median"] > 0


def test_the_energy_method_names_the_power_its_bounds_and_the_split():
    text = objective_method("energy", 8, 1, power=POWER)
    assert text.startswith("estimated: active power × measured time per inference at batch 8 (5–10 W; "
                           "estimated: a test's power)")
    assert "compute/memory split as shares" in text and "never ranked" in text and "ranked at equal power" in text
    measured = objective_method("energy", 8, 1, counter="rapl", power=POWER)
    assert "measured with rapl" in measured and "not ranked" in measured


def test_plans_are_predicted_by_time_for_energy_as_for_latency():
    import nnopt
    from nnopt.search.costs import probe_cost

    model = nnopt.create_model("simplenet", seed=0)
    assert probe_cost("energy", model) == probe_cost("latency", model) > 0
