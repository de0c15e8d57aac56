"""``nnopt bench``: latency, throughput and peak memory of a saved model over a threads × batch grid.

Protocol (BENCHMARKS.md): warm-up calls, then at least ``min_calls`` timed calls and at least
``seconds`` of timing per row with ``time.perf_counter`` under ``torch.inference_mode``; median
and 10th–90th percentiles. Backends: torch eager, ``torch.compile`` (compiled once; its compile
time is reported apart from the timings), ONNX Runtime (the model exported with
``nnopt.export_onnx``) and OpenVINO (that export converted by ``nnopt.io.openvino_export``; CPU,
float32 inference precision, latency hint). ``backend="all"`` times every backend available here,
one row per backend at each (threads, batch), adjacent in time, and checks each backend's outputs
against torch eager's on the same inputs (``max_abs_diff_vs_torch``, ``top1_agreement_vs_torch``);
backends that cannot run here are listed in ``env["skipped_backends"]`` with the reason. Results are
a BENCHMARKS.md document (benchmark ``"bench"``), and
``compare_runs`` checks a run against an earlier one for regressions. ``dtype="bf16"`` runs the
torch and compiled backends under ``torch.autocast(device, torch.bfloat16)``; a CPU without
AVX-512 BF16 or AMX-BF16 would emulate bf16 (minutes per call on large models), so the run is refused
there, and a CPU whose features cannot be read gets a warning in its env (``warnings``). ``energy_mj``: energy per
inference on the CPU, estimated as its active power at the row's threads × the row's measured time
(``nnopt.device_energy``; the method in ``energy_method``); none on a GPU.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib.util
import json
import math
import os
import platform
import resource
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nnopt import cpu
from nnopt.errors import ConfigError, UnsupportedModelError
from nnopt.io.json_file import read_json_document
from nnopt.metrics.speed import bind_call, example_batch

BENCHMARK = "bench"
BACKENDS = ("torch", "onnxruntime", "compiled", "openvino")
ALL = "all"  # every backend available here, side by side
DTYPES = ("fp32", "bf16")
DEVICES = ("cpu", "cuda")
DEFAULT_TOLERANCE = 0.1
ONNX_FIX = "pip install 'nnopt[onnx]'"
OPENVINO_FIX = "pip install 'nnopt[openvino]'"
# Every row field that BENCHMARKS.md lists, in its order; bench adds its own after these.
ROW_FIELDS = (
    "workload", "tool", "variant", "batch", "latency_ms_median", "latency_ms_p10", "latency_ms_p90",
    "file_bytes", "macs", "params", "nonzeros", "accuracy", "cosine_mean", "cosine_min",
    "speedup_vs_baseline", "energy_mj", "energy_method",
)
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


@dataclasses.dataclass(frozen=True)
class BenchOptions:
    """What to time. ``threads`` None: the process's current ``torch.get_num_threads()``."""

    batches: tuple[int, ...] = (1, 8, 32)
    threads: tuple[int, ...] | None = None
    device: str = "cpu"
    backend: str = "torch"
    seconds: float = 2.0
    min_calls: int = 20
    warmup: int = 5
    dtype: str = "fp32"

    def validate(self) -> None:
        if self.device not in DEVICES:
            raise ConfigError(f"unknown device {self.device!r}; choose {' or '.join(DEVICES)}")
        if self.backend not in (*BACKENDS, ALL):
            raise ConfigError(f"unknown backend {self.backend!r}; choose torch, onnxruntime, compiled, openvino or all")
        if self.dtype not in DTYPES:
            raise ConfigError(f"unknown dtype {self.dtype!r}; choose fp32 or bf16")
        if self.dtype == "bf16" and self.backend in ("onnxruntime", "openvino", ALL):
            raise ConfigError("--dtype bf16 runs the torch and compiled backends under torch.autocast; the "
                              f"{self.backend} backend{'s' if self.backend == ALL else ''} run the exported fp32 "
                              "graph: use --backend torch or compiled")
        if not self.batches or any(b < 1 for b in self.batches):
            raise ConfigError("--batch takes comma-separated integers >= 1, e.g. 1,8,32")
        if self.threads is not None and (not self.threads or any(t < 1 for t in self.threads)):
            raise ConfigError("--threads takes comma-separated integers >= 1, e.g. 1,2")
        if not (math.isfinite(self.seconds) and self.seconds >= 0):
            raise ConfigError(f"--seconds must be a number >= 0, got {self.seconds}")
        if self.min_calls < 1 or self.warmup < 3:
            raise ConfigError("min_calls must be >= 1 and warmup >= 3 (BENCHMARKS.md protocol)")

    def thread_counts(self) -> tuple[int, ...]:
        return self.threads or (torch.get_num_threads(),)

    @property
    def variant(self) -> str:
        """The rows' variant: the backend, plus the dtype when it is not fp32 (``"torch bf16"``)."""
        return self.variant_of(self.backend)

    def variant_of(self, backend: str) -> str:
        return backend if self.dtype == "fp32" else f"{backend} {self.dtype}"

    def backends(self) -> tuple[str, ...]:
        """The backends a run times: the one asked for, or for ``"all"`` those available here."""
        return tuple(b for b in BACKENDS if b not in skipped_backends(self)) if self.backend == ALL else (self.backend,)

    def grid(self) -> list[tuple[str, int, int]]:
        """The (variant, batch, threads) keys of the rows a run produces."""
        return [(self.variant_of(k), b, t) for t in self.thread_counts() for b in self.batches for k in self.backends()]


