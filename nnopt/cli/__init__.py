"""Command line: argument parsing only. Each command lives in its own module, ``nnopt/cli/<command>.py``,
whose ``register(commands)`` adds its subparser and handler; a handler imports the workflow it calls
(and torch) when it runs, so that building the parser stays fast."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

from nnopt._version import __version__

# The command modules, in the order `nnopt --help` lists their commands (convert also adds quantize-onnx).
COMMAND_MODULES = (
    "nnopt.cli.demo",
    "nnopt.cli.profile",
    "nnopt.cli.prune",
    "nnopt.cli.quantize",
    "nnopt.cli.bench",
    "nnopt.cli.advise",
    "nnopt.cli.energy",
    "nnopt.cli.env",
    "nnopt.cli.verify",
    "nnopt.cli.convert",
    "nnopt.cli.int8_onnx",
    "nnopt.cli.optimize",
    "nnopt.cli.report",
    "nnopt.cli.auto",
    "nnopt.cli.llm",
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    from nnopt.errors import NnoptError
    from nnopt.runtime import tune_allocator

    tune_allocator()  # the CLI owns its process: keep freed activation memory for reuse (see nnopt.runtime)
    from nnopt.cli.options import model_loading

    try:
        with model_loading(args):
            return handler(args)
    except NnoptError as exc:
        print(f"nnopt: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # unreadable input, unwritable output, full disk
        print(f"nnopt: error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nnopt: interrupted; nothing partial was written", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nnopt",
        description="Make trained neural networks smaller, faster and cheaper in energy, "
        "and prove it with measurements.",
    )
    parser.add_argument("--version", action="version", version=f"nnopt {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(commands)
    from nnopt.cli.options import MODEL_LOADING_COMMANDS, add_trust_import_argument

    for name, command in commands.choices.items():
        if name in MODEL_LOADING_COMMANDS:
            add_trust_import_argument(command)
    return parser

