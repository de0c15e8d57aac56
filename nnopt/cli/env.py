"""`nnopt env`: this machine as nnopt's speed depends on it (see nnopt.envinfo)."""

from __future__ import annotations

import argparse
import json
from typing import Any


def register(commands: Any) -> None:
    """Add the ``env`` subcommand to the CLI's subparsers."""
    env = commands.add_parser(
        "env", help="this machine as nnopt's speed depends on it: CPU features, threads, torch build, GPU",
        description="Print the device, CPU model and the CPU features nnopt's kernels use (AVX2, AVX-512, VNNI, "
        "BF16, AMX, FMA, from /proc/cpuinfo), logical cores, torch threads, torch build (oneDNN, int8 kernels), "
        "GPUs, library versions, ONNX Runtime and its execution providers, and the allocator setting.",
    )
    env.add_argument("--json", action="store_true", help="print JSON instead of a table")
    env.set_defaults(handler=cmd_env)


def cmd_env(args: argparse.Namespace) -> int:
    from nnopt.metrics.system import render_system_report, system_report

    report = system_report()
    print(json.dumps(report, indent=2) if args.json else render_system_report(report))
    return 0