def skipped_backends(options: BenchOptions) -> dict[str, str]:
    """For ``backend="all"``: each backend that cannot run here, with why (empty for one named backend)."""
    if options.backend != ALL:
        return {}
    out = {}
    for backend in BACKENDS:
        try:
            _check_backend(backend, options.device)
        except ConfigError as exc:
            out[backend] = str(exc)
    return out


def bf16_warning(device: str = "cpu") -> str | None:
    """The warning a bf16 run carries when it cannot tell whether ``device`` computes bf16 natively; None
    otherwise (a device known to emulate bf16 is refused before the run: ``require_native_bf16``)."""
    native, why = cpu.bf16_support(device)
    return f"bf16: {why}; it may be emulated and slower than fp32" if native is None else None


def autocast_call(call: Callable[[], object], device: str) -> Callable[[], object]:
    """``call`` run under ``torch.autocast(device, torch.bfloat16)``."""

    def run() -> object:
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            return call()

    return run


def check_available(options: BenchOptions) -> None:
    """Errors for a valid request that this machine cannot serve (before any model is loaded)."""
    options.validate()
    if options.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("CUDA is not available on this machine; use --device cpu")
    if options.backend != ALL:
        _check_backend(options.backend, options.device)


def _check_backend(backend: str, device: str) -> None:
    if backend in ("onnxruntime", "openvino"):
        missing = [name for name in ("onnx", backend) if importlib.util.find_spec(name) is None]
        if missing:
            fix = OPENVINO_FIX if missing[-1] == "openvino" else ONNX_FIX
            raise ConfigError(f"the {backend} backend needs {' and '.join(missing)}; {fix}")
    if backend == "onnxruntime" and device == "cuda":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ConfigError("this onnxruntime has no CUDAExecutionProvider; install onnxruntime-gpu "
                              "or use --device cpu")
    if backend == "openvino" and device != "cpu":
        raise ConfigError("the openvino backend runs on the CPU (nnopt compiles for OpenVINO's CPU plugin); "
                          "use --device cpu")


