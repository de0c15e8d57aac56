"""parallel: intra-op thread scaling, multi-process inference and DDP training on one machine, in one process run.

Workloads (BENCHMARKS.md):
- ``threads``: ``nnopt.parallel.thread_sweep`` at 1 and 2 torch threads (1 and ``--threads`` when
  that is more), the counts alternated in rounds in the same process. Models: resnet8 (random
  init, seed 0; the latency does not depend on the weights) on random (batch, 64) float32 inputs at
  batch 32 and 256, and all-MiniLM-L6-v2 fp32 at batch 32 × 128 real tokens (no padding).
  ``speedup_vs_baseline`` is the speed-up over 1 thread; ``scaling_efficiency`` = speed-up ÷
  threads (1.0 is perfect scaling); ``throughput_per_s`` = rows (sequences) per second at the
  median latency.
- ``workers``: ``nnopt.parallel.throughput_vs_workers``: resnet8 on 4096 random rows, batch 256,
  1 torch thread per worker, 1 and 2 spawned workers (each worker count is its own pool, so the
  counts run one after the other, not alternated call by call). Latency is one ``predict()`` over
  all 4096 rows (the copies to and from the workers included), ``startup_s`` spawning the pool once
  (not in rows/s). Baseline: the same batches of 256 in this process at 1 thread (the sweep's own
  in-process measurement); peer: the same in this process at 2 threads (plain torch intra-op
  parallelism, timed right after the sweep). The sweep and the peer are repeated in rounds (3
  full, 1 quick); each figure is the median of the per-round medians (``rows_per_s_rounds`` lists
  them). ``efficiency``: for workers, the speed-up over 1 worker ÷ workers; for the 2-thread peer,
  its speed-up over the 1-thread baseline ÷ 2.
- ``ddp``: ``nnopt.training.ddp_train`` of simplenet (seed 0) on the digits train split, 2 epochs,
  global batch 32, seed 0, at world_size 1 and 2 (gloo, 1 thread per rank), against in-process
  ``nnopt.train`` with the same config at ``--train-threads`` (default 1). ``wall_s``: the whole
  call (for DDP: spawning the ranks and the process group, training, collecting the weights);
  ``train_loop_s``: the training loop alone (DDP: rank 0's loop, ``DDPHistory.seconds``).
  Medians over alternated repeats (3 full, 1 quick). ``max_abs_param_diff``: the largest
  |parameter − in-process parameter| after training (DDP differs from one process only in
  summation order); accuracy on the digits test split.
- ``ddp-passes``: the passes that fine-tune, run with ``data_parallel=2`` against the same pass in
  one process (at ``--train-threads``), from one trained LeNet-300-100 (5 epochs, seed 0): gradual
  pruning to 90% (global, 4 epochs), structured pruning of half the neurons with 3 epochs of
  distillation recovery, and QAT (3 epochs; observed ranges update for the first 2, all-reduced over
  the processes). ``wall_s``: the whole
  ``nnopt.prune``/``nnopt.quantize`` call (DDP: including spawning the ranks); one repeat each.
  ``max_rel_param_diff``: the largest |Δ| of any tensor of the result (int8 codes and scales
  included) against the one-process result, relative to that tensor's largest magnitude;
  accuracy on the digits test split.

    python benchmarks/parallel.py [--quick] [--threads 2] [--train-threads 1] [--only threads,workers,ddp,ddp-passes]
                                  [--out PATH]
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from _common import (  # noqa: I001  (benchmarks/ is run as a script directory)
    TRAIN_THREADS_OPTION,
    log,
    minilm_timing_inputs,
    parse_args,
    row,
    run_workloads,
    threads,
    write_results,
)
from torch import nn

import nnopt
from nnopt.metrics.accuracy import accuracy
from nnopt.parallel import ddp_train, thread_sweep, throughput_vs_workers

WORKLOADS = ("threads", "workers", "ddp", "ddp-passes")
EXTRA = ("model", "input", "threads", "scaling_efficiency", "throughput_per_s", "workers", "rows_per_s",
         "efficiency", "startup_s", "rows_per_s_rounds", "wall_s", "train_loop_s", "loop_speedup_vs_baseline",
         "max_abs_param_diff", "max_rel_param_diff")
WORKER_ROWS = 4096
WORKER_BATCH = 256
DDP_EPOCHS = 2
DDP_BATCH = 32


def main() -> None:
    quick = "fewer timed calls and one DDP repeat; still every variant"
    args, chosen = parse_args(__doc__, "parallel", WORKLOADS, quick, extra=(TRAIN_THREADS_OPTION,))
    rows, load_env = run_workloads(args, chosen, RUNNERS)
    write_results(
        "parallel", rows, args.out, extra_columns=EXTRA,
        extra_env={"train_threads": args.train_threads, "quick": args.quick, "thread_counts": list(counts(args)),
                   **load_env},
    )
    log(f"wrote {args.out} and {args.out.with_suffix('.md')}")


def counts(args: Any) -> tuple[int, ...]:
    """Thread (and worker) counts compared: 1 and 2, plus ``--threads`` when that is more."""
    return tuple(sorted({1, 2, args.threads}))


def _r(value: float, digits: int = 4) -> float:
    return float(f"{value:.{digits}g}")


# --------------------------------------------------------------------------- threads


def sweep_rows(model_name: str, input_desc: str, sweep: Any) -> list[dict[str, Any]]:
    out = []
    for t in sweep.timings:
        r = row(workload="threads", tool="nnopt", variant=f"threads={t.threads}", batch=sweep.batch,
                latency_ms_median=_r(t.median_ms), latency_ms_p10=_r(t.p10_ms), latency_ms_p90=_r(t.p90_ms),
                speedup_vs_baseline=round(t.speedup, 3))
        r.update(model=model_name, input=input_desc, threads=t.threads, scaling_efficiency=round(t.efficiency, 3),
                 throughput_per_s=_r(t.rows_per_s))
        out.append(r)
    return out


def thread_rows(args: Any) -> list[dict[str, Any]]:
    rows = []
    generator = torch.Generator().manual_seed(0)
    resnet = nnopt.create_model("resnet8", seed=0).eval()
    seconds = 0.6 if args.quick else 2.0
    for batch in (32, 256):
        x = torch.randn(batch, 64, generator=generator)
        sweep = thread_sweep(resnet, x, threads=counts(args), warmup=5, min_calls=20, min_seconds=seconds, rounds=5)
        rows += sweep_rows("resnet8", f"({batch}, 64) float32", sweep)
        log(f"threads: resnet8 batch {batch}: efficiency at 2 threads {sweep.at(2).efficiency:.3f}")
    minilm = nnopt.create_model("minilm").eval()
    inputs = minilm_timing_inputs(32)

    def encode(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return minilm(input_ids=input_ids, attention_mask=attention_mask)

    # ~0.5-0.9 s a call: fewer calls than the small model, still alternated in rounds.
    sweep = thread_sweep(encode, (inputs["input_ids"], inputs["attention_mask"]), threads=counts(args),
                         warmup=1 if args.quick else 2, min_calls=3 if args.quick else 10, min_seconds=0.0,
                         rounds=3 if args.quick else 5)
    rows += sweep_rows("minilm", "32 × 128 tokens fp32", sweep)
    log(f"threads: minilm batch 32: efficiency at 2 threads {sweep.at(2).efficiency:.3f}")
    return rows


# --------------------------------------------------------------------------- workers


def in_process_seconds(model: nn.Module, x: torch.Tensor, n_threads: int, repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` timed passes over ``x`` in batches of WORKER_BATCH (after one warm-up)."""
    seconds = []
    with threads(n_threads), torch.inference_mode():
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            torch.cat([model(x[j : j + WORKER_BATCH]) for j in range(0, x.shape[0], WORKER_BATCH)])
            if i:
                seconds.append(time.perf_counter() - t0)
    return seconds


