"""`nnopt bench PATH`: latency, throughput and peak memory over threads × batch sizes (see nnopt.pipeline.bench)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from nnopt.cli.options import parse_int_list


def register(commands: Any) -> None:
    """Add the ``bench`` subcommand to the CLI's subparsers."""
    bench = commands.add_parser(
        "bench", help="latency, throughput and peak memory of a saved model over threads × batch sizes",
        description="Time a saved nnopt model on this machine (BENCHMARKS.md protocol: warm-up, then at least "
        "20 timed calls and --seconds of timing per row under torch.inference_mode; median and p10-p90), for "
        "every --threads × --batch, with one backend: torch (eager), compiled (torch.compile; compile time "
        "reported apart), onnxruntime (exported with nnopt.export_onnx) or openvino (that export converted to "
        "OpenVINO, CPU), or all of those available here side by side (--backend all: one row per backend, each "
        "checked against torch eager's outputs). Peak memory is the process's "
        "measured resident set (the table says how). With --compare OLD.json, rows are matched by backend, "
        "batch and threads, and the exit status is 1 when any median is slower than the old one by more than "
        "--tolerance; 0 otherwise; 2 on bad input.",
    )
    bench.add_argument("path", metavar="PATH", help="an nnopt model directory")
    bench.add_argument("--batch", default="1,8,32", metavar="B[,B...]",
                       help="comma-separated batch sizes (default: 1,8,32)")
    bench.add_argument("--threads", default=None, metavar="T[,T...]",
                       help="comma-separated torch/ONNX Runtime/OpenVINO intra-op thread counts (default: the current "
                       "torch.get_num_threads())")
    bench.add_argument("--device", default="cpu", metavar="{cpu,cuda}", help="where to run (default: cpu)")
    bench.add_argument("--backend", default="torch", metavar="{torch,onnxruntime,compiled,openvino,all}",
                       help="torch eager, ONNX Runtime (needs nnopt[onnx]), torch.compile, OpenVINO (needs "
                       "nnopt[openvino]), or all available side by side (default: torch)")
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


def cmd_bench(args: argparse.Namespace) -> int:
    from nnopt.pipeline import bench

    batches = parse_int_list(args.batch, "--batch takes comma-separated integers >= 1, e.g. 1,8,32")
    threads = (None if args.threads is None else
               parse_int_list(args.threads, "--threads takes comma-separated integers >= 1, e.g. 1,2"))
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
