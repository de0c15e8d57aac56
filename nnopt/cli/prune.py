"""`nnopt prune PATH`: unstructured or structured pruning of a saved model (see nnopt.pipeline.prune_run)."""

from __future__ import annotations

import argparse
from typing import Any

from nnopt.cli.options import (
    add_data_arguments,
    add_training_arguments,
    checkpoint_spec,
    data_options,
    print_written,
    run_checkpointed,
)


def register(commands: Any) -> None:
    """Add the ``prune`` subcommand to the CLI's subparsers."""
    prune = commands.add_parser(
        "prune", help="unstructured or structured pruning of a saved model",
        description="Prune a saved nnopt model by threshold, sparsity target (uniform, global or LAMP) or "
        "N:M pattern, optionally gradually with fine-tuning, and save it in the packed format; or, with "
        "--structured, remove whole channels, neurons and attention heads ranked by importance and save a "
        "smaller dense model.",
    )
    prune.add_argument("path", metavar="PATH", help="an nnopt model directory")
    how = prune.add_mutually_exclusive_group(required=True)
    how.add_argument("--sparsity", type=float, metavar="S", help="fraction of selected weights to zero, in [0, 1)")
    how.add_argument("--threshold", type=float, metavar="T", help="zero weights with |w| < T")
    how.add_argument("--nm", metavar="N:M", help="keep N of every M consecutive input weights, e.g. 2:4")
    how.add_argument("--structured", action="store_true",
                     help="remove whole channels/neurons (and heads with --head-ratio); needs --ratio or "
                     "--target-mac-reduction")
    prune.add_argument("--ratio", type=float, metavar="R",
                       help="--structured: share of channels (FFN neurons) removed, in [0, 1)")
    prune.add_argument("--head-ratio", type=float, default=0.0, metavar="H",
                       help="--structured: share of attention heads removed per encoder layer (default 0)")
    prune.add_argument("--importance", default="gradient", metavar="NAME",
                       help="--structured: gradient (sum of |dL/dw| of a channel's weights), taylor, l1, l2 or "
                       "random (default: gradient)")
    prune.add_argument("--rounds", type=int, default=1, metavar="K",
                       help="--structured: prune in K steps, fine-tuning after each (default 1)")
    prune.add_argument("--finetune-epochs", type=int, default=0, metavar="E",
                       help="--structured: recovery epochs after each round (default 0)")
    prune.add_argument("--distill", type=float, default=0.0, metavar="W",
                       help="--structured: weight in [0, 1] of distillation from the unpruned model during "
                       "recovery (default 0; sentence encoders recover by distillation only)")
    prune.add_argument("--channel-multiple", default="1", metavar="M",
                       help="--structured: round kept channel counts to multiples of M (e.g. 8 or 16), or 'auto' "
                       "to pick 1, 8 or 16 by timing a convolution of the model on this CPU (default 1)")
    prune.add_argument("--target-mac-reduction", type=float, default=None, metavar="X",
                       help="--structured: solve the ratio for X times fewer MACs per sample (e.g. 2.0), "
                       "instead of --ratio")
    prune.add_argument("--global", dest="allocation", action="store_const", const="global",
                       help="one magnitude threshold across layers (same as --allocation global)")
    prune.add_argument("--allocation", choices=("uniform", "global", "lamp", "energy"), default=None,
                       help="how --sparsity (or --structured --ratio) is spread over layers (default: uniform); "
                       "energy: structured only, prune where the most energy is saved per importance lost (estimated: "
                       "active power × each layer's measured time on this CPU)")
    prune.add_argument("--schedule", choices=("oneshot", "gradual"), default="oneshot",
                       help="gradual: cubic sparsity ramp with fine-tuning (needs --sparsity and --data)")
    prune.add_argument("--epochs", type=int, default=0,
                       help="fine-tuning epochs (gradual: the whole schedule, default 30; oneshot: after pruning)")
    add_data_arguments(prune, "data for fine-tuning, gradients and quality before/after")
    prune.add_argument("--layers", action="append", default=[], metavar="PATTERN",
                       help="layer name, re:REGEX or type:TYPE (repeatable); default: all Linear/Conv2d "
                       "but the final classifier")
    prune.add_argument("--format", choices=("packed", "safetensors"), default="packed",
                       help="weights file format (default: packed, which stores only non-zeros)")
    prune.add_argument("--kernel-batch", type=int, default=1, metavar="B",
                       help="batch size at which sparse (CSR) kernels are measured against dense ones; each "
                       "Linear uses the faster (default: 1); 0 keeps every layer dense")
    add_training_arguments(prune, "--schedule gradual",
                           "fine-tuning (--schedule gradual, --epochs, --structured --finetune-epochs)")
    prune.set_defaults(handler=cmd_prune)


