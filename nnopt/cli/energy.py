"""`nnopt energy PATH`: energy per inference, estimated and, where possible, measured (see
nnopt.pipeline.energy_run)."""

from __future__ import annotations

import argparse
import json
from typing import Any


def register(commands: Any) -> None:
    """Add the ``energy`` subcommand to the CLI's subparsers."""
    energy = commands.add_parser(
        "energy", help="energy per inference on this CPU: active power × measured time, measured where a counter is",
        description="Energy per inference of a saved model on this CPU: the CPU's active power × the measured time "
        "per inference (the power measured with RAPL where the machine exposes it, idle power subtracted; else the "
        "TDP share of the threads with bounds). Where it goes, by layer and compute/memory, comes from a versioned "
        "analytic table (MACs executed × pJ per MAC + bytes moved × pJ per byte), as shares of that total. Every "
        "figure says whether it is measured or estimated, how, and its bounds.",
    )
    energy.add_argument("path", metavar="PATH", help="an nnopt model directory")
    energy.add_argument("--batch", type=int, default=1, help="batch size (default: 1)")
    energy.add_argument("--table", default="horowitz-45nm", metavar="NAME_OR_YAML",
                        help="energy table: a shipped name or a .yaml file (default: horowitz-45nm)")
    energy.add_argument("--tdp", type=float, default=None, metavar="W",
                        help="watts of the CPUs this machine shows (on a VM: its share of the package's TDP), for the "
                        "active power where no counter is (default: a lookup of the package's TDP by CPU model, "
                        "shared by its logical CPUs, else 10 W per logical CPU, a guess)")
    energy.add_argument("--seconds", type=float, default=0.5, metavar="S",
                        help="seconds of latency timing (default: 0.5)")
    energy.add_argument("--measure", action="store_true",
                        help="require a hardware counter (RAPL): fail, saying why, where this machine has none "
                        "(without it: measured where a counter exists, else estimated)")
    energy.add_argument("--json", action="store_true", help="print JSON instead of a table")
    energy.set_defaults(handler=cmd_energy)


def cmd_energy(args: argparse.Namespace) -> int:
    from nnopt.pipeline.energy_run import EnergyOptions, run_energy

    options = EnergyOptions(batch=args.batch, table=args.table, tdp_w=args.tdp, seconds=args.seconds)
    options.validate()
    result = run_energy(args.path, options, require_counter=args.measure)
    print(json.dumps(result.to_dict(), indent=2) if args.json else result)
    return 0
