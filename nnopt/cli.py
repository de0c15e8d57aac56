"""Command line: argument parsing only. Each command imports what it needs when it runs."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable, Sequence

from nnopt._version import __version__


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    from nnopt.errors import NnoptError
    from nnopt.runtime import tune_allocator

    tune_allocator()  # the CLI owns its process: keep freed activation memory for reuse (see nnopt.runtime)
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
                      help="quantization bit width, 2..8 (default: 8)")
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
                     help="remove whole channels/neurons (and heads with --head-ratio); needs --ratio")
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
    prune.add_argument("--global", dest="allocation", action="store_const", const="global",
                       help="one magnitude threshold across layers (same as --allocation global)")
    prune.add_argument("--allocation", choices=("uniform", "global", "lamp", "energy"), default=None,
                       help="how --sparsity (or --structured --ratio) is spread over layers (default: uniform); "
                       "energy: structured only, prune where the most estimated energy is saved per importance lost")
    prune.add_argument("--schedule", choices=("oneshot", "gradual"), default="oneshot",
                       help="gradual: cubic sparsity ramp with fine-tuning (needs --sparsity and --data)")
    prune.add_argument("--epochs", type=int, default=0,
                       help="fine-tuning epochs (gradual: the whole schedule, default 30; oneshot: after pruning)")
    prune.add_argument("--data", choices=("digits",), default=None,
                       help="data set for fine-tuning and for accuracy before/after")
    prune.add_argument("--layers", action="append", default=[], metavar="PATTERN",
                       help="layer name, re:REGEX or type:TYPE (repeatable); default: all Linear/Conv2d "
                       "but the final classifier")
    prune.add_argument("--format", choices=("packed", "safetensors"), default="packed",
                       help="weights file format (default: packed, which stores only non-zeros)")
    prune.add_argument("--kernel-batch", type=int, default=1, metavar="B",
                       help="batch size at which sparse (CSR) kernels are measured against dense ones; each "
                       "Linear uses the faster (default: 1); 0 keeps every layer dense")
    prune.add_argument("-o", "--out", required=True, metavar="OUT", help="output model directory")
    prune.add_argument("--overwrite", action="store_true", help="replace an earlier nnopt model at OUT")
    _add_checkpoint_arguments(prune, "--schedule gradual")
    _add_data_parallel_argument(prune, "fine-tuning (--schedule gradual, --epochs, --structured --finetune-epochs)")
    prune.set_defaults(handler=cmd_prune)

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
    quant.add_argument("--data", choices=("digits",), default=None,
                       help="data set for calibration, fine-tuning and accuracy before/after")
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
    quant.add_argument("-o", "--out", required=True, metavar="OUT", help="output model directory")
    quant.add_argument("--overwrite", action="store_true", help="replace an earlier nnopt model at OUT")
    _add_checkpoint_arguments(quant, "--scheme qat")
    _add_data_parallel_argument(quant, "fine-tuning (--scheme qat, --scheme cluster --epochs N)")
    quant.set_defaults(handler=cmd_quantize)

    bench = commands.add_parser(
        "bench", help="latency, throughput and peak memory of a saved model over threads × batch sizes",
        description="Time a saved nnopt model on this machine (BENCHMARKS.md protocol: warm-up, then at least "
        "20 timed calls and --seconds of timing per row under torch.inference_mode; median and p10-p90), for "
        "every --threads × --batch, with one backend: torch (eager), compiled (torch.compile; compile time "
        "reported apart) or onnxruntime (exported with nnopt.export_onnx). Peak memory is the process's "
        "measured resident set (the table says how). With --compare OLD.json, rows are matched by backend, "
        "batch and threads, and the exit status is 1 when any median is slower than the old one by more than "
        "--tolerance; 0 otherwise; 2 on bad input.",
    )
    bench.add_argument("path", metavar="PATH", help="an nnopt model directory")
    bench.add_argument("--batch", default="1,8,32", metavar="B[,B...]",
                       help="comma-separated batch sizes (default: 1,8,32)")
    bench.add_argument("--threads", default=None, metavar="T[,T...]",
                       help="comma-separated torch/ONNX Runtime intra-op thread counts (default: the current "
                       "torch.get_num_threads())")
    bench.add_argument("--device", default="cpu", metavar="{cpu,cuda}", help="where to run (default: cpu)")
    bench.add_argument("--backend", default="torch", metavar="{torch,onnxruntime,compiled}",
                       help="torch eager, ONNX Runtime (needs nnopt[onnx]) or torch.compile (default: torch)")
    bench.add_argument("--seconds", type=float, default=2.0, metavar="S",
                       help="minimum timing per row, on top of at least 20 calls (default: 2.0)")
    bench.add_argument("--dtype", default="fp32", metavar="{fp32,bf16}",
                       help="bf16 runs the torch and compiled backends under torch.autocast(bfloat16); fast on "
                       "CPUs with AVX-512 BF16 or AMX-BF16, refused elsewhere (emulated bf16) (default: fp32)")
    bench.add_argument("--json", action="store_true",
                       help="print the BENCHMARKS.md JSON document instead of tables")
    bench.add_argument("--out", default=None, metavar="FILE", help="also write the JSON document to FILE (atomically)")
    bench.add_argument("--compare", default=None, metavar="OLD.json",
                       help="an earlier `nnopt bench --json` result; exit 1 if any matched row regressed")
    bench.add_argument("--tolerance", type=float, default=0.1, metavar="F",
                       help="--compare: allowed slow-down of the median as a fraction (default: 0.1 = 10%%)")
    bench.set_defaults(handler=cmd_bench)

    advise = commands.add_parser(
        "advise", help="which data-free techniques make a saved model faster on this machine, measured",
        description="Build the variants nnopt can make without data (fp32 baseline, bf16 autocast, int8 dynamic, "
        "BatchNorm folding, CSR sparse kernels for already sparse Linears, torch.compile with --compile), time "
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
    advise.add_argument("--json", action="store_true", help='print {"advice": [...], "env": ...} instead of a table')
    advise.set_defaults(handler=cmd_advise)

    energy = commands.add_parser(
        "energy", help="energy per inference: analytic per-layer estimate, latency-based range, measured if possible",
        description="Estimate a saved model's energy per inference from a versioned table (MACs executed × pJ per "
        "MAC + bytes moved × pJ per byte at the cache level its working set fits), give a range from measured "
        "latency × a share of the CPU's power, and measure with RAPL where the machine exposes it. Every figure "
        "says whether it is measured or estimated, how, and its bounds.",
    )
    energy.add_argument("path", metavar="PATH", help="an nnopt model directory")
    energy.add_argument("--batch", type=int, default=1, help="batch size (default: 1)")
    energy.add_argument("--table", default="horowitz-45nm", metavar="NAME_OR_YAML",
                        help="energy table: a shipped name or a .yaml file (default: horowitz-45nm)")
    energy.add_argument("--tdp", type=float, default=None, metavar="W",
                        help="the CPU's thermal design power in watts, for the latency-based range "
                        "(default: a lookup by CPU model, else 10 W per logical core, a guess)")
    energy.add_argument("--seconds", type=float, default=0.5, metavar="S",
                        help="latency timing for the latency-based range (default: 0.5)")
    energy.add_argument("--json", action="store_true", help="print JSON instead of a table")
    energy.set_defaults(handler=cmd_energy)

    env = commands.add_parser(
        "env", help="this machine as nnopt's speed depends on it: CPU features, threads, torch build, GPU",
        description="Print the device, CPU model and the CPU features nnopt's kernels use (AVX2, AVX-512, VNNI, "
        "BF16, AMX, FMA, from /proc/cpuinfo), logical cores, torch threads, torch build (oneDNN, int8 kernels), "
        "GPUs, library versions, ONNX Runtime and its execution providers, and the allocator setting.",
    )
    env.add_argument("--json", action="store_true", help="print JSON instead of a table")
    env.set_defaults(handler=cmd_env)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(commands)
    return parser


# Commands that live in their own module: each exposes ``register(commands)``, which adds its
# subparser and handler; the handler imports the heavy pieces when it runs.
COMMAND_MODULES = (
    "nnopt.pipeline.verify_run",
    "nnopt.pipeline.convert_run",
    "nnopt.pipeline.recipe_run",
    "nnopt.pipeline.report_run",
    "nnopt.pipeline.auto_run",
)


SCHEMES_HELP = ("int8-dynamic", "int8-static", "int8-weight", "int4-weight", "cluster", "qat")


def _add_checkpoint_arguments(parser: argparse.ArgumentParser, runs: str) -> None:
    parser.add_argument("--resume", action="store_true",
                        help=f"{runs}: continue an interrupted run from its checkpoint (same command, input and "
                        "data; an error if there is no checkpoint or it belongs to a different run)")
    parser.add_argument("--checkpoint-dir", default=None, metavar="D",
                        help=f"{runs}: where training is checkpointed (default: OUT.ckpt beside the output); "
                        "removed once OUT is written")
    parser.add_argument("--checkpoint-every", type=int, default=None, metavar="N",
                        help=f"{runs}: checkpoint every N epochs (default 1; 0: no checkpoints)")


def _add_data_parallel_argument(parser: argparse.ArgumentParser, runs: str) -> None:
    parser.add_argument("--data-parallel", type=int, default=1, metavar="N",
                        help=f"{runs} in N DistributedDataParallel processes on this machine's CPU cores: the same "
                        "global batches and, within floating-point tolerance, the same weights as one process "
                        "(BatchNorm and dropout excepted); no checkpoints (default: 1)")


def _checkpoint_spec(args: argparse.Namespace, trains: bool, runs: str):  # noqa: ANN202
    """The run's CheckpointSpec (None when it does not train, checkpoints are off, or it trains data-parallel)."""
    from pathlib import Path

    from nnopt.checkpoint import CheckpointSpec
    from nnopt.errors import ConfigError
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