def worker_rows(args: Any) -> list[dict[str, Any]]:
    model = nnopt.create_model("resnet8", seed=0).eval()
    x = torch.randn(WORKER_ROWS, 64, generator=torch.Generator().manual_seed(0))
    repeats, rounds = (4, 1) if args.quick else (10, 3)
    workers = tuple(w for w in counts(args) if w <= 2)
    peer_threads = max(counts(args))
    base, peer = "in-process, 1 thread", f"in-process, {peer_threads} threads"
    # Per round: the sweep (in-process 1 thread, then a fresh pool per worker count), then the
    # 2-thread peer; each variant's figure is the median of its per-round medians, so that drift in
    # the shared machine's speed over one round does not decide the comparison.
    seconds: dict[str, list[float]] = {base: [], peer: [], **{f"workers={w}": [] for w in workers}}
    startup: dict[str, list[float]] = {f"workers={w}": [] for w in workers}
    for i in range(rounds):
        sweep = throughput_vs_workers(model, x, workers=workers, batch_size=WORKER_BATCH, threads_per_worker=1,
                                      repeats=repeats)
        seconds[base].append(WORKER_ROWS / sweep.in_process_rows_per_s)
        for result in sweep.results:
            seconds[f"workers={result.workers}"].append(result.median_s)
            startup[f"workers={result.workers}"].append(result.startup_s)
        seconds[peer].append(float(np.median(in_process_seconds(model, x, peer_threads, repeats))))
        log(f"workers: round {i + 1}/{rounds} timed")
    median_s = {k: float(np.median(v)) for k, v in seconds.items()}
    rate = {k: WORKER_ROWS / v for k, v in median_s.items()}
    desc = f"({WORKER_ROWS}, 64) float32, batches of {WORKER_BATCH}"
    variants = [("baseline", base, 1, None), *[("nnopt", f"workers={w}", 1, w) for w in workers],
                ("torch", peer, peer_threads, None)]
    rows = []
    for tool, variant, n_threads, n_workers in variants:
        if n_workers is None:  # in-process: scaling against the 1-thread baseline, per thread
            efficiency = rate[variant] / rate[base] / n_threads
        else:  # workers: scaling against the fewest workers, per worker (as WorkerThroughput.efficiency)
            efficiency = rate[variant] / rate[f"workers={min(workers)}"] / (n_workers / min(workers))
        r = row(workload="workers", tool=tool, variant=variant, batch=WORKER_BATCH,
                latency_ms_median=_r(median_s[variant] * 1e3), speedup_vs_baseline=round(rate[variant] / rate[base], 3))
        r.update(model="resnet8", input=desc, threads=n_threads, workers=n_workers, rows_per_s=_r(rate[variant]),
                 efficiency=round(efficiency, 3),
                 startup_s=round(float(np.median(startup[variant])), 2) if variant in startup else None,
                 rows_per_s_rounds=[_r(WORKER_ROWS / s_, 3) for s_ in seconds[variant]])
        rows.append(r)
    return rows


