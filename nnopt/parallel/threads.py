"""Intra-op thread scaling: latency of one call at several ``torch.set_num_threads`` values.

The thread counts are alternated in ``rounds`` (as :func:`nnopt.metrics.speed.compare_calls`
alternates models) so that drift in the machine's speed falls on every count alike. The caller's
thread count is restored afterwards, whatever happens.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence

import torch
from torch import nn

from nnopt.errors import ConfigError
from nnopt.metrics.speed import _summarize, _time_calls


@dataclasses.dataclass(frozen=True)
class ThreadTiming:
    """One thread count: latency (ms, measured), rows/s, and scaling against the fewest threads."""

    threads: int
    median_ms: float
    p10_ms: float
    p90_ms: float
    calls: int
    rows_per_s: float
    speedup: float  # median latency at the fewest threads / median latency here
    efficiency: float  # speedup / (threads / fewest threads); 1.0 is perfect scaling

    def to_dict(self) -> dict[str, float]:
        return {
            "threads": self.threads, "median_ms": self.median_ms, "p10_ms": self.p10_ms, "p90_ms": self.p90_ms,
            "calls": self.calls, "rows_per_s": self.rows_per_s, "speedup": self.speedup,
            "efficiency": self.efficiency,
        }


@dataclasses.dataclass(frozen=True)
class ThreadSweep:
    """Result of :func:`thread_sweep` at one batch size on this machine's CPU."""

    batch: int
    timings: tuple[ThreadTiming, ...]
    cpu_count: int | None
    method: str = "measured: time.perf_counter around each call after warm-up, thread counts alternated"

    def at(self, threads: int) -> ThreadTiming:
        for timing in self.timings:
            if timing.threads == threads:
                return timing
        raise KeyError(threads)

    def to_dict(self) -> dict[str, object]:
        return {
            "batch": self.batch, "cpu_count": self.cpu_count, "method": self.method,
            "timings": [t.to_dict() for t in self.timings],
        }

    def __str__(self) -> str:
        from nnopt.metrics.table import render_table

        rows = [(t.threads, t.median_ms, t.rows_per_s, t.speedup, t.efficiency) for t in self.timings]
        caption = f"cpu, batch {self.batch}, {self.cpu_count} logical CPUs; {self.method}"
        columns = ("threads", "median ms", "rows/s", "speed-up", "efficiency")
        return render_table(columns, rows, caption=caption)


def thread_sweep(
    model_or_callable: nn.Module | Callable[..., object],
    inputs: torch.Tensor | Sequence[torch.Tensor],
    threads: Sequence[int] = (1, 2),
    warmup: int = 5,
    min_calls: int = 10,
    min_seconds: float = 1.0,
    rounds: int = 3,
) -> ThreadSweep:
    """Time ``model_or_callable(*inputs)`` under each intra-op thread count.

    Speed-up and efficiency are relative to the smallest count in ``threads`` (1 by default, so
    efficiency is speed-up ÷ threads). A module is put in eval mode for the sweep and its mode is
    restored; calls run under ``torch.inference_mode``.

    >>> sweep = thread_sweep(create_model("resnet8", seed=0), torch.randn(32, 64), threads=(1, 2))
    >>> sweep.at(2).efficiency  # doctest: +SKIP
    0.8
    """
    counts = _check_threads(threads)
    if warmup < 0 or min_calls < 1 or min_seconds < 0 or rounds < 1:
        raise ConfigError("thread_sweep: warmup must be >= 0, min_calls and rounds >= 1, min_seconds >= 0")
    args = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    if not args or not all(isinstance(a, torch.Tensor) for a in args) or args[0].ndim == 0:
        raise ConfigError("thread_sweep: inputs must be a batched tensor or a sequence of tensors")
    batch = int(args[0].shape[0])

    def call() -> object:
        return model_or_callable(*args)

    was_training = isinstance(model_or_callable, nn.Module) and model_or_callable.training
    if isinstance(model_or_callable, nn.Module):
        model_or_callable.eval()
    saved_threads = torch.get_num_threads()
    samples: dict[int, list[float]] = {t: [] for t in counts}
    calls_per_round = max(1, -(-min_calls // rounds))
    try:
        with torch.inference_mode():
            for round_index in range(rounds):
                for t in counts:
                    torch.set_num_threads(t)
                    # A short warm-up after every switch: the thread pool may resize on first use.
                    for _ in range(warmup if round_index == 0 else min(warmup, 2)):
                        call()
                    _time_calls(call, "cpu", calls_per_round, min_seconds / rounds, samples[t])
    finally:
        torch.set_num_threads(saved_threads)
        if was_training:
            model_or_callable.train()  # type: ignore[union-attr]

    summaries = {t: _summarize(batch, samples[t]) for t in counts}
    base = min(counts)
    base_ms = summaries[base].median_ms
    timings = []
    for t in counts:
        s = summaries[t]
        speedup = base_ms / s.median_ms if s.median_ms > 0 else float("nan")
        timings.append(ThreadTiming(
            threads=t, median_ms=s.median_ms, p10_ms=s.p10_ms, p90_ms=s.p90_ms, calls=s.calls,
            rows_per_s=batch / (s.median_ms / 1e3) if s.median_ms > 0 else float("inf"),
            speedup=speedup, efficiency=speedup / (t / base),
        ))
    return ThreadSweep(batch=batch, timings=tuple(timings), cpu_count=os.cpu_count())


def _check_threads(threads: Sequence[int]) -> tuple[int, ...]:
    if isinstance(threads, int) or not threads:
        raise ConfigError(f"threads must be a non-empty sequence of counts >= 1, got {threads!r}")
    for t in threads:
        if isinstance(t, bool) or not isinstance(t, int) or t < 1:
            raise ConfigError(f"threads: every count must be an integer >= 1, got {t!r}")
    return tuple(dict.fromkeys(threads))  # unique, in the caller's order
