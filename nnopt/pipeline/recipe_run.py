"""`nnopt optimize PATH --recipe R.yaml`: apply a YAML recipe to a saved model, measure it before
and after side by side, and save the result with the recipe recorded in its ``nnopt.json``.

Only argument parsing is imported with the CLI; torch and the techniques load when the command runs.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nnopt.errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

    from nnopt.pipeline.runs import Row
    from nnopt.recipe import Recipe

BATCHES = (1, 32)


def register(commands: Any) -> None:
    """Add the ``optimize`` subcommand to the CLI's subparsers."""
    parser = commands.add_parser(
        "optimize", help="apply a YAML recipe (an ordered list of technique configs) to a saved model",
        description="Apply the steps of a YAML recipe in order to a saved nnopt model (see recipes/ for "
        "examples), measure before and after (accuracy on the held-out test split with --data, parameters, "
        "non-zeros, MACs, estimated energy, latency at batch 1 and 32, file bytes, compression ratio) and save "
        "the result in the recipe's weights_format with the recipe recorded. The recipe, the data and the "
        "output location are checked before any work.",
    )
    parser.add_argument("path", metavar="PATH", help="an nnopt model directory")
    parser.add_argument("--recipe", required=True, metavar="R.yaml", help="the recipe file")
    parser.add_argument("--data", default=None, metavar="NAME",
                        help="data set (digits) for steps that calibrate or fine-tune (training split) and for "
                        "accuracy before/after (test split)")
    parser.add_argument("-o", "--out", required=True, metavar="OUT", help="output model directory")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier nnopt model at OUT")
    parser.add_argument("--latency-seconds", type=float, default=0.5, metavar="S",
                        help="minimum timing per model and batch size (default: 0.5)")
    parser.add_argument("--data-parallel", type=int, default=1, metavar="N",
                        help="steps that train (gradual pruning, structured recovery, QAT, clustering, train) run "
                        "in N DistributedDataParallel processes (default: 1)")
    parser.set_defaults(handler=cmd_optimize)


def cmd_optimize(args: argparse.Namespace) -> int:
    result = run_optimize(args.path, args.recipe, args.out, data_name=args.data, overwrite=args.overwrite,
                          latency_seconds=args.latency_seconds, data_parallel=args.data_parallel)
    print(result)
    print(f"\nwrote {result.out}")
    return 0


@dataclasses.dataclass(frozen=True)
class OptimizeRun:
    """Before/after figures of one `nnopt optimize` run."""

    recipe: Recipe
    rows: tuple[Row, ...]
    out: Path
    notes: str

    def __str__(self) -> str:
        from nnopt.pipeline.runs import render_run

        steps = " → ".join(step.kind for step in self.recipe.steps)
        title = f"nnopt optimize: {self.recipe.name + ': ' if self.recipe.name else ''}{steps}"
        return render_run(title, self.rows, self.notes)


def run_optimize(
    path: str | Path,
    recipe_path: str | Path,
    out: str | Path,
    data_name: str | None = None,
    overwrite: bool = False,
    latency_seconds: float = 0.5,
    progress: bool | None = None,
    data_parallel: int = 1,
) -> OptimizeRun:
    """Check the recipe, the data and ``out``, then apply the recipe to ``path`` and save into ``out``."""
    from nnopt.io.atomic import refuse_input_overlap
    from nnopt.pipeline.runs import open_run
    from nnopt.recipe import check_data, load_recipe
    from nnopt.training import check_data_parallel

    if not latency_seconds >= 0:
        raise ConfigError(f"--latency-seconds must be >= 0, got {latency_seconds}")
    check_data_parallel(data_parallel)
    out = Path(out)
    recipe = load_recipe(recipe_path)
    check_data(recipe, data_name is not None, hint="add --data digits", where=str(recipe_path))
    refuse_input_overlap(out, [recipe_path])
    run = open_run(path, out, recipe.weights_format, overwrite, data_name)
    return _optimize(run, recipe, path, out, overwrite, latency_seconds, progress, data_parallel)


def _optimize(run: Any, recipe: Recipe, path: str | Path, out: Path, overwrite: bool, latency_seconds: float,
              progress: bool | None, data_parallel: int = 1) -> OptimizeRun:
    import torch

    from nnopt.io.model_dir import save_model
    from nnopt.metrics import accuracy, profile_model
    from nnopt.pipeline.runs import commit_output, size_rows
    from nnopt.recipe import apply_recipe, recipe_to_dict

    model, dataset = run.model, run.dataset
    optimized = apply_recipe(model, recipe, data=dataset, progress=progress, data_parallel=data_parallel)
    rows: list[Row] = []
    metrics: dict[str, Any] = {}
    if dataset is not None:
        before_acc, after_acc = accuracy(model, dataset.test), accuracy(optimized, dataset.test)
        metrics["accuracy"] = after_acc
        rows.append(("accuracy (test split)", round(before_acc, 4), round(after_acc, 4)))
    before, after = profile_model(model), profile_model(optimized)
    rows += [
        ("parameters", before.params, after.params),
        ("non-zero weights", before.nonzeros, after.nonzeros),
        ("zero share of parameters", round(1 - before.nonzeros / before.params, 4),
         round(1 - after.nonzeros / after.params, 4)),
        ("MACs per example", before.macs, after.macs),
    ]
    energy = _energy_nj(model, optimized)
    energy_note = "energy: not estimated (the analytic tracer needs the model's input_shape);"
    if energy is not None:
        rows.append(("energy per inference @1, nJ (estimated)", round(energy[0], 1), round(energy[1], 1)))
        energy_note = f"energy: {energy[2]} (compute + memory);"
    timing = _latency(model, optimized, latency_seconds)
    for batch, (old, new) in timing.items():
        rows.append((f"latency batch {batch}, ms (measured)", round(old, 4), round(new, 4)))
    metrics.update(params=after.params, nonzeros=after.nonzeros, macs=after.macs,
                   latency_ms={str(b): new for b, (_, new) in timing.items()}, recipe=recipe_to_dict(recipe))
    saved = commit_output(run, lambda: save_model(optimized, out, metrics=metrics, inputs=[path],
                                                  overwrite=overwrite, weights_format=recipe.weights_format), None)
    rows += size_rows(run.meta, saved)
    notes = [
        "accuracy: measured on the held-out test split (steps read the training split only);" if dataset is not None
        else "accuracy: not measured (no --data);",
        "MACs: estimated (dense kernel, zeros included);", energy_note,
        "file bytes: measured on disk; compression ratio: dense fp32 safetensors bytes / bytes written;",
        f"latency: measured on this machine, median of alternated calls, threads {torch.get_num_threads()}: "
        + _speed_verdict(timing),
    ]
    return OptimizeRun(recipe=recipe, rows=tuple(rows), out=out, notes="\n".join(notes))


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


def _energy_nj(before: nn.Module, after: nn.Module) -> tuple[float, float, str] | None:
    """Estimated energy per inference at batch 1 in nJ, before and after, and how it was estimated;
    None where the estimate does not apply."""
    from nnopt.energy import estimate_energy
    from nnopt.errors import NnoptError

    try:
        old, new = estimate_energy(before), estimate_energy(after)
        return old.total_mj * 1e6, new.total_mj * 1e6, new.method
    except (NnoptError, ValueError):  # a model the analytic tracer cannot take (no input_shape): leave the row out
        return None
