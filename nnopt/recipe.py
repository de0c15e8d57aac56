"""Recipes: an ordered list of the same config objects the Python API takes, loadable from YAML.

A step in YAML is one mapping whose ``kind`` picks the config class and whose other keys are that
config's fields::

    name: classic
    weights_format: packed
    steps:
      - kind: prune-threshold
        threshold: 0.01
      - kind: quantize-weights
        bits: 8

Which verb runs a kind, and which part of a data set it reads, is the technique registry
(:mod:`nnopt.techniques`); parsing rejects anything it does not know, naming the key and its place.

>>> recipe = parse_recipe({"steps": [{"kind": "prune-threshold", "threshold": 0.01}]})
>>> recipe.steps
(ThresholdPruneConfig(threshold=0.01, layers=()),)
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

from torch import nn

import nnopt.pruning  # noqa: F401  (the built-in techniques register themselves on import)
import nnopt.quantization  # noqa: F401
import nnopt.simplification  # noqa: F401
import nnopt.sparse  # noqa: F401
from nnopt.config import CONFIG_VERSION, Config
from nnopt.data import Dataset
from nnopt.errors import ConfigError
from nnopt.io.model_dir import WEIGHT_FILES
from nnopt.io.yaml_file import read_yaml_file
from nnopt.techniques import Technique, kinds, run_technique, technique_for, technique_named, working_copy

__all__ = [
    "Recipe", "apply_recipe", "check_data", "data_needs", "load_recipe", "parse_recipe", "recipe_to_dict",
    "recipe_to_yaml", "recorded_recipe", "step_kind", "step_kinds",
]

TOP_LEVEL_KEYS = ("name", "description", "weights_format", "steps")

def step_kinds() -> tuple[str, ...]:
    """The kinds a recipe step may name, sorted (every registered technique's kind)."""
    return kinds()


def step_kind(kind: str) -> Technique:
    """How a recipe runs ``kind``: its technique (config class, verb and data needs)."""
    technique = technique_named(kind)
    if technique.kind != kind:  # a legacy pass name or a CLI preset is not a recipe kind
        raise ConfigError(f"unknown recipe step kind {kind!r}; known kinds: {', '.join(step_kinds())}")
    return technique


# ------------------------------------------------------------------------------------------ recipe


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Steps applied in order; ``weights_format`` ("safetensors" or "packed") is how
    ``nnopt optimize`` saves the result. Validated on construction, like a config."""

    steps: tuple[Config, ...]
    name: str = ""
    description: str = ""
    weights_format: str = "safetensors"

    def __post_init__(self) -> None:
        if isinstance(self.steps, list):
            object.__setattr__(self, "steps", tuple(self.steps))
        if not isinstance(self.steps, tuple):
            raise ConfigError(f"Recipe.steps: expected a tuple of configs, got {type(self.steps).__name__}")
        if not self.steps:
            raise ConfigError("Recipe.steps is empty; a recipe needs at least one step")
        for index, step in enumerate(self.steps):
            if not isinstance(step, Config) or not _is_step(step):
                raise ConfigError(f"Recipe.steps[{index}]: {type(step).__name__} is not a recipe step; "
                                  f"known kinds: {', '.join(step_kinds())}")
        for field in ("name", "description", "weights_format"):
            value = getattr(self, field)
            if not isinstance(value, str):
                raise ConfigError(f"Recipe.{field}: expected str, got {type(value).__name__} {value!r}")
        if self.weights_format not in WEIGHT_FILES:
            raise ConfigError(f"Recipe.weights_format must be one of {', '.join(WEIGHT_FILES)}, "
                              f"got {self.weights_format!r}")


def parse_recipe(data: Any, where: str = "recipe") -> Recipe:
    """Build a :class:`Recipe` from plain data (what ``yaml.safe_load`` returns).

    Every error names its place: ``R.yaml: steps[2] (kind quantize-weights): unknown key 'bitz'; ...``.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping with a 'steps' list, got {_describe(data)}")
    _reject_unknown(data, TOP_LEVEL_KEYS, where)
    for key in ("name", "description", "weights_format"):
        if key in data and not isinstance(data[key], str):
            raise ConfigError(f"{where}: {key}: expected str, got {_describe(data[key])}")
    if data.get("weights_format", "safetensors") not in WEIGHT_FILES:
        raise ConfigError(f"{where}: weights_format must be one of {', '.join(WEIGHT_FILES)}, "
                          f"got {data['weights_format']!r}")
    if "steps" not in data:
        raise ConfigError(f"{where}: missing key 'steps' (a list of mappings, each with a 'kind')")
    steps = data["steps"]
    if not isinstance(steps, list):
        raise ConfigError(f"{where}: steps: expected a list of mappings, got {_describe(steps)}")
    if not steps:
        raise ConfigError(f"{where}: steps is empty; a recipe needs at least one step")
    parsed = tuple(_parse_step(item, f"{where}: steps[{i}]") for i, item in enumerate(steps))
    return Recipe(steps=parsed, name=data.get("name", ""), description=data.get("description", ""),
                  weights_format=data.get("weights_format", "safetensors"))


def _parse_step(item: Any, place: str) -> Config:
    if not isinstance(item, dict):
        raise ConfigError(f"{place}: expected a mapping with a 'kind', got {_describe(item)}")
    kind = item.get("kind")
    if kind is None:
        raise ConfigError(f"{place}: missing key 'kind'; known kinds: {', '.join(step_kinds())}")
    if not isinstance(kind, str) or kind not in step_kinds():
        raise ConfigError(f"{place}: unknown kind {kind!r}; known kinds: {', '.join(step_kinds())}")
    cls = step_kind(kind).config_type
    place = f"{place} (kind {kind})"
    fields = [f.name for f in dataclasses.fields(cls)]
    _reject_unknown(item, ("kind", "version", *fields), place, shown=fields)
    if item.get("version", CONFIG_VERSION) != CONFIG_VERSION:
        raise ConfigError(f"{place}: version {item['version']!r} is not supported; this nnopt reads {CONFIG_VERSION}")
    _reject_yaml_number_strings(cls, item, place)
    try:
        return cls.from_dict(item, where=place)
    except ConfigError as exc:
        raise ConfigError(f"{place}: {exc}") from None


def _reject_unknown(data: dict[Any, Any], allowed: tuple[str, ...], place: str,
                    shown: list[str] | None = None) -> None:
    unknown = sorted((key for key in data if key not in allowed), key=str)
    if unknown:
        noun = "key" if len(unknown) == 1 else "keys"
        names = ", ".join(sorted(shown if shown is not None else allowed)) or "(none)"
        raise ConfigError(f"{place}: unknown {noun} {', '.join(map(repr, unknown))}; allowed: {names}")


def _reject_yaml_number_strings(cls: type[Config], item: dict[str, Any], place: str) -> None:
    """YAML 1.1 reads ``1e-3`` (no dot) as text: say so rather than only "expected float"."""
    hints = typing.get_type_hints(cls)
    for key, value in item.items():
        if key in hints and isinstance(value, str) and _accepts_float(hints[key]):
            try:
                number = float(value)
            except ValueError:
                continue
            raise ConfigError(f"{place}: {key}: expected a number, got str {value!r} (YAML reads exponents "
                              f"without a dot as text: write {_yaml_float(number)})")


def _yaml_float(number: float) -> str:
    text = repr(number)
    mantissa, e, exponent = text.partition("e")
    return f"{mantissa}.0e{exponent}" if e and "." not in mantissa else text


def _accepts_float(hint: Any) -> bool:
    return hint is float or float in typing.get_args(hint)


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}" if value is not None else "nothing (null)"


