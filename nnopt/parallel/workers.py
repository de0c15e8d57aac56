"""Multi-process batch inference on CPU: a large input split into contiguous chunks, one per worker.

Start method: ``spawn``. Each worker is a fresh interpreter, so nothing of the parent's state
leaks in: not its OpenMP/MKL thread pools (forking after they have started can deadlock the
child with some OpenMP runtimes), not an initialized CUDA context (unusable after ``fork``), not
other threads (Python 3.12+ warns on ``fork`` from a threaded process). The cost is a start-up of
about two seconds per worker to import torch, paid once per :class:`InferencePool`; reuse the pool
for repeated calls. As with any ``spawn`` code, a script that starts a pool needs the usual
``if __name__ == "__main__":`` guard.

The model travels to the workers as process arguments, pickled by ``torch.multiprocessing``:
its tensors go into shared memory, read-only for the workers, and nothing is read from disk.
The pool pickles a private copy, so the caller's module is never moved into shared memory.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import queue
import time
import traceback
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from nnopt.errors import ConfigError

_POLL_S = 0.5  # how often a waiting parent checks that its workers are still alive
_START_TIMEOUT_S = 300.0


def _worker_loop(
    index: int, model: nn.Module, batch_size: int, threads: int, tasks: Any, results: Any, tune: bool = False
) -> None:
    # Runs in a spawned worker. Torch threads are set before the first op so the pool is sized once.
    torch.set_num_threads(threads)
    if tune:  # the parent kept freed memory for reuse (nnopt.tune_allocator): workers do the same
        from nnopt.runtime import tune_allocator

        tune_allocator()
    model.eval()
    results.put(("ready", index, None))
    while True:
        task = tasks.get()
        if task is None:
            return
        job, chunk = task  # chunk: (rows, *features), a view of the parent's shared-memory input
        try:
            with torch.inference_mode():
                outputs = [model(chunk[i : i + batch_size]) for i in range(0, chunk.shape[0], batch_size)]
                out = torch.cat(outputs)  # (rows, *out_features)
            results.put(("ok", job, out))
        except Exception:  # reported to the parent, which raises it; the worker stays usable
            results.put(("error", job, traceback.format_exc()))


def _allocator_tuned() -> bool:
    from nnopt.runtime import runtime_settings

    return str(runtime_settings().get("allocator", "")).startswith("glibc malloc")


class InferencePool:
    """``workers`` spawned processes, each holding the model, that run :meth:`predict` together.

    Outputs come back in the input's row order and equal a single-process run within
    floating-point tolerance (each worker uses the same kernels on its own rows). The model must
    return one tensor per call and treat rows independently (eval-mode BatchNorm is fine).

    >>> with InferencePool(model, workers=2, batch_size=256) as pool:  # doctest: +SKIP
    ...     out = pool.predict(torch.randn(4096, 64))
    """

    def __init__(self, model: nn.Module, workers: int, batch_size: int = 256, threads_per_worker: int = 1) -> None:
        _check_positive(workers=workers, batch_size=batch_size, threads_per_worker=threads_per_worker)
        import torch.multiprocessing as mp

        self.workers = workers
        self.batch_size = batch_size
        self.threads_per_worker = threads_per_worker
        self._jobs = 0
        ctx = mp.get_context("spawn")
        # A private CPU copy: sending it moves its storage into shared memory, not the caller's.
        shared_model = copy.deepcopy(model).cpu().eval()
        self._tasks = [ctx.SimpleQueue() for _ in range(workers)]
        self._results = ctx.Queue()
        self._procs = []
        started = time.perf_counter()
        try:
            for i in range(workers):
                proc = ctx.Process(
                    target=_worker_loop,
                    args=(i, shared_model, batch_size, threads_per_worker, self._tasks[i], self._results,
                          _allocator_tuned()),
                    daemon=True,
                )
                proc.start()
                self._procs.append(proc)
            self._collect({i for i in range(workers)}, "ready", _START_TIMEOUT_S)
        except BaseException:
            self.close()
            raise
        self.startup_seconds = time.perf_counter() - started

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Run the model on every row of ``x`` (CPU), ``batch_size`` rows per forward call."""
        if not isinstance(x, torch.Tensor) or x.ndim < 1 or x.shape[0] < 1:
            raise ConfigError("x must be a tensor with at least one row")
        if not self._procs:
            raise RuntimeError("the InferencePool is closed")
        # One shared-memory copy of the input; workers read their contiguous slice of it in place.
        shared = torch.empty(x.shape, dtype=x.dtype).share_memory_()
        shared.copy_(x.detach())
        chunks = [c for c in torch.tensor_split(shared, self.workers) if c.shape[0] > 0]
        jobs = {}
        for worker, chunk in enumerate(chunks):
            job = self._jobs
            self._jobs += 1
            jobs[job] = worker
            self._tasks[worker].put((job, chunk))
        outs = self._collect(set(jobs), "ok", timeout=None)
        return torch.cat([outs[job] for job in sorted(jobs)])  # chunk order == row order

    def _collect(self, pending: set[int], kind: str, timeout: float | None) -> dict[int, Any]:
        got: dict[int, Any] = {}
        errors: list[str] = []
        deadline = None if timeout is None else time.monotonic() + timeout
        while pending:
            try:
                status, key, payload = self._results.get(timeout=_POLL_S)
            except queue.Empty:
                dead = [p.exitcode for p in self._procs if not p.is_alive()]
                if dead:
                    raise RuntimeError(f"an inference worker exited unexpectedly (exit codes {dead})") from None
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"inference workers did not start within {timeout:.0f} s") from None
                continue
            if status not in (kind, "error") or key not in pending:
                raise RuntimeError(f"unexpected message from an inference worker: {status} {key}")
            pending.discard(key)
            if status == "error":
                errors.append(payload)  # raised once every job has answered, so none is left queued
            else:
                got[key] = payload  # a worker's shared-memory output; predict() concatenates into fresh memory
        if errors:
            raise RuntimeError(f"an inference worker failed:\n{errors[0]}")
        return got

    def close(self) -> None:
        """Stop the workers (also done on leaving a ``with`` block)."""
        for tasks, proc in zip(self._tasks, self._procs):
            if proc.is_alive():
                tasks.put(None)
        for proc in self._procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
        self._procs = []

    def __enter__(self) -> InferencePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def parallel_predict(
    model: nn.Module, x: torch.Tensor, workers: int, batch_size: int = 256, threads_per_worker: int = 1
) -> torch.Tensor:
    """Outputs of ``model`` on all rows of ``x``, computed by ``workers`` spawned processes.

    ``x`` is split into ``workers`` contiguous chunks; each worker runs its chunk in batches of
    ``batch_size`` with ``threads_per_worker`` torch threads. The result is in the original row
    order and matches ``model(x)`` within floating-point tolerance. This starts and stops a pool
    (seconds); for repeated calls keep an :class:`InferencePool`.

    >>> out = parallel_predict(create_model("simplenet", seed=0), torch.randn(4096, 64), workers=2)  # doctest: +SKIP
    """
    _check_positive(workers=workers, batch_size=batch_size, threads_per_worker=threads_per_worker)
    with InferencePool(model, workers, batch_size, threads_per_worker) as pool:
        return pool.predict(x)