@dataclasses.dataclass(frozen=True)
class BenchResult:
    """One run: the BENCHMARKS.md ``env`` and ``rows``, plus how memory and compile time were obtained."""

    workload: str
    env: dict[str, Any]
    rows: tuple[dict[str, Any], ...]

    def to_dict(self) -> dict[str, Any]:
        return {"benchmark": BENCHMARK, "env": self.env, "rows": [dict(r) for r in self.rows]}

    def __str__(self) -> str:
        from rich.markup import escape

        from nnopt.metrics.table import render_table

        columns: tuple[str, ...] = ("variant", "threads", "batch", "median ms", "p10 ms", "p90 ms", "calls",
                                    "examples/s", "peak RSS MiB", "+RSS MiB")
        rows = [(r["variant"], r["threads"], r["batch"], r["latency_ms_median"], r["latency_ms_p10"],
                 r["latency_ms_p90"], r["calls"], r["throughput_per_s"], r["peak_rss_mib"], r["peak_rss_delta_mib"])
                for r in self.rows]
        env = self.env
        several = env.get("backend") == ALL
        if several:
            columns += ("vs torch: top-1", "max |diff|")
            rows = [(*row, r.get("top1_agreement_vs_torch"), r.get("max_abs_diff_vs_torch"))
                    for row, r in zip(rows, self.rows)]
        lines = [
            f"{self.workload} on {env['device']} ({env['cpu']}), backend {env['backend']}"
            + (f" ({env['onnxruntime_provider']})" if env.get("onnxruntime_provider") else "")
            + (f", dtype {env['dtype']} ({env['dtype_method']})" if env.get("dtype", "fp32") != "fp32" else ""),
            *(f"WARNING: {w}" for w in env.get("warnings", [])),
            f"latency: {env['timing_method']}",
            f"memory: {env['memory_method']}",
        ]
        before, after = env.get("load_average") or (None, None)
        if before is not None and after is not None:
            lines.append(f"machine load (1-min average) {before:.2f} at start, {after:.2f} at end, on "
                         f"{env['logical_cores']} logical cores; other work inflates and spreads timings")
        if env.get("compile_seconds") is not None:
            lines.append(f"compile: {env['compile_seconds']:.2f} s ({env['compile_method']}), not in the timings")
        if env.get("openvino"):
            lines.append(f"OpenVINO {env['openvino']}: {env.get('openvino_method', '')}")
        if several:
            lines.append(f"backends: {', '.join(env['backends'])}; agreement: {env['agreement_method']}")
            # escaped: rich would read "nnopt[openvino]" as markup and drop it
            lines += [escape(f"not timed: {name}: {why}") for name, why in env.get("skipped_backends", {}).items()]
        return render_table(columns, rows, title=f"nnopt bench: {self.workload}", caption="\n".join(lines))