def load_recipe(path: str | Path) -> Recipe:
    """Read a YAML recipe file (``yaml.safe_load``: nothing in it is executed)."""
    data = read_yaml_file(path)
    return parse_recipe(data, where=str(path))


def recorded_recipe(path: str | Path) -> Recipe:
    """The recipe that ``nnopt optimize`` recorded in a saved model's ``nnopt.json``.

    >>> print(recipe_to_yaml(recorded_recipe("simplenet-classic")))  # doctest: +SKIP
    """
    from nnopt.errors import ModelFormatError
    from nnopt.io.model_dir import META_FILE, read_meta

    meta = read_meta(path)
    data = meta.get("metrics", {}).get("recipe") if isinstance(meta.get("metrics"), dict) else None
    if data is None:
        raise ModelFormatError(f"{path}: {META_FILE} records no recipe (it was not written by nnopt optimize)")
    try:
        return parse_recipe(data, where=f"{Path(path) / META_FILE} metrics.recipe")
    except ConfigError as exc:
        raise ModelFormatError(str(exc)) from None


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """Plain data that :func:`parse_recipe` turns back into an equal recipe (every field written out)."""
    steps = []
    for step in recipe.steps:
        data = step.to_dict()
        data.pop("version", None)  # one version for all configs today; parse_recipe accepts it if present
        steps.append(data)
    return {"name": recipe.name, "description": recipe.description, "weights_format": recipe.weights_format,
            "steps": steps}