@dataclasses.dataclass(frozen=True)
class WorkerThroughput:
    """One worker count: steady-state rows/s of :meth:`InferencePool.predict` (measured)."""

    workers: int
    median_s: float  # per predict() call over all rows, including the copies to and from workers
    rows_per_s: float
    speedup: float  # against the fewest workers
    efficiency: float  # speedup / (workers / fewest workers)
    startup_s: float  # spawning the pool once, not part of rows_per_s

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class WorkerSweep:
    """Result of :func:`throughput_vs_workers`, with an in-process baseline on the same rows."""

    rows: int
    batch_size: int
    threads_per_worker: int
    in_process_rows_per_s: float  # the same batches in this process, torch threads = threads_per_worker
    results: tuple[WorkerThroughput, ...]
    cpu_count: int | None
    method: str = "measured: time.perf_counter around predict() after a warm-up call; median of repeats"

    def at(self, workers: int) -> WorkerThroughput:
        for result in self.results:
            if result.workers == workers:
                return result
        raise KeyError(workers)

    def to_dict(self) -> dict[str, object]:
        return {
            "rows": self.rows, "batch_size": self.batch_size, "threads_per_worker": self.threads_per_worker,
            "in_process_rows_per_s": self.in_process_rows_per_s, "cpu_count": self.cpu_count,
            "method": self.method, "results": [r.to_dict() for r in self.results],
        }

    def __str__(self) -> str:
        from nnopt.metrics.table import render_table

        rows = [(r.workers, r.rows_per_s, r.speedup, r.efficiency, r.startup_s) for r in self.results]
        caption = (
            f"cpu, {self.rows} rows, batch {self.batch_size}, {self.threads_per_worker} thread(s) per worker, "
            f"{self.cpu_count} logical CPUs; in-process {self.in_process_rows_per_s:,.0f} rows/s; {self.method}"
        )
        return render_table(("workers", "rows/s", "speed-up", "efficiency", "start-up s"), rows, caption=caption)


