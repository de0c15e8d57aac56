"""`nnopt auto PATH --data NAME --objective size|latency|energy --max-drop D -o OUT`: search for the
plan (a recipe) that best serves the objective within an accuracy budget, and write it.

The search is :func:`nnopt.auto`; this workflow loads the model directory, calls it, and writes what it
returns. Everything is checked before any work. The output directory appears complete or not at all;
the trials evaluated so far are checkpointed beside it, so Ctrl-C loses no finished work and
``--resume`` continues. Exit status: 0 with a chosen plan; 3 when no plan meets ``--max-drop`` or, for
latency, none that does is measurably faster than the input model (the front and the closest plans are
still written, without a model); 2 on bad input.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

from nnopt.data import Dataset
from nnopt.report.document import REPORT_HTML, REPORT_JSON, REPORT_MD
from nnopt.search.api import NOTHING_MEETS, AutoResult
from nnopt.search.config import AutoConfig

MODEL_DIR = "model"
RECIPE_FILE = "recipe.yaml"
# What an earlier auto output holds: it may be replaced with --overwrite (report.json marks it).
AUTO_FILES = (REPORT_JSON, REPORT_HTML, REPORT_MD, RECIPE_FILE, MODEL_DIR)

__all__ = ["AUTO_FILES", "NOTHING_MEETS", "AutoRun", "run_auto"]


@dataclasses.dataclass(frozen=True)
class AutoRun:
    """What an auto run wrote (``out``) and the search's result; ``exit_code`` 0 with a chosen plan, 3 without."""

    out: Path
    result: AutoResult

    @property
    def report(self) -> dict[str, Any]:
        return self.result.report

    @property
    def exit_code(self) -> int:
        return self.result.exit_code

    def __str__(self) -> str:
        return f"{self.result}\nwrote {self.out}"


def run_auto(path: str | Path, data: Dataset | str, config: AutoConfig, out: str | Path, resume: bool = False,
             overwrite: bool = False, progress: bool | None = None, data_source: str | None = None,
             data_options: dict[str, Any] | None = None) -> AutoRun:
    """Check the output, load the model directory, search (or resume) with :func:`nnopt.auto`, then write
    OUT atomically: OUT/model, OUT/recipe.yaml and OUT/report.json/.html/.md.

    ``data``: a bundled task's name or a Dataset (the user's file read by :func:`nnopt.datafiles.load_data`:
    ``data_source`` is its path, named in the recipe's reproduce line with ``data_options``)."""
    from nnopt.io.atomic import atomic_directory, check_replaceable, refuse_input_overlap
    from nnopt.lineage import note_input
    from nnopt.loading import load_model
    from nnopt.search import auto, checkpoint_dir

    out, path = Path(out), Path(path)
    refuse_input_overlap(out, [path])
    check_replaceable(out, AUTO_FILES if overwrite else None)
    model = load_model(path)
    if not isinstance(data, str):
        note_input(model, data.train.x)  # a user module's sample shape, for its profile and timing
    checkpoint = checkpoint_dir(out)
    result = auto(model, data, config, checkpoint_dir=checkpoint, resume=resume, keep_checkpoint=True, source=path,
                  progress=progress)
    if result.chosen:  # where this run writes the chosen model and its recipe
        result = dataclasses.replace(result, report={
            **result.report, "result": {**result.report["result"], "model": MODEL_DIR, "recipe_file": RECIPE_FILE}})
    with atomic_directory(out, replace_if=AUTO_FILES if overwrite else None) as tmp:
        _write(result, config, data_source or data, path, tmp, data_options or {})
    shutil.rmtree(checkpoint, ignore_errors=True)  # only now: until OUT is complete, --resume can redo the writing
    return AutoRun(out, result)


def _write(result: AutoResult, config: AutoConfig, data: Dataset | str, path: str | Path, tmp: Path,
           data_options: dict[str, Any]) -> None:
    from nnopt.io.atomic import write_bytes_durable
    from nnopt.recipe import recipe_to_dict, recipe_to_yaml
    from nnopt.report import write_reports
    from nnopt.saving import save_model

    report = result.report
    if result.model is not None and result.recipe is not None:
        save_model(result.model, tmp / MODEL_DIR, metrics={**result.test, "recipe": recipe_to_dict(result.recipe)},
                   inputs=[path], weights_format=result.recipe.weights_format)
        # `nnopt optimize` reads the same data (a name or the user's file); bundled encoder plans are data-free.
        reads = f" --data {data}" if isinstance(data, str) and data != "sentences" else ""
        if reads and data_options.get("label_column"):
            reads += f" --label-column {data_options['label_column']}"
        if reads and data_options.get("image_size"):
            reads += " --image-size {}x{}".format(*data_options["image_size"])
        header = (f"# nnopt auto: {report['chosen']} ({config.objective}, max drop {config.max_drop:g}).\n"
                  f"# Reproduce: nnopt optimize {path} --recipe {RECIPE_FILE}{reads} -o OUT\n")
        write_bytes_durable(tmp / RECIPE_FILE, (header + recipe_to_yaml(result.recipe)).encode())
    write_bytes_durable(tmp / REPORT_JSON, (json.dumps(report, indent=2, default=_plain) + "\n").encode())
    write_reports(tmp, report)


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON")
