"""`nnopt report RUN_DIR`: rebuild report.html and report.md from a run's report.json."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from nnopt.errors import ModelFormatError
from nnopt.io.json_file import JSONFileError, read_json
from nnopt.report.document import REPORT_HTML, REPORT_JSON, REPORT_MD


def register(commands: Any) -> None:
    """Add the ``report`` subcommand to the CLI's subparsers."""
    parser = commands.add_parser(
        "report", help="render a run's report.json as report.html (plots, self-contained) and report.md",
        description="Read RUN_DIR/report.json (written by nnopt demo, nnopt auto, ...) and write report.html, "
        "one self-contained page with tables and plots (every figure marked measured or estimated), and "
        "report.md, the same tables in Markdown, into RUN_DIR. Existing ones are replaced atomically.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a directory that holds report.json")
    parser.set_defaults(handler=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from nnopt.report.html import write_reports

    run_dir = Path(args.run_dir)
    report = load_report(run_dir)
    write_reports(run_dir, report)
    print(f"wrote {run_dir / REPORT_HTML}")
    print(f"wrote {run_dir / REPORT_MD}")
    return 0


def load_report(run_dir: Path) -> dict[str, Any]:
    """The report.json document of ``run_dir``, checked to be one that the renderers can read."""
    from nnopt.report import read_report

    path = Path(run_dir) / REPORT_JSON
    if not Path(run_dir).is_dir():
        raise ModelFormatError(f"{run_dir} is not a directory (expected a run directory holding {REPORT_JSON})")
    if not path.is_file():
        raise ModelFormatError(f"{run_dir} has no {REPORT_JSON}: not an nnopt run directory")
    try:
        report = read_json(path)
    except JSONFileError as exc:
        raise ModelFormatError(f"{path} is not valid JSON: {exc}") from None
    try:
        read_report(report)
    except ModelFormatError as exc:
        raise ModelFormatError(f"{path}: {exc}") from None
    return report
