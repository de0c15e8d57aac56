"""``nnopt.auto(model, data, AutoConfig(...))``: the automatic search as a Python verb.

It takes an in-memory model and data and returns an :class:`AutoResult`; it writes no output. Trial
models are written to a work directory, because their size is the bytes of the file written and
latency is timed from them: a temporary directory, removed before returning, unless ``checkpoint_dir``
asks to keep the work there so that an interrupted search can be resumed. ``nnopt auto``
(:mod:`nnopt.pipeline.auto_run`) calls this verb and writes what it returns.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from nnopt.data import Dataset, as_dataset, call_model
from nnopt.errors import ConfigError, NnoptError
from nnopt.search.checkpoint import Checkpoint
from nnopt.search.config import AutoConfig
from nnopt.search.engine import plan_of, search
from nnopt.search.plans import plan_recipe
from nnopt.search.space import BuildOptions
from nnopt.search.summary import InputModel, build_report, rebuild
from nnopt.search.tasks import Task, make_task, prepare
from nnopt.search.trials import ContextSpec, ModuleTemplate, TrialContext, analytic_energy, build_context

if TYPE_CHECKING:
    from nnopt.recipe import Recipe

# Exit status when no plan is chosen: none meets the accuracy budget (or, latency and energy: none is faster).
NOTHING_MEETS = 3
INPUT_DIR = "input"  # in the work directory: the input model, when it was not loaded from a directory


@dataclasses.dataclass(frozen=True)
class FrontPlan:
    """One plan on the Pareto front: its recipe and what the search measured of it on the validation split.

    ``figures`` is the plan's row of the report (bytes, latency_ms, speedup, energy_nj, macs, ...), each
    figure described in ``report["methods"]``."""

    name: str
    recipe: Recipe
    quality: float  # top-1 accuracy, or mean cosine to the input model's embeddings
    drop: float  # baseline quality minus this plan's
    objective_value: float  # bytes, median ms or nJ per inference (power × measured time): lower is better
    meets_budget: bool
    chosen: bool
    figures: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class AutoResult:
    """What :func:`auto` found: the chosen model and recipe (None when no plan meets the budget), its
    figures on the test split, the front (cheapest first) and the report document (``report.json`` of
    ``nnopt auto``: every figure with its method, the trials, the sensitivities, the budget spent)."""

    model: nn.Module | None  # the chosen plan rebuilt on the whole training split, as apply_recipe does
    recipe: Recipe | None
    test: dict[str, float]  # the chosen model on the test split: accuracy, or cosine_mean and cosine_min
    front: tuple[FrontPlan, ...]
    report: dict[str, Any]

    @property
    def chosen(self) -> bool:
        return self.recipe is not None

    @property
    def exit_code(self) -> int:
        """0 with a chosen plan, :data:`NOTHING_MEETS` (3) without."""
        return 0 if self.chosen else NOTHING_MEETS

    @property
    def message(self) -> str:
        return str(self.report["message"])

    def __str__(self) -> str:
        from nnopt.metrics.table import render_table

        report = self.report
        metric = report["metric"]
        rows = []
        for v in report["variants"]:
            latency = v.get("latency_ms") or {}
            rows.append((v["name"] + (" *" if v.get("chosen") else ""), _fmt(v.get(metric)), _fmt(v.get("test")),
                         v.get("bytes"), _fmt(v.get("compression_ratio"), "x"), _fmt(latency.get("median")),
                         _fmt(v.get("speedup"), "x"), _fmt(v.get("energy_nj"))))
        columns = (f"plan ({report['objective']})", f"{metric} (validation)", f"{metric} (test)", "bytes",
                   "vs fp32", f"ms @{report['batch']}", "speed-up", "nJ (est.)")
        caption = ("* chosen. Bytes, latency: measured; energy: estimated, active power × measured time. "
                   f"Validation: {report['dataset'].get('validation')} rows/sentences held out from every step.")
        table = render_table(columns, rows, title="nnopt auto", caption=caption)
        return f"{table}\nobjective {report['objective']}: {report['objective_method']}\n{report['message']}"


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:.4g}{unit}" if isinstance(value, float) else f"{value}{unit}"


def auto(model: nn.Module, data: Dataset | str | Any, config: AutoConfig | None = None, *,
         checkpoint_dir: str | Path | None = None, resume: bool = False, keep_checkpoint: bool = False,
         source: str | Path | None = None, progress: bool | None = None,
         trust_import: bool | None = None) -> AutoResult:
    """Search for the plan (a recipe) that best serves ``config.objective`` within ``config.max_drop``.

    Measures each unit's sensitivity on a validation split held out of ``data``'s training split,
    evaluates candidate plans through their recipes, keeps the Pareto front of quality against the
    objective, and rebuilds the cheapest plan within the budget on the whole training split, then
    measures it on the test split (``result.test``), which the search never read.

    ``model`` is any ``nn.Module`` (the user's own, ``create_model``, ``load_model``, an adapter); it is left
    as it was. Trial models of a user's own module are rebuilt from a copy of it (nothing is imported).
    ``data`` is a :class:`~nnopt.data.Dataset` (``nnopt.load_data(PATH)`` reads files), anything
    :func:`nnopt.as_dataset` takes (tensors, arrays, ``(x, y)``, torch Datasets and DataLoaders), or bundled data
    by name: ``"digits"``, or ``"sentences"`` for a sentence encoder (quality: mean cosine to the input model's
    embeddings). The quality metric follows the data: top-1 accuracy with labels; without them top-1 agreement
    with the input model's predictions (``report["metric"] == "agreement"``), or the mean cosine of its outputs
    for an embedding model, and fine-tuning steps distil from the model they start from.

    ``checkpoint_dir`` keeps the trials there after each step; ``resume=True`` continues what an
    interrupted call with the same model, data and settings left. A finished search removes it, unless
    ``keep_checkpoint`` (a caller that still writes the result removes it once that is done, as
    ``nnopt auto`` does, so that an interruption while writing loses no trial).
    ``source`` is the model directory ``model`` was loaded from: its weights file then gives the
    baseline's size and identity, and worker processes load it from there. ``trust_import=True``: worker
    processes may import the package a loaded user module's record names, as
    ``load_model(..., trust_import=True)`` did (default: as :func:`nnopt.loading.trusting_imports` says).

    >>> import nnopt
    >>> data = nnopt.load_dataset("digits")
    >>> model = nnopt.create_model("simplenet")
    >>> _ = nnopt.train(model, data.train, nnopt.TrainConfig(epochs=3), progress=False)
    >>> config = nnopt.AutoConfig(objective="size", max_drop=0.01, budget_minutes=5)
    >>> result = nnopt.auto(model, data, config)  # doctest: +SKIP
    >>> result.test["accuracy"], result.recipe.steps  # doctest: +SKIP
    >>> print(result)  # the front beside the baseline, and what was chosen  # doctest: +SKIP
    """
    config = AutoConfig() if config is None else config
    if not isinstance(config, AutoConfig):
        raise ConfigError(f"config must be an AutoConfig, got {type(config).__name__}")
    if resume and checkpoint_dir is None:
        raise ConfigError("resume=True needs the checkpoint_dir of the interrupted search")
    if not isinstance(data, str | Dataset):
        try:  # the user's tensors, Datasets or DataLoaders: one conversion, then as any Dataset
            data = as_dataset(data)
        except ConfigError as exc:
            raise ConfigError(f"data must be an nnopt.data.Dataset, a bundled name ('digits', 'sentences') or what "
                              f"nnopt.as_dataset takes (tensors, arrays, (x, y), torch Datasets): {exc}") from None
    from nnopt.lineage import (
        USER_MODULE,
        get_lineage,
        has_lineage,
        note_input,
        recorded_input,
        set_lineage,
        user_module_lineage,
    )
    from nnopt.loading import trusted_imports

    factory = None
    sample = data.train.x if isinstance(data, Dataset) else None
    if not has_lineage(model):  # the user's own module: a copy gets its record, and rebuilds trial models
        template = ModuleTemplate(model)
        model, factory = template(), template
        set_lineage(model, user_module_lineage(model))
    elif recorded_input(model) is None and get_lineage(model).architecture == USER_MODULE:
        model = copy.deepcopy(model)  # a loaded user module learns its sample shape: on a copy, not the caller's
    note_input(model, sample)
    with _modes_kept(model):  # the search runs the model in eval mode; the caller's mode comes back
        model.eval()  # also before the first check's forward pass: BatchNorm must not update its statistics
        task = make_task(data)
        task.check_fits(model)
        _check_objective(model, task, config)
        loaded = _loaded_from(model, source) if source is not None else None
        fingerprint = {"model_sha256": loaded[1].sha256 if loaded else _tensor_sha256(model.state_dict().items()),
                       "architecture": _lineage(model).architecture, **_data_fingerprint(data),
                       **config.fingerprint()}
        with _workspace(checkpoint_dir) as work:
            checkpoint = Checkpoint.at(work, fingerprint, resume)  # refusals (stale or foreign) come first
            model_path, input_model = loaded or _saved_copy(model, work, factory)
            spec = ContextSpec(model_path=str(model_path), data=data, objective=config.objective,
                               batch=config.batch, levels=config.levels,
                               options=BuildOptions(finetune_epochs=config.finetune_epochs, stages=config.stages),
                               threads=_threads_per_worker(config.workers), factory=factory,
                               trust_import=trusted_imports() if trust_import is None else trust_import)
            prepare(task, model)
            ctx = build_context(spec, model=model, task=task)  # finds the search space: an error if there is none
            outcome = search(ctx, config, checkpoint, task.quality(model, "validation"), progress)
            final = rebuild(ctx, outcome, work)
            report = build_report(ctx, config, outcome, final, input_model)
            front = tuple(_front_plan(row, trial, ctx, report["metric"])
                          for row, trial in zip(report["front"], outcome.front))
            if not keep_checkpoint:
                checkpoint.remove()
    if final is None:
        return AutoResult(None, None, {}, front, report)
    return AutoResult(final.model, final.recipe, final.test, front, report)


def _front_plan(row: dict[str, Any], trial: dict[str, Any], ctx: TrialContext, metric: str) -> FrontPlan:
    return FrontPlan(name=row["name"], recipe=plan_recipe(plan_of(trial), ctx.space, ctx.spec.options),
                     quality=row[metric], drop=row["drop"], objective_value=row["objective_value"],
                     meets_budget=row["meets_budget"], chosen=row["chosen"], figures=row)


@contextlib.contextmanager
def _modes_kept(model: nn.Module) -> Iterator[None]:
    modes = [(module, module.training) for module in model.modules()]
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


@contextlib.contextmanager
def _workspace(checkpoint_dir: str | Path | None) -> Iterator[Path]:
    """Where trial models go: the checkpoint directory, or a temporary one removed afterwards (also on errors)."""
    if checkpoint_dir is not None:
        yield Path(checkpoint_dir)
        return
    with tempfile.TemporaryDirectory(prefix="nnopt-auto-") as tmp:
        yield Path(tmp) / "search"  # not created yet: a fresh checkpoint refuses an existing directory


def _loaded_from(model: nn.Module, source: str | Path) -> tuple[Path, InputModel]:
    """The directory workers load the input model from, and its weights file's size and identity."""
    from nnopt.io.model_dir import read_meta, weights_file

    meta = read_meta(source)
    return Path(source).resolve(), _input_model(model, meta["files"][weights_file(meta)])


def _saved_copy(model: nn.Module, work: Path, factory: ModuleTemplate | None) -> tuple[Path, InputModel]:
    """The input model written to the work directory: its bytes are the baseline's, and workers load it."""
    from nnopt.saving import save_model

    work.mkdir(parents=True, exist_ok=True)
    saved = save_model(model, work / INPUT_DIR, overwrite=True, factory=factory)
    return saved.path.resolve(), _input_model(model, next(iter(saved.meta["files"].values())))


def _input_model(model: nn.Module, weights: dict[str, Any]) -> InputModel:
    lineage = _lineage(model)
    return InputModel(lineage.architecture, tuple(p.name for p in lineage.applied), int(weights["bytes"]),
                      str(weights["sha256"]))


def _lineage(model: nn.Module) -> Any:
    from nnopt.lineage import get_lineage

    return get_lineage(model)  # an error naming the fix for a model nnopt did not create


def _tensor_sha256(tensors: Iterable[tuple[str, Any]]) -> str:
    """A digest of named tensors (names, dtypes, shapes and bytes): a model's or a data set's identity."""
    digest = hashlib.sha256()
    for name, value in sorted(tensors, key=lambda item: item[0]):
        digest.update(name.encode())
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu().contiguous()
            digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            digest.update(repr(value).encode())
    return digest.hexdigest()


def _data_fingerprint(data: Dataset | str) -> dict[str, Any]:
    if not isinstance(data, Dataset):
        return {"data": data}
    splits = {"train": data.train, "test": data.test}
    return {"data": data.name, "data_sha256": _tensor_sha256(
        item for name, split in splits.items() for item in _parts(f"{name}.x", split.x) + [(f"{name}.y", split.y)])}


def _parts(name: str, x: Any) -> list[tuple[str, Any]]:
    """Named tensors of one split's inputs (a tensor, a tuple or a dict of them)."""
    if isinstance(x, dict):
        return [(f"{name}.{key}", value) for key, value in x.items()]
    if isinstance(x, tuple):
        return [(f"{name}.{i}", value) for i, value in enumerate(x)]
    return [(name, x)]


def _check_objective(model: nn.Module, task: Task, config: AutoConfig) -> None:
    """The objective must be measurable for this model here, before any work."""
    try:
        with torch.inference_mode():
            inputs = task.timing_inputs(model, config.batch)
            call_model(model, inputs)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ConfigError(f"the model does not run on a batch of {config.batch}: {exc}") from None
    if config.objective == "energy":
        try:  # every trial notes the analytic split of its energy
            analytic_energy(model, config.batch)
        except (NnoptError, RuntimeError, ValueError) as exc:
            raise ConfigError(f"AutoConfig.objective is energy, but nnopt cannot estimate this model's energy "
                              f"split ({exc})") from None


def _threads_per_worker(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // max(1, workers))
