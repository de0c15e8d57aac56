"""`nnopt optimize PATH --recipe R.yaml`: apply a YAML recipe to a saved model, measure it before
and after side by side, and save the result with the recipe recorded in its ``nnopt.json``.

The command line is nnopt.cli.optimize; torch and the techniques load when the workflow runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from nnopt.errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

    from nnopt.pipeline.runs import Row, RunResult
    from nnopt.recipe import Recipe

BATCHES = (1, 32)


def run_optimize(
    path: str | Path,
    recipe_path: str | Path,
    out: str | Path,
    data_name: str | None = None,
    overwrite: bool = False,
    latency_seconds: float = 0.5,
    progress: bool | None = None,
    data_parallel: int = 1,
    data_options: dict[str, Any] | None = None,
) -> RunResult:
    """Check the recipe, the data and ``out``, then apply the recipe to ``path`` and save into ``out``.

    ``data_name``: bundled data by name or the user's file (:func:`nnopt.datafiles.load_data` with
    ``data_options``); without labels the quality rows are fidelity to the input model."""
    from nnopt.io.atomic import refuse_input_overlap
    from nnopt.pipeline.runs import DATA_HINT, open_run
    from nnopt.recipe import check_data, load_recipe
    from nnopt.training import check_data_parallel

    if not latency_seconds >= 0:
        raise ConfigError(f"--latency-seconds must be >= 0, got {latency_seconds}")
    check_data_parallel(data_parallel)
    out = Path(out)
    recipe = load_recipe(recipe_path)
    check_data(recipe, data_name is not None, hint=DATA_HINT, where=str(recipe_path))
    refuse_input_overlap(out, [recipe_path])
    run = open_run(path, out, recipe.weights_format, overwrite, data_name, data_options=data_options)
    return _optimize(run, recipe, path, out, overwrite, latency_seconds, progress, data_parallel)


def _optimize(run: Any, recipe: Recipe, path: str | Path, out: Path, overwrite: bool, latency_seconds: float,
              progress: bool | None, data_parallel: int = 1) -> RunResult:
    import torch

    from nnopt.metrics import profile_model
    from nnopt.pipeline.runs import QUALITY_NOTE, RunResult, commit_output, quality_rows, size_rows
    from nnopt.recipe import apply_recipe, recipe_to_dict
    from nnopt.saving import save_model

    model, dataset = run.model, run.dataset
    optimized = apply_recipe(model, recipe, data=dataset, progress=progress, data_parallel=data_parallel)
    rows: list[Row] = []
    metrics: dict[str, Any] = {}
    if dataset is not None:
        rows, metrics = quality_rows(model, optimized, dataset)
        if dataset.test.labelled:
            rows = [("accuracy (test split)", *rows[0][1:])]
    before, after = profile_model(model), profile_model(optimized)
    rows += [
        ("parameters", before.params, after.params),
        ("non-zero weights", before.nonzeros, after.nonzeros),
        ("zero share of parameters", round(1 - before.nonzeros / before.params, 4),
         round(1 - after.nonzeros / after.params, 4)),
        ("MACs per example", before.macs, after.macs),
    ]
    timing = _latency(model, optimized, latency_seconds)
    for batch, (old, new) in timing.items():
        rows.append((f"latency batch {batch}, ms (measured)", round(old, 4), round(new, 4)))
    smallest = min(timing)
    energy = _energy_uj(timing[smallest], smallest)
    rows.append((f"energy per inference @{smallest}, µJ (estimated)", *energy[:2]))
    energy_note = f"energy: {energy[2]};"
    metrics.update(params=after.params, nonzeros=after.nonzeros, macs=after.macs,
                   latency_ms={str(b): new for b, (_, new) in timing.items()}, recipe=recipe_to_dict(recipe))
    saved = commit_output(run, lambda: save_model(optimized, out, metrics=metrics, inputs=[path],
                                                  overwrite=overwrite, weights_format=recipe.weights_format), None)
    rows += size_rows(run.meta, saved)
    notes = [
        QUALITY_NOTE[dataset.test.labelled] if dataset is not None else "accuracy: not measured (no --data);",
        "MACs: estimated (dense kernel, zeros included);", energy_note,
        "file bytes: measured on disk; compression ratio: dense fp32 safetensors bytes / bytes written;",
        f"latency: measured on this machine, median of alternated calls, threads {torch.get_num_threads()}: "
        + _speed_verdict(timing),
    ]
    steps = " → ".join(step.kind for step in recipe.steps)
    title = f"nnopt optimize: {recipe.name + ': ' if recipe.name else ''}{steps}"
    return RunResult(title=title, rows=tuple(rows), out=out, notes="\n".join(notes))


def _speed_verdict(timing: dict[int, tuple[float, float]]) -> str:
    """Say plainly where the result is not faster: zeros and codes alone do not make a kernel faster."""
    from nnopt.metrics.speed import MIN_SPEEDUP

    parts = []
    for batch, (old, new) in timing.items():
        if new > 0 and old / new >= MIN_SPEEDUP:
            parts.append(f"batch {batch} faster ({old / new:.2f}× the input's speed)")
        else:
            parts.append(f"batch {batch} not faster here ({new / old if old > 0 else 1:.2f}× the input's time)")
    return "; ".join(parts)


def _latency(before: nn.Module, after: nn.Module, seconds: float) -> dict[int, tuple[float, float]]:
    """Median ms per call at each batch size, both models timed side by side on the same inputs."""

    import torch

    from nnopt.metrics.speed import bind_call, compare_calls, example_batch

    timing = {}
    for batch in BATCHES:
        inputs = example_batch(before, batch)  # token ids for a sentence encoder, rows otherwise
        calls = {name: bind_call(m, inputs) for name, m in (("before", before.eval()), ("after", after.eval()))}
        with torch.inference_mode():
            stats = compare_calls(calls, batch, min_seconds=seconds)
        timing[batch] = (stats["before"].median_ms, stats["after"].median_ms)
    return timing


def _energy_uj(milliseconds: tuple[float, float], batch: int) -> tuple[float, float, str]:
    """Energy per inference in µJ before and after, from their measured times at ``batch`` at equal power (so
    the slower model never shows less), and how it was estimated."""
    import torch

    from nnopt.energy import cpu_active_power, device_energy

    power = cpu_active_power(torch.get_num_threads())
    old, new = (device_energy(ms / 1e3, batch, power) for ms in milliseconds)
    return float(f"{old.joules * 1e6:.4g}"), float(f"{new.joules * 1e6:.4g}"), new.method  # readable at any power
