"""`nnopt demo`: train the classic SimpleNet on digits, prune, quantize, measure and report."""

from __future__ import annotations

import argparse
from typing import Any

# The classic four variants first, then the others the report compares (nnopt.pipeline.classic).
DESCRIPTION = (
    "Train SimpleNet (Dense 64-32-10) on scikit-learn digits, prune with |w| < θ, quantize with w_q = round(w·S); "
    "add gradual and structured pruning and the other quantization schemes; measure every variant side by side "
    "and write a report."
)


def register(commands: Any) -> None:
    """Add the ``demo`` subcommand to the CLI's subparsers."""
    help_line = "train the classic SimpleNet on digits, prune, quantize, measure, report"
    demo = commands.add_parser("demo", help=help_line, description=DESCRIPTION)
    demo.add_argument("--out", default="nnopt-report", metavar="DIR",
                      help="output directory (default: nnopt-report); an earlier report there is replaced")
    demo.add_argument("--epochs", type=int, default=20, help="training epochs (default: 20)")
    demo.add_argument("--threshold", type=float, default=0.01, metavar="T",
                      help="pruning threshold θ: weights with |w| < θ become 0 (default: 0.01)")
    demo.add_argument("--bits", type=int, default=8, metavar="B",
                      help="quantization bit width, 2..8 (default: 8)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    demo.add_argument("--latency-seconds", type=float, default=1.0, metavar="S",
                      help="minimum timing per variant and batch size (default: 1.0)")
    demo.set_defaults(handler=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from nnopt.pipeline.classic import ClassicConfig, run_classic

    config = ClassicConfig(
        epochs=args.epochs, threshold=args.threshold, bits=args.bits, seed=args.seed,
        latency_seconds=args.latency_seconds,
    )
    result = run_classic(config, args.out)
    print(result)
    print(f"\nwrote {args.out}/report.json, report.md, report.html and one model directory per variant")
    return 0