# --------------------------------------------------------------------------- ddp


def _max_param_diff(a: nn.Module, b: nn.Module) -> float:
    sb = b.state_dict()
    return max(float((v.float() - sb[k].float()).abs().max()) for k, v in a.state_dict().items())


def _max_relative_diff(a: nn.Module, b: nn.Module) -> float:
    sb = b.state_dict()
    return max(float((v.float() - sb[k].float()).abs().max() / sb[k].float().abs().max().clamp(min=1e-30))
               for k, v in a.state_dict().items() if torch.is_tensor(v) and v.numel())


def ddp_rows(args: Any) -> list[dict[str, Any]]:
    data = nnopt.load_digits()
    config = nnopt.TrainConfig(epochs=DDP_EPOCHS, batch_size=DDP_BATCH, seed=0)
    repeats = 1 if args.quick else 3
    keys = [("baseline", "nnopt.train, 1 process", 0), ("nnopt", "ddp world_size=1", 1),
            ("nnopt", "ddp world_size=2", 2)]
    wall: dict[str, list[float]] = {k[1]: [] for k in keys}
    loop: dict[str, list[float]] = {k[1]: [] for k in keys}
    models: dict[str, nn.Module] = {}
    for _ in range(repeats):  # variants alternated, so a burst of load falls on each alike
        for _tool, variant, world in keys:
            model = nnopt.create_model("simplenet", seed=0)
            t0 = time.perf_counter()
            if world == 0:
                with threads(args.train_threads):
                    history = nnopt.train(model, data.train, config, progress=False)
                wall[variant].append(time.perf_counter() - t0)
            else:
                history = ddp_train(model, data.train, config, world_size=world)
                wall[variant].append(history.wall_seconds)
            loop[variant].append(history.seconds)
            models[variant] = model
    log("ddp: trained")
    reference = models[keys[0][1]]
    base_wall = float(np.median(wall[keys[0][1]]))
    base_loop = float(np.median(loop[keys[0][1]]))
    rows = []
    for tool, variant, world in keys:
        w, lp = float(np.median(wall[variant])), float(np.median(loop[variant]))
        r = row(workload="ddp", tool=tool, variant=variant, batch=DDP_BATCH,
                accuracy=round(accuracy(models[variant], data.test), 4), speedup_vs_baseline=round(base_wall / w, 3))
        r.update(model="simplenet", input=f"digits train ({len(data.train)} rows), {DDP_EPOCHS} epochs",
                 threads=args.train_threads if world == 0 else 1, workers=max(world, 1), wall_s=round(w, 3),
                 train_loop_s=round(lp, 3), loop_speedup_vs_baseline=round(base_loop / lp, 3),
                 max_abs_param_diff=float(f"{_max_param_diff(models[variant], reference):.3g}"), repeats=repeats)
        rows.append(r)
    return rows


