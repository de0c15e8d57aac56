"""What the commands share: number parsing, the output, checkpoint and data-parallel arguments, and
how a run that wrote a model is reported. Nothing here imports torch: `nnopt --help` stays fast."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from nnopt.errors import ConfigError


def parse_fraction(text: str, flag: str) -> float:
    """``0.005`` or ``0.5%`` → 0.005."""
    raw = str(text).strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        raise ConfigError(f"{flag} takes a fraction in [0, 1] such as 0.005, or a percentage such as 0.5%; "
                          f"got {text!r}") from None
    return value


def _number(text: str, flag: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"{flag} takes a number, got {text!r}") from None


def _int(text: str, flag: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"{flag} takes an integer, got {text!r}") from None


def parse_count(text: str | int, flag: str) -> int:
    """``"32"`` -> 32; ConfigError naming ``flag`` unless it is an integer >= 1."""
    item = str(text).strip()
    if not (item.isdigit() and int(item) >= 1):
        raise ConfigError(f"{flag} must be an integer >= 1, got {str(text)!r}")
    return int(item)


def parse_int_list(text: str, message: str) -> tuple[int, ...]:
    """``"1,8,32"`` -> ``(1, 8, 32)``; ConfigError(message) unless every item is an integer >= 1."""
    items = [item.strip() for item in str(text).split(",")]
    if not items or not all(item.isdigit() and int(item) >= 1 for item in items):
        raise ConfigError(message)
    return tuple(int(item) for item in items)


DATA_HELP = ("NAME (digits) or a file/folder of your data: .npz (x, optional y; or x_train/y_train/x_test/y_test), "
             ".npy (x only), .csv (numeric columns, a header; labels in column 'label' or 'y', or --label-column), a "
             "folder of images in class subfolders, a .txt file (one sentence per line); see docs/data.md. Without "
             "labels, quality is fidelity to the input model and recovery distils from it")


def add_data_arguments(parser: argparse.ArgumentParser, reads: str, required: bool = False) -> None:
    """``--data NAME|PATH`` (what the run ``reads`` it for) and the options of data files."""
    parser.add_argument("--data", required=required, default=None, metavar="NAME|PATH", help=f"{reads}: {DATA_HELP}")
    parser.add_argument("--label-column", default=None, metavar="COL",
                        help="--data FILE.csv: the column holding the labels (default: label or y if present)")
    parser.add_argument("--image-size", default=None, metavar="WxH",
                        help="--data FOLDER of images: resize every image to W×H pixels, or N×N with one number "
                        "(default: the first image's size)")


def data_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of :func:`nnopt.datafiles.load_data` that ``--label-column``/``--image-size`` give."""
    options: dict[str, Any] = {}
    if getattr(args, "label_column", None):
        options["label_column"] = args.label_column
    size = getattr(args, "image_size", None)
    if size:
        parts = str(size).lower().replace("×", "x").split("x")
        if not (1 <= len(parts) <= 2 and all(p.strip().isdigit() and int(p) >= 1 for p in parts)):
            raise ConfigError(f"--image-size takes W×H or N (pixels, integers >= 1), got {size!r}")
        options["image_size"] = (int(parts[0]), int(parts[-1]))
    return options


def add_model_output_arguments(parser: argparse.ArgumentParser) -> None:
    """``-o/--out`` and ``--overwrite`` of a command that writes one nnopt model directory."""
    parser.add_argument("-o", "--out", required=True, metavar="OUT", help="output model directory")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier nnopt model at OUT")


def add_training_arguments(parser: argparse.ArgumentParser, checkpoint_runs: str, parallel_runs: str) -> None:
    """The model output arguments, then the checkpoint arguments of the ``checkpoint_runs`` that train and
    ``--data-parallel`` for the ``parallel_runs``."""
    add_model_output_arguments(parser)
    parser.add_argument("--resume", action="store_true",
                        help=f"{checkpoint_runs}: continue an interrupted run from its checkpoint (same command, "
                        "input and data; an error if there is no checkpoint or it belongs to a different run)")
    parser.add_argument("--checkpoint-dir", default=None, metavar="D",
                        help=f"{checkpoint_runs}: where training is checkpointed (default: OUT.ckpt beside the "
                        "output); removed once OUT is written")
    parser.add_argument("--checkpoint-every", type=int, default=None, metavar="N",
                        help=f"{checkpoint_runs}: checkpoint every N epochs (default 1; 0: no checkpoints)")
    parser.add_argument("--data-parallel", type=int, default=1, metavar="N",
                        help=f"{parallel_runs} in N DistributedDataParallel processes on this machine's CPU cores: "
                        "the same global batches and, within floating-point tolerance, the same weights as one "
                        "process (BatchNorm and dropout excepted); no checkpoints (default: 1)")