def run_bench(path: str | Path, options: BenchOptions) -> BenchResult:
    """Time the saved model at ``path`` for each threads × batch of ``options``."""
    from nnopt.envinfo import environment
    from nnopt.io.model_dir import read_meta, weights_file
    from nnopt.loading import load_model

    check_available(options)
    if options.dtype == "bf16":
        cpu.require_native_bf16("--dtype bf16", options.device)  # before loading: refused in well under a second
    path = Path(path)
    meta = read_meta(path)
    model = load_model(path).eval()
    workload = path.resolve().name  # the model directory's name, also for "." or a trailing slash
    sizes = _model_sizes(model)
    file_bytes = int(meta["files"][weights_file(meta)]["bytes"])
    memory = _MemoryProbe()
    env: dict[str, Any] = {**environment(options.device), "backend": options.backend, "dtype": options.dtype,
                           "architecture": meta["architecture"],
                           "applied": [p.get("name") for p in meta["applied"]],
                           "timing_method": f"measured: time.perf_counter around each call after {options.warmup} "
                           f"warm-up calls; >= {options.min_calls} calls and >= {options.seconds} s per row; "
                           "torch.inference_mode" + ("; torch.cuda.synchronize before each reading"
                                                     if options.device == "cuda" else ""),
                           "memory_method": memory.method}
    if options.device == "cuda":
        env["memory_method"] += "; GPU: torch.cuda.max_memory_allocated per row"
    if options.dtype == "bf16":
        env["dtype_method"] = f"torch.autocast(device_type={options.device!r}, dtype=torch.bfloat16)"
        warning = bf16_warning(options.device)
        env["warnings"] = [warning] if warning else []
    backends = options.backends()
    if options.backend == ALL:
        env["backends"] = list(backends)
        env["skipped_backends"] = skipped_backends(options)
        env["agreement_method"] = ("measured: each backend's outputs against torch eager's on the same inputs, "
                                   "per (threads, batch): max |difference| and share of rows with the same top-1")
    if {"onnxruntime", "openvino"} & set(backends):
        from nnopt.io.onnx_export import resolve_int8_weights

        # how int8 layers were exported for this run (U8S8 is faster with VNNI; U8U8 is exact everywhere)
        env["onnx_int8_weights"] = resolve_int8_weights("auto")
    runners = {backend: _make_backend(model, options, backend) for backend in backends}
    load_before = _load_average()
    rows: list[dict[str, Any]] = []
    previous_threads = torch.get_num_threads()
    try:
        with contextlib.ExitStack() as stack, torch.inference_mode():
            for runner in runners.values():
                stack.enter_context(runner)
            for threads in options.thread_counts():
                torch.set_num_threads(threads)
                for batch in options.batches:
                    inputs = _inputs(model, batch, options.device)
                    reference = _first_output(runners["torch"].call(threads, inputs)()) if "torch" in runners \
                        and len(runners) > 1 else None
                    for backend, runner in runners.items():
                        call = runner.call(threads, inputs)
                        row = _time_row(call, batch, threads, options, memory, inputs) | {
                            "workload": workload, "file_bytes": file_bytes, "variant": options.variant_of(backend),
                            "backend": backend, **sizes,
                        }
                        if reference is not None:
                            row.update(_agreement_vs_torch(_first_output(call()), reference))
                        rows.append(row)
            for runner in runners.values():
                env.update(runner.env())
    finally:
        torch.set_num_threads(previous_threads)
    env["threads"] = list(options.thread_counts())
    env["load_average"] = [load_before, _load_average()]
    env["logical_cores"] = os.cpu_count()
    return BenchResult(workload, env, tuple(_ordered(row, row["variant"]) for row in rows))


def _first_output(value: object) -> torch.Tensor | None:
    """The first tensor of an output (tuple, list, mapping), as float32 on the CPU; None if there is none."""
    if isinstance(value, Mapping):
        value = next(iter(value.values()), None)
    elif isinstance(value, (tuple, list)):
        value = value[0] if value else None
    if not isinstance(value, torch.Tensor):
        return None
    return (value.dequantize() if value.is_quantized else value).detach().float().cpu()


def _agreement_vs_torch(output: torch.Tensor | None, reference: torch.Tensor | None) -> dict[str, Any]:
    if output is None or reference is None or output.shape != reference.shape or output.ndim == 0:
        return {"max_abs_diff_vs_torch": None, "top1_agreement_vs_torch": None}
    rows, ref = output.reshape(output.shape[0], -1), reference.reshape(reference.shape[0], -1)
    top1 = float((rows.argmax(1) == ref.argmax(1)).float().mean()) if rows.shape[1] > 1 else None
    return {"max_abs_diff_vs_torch": _sig(float((rows - ref).abs().max())) if rows.numel() else 0.0,
            "top1_agreement_vs_torch": None if top1 is None else round(top1, 4)}


def _ordered(row: dict[str, Any], variant: str) -> dict[str, Any]:
    full = {
        "tool": "nnopt", "variant": variant, "accuracy": None, "cosine_mean": None, "cosine_min": None,
        "speedup_vs_baseline": None, "energy_mj": None, "energy_method": None, **row,
    }
    return {**{key: full[key] for key in ROW_FIELDS}, **{k: v for k, v in full.items() if k not in ROW_FIELDS}}