def recipe_to_yaml(recipe: Recipe) -> str:
    """YAML text of :func:`recipe_to_dict`; ``parse_recipe(yaml.safe_load(text)) == recipe``."""
    import yaml

    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False, allow_unicode=True, width=100)


# ------------------------------------------------------------------------------------------ apply


def data_needs(recipe: Recipe) -> tuple[str, ...]:
    """One line per step that cannot run without data, naming the step and why."""
    needs = []
    for index, step in enumerate(recipe.steps):
        reason = technique_for(step).needs_data(step)
        if reason:
            needs.append(f"steps[{index}] (kind {step.kind}) needs data for {reason}")
    return tuple(needs)


def check_data(recipe: Recipe, has_data: bool, hint: str = "pass data=... (a Dataset)", where: str = "") -> None:
    """Raise :class:`ConfigError` before any work when a step needs data and there is none.

    ``where`` (the recipe file, say) prefixes the message; ``hint`` ends it.
    """
    needs = data_needs(recipe)
    if needs and not has_data:
        more = f" (and {len(needs) - 1} more step{'s' if len(needs) > 2 else ''})" if len(needs) > 1 else ""
        raise ConfigError(f"{where + ': ' if where else ''}{needs[0]}{more}: {hint}")


def apply_recipe(
    model: nn.Module, recipe: Recipe, data: Dataset | None = None, progress: bool | None = None,
    data_parallel: int = 1,
) -> nn.Module:
    """Apply ``recipe``'s steps in order to a copy of ``model`` and return it.

    Each step runs through its verb, so the model's record lists every pass (fine-tuning steps,
    kind ``train``, change values only and are not recorded as passes). Steps that calibrate or
    fine-tune read ``data``'s training split; its test split is never used. ``data_parallel`` > 1:
    steps that train do so in that many DDP processes (see :func:`nnopt.train`).

    >>> small = apply_recipe(model, load_recipe("recipes/classic.yaml"))  # doctest: +SKIP
    """
    if not isinstance(recipe, Recipe):
        raise ConfigError(f"expected a Recipe, got {type(recipe).__name__}")
    if data is not None and not isinstance(data, Dataset):
        raise ConfigError(f"data must be an nnopt Dataset (nnopt.load_dataset(...)), got {type(data).__name__}")
    check_data(recipe, data is not None)
    parallel = _parallel_option(recipe, data_parallel)
    current = working_copy(model)
    # Without labels, steps that fine-tune distil from the model as it was before the first step.
    teacher = {"teacher": working_copy(model).eval()} if data is not None and data.train.y is None else {}
    for step in recipe.steps:
        technique = technique_for(step)
        part = technique.data_for(data, step) if data is not None else None
        # the verbs' shared body, in place: every step of the recipe works on one copy
        current = run_technique(technique.verb, current, step, True, data=part, progress=progress, **parallel,
                                **teacher)
    return current.eval()


def _parallel_option(recipe: Recipe, data_parallel: int) -> dict[str, int]:
    """``{"data_parallel": N}`` for the techniques when N > 1, after checking that some step trains and
    that every step's technique takes the option."""
    import inspect

    from nnopt.training import parallel_context

    option = parallel_context(data_parallel)
    if option and not any(technique_for(step).trains(step) for step in recipe.steps):
        raise ConfigError("data_parallel applies to recipes with a step that trains (fine-tuning); this one has none")
    for step in recipe.steps if option else ():
        parameters = inspect.signature(technique_for(step).apply).parameters.values()
        if not any(p.name == "data_parallel" or p.kind is p.VAR_KEYWORD for p in parameters):
            raise ConfigError(f"recipe step kind {step.kind!r} does not run data-parallel; use data_parallel=1")
    return option


def _is_step(step: Config) -> bool:
    try:
        return technique_for(step).kind == step.kind
    except ConfigError:
        return False