def cmd_prune(args: argparse.Namespace) -> int:
    from nnopt.errors import ConfigError
    from nnopt.pipeline.prune_run import run_prune
    from nnopt.pruning import GradualPruneConfig, MagnitudePruneConfig, NMPruneConfig, ThresholdPruneConfig

    layers = tuple(args.layers)
    allocation = args.allocation or "uniform"
    if args.structured:
        checkpoint_spec(args, False, "--schedule gradual")  # refuses --resume and friends here
        return _structured_prune(args, layers, allocation)
    if args.ratio is not None:
        raise ConfigError("--ratio applies to --structured pruning; use --sparsity for weight sparsity")
    if args.target_mac_reduction is not None or args.channel_multiple != "1":
        raise ConfigError("--target-mac-reduction and --channel-multiple apply to --structured pruning")
    if args.epochs < 0:
        raise ConfigError(f"--epochs must be >= 0, got {args.epochs}")
    if args.schedule == "gradual":
        if args.sparsity is None:
            raise ConfigError("--schedule gradual needs --sparsity")
        config = GradualPruneConfig(final_sparsity=args.sparsity, epochs=args.epochs or 30,
                                    allocation=args.allocation or "global", layers=layers)
    elif args.sparsity is not None:
        config = MagnitudePruneConfig(sparsity=args.sparsity, allocation=allocation, layers=layers)
    elif args.threshold is not None:
        config = ThresholdPruneConfig(threshold=args.threshold, layers=layers)
    else:
        n, sep, m = args.nm.partition(":")
        if not (sep and n.isdigit() and m.isdigit()):
            raise ConfigError(f"--nm takes N:M with two integers, e.g. 2:4; got {args.nm!r}")
        config = NMPruneConfig(n=int(n), m=int(m), layers=layers)
    finetune_epochs = 0 if args.schedule == "gradual" else args.epochs
    if args.kernel_batch < 0:
        raise ConfigError(f"--kernel-batch must be >= 0, got {args.kernel_batch}")
    spec = checkpoint_spec(args, args.schedule == "gradual", "--schedule gradual")
    return run_checkpointed(spec, lambda: run_prune(
        args.path, config, args.out, data_name=args.data, finetune_epochs=finetune_epochs, weights_format=args.format,
        overwrite=args.overwrite, kernel_batch=args.kernel_batch, checkpoint=spec, resume=args.resume,
        data_parallel=args.data_parallel, data_options=data_options(args)))


def _structured_prune(args: argparse.Namespace, layers: tuple[str, ...], allocation: str) -> int:
    from nnopt.errors import ConfigError
    from nnopt.pipeline.prune_run import run_structured_prune
    from nnopt.pruning import StructuredPruneConfig

    if args.ratio is None and args.target_mac_reduction is None:
        raise ConfigError("--structured needs --ratio R (share of channels to remove, in [0, 1)) or "
                          "--target-mac-reduction X (X times fewer MACs)")
    if args.ratio is not None and args.target_mac_reduction is not None:
        raise ConfigError("--structured takes --ratio or --target-mac-reduction, not both")
    multiple: int | str = args.channel_multiple
    if multiple != "auto":
        try:
            multiple = int(multiple)
        except ValueError:
            raise ConfigError(f"--channel-multiple must be an integer >= 1 or 'auto', got {multiple!r}") from None
    if allocation == "lamp" or args.schedule != "oneshot":
        raise ConfigError("--structured takes --allocation uniform, global or energy, and no --schedule")
    config = StructuredPruneConfig(
        ratio=0.5 if args.ratio is None else args.ratio, head_ratio=args.head_ratio, importance=args.importance,
        allocation=allocation, rounds=args.rounds, finetune_epochs=args.finetune_epochs, distill=args.distill,
        layers=layers, channel_multiple=multiple, target_mac_reduction=args.target_mac_reduction,
    )
    weights_format = "safetensors" if args.format == "packed" else args.format  # dense result: nothing to pack
    result = run_structured_prune(args.path, config, args.out, data_name=args.data,
                                  weights_format=weights_format, overwrite=args.overwrite,
                                  data_parallel=args.data_parallel, data_options=data_options(args))
    return print_written(result)
