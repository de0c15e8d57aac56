"""`nnopt advise PATH`: which data-free techniques make a saved model faster here, measured (see
nnopt.pipeline.advice)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from nnopt.cli.options import parse_count


def register(commands: Any) -> None:
    """Add the ``advise`` subcommand to the CLI's subparsers."""
    advise = commands.add_parser(
        "advise", help="which data-free techniques make a saved model faster on this machine, measured",
        description="Build the variants nnopt can make without data (fp32 baseline, bf16 autocast, int8 dynamic, "
        "BatchNorm folding, CSR sparse kernels for already sparse Linears, torch.compile with --compile, ONNX "
        "Runtime and OpenVINO running the exported model with --runtimes), time "
        "them side by side at --batch on this machine, check their outputs against the baseline on random "
        "inputs, and say for each whether it is faster here and, if not, why.",
    )
    advise.add_argument("path", metavar="PATH", help="an nnopt model directory")
    advise.add_argument("--batch", default="32", metavar="B", help="batch size to time (default: 32)")
    advise.add_argument("--threads", default=None, metavar="N",
                        help="torch intra-op threads (default: the current torch.get_num_threads())")
    advise.add_argument("--seconds", type=float, default=1.0, metavar="S",
                        help="minimum timing per technique, on top of at least 20 calls (default: 1.0)")
    advise.add_argument("--device", default="cpu", metavar="{cpu,cuda}", help="where to run (default: cpu)")
    advise.add_argument("--compile", action="store_true",
                        help="also try torch.compile (takes seconds; compile time reported apart)")
    advise.add_argument("--runtimes", action="store_true",
                        help="also run the model exported to ONNX in ONNX Runtime and OpenVINO (where installed; "
                        "export and conversion time reported apart)")
    advise.add_argument("--json", action="store_true", help='print {"advice": [...], "env": ...} instead of a table')
    advise.set_defaults(handler=cmd_advise)


def cmd_advise(args: argparse.Namespace) -> int:
    from nnopt.pipeline.advice import AdviseOptions, run_advise

    options = AdviseOptions(batch=parse_count(args.batch, "--batch"),
                            threads=None if args.threads is None else parse_count(args.threads, "--threads"),
                            seconds=args.seconds, device=args.device, compile=args.compile,
                            runtimes=args.runtimes)
    result = run_advise(args.path, options)
    print(json.dumps(result.to_dict(), indent=2) if args.json else result)
    return 0
