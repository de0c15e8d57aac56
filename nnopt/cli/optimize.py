"""`nnopt optimize PATH --recipe R.yaml`: apply a YAML recipe to a saved model (see nnopt.pipeline.recipe_run)."""

from __future__ import annotations

import argparse
from typing import Any

from nnopt.cli.options import add_data_arguments, add_model_output_arguments, data_options, print_written


def register(commands: Any) -> None:
    """Add the ``optimize`` subcommand to the CLI's subparsers."""
    parser = commands.add_parser(
        "optimize", help="apply a YAML recipe (an ordered list of technique configs) to a saved model",
        description="Apply the steps of a YAML recipe in order to a saved nnopt model (see recipes/ for "
        "examples), measure before and after (accuracy on the held-out test split with --data, parameters, "
        "non-zeros, MACs, estimated energy, latency at batch 1 and 32, file bytes, compression ratio) and save "
        "the result in the recipe's weights_format with the recipe recorded. The recipe, the data and the "
        "output location are checked before any work.",
    )
    parser.add_argument("path", metavar="PATH", help="an nnopt model directory")
    parser.add_argument("--recipe", required=True, metavar="R.yaml", help="the recipe file")
    add_data_arguments(parser, "data for steps that calibrate or fine-tune (training split) and for quality "
                       "before/after (test split)")
    add_model_output_arguments(parser)
    parser.add_argument("--latency-seconds", type=float, default=0.5, metavar="S",
                        help="minimum timing per model and batch size (default: 0.5)")
    parser.add_argument("--data-parallel", type=int, default=1, metavar="N",
                        help="steps that train (gradual pruning, structured recovery, QAT, clustering, train) run "
                        "in N DistributedDataParallel processes (default: 1)")
    parser.set_defaults(handler=cmd_optimize)


def cmd_optimize(args: argparse.Namespace) -> int:
    from nnopt.pipeline.recipe_run import run_optimize

    result = run_optimize(args.path, args.recipe, args.out, data_name=args.data, overwrite=args.overwrite,
                          latency_seconds=args.latency_seconds, data_parallel=args.data_parallel,
                          data_options=data_options(args))
    return print_written(result)
