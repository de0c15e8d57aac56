"""Command line: argument parsing only. Each command imports what it needs when it runs."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from nnopt._version import __version__


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    from nnopt.errors import NnoptError

    try:
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

    demo = commands.add_parser(
        "demo", help="train the classic SimpleNet on digits, prune, quantize, measure, report",
        description="Train SimpleNet (Dense 64-32-10) on scikit-learn digits, prune with |w| < θ, "
        "quantize with w_q = round(w·S), measure all four variants and write a report.",
    )
    demo.add_argument("--out", default="nnopt-report", metavar="DIR",
                      help="output directory (default: nnopt-report); an earlier report there is replaced")
    demo.add_argument("--epochs", type=int, default=20, help="training epochs (default: 20)")
    demo.add_argument("--threshold", type=float, default=0.01, metavar="T",
                      help="pruning threshold θ: weights with |w| < θ become 0 (default: 0.01)")
    demo.add_argument("--bits", type=int, default=8, metavar="B",
                      help="quantization bit width, 2..16 (default: 8)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    demo.add_argument("--latency-seconds", type=float, default=1.0, metavar="S",
                      help="minimum timing per variant and batch size (default: 1.0)")
    demo.set_defaults(handler=cmd_demo)

    profile = commands.add_parser(
        "profile", help="per-layer table of a saved model",
        description="Print a saved nnopt model's per-layer shapes, parameters, non-zeros, MACs, "
        "dtype and bytes.",
    )
    profile.add_argument("path", metavar="PATH", help="an nnopt model directory")
    profile.add_argument("--json", action="store_true", help="print JSON instead of a table")
    profile.set_defaults(handler=cmd_profile)
    return parser


def cmd_demo(args: argparse.Namespace) -> int:
    from nnopt.pipeline.classic import ClassicConfig, run_classic

    config = ClassicConfig(
        epochs=args.epochs, threshold=args.threshold, bits=args.bits, seed=args.seed,
        latency_seconds=args.latency_seconds,
    )
    result = run_classic(config, args.out)
    print(result)
    print(f"\nwrote {args.out}/report.json, {args.out}/report.md and one model directory per variant")
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from nnopt.io.model_dir import WEIGHTS_FILE, load_model, read_meta
    from nnopt.metrics import profile_model

    meta = read_meta(args.path)
    model = load_model(args.path)
    file_bytes = meta["files"][WEIGHTS_FILE]["bytes"]
    profile = profile_model(model, file_bytes=file_bytes)
    applied = [p["name"] for p in meta.get("applied", [])]
    if args.json:
        doc = {"path": args.path, "architecture": meta["architecture"], "applied": applied, **profile.to_dict()}
        print(json.dumps(doc, indent=2))
    else:
        print(f"{args.path}: {meta['architecture']}, applied: {', '.join(applied) or 'nothing'}")
        print(profile)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
