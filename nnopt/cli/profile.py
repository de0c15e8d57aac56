"""`nnopt profile PATH`: the per-layer table of a saved model."""

from __future__ import annotations

import argparse
import json
from typing import Any


def register(commands: Any) -> None:
    """Add the ``profile`` subcommand to the CLI's subparsers."""
    profile = commands.add_parser(
        "profile", help="per-layer table of a saved model",
        description="Print a saved nnopt model's per-layer shapes, parameters, non-zeros, MACs, "
        "dtype and bytes.",
    )
    profile.add_argument("path", metavar="PATH", help="an nnopt model directory")
    profile.add_argument("--json", action="store_true", help="print JSON instead of a table")
    profile.set_defaults(handler=cmd_profile)


def cmd_profile(args: argparse.Namespace) -> int:
    from nnopt.io.model_dir import read_meta, weights_file
    from nnopt.loading import load_model
    from nnopt.metrics import profile_model

    meta = read_meta(args.path)
    model = load_model(args.path)
    file_bytes = meta["files"][weights_file(meta)]["bytes"]
    profile = profile_model(model, file_bytes=file_bytes)
    applied = [p["name"] for p in meta.get("applied", [])]
    if args.json:
        doc = {"path": args.path, "architecture": meta["architecture"], "applied": applied, **profile.to_dict()}
        print(json.dumps(doc, indent=2))
    else:
        print(f"{args.path}: {meta['architecture']}, applied: {', '.join(applied) or 'nothing'}")
        print(profile)
    return 0
