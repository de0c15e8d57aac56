"""`nnopt report RUN_DIR`: rebuild report.html and report.md from a run's report.json (see
nnopt.pipeline.report_run)."""

from __future__ import annotations

import argparse
from typing import Any


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
    from nnopt.pipeline.report_run import run_report

    for path in run_report(args.run_dir):
        print(f"wrote {path}")
    return 0