def checkpoint_spec(args: argparse.Namespace, trains: bool, runs: str):  # noqa: ANN201
    """The run's CheckpointSpec (None when it does not train, checkpoints are off, or it trains data-parallel)."""
    from pathlib import Path

    from nnopt.checkpoint import CheckpointSpec
    from nnopt.training import check_data_parallel

    asked = args.resume or args.checkpoint_dir is not None or args.checkpoint_every is not None
    if not trains:
        if asked:
            raise ConfigError(f"--resume, --checkpoint-dir and --checkpoint-every apply to {runs} only")
        return None
    if check_data_parallel(args.data_parallel) > 1:
        if asked:
            from nnopt.pipeline.runs import NO_CHECKPOINTS

            raise ConfigError(NO_CHECKPOINTS)
        return None
    every = 1 if args.checkpoint_every is None else args.checkpoint_every
    if every < 0:
        raise ConfigError(f"--checkpoint-every must be >= 0, got {every}")
    if every == 0:
        if args.resume or args.checkpoint_dir is not None:
            raise ConfigError("--checkpoint-every 0 turns checkpoints off: it cannot go with --resume or "
                              "--checkpoint-dir")
        return None
    directory = Path(args.checkpoint_dir) if args.checkpoint_dir else Path(f"{Path(args.out)}.ckpt")
    return CheckpointSpec(directory, every=every)


def interrupted(spec) -> int:  # noqa: ANN001
    """Ctrl-C during a run: say what was kept and how to continue (exit 130, as the shell does)."""
    message = "nnopt: interrupted; nothing partial was written"
    if spec is not None:
        from nnopt.checkpoint import checkpoint_progress

        progress = checkpoint_progress(spec.directory)
        if progress is not None:
            message += (f"; training is checkpointed after epoch {progress[0]} of {progress[1]} in "
                        f"{spec.directory}: run the same command with --resume to continue")
        else:
            message += "; training stopped before its first checkpoint"
    print(message, file=sys.stderr)
    return 130


def run_checkpointed(spec: Any, run: Callable[[], Any]) -> int:
    """``run()`` a command that may train into the checkpoint ``spec``; then :func:`print_written`, or on
    Ctrl-C :func:`interrupted`."""
    try:
        result = run()
    except KeyboardInterrupt:
        return interrupted(spec)
    return print_written(result)


def print_written(result: Any) -> int:
    """Print a run's before/after table and where its model went; exit status 0."""
    print(result)
    print(f"\nwrote {result.out}")
    return 0


# Commands that read a model directory: each takes --trust-import (see add_trust_import_argument).
MODEL_LOADING_COMMANDS = ("profile", "prune", "quantize", "bench", "advise", "energy", "convert", "optimize", "auto",
                          "int8-onnx")


def add_trust_import_argument(parser: argparse.ArgumentParser) -> None:
    """``--trust-import`` of a command that loads models: lets a model saved from the user's own nn.Module be
    rebuilt by importing the package its record names (see :func:`nnopt.loading.load_model`)."""
    parser.add_argument("--trust-import", action="store_true",
                        help="a model saved from your own nn.Module: import the package.module:Name its nnopt.json "
                        "records to rebuild the architecture (this runs that package's code, as trust_remote_code "
                        "does elsewhere); without it such a model is refused and nothing is imported")


def model_loading(args: argparse.Namespace) -> Any:
    """The context a command runs in: with ``--trust-import``, models load with ``trust_import=True``."""
    from nnopt.loading import trusting_imports

    return trusting_imports(bool(getattr(args, "trust_import", False)))
