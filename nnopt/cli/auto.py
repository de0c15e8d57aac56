"""`nnopt auto`: search for the best plan (a recipe) for size, latency or energy within an accuracy budget.

The workflow lives in :mod:`nnopt.pipeline.auto_run` (which calls :func:`nnopt.auto`); this module parses
the arguments into an :class:`~nnopt.search.AutoConfig`, names errors by their flags, and prints.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any

from nnopt.cli.options import _int, _number, add_data_arguments, data_options, parse_fraction


def register(commands: Any) -> None:
    """Add the ``auto`` subcommand to the CLI's subparsers."""
    parser = commands.add_parser(
        "auto", help="search for the best plan (a recipe) for size, latency or energy within an accuracy budget",
        description="Measure each layer's sensitivity on a validation split, build candidate plans (per-layer "
        "sparsity, bit widths, structured ratios, int8), evaluate each through its recipe with fine-tuning, keep "
        "the Pareto front of quality against the objective, and write the best plan within --max-drop: OUT/model "
        "(rebuilt on the whole training split, as `nnopt optimize OUT/recipe.yaml` does), OUT/recipe.yaml and "
        "OUT/report.json/.html/.md. Exit status 0 with a chosen plan, 3 when none meets --max-drop or, for latency, "
        "none that does is faster than the input (the front is "
        "still written), 2 on bad input. Ctrl-C keeps a checkpoint beside OUT; --resume continues it.",
    )
    parser.add_argument("path", metavar="PATH", help="an nnopt model directory")
    add_data_arguments(parser, "sentences (sentence encoders: quality is the cosine to the input model's embeddings), "
                       "or the quality metric follows the data: accuracy with labels, top-1 agreement with the input "
                       "model (cosine for embedding outputs) without", required=True)
    parser.add_argument("--objective", required=True, metavar="{size,latency,energy}",
                        help="size: bytes of the written file (measured); latency: median ms at --batch (measured); "
                        "energy: nJ per inference = active power × measured time (also measured where counters exist)")
    parser.add_argument("--max-drop", required=True, metavar="D",
                        help="allowed quality drop as a fraction in [0, 1] (0.005 = half a point of accuracy; for "
                        "encoders mean cosine >= 1 - D); '0.5%%' also works")
    parser.add_argument("--budget-minutes", default="30", metavar="M",
                        help="bounds the run: no trial starts after 90%% of M minutes and the timings after the trials "
                        "shrink to what is left (default 30)")
    parser.add_argument("--workers", default="1", metavar="W",
                        help="evaluate trials in W spawned processes (default 1); latency is timed serially")
    parser.add_argument("--batch", default="32", metavar="B", help="batch size for latency and energy (default 32)")
    parser.add_argument("--finetune-epochs", default="20", metavar="E",
                        help="fine-tuning epochs after pruning, spread over its stages (default 20)")
    parser.add_argument("--latency-seconds", default="2", metavar="S",
                        help="minimum timing per model in the final side-by-side measurement (default 2)")
    parser.add_argument("--resume", action="store_true", help="continue the search an interrupted run checkpointed")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier nnopt auto output at OUT")
    parser.add_argument("-o", "--out", required=True, metavar="OUT", help="output directory")
    parser.set_defaults(handler=cmd_auto)


def cmd_auto(args: argparse.Namespace) -> int:
    from nnopt.errors import ConfigError, ResumeError
    from nnopt.pipeline.auto_run import run_auto
    from nnopt.search import AutoConfig, checkpoint_dir
    from nnopt.search.checkpoint import trials_kept

    try:
        config = AutoConfig(
            objective=args.objective, max_drop=parse_fraction(args.max_drop, "--max-drop"),
            batch=_int(args.batch, "--batch"), budget_minutes=_number(args.budget_minutes, "--budget-minutes"),
            workers=_int(args.workers, "--workers"), finetune_epochs=_int(args.finetune_epochs, "--finetune-epochs"),
            latency_seconds=_number(args.latency_seconds, "--latency-seconds"),
        )
        result = run_auto(args.path, _data(args), config, args.out, resume=args.resume, overwrite=args.overwrite,
                          data_source=args.data, data_options=data_options(args))
    except (ConfigError, ResumeError) as exc:
        raise type(exc)(as_flags(str(exc))) from None
    except KeyboardInterrupt:
        kept = checkpoint_dir(args.out)
        if kept.exists():
            print(f"nnopt auto: interrupted; {trials_kept(kept)} evaluated trial(s) kept in {kept}; run the same "
                  "command with --resume to continue", file=sys.stderr)
        raise
    print(result)
    return result.exit_code


def _data(args: argparse.Namespace) -> Any:
    """A bundled task's name as is (``digits``, ``sentences``); anything else is the user's file or folder."""
    from nnopt.search.tasks import TASKS

    if args.data in TASKS:
        return args.data
    from pathlib import Path

    from nnopt.datafiles import load_data
    from nnopt.errors import ConfigError

    if not Path(args.data).exists():
        raise ConfigError(f"unknown data {args.data!r} for nnopt auto; known: {', '.join(sorted(TASKS))}, or an "
                          "existing data file or folder (.npz, .npy, .csv, .txt, image class folders)")

    return load_data(args.data, **data_options(args))


# The Python names in nnopt.auto's messages, as this command's flags.
FLAGS = {"objective": "--objective", "max_drop": "--max-drop", "batch": "--batch", "budget_minutes": "--budget-minutes",
         "workers": "--workers", "finetune_epochs": "--finetune-epochs", "latency_seconds": "--latency-seconds"}


def as_flags(message: str) -> str:
    """``AutoConfig.max_drop`` -> ``--max-drop``, ``data='digits'`` -> ``--data digits``, ``resume=True`` ->
    ``--resume``: nnopt.auto names its fields and arguments; the command line names its flags."""
    message = re.sub(r"AutoConfig\.(\w+)", lambda m: FLAGS.get(m.group(1), m.group(0)), message)
    return re.sub(r"data='(\w+)'", r"--data \1", message).replace("resume=True", "--resume")
