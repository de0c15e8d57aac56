"""`nnopt auto PATH --data NAME --objective size|latency|energy --max-drop D -o OUT`: search for the
plan (a recipe) that best serves the objective within an accuracy budget, and write it.

Everything is checked before any work. The output directory appears complete or not at all; the
trials evaluated so far are checkpointed beside it, so Ctrl-C loses no finished work and
``--resume`` continues. Exit status: 0 with a chosen plan; 3 when no plan meets ``--max-drop`` or, for
latency, none that does is measurably faster than the input model (the front and the closest plans are
still written, without a model); 2 on bad input.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from nnopt.errors import ConfigError
from nnopt.report.document import REPORT_HTML, REPORT_JSON, REPORT_MD

NOTHING_MEETS = 3  # exit status when no plan is chosen: none meets the accuracy budget (or, latency: none is faster)
# What an earlier auto output holds: it may be replaced with --overwrite (report.json marks it).
AUTO_FILES = (REPORT_JSON, REPORT_HTML, REPORT_MD, "recipe.yaml", "model")


def register(commands: Any) -> None:
    """Add the ``auto`` subcommand to the CLI's subparsers."""
    parser = commands.add_parser(
        "auto", help="search for the best plan (a recipe) for size, latency or energy within an accuracy budget",
        description="Measure each layer's sensitivity on a validation split, build candidate plans (per-layer "
        "sparsity, bit widths, structured ratios, int8), evaluate each through its recipe with fine-tuning, keep "
        "the Pareto front of quality against the objective, and write the best plan within --max-drop: OUT/model "
        "(rebuilt on the whole training split, as `nnopt optimize OUT/recipe.yaml` does), OUT/recipe.yaml and "
        "OUT/report.json/.html/.md. Exit status 0 with a chosen plan, 3 when none meets --max-drop or, for latency, "
        "none that does is faster than the input (the front is "
        "still written), 2 on bad input. Ctrl-C keeps a checkpoint beside OUT; --resume continues it.",
    )
    parser.add_argument("path", metavar="PATH", help="an nnopt model directory")
    parser.add_argument("--data", required=True, metavar="NAME",
                        help="digits (classifiers) or sentences (sentence encoders: quality is the cosine to the "
                        "input model's embeddings)")
    parser.add_argument("--objective", required=True, metavar="{size,latency,energy}",
                        help="size: bytes of the written file (measured); latency: median ms at --batch (measured); "
                        "energy: nJ per inference (estimated, analytic; also measured where counters exist)")
    parser.add_argument("--max-drop", required=True, metavar="D",
                        help="allowed quality drop as a fraction in [0, 1] (0.005 = half a point of accuracy; for "
                        "encoders mean cosine >= 1 - D); '0.5%%' also works")
    parser.add_argument("--budget-minutes", default="30", metavar="M",
                        help="bounds the run: no trial starts after 90%% of M minutes and the timings after the trials "
                        "shrink to what is left (default 30)")
    parser.add_argument("--workers", default="1", metavar="W",
                        help="evaluate trials in W spawned processes (default 1); latency is timed serially")
    parser.add_argument("--batch", default="32", metavar="B", help="batch size for latency and energy (default 32)")
    parser.add_argument("--finetune-epochs", default="20", metavar="E",
                        help="fine-tuning epochs after pruning, spread over its stages (default 20)")
    parser.add_argument("--latency-seconds", default="2", metavar="S",
                        help="minimum timing per model in the final side-by-side measurement (default 2)")
    parser.add_argument("--resume", action="store_true", help="continue the search an interrupted run checkpointed")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier nnopt auto output at OUT")
    parser.add_argument("-o", "--out", required=True, metavar="OUT", help="output directory")
    parser.set_defaults(handler=cmd_auto)


def cmd_auto(args: argparse.Namespace) -> int:
    from nnopt.search import SearchSettings

    settings = SearchSettings(
        objective=args.objective, max_drop=parse_fraction(args.max_drop, "--max-drop"),
        batch=_int(args.batch, "--batch"), budget_minutes=_number(args.budget_minutes, "--budget-minutes"),
        workers=_int(args.workers, "--workers"), finetune_epochs=_int(args.finetune_epochs, "--finetune-epochs"),
        latency_seconds=_number(args.latency_seconds, "--latency-seconds"),
    )
    result = run_auto(args.path, args.data, settings, args.out, resume=args.resume, overwrite=args.overwrite)
    print(result)
    return result.exit_code


def parse_fraction(text: str, flag: str) -> float:
    """``0.005`` or ``0.5%`` → 0.005."""
    raw = str(text).strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        raise ConfigError(f"{flag} takes a fraction in [0, 1] such as 0.005, or a percentage such as 0.5%; "
                          f"got {text!r}") from None
    return value


def _number(text: str, flag: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"{flag} takes a number, got {text!r}") from None


def _int(text: str, flag: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"{flag} takes an integer, got {text!r}") from None


