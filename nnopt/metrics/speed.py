"""Wall-clock latency: warm-up, then repeated timed calls; median and percentiles.

Protocol (BENCHMARKS.md): at least ``warmup`` untimed calls, then at least ``min_calls`` timed
calls and at least ``min_seconds`` of timing; ``time.perf_counter``; ``torch.inference_mode``.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from nnopt.errors import ConfigError, UnsupportedModelError

# A measured speed-up below this is within the run-to-run noise of a shared machine: choices made
# by measurement (advice, per-layer kernels, recipe summaries) need at least this much.
MIN_SPEEDUP = 1.05


@dataclasses.dataclass(frozen=True)
class Timing:
    """Latency of one call at one batch size, in milliseconds (measured)."""

    batch: int
    median_ms: float
    p10_ms: float
    p90_ms: float
    calls: int

    def to_dict(self) -> dict[str, float]:
        return {"median": self.median_ms, "p10": self.p10_ms, "p90": self.p90_ms, "calls": self.calls}


@dataclasses.dataclass(frozen=True)
class LatencyStats:
    device: str
    threads: int
    timings: tuple[Timing, ...]
    method: str = "measured: time.perf_counter around each forward call, after warm-up"

    def at(self, batch: int) -> Timing:
        for timing in self.timings:
            if timing.batch == batch:
                return timing
        raise KeyError(batch)

    def to_dict(self) -> dict[str, dict[str, float]]:
        return {str(t.batch): t.to_dict() for t in self.timings}

    def __str__(self) -> str:
        from nnopt.metrics.table import render_table

        rows = [(t.batch, t.median_ms, t.p10_ms, t.p90_ms, t.calls) for t in self.timings]
        caption = f"{self.device}, {self.threads} threads; {self.method}"
        return render_table(("batch", "median ms", "p10 ms", "p90 ms", "calls"), rows, caption=caption)


def example_batch(model: nn.Module, batch: int, generator: torch.Generator | None = None) -> Any:
    """What ``model`` is called with for timing, export and energy runs: its own ``example_inputs``
    (token ids and mask for a sentence encoder), else standard-normal rows of its ``input_shape``.
    Seeded (0) unless ``generator`` is given, so every run sees the same data."""
    from nnopt.metrics.profile import model_input_shape, random_input

    generator = torch.Generator().manual_seed(0) if generator is None else generator
    own = getattr(model, "example_inputs", None)
    if callable(own):
        return own(batch, generator=generator)
    try:
        shape = model_input_shape(model)
    except (ValueError, ConfigError) as exc:
        raise UnsupportedModelError(f"cannot build inputs: {exc}") from None
    return random_input(model, batch, shape, generator)


def bind_call(fn: Callable[..., object], inputs: Any) -> Callable[[], object]:
    """``fn`` applied to ``inputs`` (keyword inputs for a mapping), as a zero-argument call to time."""
    return functools.partial(fn, **inputs) if isinstance(inputs, Mapping) else functools.partial(fn, inputs)


def measure_latency(
    model: nn.Module,
    input_shape: Sequence[int],
    batch_sizes: Sequence[int] = (1, 256),
    warmup: int = 10,
    min_calls: int = 20,
    min_seconds: float = 2.0,
    device: str = "cpu",
) -> LatencyStats:
    """Time ``model`` on random inputs of ``(batch, *input_shape)`` for each batch size."""
    stats = compare_latency({"model": model}, input_shape, batch_sizes, warmup, min_calls, min_seconds, device)
    return stats["model"]


def compare_latency(
    models: Mapping[str, nn.Module],
    input_shape: Sequence[int],
    batch_sizes: Sequence[int] = (1, 256),
    warmup: int = 10,
    min_calls: int = 20,
    min_seconds: float = 2.0,
    device: str = "cpu",
    rounds: int = 5,
) -> dict[str, LatencyStats]:
    """Time several models side by side, alternating them in ``rounds`` so that drift in the
    machine's speed (other load, frequency changes) falls on all of them alike."""
    from nnopt.metrics.profile import random_input

    if not batch_sizes or any(b < 1 for b in batch_sizes):
        raise ConfigError(f"batch sizes must be >= 1, got {list(batch_sizes)}")
    for model in models.values():
        model.eval()
    generator = torch.Generator().manual_seed(0)
    timings: dict[str, list[Timing]] = {name: [] for name in models}
    with torch.inference_mode():
        for batch in batch_sizes:
            x = random_input(next(iter(models.values())), batch, input_shape, generator).to(device)
            calls = {name: functools.partial(model, x) for name, model in models.items()}
            for name, timing in compare_calls(calls, batch, warmup, min_calls, min_seconds, rounds, device).items():
                timings[name].append(timing)
    threads = torch.get_num_threads()
    return {name: LatencyStats(device, threads, tuple(timings[name])) for name in models}


def compare_calls(
    calls: Mapping[str, Callable[[], object]],
    batch: int,
    warmup: int = 10,
    min_calls: int = 20,
    min_seconds: float = 2.0,
    rounds: int = 5,
    device: str = "cpu",
) -> dict[str, Timing]:
    """Time zero-argument callables side by side (any runtime: torch, ONNX Runtime, ...),
    alternating them in ``rounds``; ``batch`` only labels the result."""
    if warmup < 0 or min_calls < 1 or min_seconds < 0 or rounds < 1:
        raise ConfigError("warmup must be >= 0, min_calls, rounds >= 1 and min_seconds >= 0")
    samples: dict[str, list[float]] = {name: [] for name in calls}
    calls_per_round = max(1, -(-min_calls // rounds))
    seconds_per_round = min_seconds / rounds
    for call in calls.values():
        for _ in range(warmup):
            call()
    for _ in range(rounds):
        for name, call in calls.items():
            _time_calls(call, device, calls_per_round, seconds_per_round, samples[name])
    return {name: _summarize(batch, samples[name]) for name in calls}


def _time_calls(call: Callable[[], object], device: str, calls: int, seconds: float, out: list[float]) -> None:
    started = time.perf_counter()
    done = 0
    while done < calls or time.perf_counter() - started < seconds:
        t0 = time.perf_counter()
        call()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        out.append((time.perf_counter() - t0) * 1e3)
        done += 1


def _summarize(batch: int, samples: list[float]) -> Timing:
    p10, median, p90 = np.percentile(samples, [10, 50, 90])
    return Timing(batch, float(median), float(p10), float(p90), len(samples))