def _interrupted(spec) -> int:  # noqa: ANN001
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
    spec = _checkpoint_spec(args, args.scheme == "qat", "--scheme qat")
    try:
        result = run_quantize(args.path, options, args.out, data_name=args.data, weights_format=args.format,
                              overwrite=args.overwrite, checkpoint=spec, resume=args.resume,
                              data_parallel=args.data_parallel)
    except KeyboardInterrupt:
        return _interrupted(spec)
    print(result)
    print(f"\nwrote {result.out}")
    return 0


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


def cmd_prune(args: argparse.Namespace) -> int:
    from nnopt.errors import ConfigError
    from nnopt.pipeline.prune_run import run_prune
    from nnopt.pruning import GradualPruneConfig, MagnitudePruneConfig, NMPruneConfig, ThresholdPruneConfig

    layers = tuple(args.layers)
    allocation = args.allocation or "uniform"
    if args.structured:
        _checkpoint_spec(args, False, "--schedule gradual")  # refuses --resume and friends here
        return _structured_prune(args, layers, allocation)
    if args.ratio is not None:
        raise ConfigError("--ratio applies to --structured pruning; use --sparsity for weight sparsity")
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
    spec = _checkpoint_spec(args, args.schedule == "gradual", "--schedule gradual")
    try:
        result = run_prune(args.path, config, args.out, data_name=args.data, finetune_epochs=finetune_epochs,
                           weights_format=args.format, overwrite=args.overwrite, kernel_batch=args.kernel_batch,
                           checkpoint=spec, resume=args.resume, data_parallel=args.data_parallel)
    except KeyboardInterrupt:
        return _interrupted(spec)
    print(result)
    print(f"\nwrote {result.out}")
    return 0


