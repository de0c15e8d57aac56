"""The technique registry: one entry per config type, read by the verbs, recipes, the CLI and loading.

An entry holds the config's ``kind`` (which is also the pass name a saved model records, the recipe
step kind and the CLI name), the verb that runs it, how to apply it, how to re-create on load the
structure it produced, and whether and what data it needs. A new technique is one module (its
config, ``apply`` and ``replay``) plus one :func:`register_technique` call::

    register_technique(Technique(MyConfig, verb="prune", apply=my_apply))
    pruned = nnopt.prune(model, MyConfig(...))           # the verb finds it by the config's type
    recipe = parse_recipe({"steps": [{"kind": MyConfig.kind}]})  # so does a recipe, by its kind

This module sits at the base of the package: technique packages import it to register themselves;
the load path (:mod:`nnopt.loading`) sits above them and imports the built-in ones.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from torch import nn

from nnopt.config import Config
from nnopt.errors import ConfigError, ModelFormatError
from nnopt.lineage import AppliedPass, has_lineage, note_input, set_lineage, user_module_lineage, with_pass

if TYPE_CHECKING:
    from nnopt.data import Dataset

Apply = Callable[..., dict[str, Any]]  # (model, config, **context) -> details to record with the pass
Replay = Callable[[nn.Module, AppliedPass], None]  # re-creates the pass's module structure on load
VERBS = ("prune", "quantize", "simplify", "sparsify", "finetune")
_NOUNS = {"prune": "pruning", "quantize": "quantization", "simplify": "simplify", "sparsify": "sparse kernel",
          "finetune": "fine-tuning"}  # for messages: "... is not a pruning config"


def no_data(config: Any) -> str | None:
    """``needs_data`` of a technique that never reads data."""
    return None


def always(reason: str) -> Callable[[Any], str | None]:
    """``needs_data`` of a technique that always reads data, for ``reason`` ("calibration", "fine-tuning")."""
    return lambda config: reason


def no_split(dataset: Dataset, config: Any) -> Any:
    """``data_for`` of a technique that reads nothing."""
    return None


def train_split(dataset: Dataset, config: Any) -> Any:
    """``data_for`` of a technique that reads the whole training split."""
    return dataset.train


def calibration_rows(dataset: Dataset, config: Any) -> Any:
    """``data_for`` of a calibrating technique: a stratified subset of ``config.calibration_samples`` rows."""
    return dataset.calibration(config.calibration_samples)


@dataclasses.dataclass(frozen=True)
class Technique:
    """How nnopt runs, records, replays and feeds one config type.

    ``needs_data(config)`` says why that config cannot run without data (None: it can; a reason
    naming "fine-tuning" marks a step that trains); ``data_for(dataset, config)`` is the part of a
    data set it reads (test rows are never handed to a technique). ``records=False``: the pass
    changes values only and the model's record does not list it (fine-tuning). ``legacy_names``:
    pass names older versions recorded, still replayed on load. ``presets``: further CLI names for
    the config with some fields fixed (``int4-weight`` is ``quantize-weights`` with ``bits=4``).
    """

    config_type: type[Config]
    verb: str
    apply: Apply
    replay: Replay | None = None
    needs_data: Callable[[Any], str | None] = no_data
    data_for: Callable[[Dataset, Any], Any] = no_split
    records: bool = True
    legacy_names: tuple[str, ...] = ()
    presets: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)

    @property
    def kind(self) -> str:
        return self.config_type.kind

    def trains(self, config: Config) -> bool:
        """Whether this config fine-tunes the model (its data need names fine-tuning)."""
        return "fine-tuning" in (self.needs_data(config) or "")


_BY_TYPE: dict[type, Technique] = {}
_BY_NAME: dict[str, Technique] = {}  # kinds, legacy pass names and presets


def register_technique(technique: Technique) -> Technique:
    """Add ``technique``; a config type, kind, legacy name or preset already registered is an error."""
    if technique.verb not in VERBS:
        raise ValueError(f"verb must be one of {', '.join(VERBS)}, got {technique.verb!r}")
    kind = getattr(technique.config_type, "kind", None)
    if not (isinstance(technique.config_type, type) and issubclass(technique.config_type, Config)) or not kind:
        raise ValueError(f"{technique.config_type!r} is not a Config subclass with a kind")
    if technique.config_type in _BY_TYPE:
        raise ValueError(f"{technique.config_type.__name__} is already registered")
    names = (kind, *technique.legacy_names, *technique.presets)
    taken = [name for name in names if name in _BY_NAME]
    if taken or len(set(names)) != len(names):
        raise ValueError(f"technique name {(taken or [kind])[0]!r} is already registered")
    _BY_TYPE[technique.config_type] = technique
    for name in names:
        _BY_NAME[name] = technique
    return technique


def unregister_technique(config_type: type) -> None:
    """Remove a registration (for tests that register a toy technique)."""
    technique = _BY_TYPE.pop(config_type)
    for name in [n for n, t in _BY_NAME.items() if t is technique]:
        del _BY_NAME[name]


def techniques(verb: str | None = None) -> tuple[Technique, ...]:
    """The registered techniques (those of one verb), sorted by kind."""
    return tuple(sorted((t for t in _BY_TYPE.values() if verb in (None, t.verb)), key=lambda t: t.kind))


def kinds(verb: str | None = None) -> tuple[str, ...]:
    """The registered kinds (of one verb), sorted."""
    return tuple(t.kind for t in techniques(verb))


def technique_for(config: Any, verb: str | None = None) -> Technique:
    """The entry of ``config``'s type; ConfigError if there is none (or it belongs to another verb)."""
    technique = _BY_TYPE.get(type(config))
    if technique is None or verb not in (None, technique.verb):
        known = ", ".join(t.config_type.__name__ for t in techniques(verb))
        noun = _NOUNS.get(verb or "", "technique")
        raise ConfigError(f"{type(config).__name__} is not a {noun} config; known: {known}")
    return technique