def throughput_vs_workers(
    model: nn.Module,
    x: torch.Tensor,
    workers: Sequence[int] = (1, 2),
    batch_size: int = 256,
    threads_per_worker: int = 1,
    repeats: int = 5,
) -> WorkerSweep:
    """Rows per second of :func:`parallel_predict`-style inference for each worker count.

    Each count gets its own pool; after one warm-up call, ``repeats`` timed ``predict(x)`` calls
    give the median. Pool start-up is reported separately, not folded into rows/s.

    >>> sweep = throughput_vs_workers(create_model("resnet8", seed=0), torch.randn(4096, 64))  # doctest: +SKIP
    >>> sweep.at(2).speedup  # doctest: +SKIP
    """
    if isinstance(workers, int) or not workers:
        raise ConfigError(f"workers must be a non-empty sequence of counts >= 1, got {workers!r}")
    for w in workers:
        _check_positive(workers=w)
    _check_positive(batch_size=batch_size, threads_per_worker=threads_per_worker, repeats=repeats)
    counts = tuple(dict.fromkeys(workers))
    rows = int(x.shape[0])
    baseline = _in_process_seconds(model, x, batch_size, threads_per_worker, repeats)
    measured: dict[int, tuple[float, float]] = {}
    for w in counts:
        with InferencePool(model, w, batch_size, threads_per_worker) as pool:
            pool.predict(x)  # warm-up: first-call allocations and kernel selection in every worker
            seconds = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                pool.predict(x)
                seconds.append(time.perf_counter() - t0)
            measured[w] = (float(np.median(seconds)), pool.startup_seconds)
    base_w = min(counts)
    results = []
    for w in counts:
        median_s, startup = measured[w]
        speedup = measured[base_w][0] / median_s
        results.append(WorkerThroughput(w, median_s, rows / median_s, speedup, speedup / (w / base_w), startup))
    return WorkerSweep(rows, batch_size, threads_per_worker, rows / baseline, tuple(results), os.cpu_count())


def _in_process_seconds(model: nn.Module, x: torch.Tensor, batch_size: int, threads: int, repeats: int) -> float:
    was_training = model.training
    saved = torch.get_num_threads()
    model.eval()
    seconds = []
    try:
        torch.set_num_threads(threads)
        with torch.inference_mode():
            for i in range(repeats + 1):
                t0 = time.perf_counter()
                torch.cat([model(x[j : j + batch_size]) for j in range(0, x.shape[0], batch_size)])
                if i:  # the first call is the warm-up
                    seconds.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(saved)
        model.train(was_training)
    return float(np.median(seconds))


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
