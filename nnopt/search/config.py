"""What an automatic search is asked: :class:`AutoConfig`, a frozen, validated :class:`nnopt.config.Config`."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

from nnopt.config import Config
from nnopt.errors import ConfigError
from nnopt.search.space import KNOBS, OBJECTIVES, SPACE_VERSION


@dataclasses.dataclass(frozen=True)
class AutoConfig(Config):
    """The objective, the accuracy budget, and how long and wide to search.

    ``max_drop`` is a fraction (0.005 = half a point of accuracy; for a sentence encoder, the mean
    cosine to the input model's embeddings must stay >= 1 - max_drop). ``budget_minutes`` bounds the run:
    no trial starts after 90% of it, and the timings after the trials shrink to what is left (a trial
    already running finishes, and each timing keeps its minimum call count); ``batch`` is the batch
    size latency and energy are measured at.

    >>> AutoConfig(objective="latency", max_drop=0.01, budget_minutes=10).workers
    1
    """

    kind: ClassVar[str] = "auto"

    objective: str = "size"  # one of OBJECTIVES
    max_drop: float = 0.01
    batch: int = 32
    budget_minutes: float = 30.0
    workers: int = 1  # trials in this many spawned processes
    finetune_epochs: int = 20  # after pruning, spread over its stages
    stages: int = 5
    probe_epochs: int = 1  # recovery of each pruning probe (when plans fine-tune)
    targets: tuple[float, ...] | None = None  # predicted cost shares; None: the objective's default
    levels: dict[str, tuple[float, ...]] | None = None  # per knob, overriding its levels (quick runs, tests)
    latency_seconds: float = 2.0  # final side-by-side timing, per model (at least min_calls calls too)
    min_calls: int = 20  # BENCHMARKS.md's protocol; fewer only for quick benchmark runs
    screen_seconds: float = 0.5  # per trial, against the baseline, before the front is known

    def __post_init__(self) -> None:
        levels: Any = self.levels
        if isinstance(levels, dict):  # lists from YAML/JSON become tuples, as Config does for fields
            object.__setattr__(self, "levels", {k: tuple(v) if isinstance(v, list) else v for k, v in levels.items()})
        super().__post_init__()

    def validate(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"AutoConfig.objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if not (math.isfinite(self.max_drop) and 0 <= self.max_drop <= 1):
            raise ConfigError(f"AutoConfig.max_drop must be a fraction in [0, 1] (0.005 = half a point), "
                              f"got {self.max_drop!r}")
        for name in ("batch", "workers", "stages", "min_calls"):
            if getattr(self, name) < 1:
                raise ConfigError(f"AutoConfig.{name} must be an integer >= 1, got {getattr(self, name)!r}")
        for name in ("finetune_epochs", "probe_epochs"):
            if getattr(self, name) < 0:
                raise ConfigError(f"AutoConfig.{name} must be an integer >= 0, got {getattr(self, name)!r}")
        for name in ("budget_minutes", "latency_seconds", "screen_seconds"):
            value = getattr(self, name)
            positive = name == "budget_minutes"
            if not math.isfinite(value) or value < 0 or (positive and value == 0):
                raise ConfigError(f"AutoConfig.{name} must be a number {'> 0' if positive else '>= 0'}, got {value!r}")
        if self.targets is not None and (not self.targets or any(not (0 < t <= 1) for t in self.targets)):
            raise ConfigError(f"AutoConfig.targets must be cost shares in (0, 1], got {self.targets!r}")
        self._validate_levels()

    def _validate_levels(self) -> None:
        if self.levels is None:
            return
        if not isinstance(self.levels, dict):
            raise ConfigError(f"AutoConfig.levels must map knob names to levels, got {self.levels!r}")
        for knob, levels in self.levels.items():
            if knob not in KNOBS:
                raise ConfigError(f"AutoConfig.levels: unknown knob {knob!r}; known: {', '.join(sorted(KNOBS))}")
            if not isinstance(levels, tuple) or not levels or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) for v in levels):
                raise ConfigError(f"AutoConfig.levels[{knob!r}] must be a non-empty sequence of numbers, "
                                  f"got {levels!r}")

    def fingerprint(self) -> dict[str, Any]:
        """The settings that change what a trial measures (not the budget, workers or timing lengths)."""
        return {"objective": self.objective, "max_drop": self.max_drop, "batch": self.batch,
                "finetune_epochs": self.finetune_epochs, "stages": self.stages,
                "probe_epochs": self.probe_epochs, "targets": list(self.targets or ()),
                "levels": {k: list(v) for k, v in sorted((self.levels or {}).items())}, "space_version": SPACE_VERSION}


SearchSettings = AutoConfig  # the name before AutoConfig; kept for existing callers
