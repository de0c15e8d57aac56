"""`nnopt verify DIR`: does an output directory still hold exactly what nnopt wrote? (see
nnopt.pipeline.verify_run). Exit status 0 when everything matches, 1 on a mismatch, 2 when there is
nothing to verify against."""

from __future__ import annotations

import argparse
import json
from typing import Any


def register(commands: Any) -> None:
    """Add `nnopt verify` to the CLI's subcommands."""
    verify = commands.add_parser(
        "verify", help="check an output directory against its manifest (sha256 of every file)",
        description="Compare every file of an nnopt output directory (a model, a demo report, ...) with the "
        "sha256 and size its manifest.json records, and each model's weights with the sha256 in its nnopt.json. "
        "Prints OK, or the changed, missing and extra files. Exit status 0 when everything matches, 1 on a "
        "mismatch, 2 when PATH is not a directory with a manifest.json.",
    )
    verify.add_argument("path", metavar="DIR", help="an output directory written by nnopt")
    verify.add_argument("--json", action="store_true", help="print the result as JSON")
    verify.set_defaults(handler=cmd_verify)


def cmd_verify(args: argparse.Namespace) -> int:
    from nnopt.pipeline.verify_run import verify_output

    result = verify_output(args.path)
    if args.json:
        doc = {"path": str(result.path), "ok": result.ok, "checked": result.checked, "changed": list(result.changed),
               "missing": list(result.missing), "extra": list(result.extra), "notes": list(result.notes)}
        print(json.dumps(doc, indent=2))
    else:
        print(result)
    return 0 if result.ok else 1
