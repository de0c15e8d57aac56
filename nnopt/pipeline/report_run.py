"""`nnopt report RUN_DIR`: rebuild report.html and report.md from a run's report.json."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nnopt.errors import ModelFormatError
from nnopt.io.json_file import read_json_document
from nnopt.report.document import REPORT_HTML, REPORT_JSON, REPORT_MD


def run_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Render ``run_dir``'s report.json as report.html and report.md beside it; their paths."""
    from nnopt.report.html import write_reports

    run_dir = Path(run_dir)
    report = load_report(run_dir)
    write_reports(run_dir, report)
    return run_dir / REPORT_HTML, run_dir / REPORT_MD


def load_report(run_dir: Path) -> dict[str, Any]:
    """The report.json document of ``run_dir``, checked to be one that the renderers can read."""
    from nnopt.report import read_report

    path = Path(run_dir) / REPORT_JSON
    if not Path(run_dir).is_dir():
        raise ModelFormatError(f"{run_dir} is not a directory (expected a run directory holding {REPORT_JSON})")
    report = read_json_document(path, ModelFormatError, f"{run_dir} has no {REPORT_JSON}: not an nnopt run directory",
                                f"{path} is not valid JSON")
    try:
        read_report(report)
    except ModelFormatError as exc:
        raise ModelFormatError(f"{path}: {exc}") from None
    return report