@dataclasses.dataclass(frozen=True)
class AutoResult:
    """What an auto run wrote and its exit status (0: a plan was chosen; 3: none was, see NOTHING_MEETS)."""

    out: Path
    report: dict[str, Any]
    exit_code: int

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
        caption = ("* chosen. Bytes, latency: measured; energy: estimated (analytic). "
                   f"Validation: {report['dataset'].get('validation')} rows/sentences held out from every step.")
        table = render_table(columns, rows, title="nnopt auto", caption=caption)
        objective = f"objective {report['objective']}: {report['objective_method']}"
        return f"{table}\n{objective}\n{report['message']}\nwrote {self.out}"


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:.4g}{unit}" if isinstance(value, float) else f"{value}{unit}"


def run_auto(path: str | Path, data: str, settings: Any, out: str | Path, resume: bool = False,
             overwrite: bool = False, progress: bool | None = None) -> AutoResult:
    """Validate everything, search (or resume), then write OUT atomically; the checkpoint goes when done."""
    from nnopt.io.atomic import atomic_directory, check_replaceable, refuse_input_overlap
    from nnopt.io.model_dir import load_model, read_meta, weights_file
    from nnopt.search import Checkpoint, ContextSpec, build_context, load_task, search
    from nnopt.search.checkpoint import checkpoint_dir
    from nnopt.search.space import BuildOptions
    from nnopt.search.tasks import prepare

    settings.validate()
    out = Path(out)
    refuse_input_overlap(out, [path])
    check_replaceable(out, AUTO_FILES if overwrite else None)
    meta = read_meta(path)
    model = load_model(path)
    task = load_task(data)
    task.check_fits(model)
    _check_objective(model, task, settings)
    spec = ContextSpec(model_path=str(Path(path).resolve()), data=data, objective=settings.objective,
                       batch=settings.batch, levels=settings.levels,
                       options=BuildOptions(finetune_epochs=settings.finetune_epochs, stages=settings.stages),
                       threads=_threads_per_worker(settings.workers))
    fingerprint = {"model_sha256": meta["files"][weights_file(meta)]["sha256"], "architecture": meta["architecture"],
                   "data": data, **settings.fingerprint()}
    checkpoint = Checkpoint.open(out, fingerprint, resume)  # refusals (stale or foreign checkpoint) come first
    prepare(task, model)
    ctx = build_context(spec, model=model, task=task)  # finds the search space: an error if there is none
    baseline = task.quality(model, "validation")
    try:
        outcome = search(ctx, settings, checkpoint, baseline, progress)
        with atomic_directory(out, replace_if=AUTO_FILES if overwrite else None) as tmp:
            report = _write(ctx, settings, outcome, meta, path, tmp)
    except KeyboardInterrupt:
        if checkpoint.directory.exists():
            done = len(checkpoint.state.get("trials", {}))
            print(f"nnopt auto: interrupted; {done} evaluated trial(s) kept in {checkpoint_dir(out)}; run the same "
                  "command with --resume to continue", file=sys.stderr)
        raise
    checkpoint.remove()
    return AutoResult(out, report, 0 if report["chosen"] else NOTHING_MEETS)


def _write(ctx: Any, settings: Any, outcome: Any, meta: dict[str, Any], path: str | Path, tmp: Path) -> dict[str, Any]:
    from nnopt.io.atomic import write_bytes_durable
    from nnopt.recipe import recipe_to_yaml
    from nnopt.report import write_reports
    from nnopt.search.summary import RECIPE_FILE, build_report, rebuild

    final = rebuild(ctx, outcome, path, tmp)
    report = build_report(ctx, settings, outcome, final, meta)
    if final is not None:
        header = (f"# nnopt auto: {report['chosen']} ({settings.objective}, max drop {settings.max_drop:g}).\n"
                  f"# Reproduce: nnopt optimize {path} --recipe {RECIPE_FILE}"
                  f"{' --data ' + ctx.spec.data if ctx.task.final_data() is not None else ''} -o OUT\n")
        write_bytes_durable(tmp / RECIPE_FILE, (header + recipe_to_yaml(final.recipe)).encode())
    write_bytes_durable(tmp / REPORT_JSON, (json.dumps(report, indent=2, default=_plain) + "\n").encode())
    write_reports(tmp, report)
    return report


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON")


def _check_objective(model: Any, task: Any, settings: Any) -> None:
    """The objective must be measurable for this model here, before any work."""
    import torch

    from nnopt.errors import NnoptError

    try:
        with torch.inference_mode():
            inputs = task.timing_inputs(model, settings.batch)
            model(**inputs) if isinstance(inputs, dict) else model(inputs)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ConfigError(f"the model does not run on a batch of {settings.batch}: {exc}") from None
    if settings.objective == "energy":
        from nnopt.search.trials import energy_nj

        try:
            energy_nj(model, settings.batch)
        except (NnoptError, RuntimeError, ValueError) as exc:
            raise ConfigError(f"--objective energy: nnopt cannot estimate this model's energy ({exc})") from None


def _threads_per_worker(workers: int) -> int:
    import os

    return max(1, (os.cpu_count() or 1) // max(1, workers))
