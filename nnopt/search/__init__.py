"""Accuracy-aware search (``nnopt.auto``, ``nnopt auto``): sensitivity per unit, candidate plans, trials built
through recipes, the Pareto front of quality against an objective, and the choice within a budget.

>>> import nnopt
>>> data = nnopt.load_dataset("digits")
>>> model = nnopt.create_model("simplenet")  # trained, in practice
>>> result = nnopt.auto(model, data, nnopt.AutoConfig(objective="size", max_drop=0.005))  # doctest: +SKIP
>>> result.recipe, [plan.objective_value for plan in result.front]  # doctest: +SKIP
"""

from __future__ import annotations

from nnopt.search.api import NOTHING_MEETS, AutoResult, FrontPlan, auto
from nnopt.search.checkpoint import Checkpoint, checkpoint_dir
from nnopt.search.config import AutoConfig, SearchSettings
from nnopt.search.engine import SearchOutcome, search
from nnopt.search.pareto import choose, dominates, pareto_front
from nnopt.search.plans import TARGETS, Plan, make_plans, plan_recipe
from nnopt.search.sensitivity import Sensitivity, measure_sensitivity
from nnopt.search.space import KNOBS, OBJECTIVES, BuildOptions, Knob, SearchSpace, build_space, register_knob
from nnopt.search.tasks import TASKS, load_task, make_task, validation_split
from nnopt.search.trials import ContextSpec, TrialContext, build_context, evaluate_plan

__all__ = [
    "KNOBS", "NOTHING_MEETS", "OBJECTIVES", "TASKS", "TARGETS", "AutoConfig", "AutoResult", "BuildOptions",
    "Checkpoint", "ContextSpec", "FrontPlan", "Knob", "Plan", "SearchOutcome", "SearchSettings", "SearchSpace",
    "Sensitivity", "TrialContext", "auto", "build_context", "build_space", "checkpoint_dir", "choose", "dominates",
    "evaluate_plan", "load_task", "make_plans", "make_task", "measure_sensitivity", "pareto_front", "plan_recipe",
    "register_knob", "search", "validation_split",
]
