"""`nnopt quantize PATH --scheme S`: quantize a saved model with one scheme (see nnopt.pipeline.quantize_run)."""

from __future__ import annotations

import argparse
from typing import Any

from nnopt.cli.options import (
    add_data_arguments,
    add_training_arguments,
    checkpoint_spec,
    data_options,
    run_checkpointed,
)

# nnopt.pipeline.quantize_run.SCHEMES, without importing torch to build the parser
SCHEMES_HELP = ("int8-dynamic", "int8-static", "int8-weight", "int4-weight", "cluster", "qat")


def register(commands: Any) -> None:
    """Add the ``quantize`` subcommand to the CLI's subparsers."""
    quant = commands.add_parser(
        "quantize", help="quantize a saved model: int8 (dynamic, static, weight-only), int4, clustering, QAT",
        description="Quantize a saved nnopt model with one scheme and save it. int8-dynamic and int8-static "
        "compute with int8 matrix kernels; int8-weight and int4-weight store narrow codes (grouped with "
        "--group) and dequantize per call; cluster stores a k-means codebook plus indices; qat fine-tunes "
        "with fake quantization, then converts to int8.",
    )
    quant.add_argument("path", metavar="PATH", help="an nnopt model directory")
    quant.add_argument("--scheme", required=True, choices=SCHEMES_HELP, metavar="SCHEME",
                       help="one of: " + ", ".join(SCHEMES_HELP))
    quant.add_argument("--group", type=int, default=None, metavar="G",
                       help="group size for int8-weight/int4-weight (e.g. 32, 64, 128); must divide each "
                       "layer's input size (default: one scale per output channel)")
    quant.add_argument("--calib", type=int, default=256, metavar="N",
                       help="calibration samples from the training split (default: 256)")
    add_data_arguments(quant, "data for calibration, fine-tuning and quality before/after")
    quant.add_argument("--observer", choices=("minmax", "percentile", "mse"), default="minmax",
                       help="int8-static: how activation ranges are chosen (default: minmax)")
    quant.add_argument("--smoothing", type=float, default=None, metavar="ALPHA",
                       help="int8-dynamic: SmoothQuant migration strength in (0, 1]; needs --data")
    quant.add_argument("--kernels", choices=("all", "measured"), default=None,
                       help="int8-dynamic: all (every Linear int8) or measured (time each Linear's fp32 and int8 "
                       "kernels here, keep int8 only where it is >= 1.05x faster) (default: all)")
    quant.add_argument("--kernel-batch", type=int, default=None, metavar="B",
                       help="int8-dynamic --kernels measured: examples per timed call (default: 32)")
    quant.add_argument("--bits", type=int, default=None, metavar="B", help="cluster: codebook of 2^B centroids "
                       "(default: 4)")
    quant.add_argument("--epochs", type=int, default=0,
                       help="cluster: centroid fine-tuning epochs; qat: training epochs (default 3)")
    quant.add_argument("--format", choices=("safetensors", "packed"), default="safetensors",
                       help="weights file format (default: safetensors)")
    add_training_arguments(quant, "--scheme qat", "fine-tuning (--scheme qat, --scheme cluster --epochs N)")
    quant.set_defaults(handler=cmd_quantize)


def cmd_quantize(args: argparse.Namespace) -> int:
    from nnopt.errors import ConfigError
    from nnopt.pipeline.quantize_run import QuantizeOptions, run_quantize

    if args.epochs < 0:
        raise ConfigError(f"--epochs must be >= 0, got {args.epochs}")
    if args.calib < 1:
        raise ConfigError(f"--calib must be >= 1, got {args.calib}")
    options = QuantizeOptions(scheme=args.scheme, group=args.group, calib=args.calib, bits=args.bits,
                              epochs=args.epochs, smoothing=args.smoothing, observer=args.observer,
                              kernels=args.kernels, kernel_batch=args.kernel_batch)
    spec = checkpoint_spec(args, args.scheme == "qat", "--scheme qat")
    return run_checkpointed(spec, lambda: run_quantize(
        args.path, options, args.out, data_name=args.data, weights_format=args.format, overwrite=args.overwrite,
        checkpoint=spec, resume=args.resume, data_parallel=args.data_parallel, data_options=data_options(args)))