def _structured_prune(args: argparse.Namespace, layers: tuple[str, ...], allocation: str) -> int:
    from nnopt.errors import ConfigError
    from nnopt.pipeline.prune_run import run_structured_prune
    from nnopt.pruning import StructuredPruneConfig

    if args.ratio is None:
        raise ConfigError("--structured needs --ratio R (share of channels to remove, in [0, 1))")
    if allocation == "lamp" or args.schedule != "oneshot":
        raise ConfigError("--structured takes --allocation uniform, global or energy, and no --schedule")
    config = StructuredPruneConfig(
        ratio=args.ratio, head_ratio=args.head_ratio, importance=args.importance, allocation=allocation,
        rounds=args.rounds, finetune_epochs=args.finetune_epochs, distill=args.distill, layers=layers,
    )
    weights_format = "safetensors" if args.format == "packed" else args.format  # dense result: nothing to pack
    result = run_structured_prune(args.path, config, args.out, data_name=args.data,
                                  weights_format=weights_format, overwrite=args.overwrite,
                                  data_parallel=args.data_parallel)
    print(result)
    print(f"\nwrote {result.out}")
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from nnopt.io.model_dir import load_model, read_meta, weights_file
    from nnopt.metrics import profile_model

    meta = read_meta(args.path)
    model = load_model(args.path)
    file_bytes = meta["files"][weights_file(meta)]["bytes"]
    profile = profile_model(model, file_bytes=file_bytes)
    applied = [p["name"] for p in meta.get("applied", [])]
    if args.json:
        doc = {"path": args.path, "architecture": meta["architecture"], "applied": applied, **profile.to_dict()}
        print(json.dumps(doc, indent=2))
    else:
        print(f"{args.path}: {meta['architecture']}, applied: {', '.join(applied) or 'nothing'}")
        print(profile)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from nnopt.pipeline import bench

    batches = bench.parse_int_list(args.batch, "--batch takes comma-separated integers >= 1, e.g. 1,8,32")
    threads = (None if args.threads is None else
               bench.parse_int_list(args.threads, "--threads takes comma-separated integers >= 1, e.g. 1,2"))
    options = bench.BenchOptions(batches=batches, threads=threads, device=args.device, backend=args.backend,
                                 seconds=args.seconds, dtype=args.dtype)
    bench.check_available(options)
    bench.check_tolerance(args.tolerance)
    old = None
    if args.compare is not None:
        old = bench.load_bench_json(args.compare)
        bench.check_comparable(old, options, args.compare)
    if args.out is not None:
        bench.check_output(args.out)
    result = bench.run_bench(args.path, options)
    comparison = bench.compare_runs(old, result, args.tolerance) if old is not None else None
    doc = result.to_dict()
    if args.out is not None:
        bench.write_json(args.out, doc)
    if args.json:
        print(json.dumps(doc if comparison is None else {**doc, "compare": comparison.to_dict()}, indent=2))
    else:
        print(result)
        if comparison is not None:
            print()
            print(comparison)
        if args.out is not None:
            print(f"\nwrote {args.out}")
    return 1 if comparison is not None and comparison.regressions else 0


def cmd_advise(args: argparse.Namespace) -> int:
    from nnopt.pipeline.advice import AdviseOptions, parse_count, run_advise

    options = AdviseOptions(batch=parse_count(args.batch, "--batch"),
                            threads=None if args.threads is None else parse_count(args.threads, "--threads"),
                            seconds=args.seconds, device=args.device, compile=args.compile)
    result = run_advise(args.path, options)
    print(json.dumps(result.to_dict(), indent=2) if args.json else result)
    return 0


def cmd_energy(args: argparse.Namespace) -> int:
    from nnopt.pipeline.energy_run import EnergyOptions, run_energy

    options = EnergyOptions(batch=args.batch, table=args.table, tdp_w=args.tdp, seconds=args.seconds)
    options.validate()
    result = run_energy(args.path, options)
    print(json.dumps(result.to_dict(), indent=2) if args.json else result)
    return 0


def cmd_env(args: argparse.Namespace) -> int:
    from nnopt.envinfo import render_system_report, system_report

    report = system_report()
    print(json.dumps(report, indent=2) if args.json else render_system_report(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