def technique_named(name: str) -> Technique:
    """The entry whose kind, legacy pass name or preset is ``name``; ConfigError naming the known kinds."""
    technique = _BY_NAME.get(name) if isinstance(name, str) else None
    if technique is None:
        raise ConfigError(f"unknown kind {name!r}; known kinds: {', '.join(kinds())}")
    return technique


def config_named(name: str, **fields: Any) -> Config:
    """The config a kind or preset name stands for, with ``fields`` set (validated by the config).

    >>> import nnopt.quantization
    >>> config = config_named("int4-weight", group_size=32)
    >>> config.bits, config.per_channel, config.group_size
    (4, True, 32)
    """
    technique = technique_named(name)
    preset = dict(technique.presets.get(name, {}))
    clash = sorted(set(preset) & set(fields))
    if clash:
        raise ConfigError(f"{name} fixes {clash[0]}={preset[clash[0]]!r}; use {technique.kind} to choose it")
    return technique.config_type(**preset, **fields)


def replay_structure(model: nn.Module, applied: AppliedPass) -> None:
    """Re-create the module structure a recorded pass produced (values are loaded afterwards)."""
    technique = _BY_NAME.get(applied.name)
    if technique is None or technique.presets.get(applied.name) is not None:
        raise ModelFormatError(
            f"the model records pass {applied.name!r}, which this nnopt does not know; known: {', '.join(kinds())}"
        )
    if technique.replay is not None:
        technique.replay(model, applied)


# ----------------------------------------------------------------------------------------- verbs


def working_copy(model: Any, inplace: bool = False) -> nn.Module:
    """The module a verb works on: the model itself, a deep copy, or a converted Keras model.

    A module nnopt did not create gets a user-module lineage (its class's import path, as data), so
    that every pass after is recorded and the result saves and reloads. The user's model is never
    changed, except with ``inplace=True``, where that record is attached to it as an attribute
    (``_nnopt_lineage``, outside its state dict).
    """
    if _is_keras(model):
        if inplace:
            raise ConfigError("a Keras model is converted to an nnopt model, so inplace=True cannot apply")
        from nnopt.models import from_keras

        converted: nn.Module = from_keras(model)
        return converted
    if not isinstance(model, nn.Module):
        raise ModelFormatError(f"expected a torch.nn.Module or a Keras model, got {type(model).__name__}")
    target = model if inplace else copy.deepcopy(model)
    if not has_lineage(target):
        set_lineage(target, user_module_lineage(target))
    return target


def record(model: nn.Module, name: str, config: dict[str, Any], details: dict[str, Any]) -> None:
    """Note a pass on ``model`` (a module without a record gets a user-module one first)."""
    if not has_lineage(model):
        set_lineage(model, user_module_lineage(model))
    with_pass(model, AppliedPass(name=name, config=config, details=details))


def run_technique(verb: str, model: Any, config: Any, inplace: bool, **context: Any) -> nn.Module:
    """Shared body of the verbs: find the config's technique, run it, record the pass.

    ``context`` (data for passes that fine-tune, progress, checkpoints, ...) goes to ``apply`` as is.
    The result is a copy unless ``inplace``; see :func:`working_copy` for what ``inplace`` attaches to a
    module nnopt did not create.
    """
    from nnopt.data import training_data

    technique = technique_for(config, verb)
    if "data" in context:  # tensors, arrays, Datasets and DataLoaders become a Split (see nnopt.as_dataset)
        context["data"] = training_data(context["data"])
    target = working_copy(model, inplace)
    note_input(target, getattr(context.get("data"), "x", None))
    details = technique.apply(target, config, **context)
    if technique.records:
        record(target, technique.kind, config.to_dict(), details)
    return target


def _is_keras(model: Any) -> bool:
    return any(cls.__module__.split(".")[0] == "keras" for cls in type(model).__mro__)