def _time_row(call: Callable[[], object], batch: int, threads: int, options: BenchOptions,
              memory: _MemoryProbe, inputs: Any) -> dict[str, Any]:
    from nnopt.metrics.speed import compare_calls

    memory.start()
    if options.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    timing = compare_calls({"row": call}, batch, warmup=options.warmup, min_calls=options.min_calls,
                           min_seconds=options.seconds, rounds=1, device=options.device)["row"]
    peak, delta = memory.stop()
    row: dict[str, Any] = {
        "batch": batch, "latency_ms_median": _sig(timing.median_ms), "latency_ms_p10": _sig(timing.p10_ms),
        "latency_ms_p90": _sig(timing.p90_ms), "threads": threads, "device": options.device,
        "calls": timing.calls, "throughput_per_s": _sig(batch / (timing.median_ms / 1e3)),
        "peak_rss_mib": peak, "peak_rss_delta_mib": delta, "input_shape": _shape_of(inputs),
        "dtype": options.dtype, **_energy(timing.median_ms, batch, threads, options.device),
    }
    if options.device == "cuda":
        row["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 2)
    return row


def _energy(latency_ms: float, batch: int, threads: int, device: str) -> dict[str, Any]:
    """Energy per inference (mJ), estimated: the CPU's active power at ``threads`` × the row's measured time.
    None on a GPU, where no one power fits (docs/energy.md): a figure there is measured or absent."""
    if device != "cpu":
        return {"energy_mj": None, "energy_method": "not estimated on a GPU: its power varies too much between "
                "models for power × time to hold; measure it with NVML (nnopt.measure_energy(fn, device='cuda'))"}
    from nnopt.energy import cpu_active_power, device_energy

    energy = device_energy(latency_ms / 1e3, batch, cpu_active_power(threads))
    return {"energy_mj": _sig(energy.joules * 1e3), "energy_method": energy.method}


def _load_average() -> float | None:
    """The 1-minute load average: other work on the machine inflates and spreads the timings."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):  # not on Windows
        return None


def _sig(value: float) -> float:
    """Six significant digits: sub-microsecond latencies keep their precision, long ones lose only noise."""
    return float(f"{value:.6g}")


def _shape_of(inputs: Any) -> list[int]:
    tensor = next(iter(inputs.values())) if isinstance(inputs, Mapping) else inputs
    return list(tensor.shape)


def _inputs(model: nn.Module, batch: int, device: str) -> Any:
    inputs = example_batch(model, batch)
    return {k: v.to(device) for k, v in inputs.items()} if isinstance(inputs, Mapping) else inputs.to(device)


def _model_sizes(model: nn.Module) -> dict[str, int | None]:
    """Parameters, non-zeros and MACs (analytic, per sample) from ``nnopt.profile_model``; None where the
    model cannot be profiled rather than a made-up number."""
    from nnopt.metrics import profile_model

    try:
        profile = profile_model(model)
    except (ValueError, TypeError, RuntimeError, NotImplementedError):
        return {"params": None, "nonzeros": None, "macs": None}
    return {"params": profile.params, "nonzeros": profile.nonzeros, "macs": profile.macs}


class _Backend:
    """Makes the zero-argument call that is timed, per thread count and inputs."""

    def __init__(self, model: nn.Module, options: BenchOptions) -> None:
        self.model = model.to(options.device)
        self.options = options

    def __enter__(self) -> _Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def call(self, threads: int, inputs: Any) -> Callable[[], object]:
        return self.bind(self.model, inputs)

    def bind(self, fn: Callable[..., object], inputs: Any) -> Callable[[], object]:
        """The timed call: ``fn(inputs)``, under bf16 autocast when the run's dtype is bf16."""
        call = bind_call(fn, inputs)
        return autocast_call(call, self.options.device) if self.options.dtype == "bf16" else call

    def env(self) -> dict[str, Any]:
        return {}


class _CompiledBackend(_Backend):
    """``torch.compile`` once per thread count: inductor's CPU kernels bake ``torch.get_num_threads()`` into
    their code (its thread-count-agnostic mode measured 10-100x slower at 2 threads here), so dynamo's
    caches are cleared (``torch.compiler.reset``) before each thread count. The first call of each
    (threads, batch) shape (tracing and code generation) is timed as compile time, never as latency."""

    def __init__(self, model: nn.Module, options: BenchOptions) -> None:
        super().__init__(model, options)
        self.compile_seconds = 0.0
        self.threads: int | None = None
        self.compiled: Callable[..., object] = self.model

    def __exit__(self, *exc: object) -> None:
        torch.compiler.reset()

    def call(self, threads: int, inputs: Any) -> Callable[[], object]:
        started = time.perf_counter()
        if threads != self.threads:
            torch.compiler.reset()
            self.compiled = torch.compile(self.model)
            self.threads = threads
        call = self.bind(self.compiled, inputs)
        try:
            call()
            if self.options.device == "cuda":
                torch.cuda.synchronize()
        except Exception as exc:  # dynamo/inductor raise many types; name the model and the cause
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UnsupportedModelError(
                f"torch.compile of {type(self.model).__name__} failed: {first}; try --backend torch"
            ) from None
        self.compile_seconds += time.perf_counter() - started
        return call

    def env(self) -> dict[str, Any]:
        return {"compile_seconds": round(self.compile_seconds, 3),
                "compile_method": "measured: torch.compile once per thread count plus the first call of each "
                "(threads, batch), which traces and generates code (one forward pass each included)"}


class _OnnxBackend(_Backend):
    """The model exported once with ``nnopt.export_onnx`` (dynamic batch) to a temporary file, and one
    ONNX Runtime session per thread count."""

    def __init__(self, model: nn.Module, options: BenchOptions) -> None:
        # exported on the CPU (a copy when the other backends run it on a GPU); the session picks its provider
        self.model = model if options.device == "cpu" else copy.deepcopy(model).cpu()
        self.options = options
        self._tmp = tempfile.TemporaryDirectory(prefix="nnopt-bench-")
        self.path = Path(self._tmp.name) / "model.onnx"
        self.runners: dict[int, Any] = {}

    def __enter__(self) -> _OnnxBackend:
        from nnopt.io.onnx_export import export_onnx

        try:
            # a file timed here and nowhere else: the fastest exact int8 form on this machine
            export_onnx(self.model, _inputs(self.model, min(self.options.batches), "cpu"), self.path,
                        int8_weights="auto")
        except BaseException:
            self._tmp.cleanup()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.runners.clear()
        self._tmp.cleanup()

    def runner(self, threads: int) -> Any:
        from nnopt.io.onnx_export import OnnxRunner

        return OnnxRunner(self.path, threads=threads)

    def call(self, threads: int, inputs: Any) -> Callable[[], object]:
        if threads not in self.runners:
            self.runners[threads] = self.runner(threads)
        if isinstance(inputs, Mapping):
            inputs = {k: v.cpu() for k, v in inputs.items()}
        else:
            inputs = inputs.cpu()
        return bind_call(self.runners[threads], inputs)

    def env(self) -> dict[str, Any]:
        from nnopt.envinfo import onnxruntime_info

        providers = {runner.provider for runner in self.runners.values()}
        return {"onnxruntime": onnxruntime_info()["onnxruntime"],
                "onnxruntime_provider": ", ".join(sorted(providers)), "onnx_bytes": self.path.stat().st_size
                if self.path.exists() else None}


class _OpenVinoBackend(_OnnxBackend):
    """The same export as the ONNX Runtime backend, converted to OpenVINO and compiled for the CPU once per
    thread count (``INFERENCE_NUM_THREADS``, latency hint, float32 inference precision)."""

    def runner(self, threads: int) -> Any:
        from nnopt.io.openvino_export import OpenVinoRunner

        return OpenVinoRunner(self.path, threads=threads, hint="latency")

    def env(self) -> dict[str, Any]:
        from nnopt.io.openvino_export import openvino_version

        settings = next(iter(self.runners.values())).settings() if self.runners else {}
        return {"openvino": openvino_version(), "openvino_settings": settings,
                "openvino_method": "the ONNX export converted with openvino.convert_model, compiled for the CPU "
                "per thread count (INFERENCE_NUM_THREADS, PERFORMANCE_HINT LATENCY, INFERENCE_PRECISION_HINT f32)",
                "onnx_bytes": self.path.stat().st_size if self.path.exists() else None}


_BACKENDS: dict[str, type[_Backend]] = {"torch": _Backend, "compiled": _CompiledBackend, "onnxruntime": _OnnxBackend,
                                        "openvino": _OpenVinoBackend}


def _make_backend(model: nn.Module, options: BenchOptions, backend: str | None = None) -> _Backend:
    return _BACKENDS[backend or options.backend](model, options)


class _MemoryProbe:
    """Peak resident memory of the process during one row.

    Linux: freed heap memory is handed back first (glibc ``malloc_trim``), the kernel's peak-RSS counter
    is reset (``/proc/self/clear_refs``), and the row reports ``VmHWM`` (its peak) and the peak's rise
    over the RSS at the start of the row. Elsewhere, or when the counter cannot be reset, the process's
    high-water mark ``ru_maxrss``, whose rise is 0 for a row that stays under an earlier peak.
    """

    def __init__(self) -> None:
        self.libc = _glibc()
        self.resettable = self._try_reset()
        if self.resettable:
            self.method = ("measured: peak RSS (VmHWM, reset per row via /proc/self/clear_refs) and its rise over "
                           "the row's starting RSS (VmRSS), after returning freed heap memory (malloc_trim); "
                           "includes the model and the runtime")
        else:
            self.method = ("measured: ru_maxrss, the process's RSS high-water mark, and its rise during the row "
                           "(0 when a row stays under an earlier peak)")
        self.before = 0.0

    def _try_reset(self) -> bool:
        try:
            _CLEAR_REFS.write_text("5")
            return _status_kib("VmHWM") is not None
        except OSError:
            return False

    def start(self) -> None:
        if self.resettable:
            if self.libc is not None:
                self.libc.malloc_trim(0)
            self._try_reset()
            self.before = (_status_kib("VmRSS") or 0) / 1024
        else:
            self.before = _maxrss_mib()

    def stop(self) -> tuple[float, float]:
        peak = (_status_kib("VmHWM") or 0) / 1024 if self.resettable else _maxrss_mib()
        return round(peak, 2), round(max(0.0, peak - self.before), 2)


def _status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _maxrss_mib() -> float:
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value / 2**20 if platform.system() == "Darwin" else value / 1024  # bytes on macOS, KiB on Linux


def _glibc() -> Any:
    from nnopt.runtime import _glibc as runtime_glibc

    libc = runtime_glibc()
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


# --- comparing two runs -------------------------------------------------------------------------


def load_bench_json(path: str | Path) -> dict[str, Any]:
    """Read an earlier ``nnopt bench --json`` document; ConfigError naming what is wrong otherwise."""
    path = Path(path)
    doc = read_json_document(path, ConfigError, f"--compare {path}: no such file",
                             f"--compare {path} is not a bench JSON")
    if not isinstance(doc, dict) or doc.get("benchmark") != BENCHMARK or not isinstance(doc.get("rows"), list):
        raise ConfigError(
            f"--compare {path} is not a bench JSON (expected \"benchmark\": \"bench\" and a list of rows)"
        )
    for i, row in enumerate(doc["rows"]):
        if not (isinstance(row, dict) and isinstance(row.get("variant"), str) and _is_int(row.get("batch"))
                and _is_int(row.get("threads")) and _is_positive(row.get("latency_ms_median"))):
            raise ConfigError(f"--compare {path} is not a bench JSON: row {i} lacks variant, batch, threads or a "
                              "positive latency_ms_median")
    return doc


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def check_comparable(old: Mapping[str, Any], options: BenchOptions, path: str | Path) -> None:
    """Error before timing anything when the old run shares no (variant, batch, threads) with this one."""
    old_keys = {(r["variant"], r["batch"], r["threads"]) for r in old["rows"]}
    if not old_keys & set(options.grid()):
        raise ConfigError(f"--compare {path} has no row with the same backend, batch and threads as this run")


def check_tolerance(tolerance: float) -> None:
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise ConfigError(f"--tolerance must be a number >= 0 (0.1 = 10% slower), got {tolerance}")


@dataclasses.dataclass(frozen=True)
class Comparison:
    """Old against new medians per (variant, batch, threads); ``ratio`` = new / old."""

    rows: tuple[dict[str, Any], ...]
    tolerance: float

    @property
    def regressions(self) -> tuple[dict[str, Any], ...]:
        return tuple(r for r in self.rows if r["verdict"] == "REGRESSION")

    def to_dict(self) -> dict[str, Any]:
        return {"tolerance": self.tolerance, "regressions": len(self.regressions), "rows": [dict(r) for r in self.rows]}

    def __str__(self) -> str:
        from nnopt.metrics.table import render_table

        columns = ("variant", "batch", "threads", "old median ms", "new median ms", "new/old", "verdict")
        rows = [(r["variant"], r["batch"], r["threads"], r["old_ms"], r["new_ms"], r["ratio"], r["verdict"])
                for r in self.rows]
        n = len(self.regressions)
        caption = (f"regression: new median more than {self.tolerance:.0%} slower than old; "
                   + (f"{n} regression{'s' if n != 1 else ''}" if n else "no regression"))
        return render_table(columns, rows, title="comparison with the earlier run", caption=caption)


def compare_runs(old: Mapping[str, Any], new: BenchResult, tolerance: float = DEFAULT_TOLERANCE) -> Comparison:
    check_tolerance(tolerance)
    old_rows = {(r["variant"], r["batch"], r["threads"]): r for r in old["rows"]}
    rows = []
    for row in new.rows:
        key = (row["variant"], row["batch"], row["threads"])
        before = old_rows.get(key)
        if before is None:
            rows.append({"variant": key[0], "batch": key[1], "threads": key[2], "old_ms": None,
                         "new_ms": row["latency_ms_median"], "ratio": None, "verdict": "not in old run"})
            continue
        ratio = row["latency_ms_median"] / before["latency_ms_median"]
        verdict = "REGRESSION" if ratio > 1 + tolerance else ("faster" if ratio < 1 - tolerance else "ok")
        rows.append({"variant": key[0], "batch": key[1], "threads": key[2], "old_ms": before["latency_ms_median"],
                     "new_ms": row["latency_ms_median"], "ratio": round(ratio, 3), "verdict": verdict})
    return Comparison(tuple(rows), tolerance)


def check_output(path: str | Path) -> None:
    """Error before timing when ``--out`` cannot be written (missing folder, a directory)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"--out {path} is a directory; give a file name, e.g. {path / 'bench.json'}")
    if not path.parent.is_dir():
        raise ConfigError(f"--out {path}: the folder {path.parent} does not exist")


def write_json(path: str | Path, doc: Mapping[str, Any]) -> None:
    from nnopt.io.atomic import atomic_write_bytes

    atomic_write_bytes(Path(path), (json.dumps(doc, indent=2) + "\n").encode())


__all__ = [
    "ALL", "BACKENDS", "DEVICES", "DTYPES", "skipped_backends",
    "BenchOptions", "BenchResult", "Comparison", "check_available", "check_comparable",
    "check_output", "check_tolerance", "compare_runs", "load_bench_json", "run_bench",
    "write_json", "autocast_call", "bf16_warning",
]