def ddp_pass_rows(args: Any) -> list[dict[str, Any]]:
    from nnopt.pruning import GradualPruneConfig, StructuredPruneConfig
    from nnopt.quantization import QATConfig

    data = nnopt.load_digits()
    with threads(args.train_threads):
        base = nnopt.create_model("lenet300", seed=0)
        nnopt.train(base, data.train, nnopt.TrainConfig(epochs=5, seed=0), progress=False)
    passes = (
        ("gradual pruning to 90%, 4 epochs", nnopt.prune, GradualPruneConfig(final_sparsity=0.9, epochs=4)),
        ("structured 50% + 3 epochs distillation", nnopt.prune,
         StructuredPruneConfig(ratio=0.5, importance="l1", finetune_epochs=3, distill=0.5)),
        ("QAT int8, 3 epochs", nnopt.quantize, QATConfig(epochs=3)),
    )
    rows = []
    for name, verb, config in passes:
        results = {}
        for world in (1, 2):
            t0 = time.perf_counter()
            with threads(args.train_threads if world == 1 else torch.get_num_threads()):
                results[world] = verb(base, config, data=data.train, progress=False, data_parallel=world)
            results[world] = (results[world], time.perf_counter() - t0)
        log(f"ddp-passes: {name}")
        for world, (model, wall) in results.items():
            r = row(workload="ddp-passes", tool="baseline" if world == 1 else "nnopt",
                    variant=f"{name}, {'1 process' if world == 1 else 'data_parallel=2'}", batch=config.batch_size,
                    accuracy=round(accuracy(model, data.test), 4),
                    speedup_vs_baseline=round(results[1][1] / wall, 3))
            r.update(model="lenet300", input=f"digits train ({len(data.train)} rows)", workers=world,
                     wall_s=round(wall, 3), max_rel_param_diff=float(f"{_max_relative_diff(model, results[1][0]):.3g}"))
            rows.append(r)
    return rows


RUNNERS = {"threads": thread_rows, "workers": worker_rows, "ddp": ddp_rows, "ddp-passes": ddp_pass_rows}

if __name__ == "__main__":
    main()
