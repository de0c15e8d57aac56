"""Accuracy-aware search (``nnopt auto``): sensitivity per unit, candidate plans, trials built through
recipes, the Pareto front of quality against an objective, and the choice within a budget.

>>> from nnopt.search import SearchSettings
>>> from nnopt.pipeline.auto_run import run_auto
>>> settings = SearchSettings(objective="size", max_drop=0.005)
>>> result = run_auto("lenet300-dir", "digits", settings, "auto-out")  # doctest: +SKIP
>>> result.report["result"]["compression_ratio"]  # doctest: +SKIP
"""

from __future__ import annotations

from nnopt.search.checkpoint import Checkpoint, checkpoint_dir
from nnopt.search.engine import SearchOutcome, SearchSettings, search
from nnopt.search.pareto import choose, dominates, pareto_front
from nnopt.search.plans import TARGETS, Plan, make_plans, plan_recipe
from nnopt.search.sensitivity import Sensitivity, measure_sensitivity
from nnopt.search.space import KNOBS, OBJECTIVES, BuildOptions, Knob, SearchSpace, build_space, register_knob
from nnopt.search.tasks import TASKS, load_task, validation_split
from nnopt.search.trials import ContextSpec, TrialContext, build_context, evaluate_plan

__all__ = [
    "KNOBS", "OBJECTIVES", "TASKS", "TARGETS", "BuildOptions", "Checkpoint", "ContextSpec", "Knob", "Plan",
    "SearchOutcome", "SearchSettings", "SearchSpace", "Sensitivity", "TrialContext", "build_context",
    "build_space", "checkpoint_dir", "choose", "dominates", "evaluate_plan", "load_task", "make_plans",
    "measure_sensitivity", "pareto_front", "plan_recipe", "register_knob", "search", "validation_split",
]
