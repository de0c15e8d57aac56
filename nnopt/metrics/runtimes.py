"""The fastest runtime on this machine, chosen by measurement.

:func:`time_runtimes` builds every runtime candidate that is available here for a torch model and/or
an ONNX file (torch eager, ``torch.compile``, ONNX Runtime, OpenVINO), times them side by side with
:func:`nnopt.metrics.speed.compare_calls` (alternated rounds, so drift in the machine's speed falls on
all alike), checks each one's outputs against a reference (max abs difference, top-1 agreement,
cosine), and returns a :class:`RuntimeTable` whose ``fastest`` is the fastest *faithful* candidate.
Candidates that cannot run here (a package not installed, no torch model for torch rows, an export
or compile that failed) are rows with ``available=False`` and the reason.

With only an ONNX file (e.g. an int8 QDQ file), the candidates are ONNX Runtime and OpenVINO; pass the
fp32 model's outputs as ``reference`` to judge fidelity against it (otherwise the first runtime that
ran is the reference, which says nothing about the int8 error itself).

>>> import torch
>>> from nnopt.metrics.runtimes import time_runtimes
>>> model = torch.nn.Sequential(torch.nn.Linear(8, 4)).eval()
>>> table = time_runtimes(torch.randn(4, 8), model=model, runtimes=("torch",), seconds=0.01)
>>> table.fastest.runtime
'torch'
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nnopt.errors import ConfigError, NnoptError, UnsupportedModelError

RUNTIMES = ("torch", "compiled", "onnxruntime", "openvino")
LABELS = {"torch": "torch eager", "compiled": "torch.compile", "onnxruntime": "ONNX Runtime", "openvino": "OpenVINO"}
MIN_AGREEMENT = 0.99  # top-1 agreement with the reference for a runtime to count as faithful


@dataclasses.dataclass(frozen=True)
class RuntimeRow:
    """One runtime: its measured latency and its agreement with the reference, or why it was not timed."""

    runtime: str
    label: str
    available: bool
    reason: str | None = None
    median_ms: float | None = None
    p10_ms: float | None = None
    p90_ms: float | None = None
    calls: int | None = None
    speedup: float | None = None  # the baseline's median / this median (measured)
    max_abs_diff: float | None = None
    top1_agreement: float | None = None
    cosine_min: float | None = None
    faithful: bool | None = None
    setup_seconds: float | None = None  # export, conversion, compilation: measured, not in the timings
    details: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def timed(self) -> bool:
        return self.median_ms is not None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class RuntimeTable:
    """Every runtime candidate at one batch size and thread count; ``fastest`` is the fastest faithful one."""

    rows: tuple[RuntimeRow, ...]
    device: str
    cpu: str
    threads: int
    batch: int
    reference: str  # what the outputs were compared with
    baseline: str | None  # the runtime the speed-ups are relative to
    min_agreement: float
    timing_method: str
    agreement_method: str

    @property
    def fastest(self) -> RuntimeRow | None:
        """The timed, faithful row with the smallest median; None when none is."""
        faithful = [r for r in self.rows if r.timed and r.faithful]
        return min(faithful, key=lambda r: r.median_ms or math.inf, default=None)

    def row(self, runtime: str) -> RuntimeRow:
        for row in self.rows:
            if row.runtime == runtime:
                return row
        raise KeyError(runtime)

    def to_dict(self) -> dict[str, Any]:
        fastest = self.fastest
        return {
            "rows": [r.to_dict() for r in self.rows], "fastest": fastest.runtime if fastest else None,
            "method": "measured", "device": self.device, "cpu": self.cpu, "threads": self.threads,
            "batch": self.batch, "reference": self.reference, "baseline": self.baseline,
            "min_agreement": self.min_agreement, "timing_method": self.timing_method,
            "agreement_method": self.agreement_method,
        }

    def __str__(self) -> str:
        from nnopt.metrics.table import render_table

        columns = ("runtime", "median ms (measured)", "p10-p90 ms", "speed-up", "max |diff|", "top-1 agreement",
                   "faithful", "setup s")
        rows = [(r.label, r.median_ms, "-" if r.p10_ms is None else f"{r.p10_ms:.4g}-{r.p90_ms:.4g}",
                 None if r.speedup is None else f"{r.speedup:.2f}x",
                 None if r.max_abs_diff is None else f"{r.max_abs_diff:.2g}",
                 None if r.top1_agreement is None else f"{r.top1_agreement:.1%}",
                 None if r.faithful is None else ("yes" if r.faithful else "NO"), r.setup_seconds)
                for r in self.rows if r.timed]
        fastest = self.fastest
        lines = [
            f"measured on {self.device} ({self.cpu}), {self.threads} thread{'s' if self.threads != 1 else ''}, "
            f"batch {self.batch}; {self.timing_method}",
            f"agreement: {self.agreement_method}; reference: {self.reference}",
            "speed-up = " + (f"{LABELS.get(self.baseline, self.baseline)} median / runtime median" if self.baseline
                             else "-") + "; setup (export, conversion, compilation) measured, not in the timings",
            "fastest faithful: " + (f"{fastest.label} ({fastest.median_ms:.4g} ms)" if fastest else "none"),
        ]
        missing = [r for r in self.rows if not r.timed]
        if missing:
            lines += ["not timed:", *(f"  {r.label}: {r.reason}" for r in missing)]
        from rich.markup import escape

        # the caption is rich markup: "nnopt[openvino]" would otherwise be read as a style and vanish
        return render_table(columns, rows, title="runtimes side by side", caption=escape("\n".join(lines)))


@dataclasses.dataclass
class RuntimeCall:
    """A runtime ready to time: the zero-argument call, its measured setup time, and facts about it."""

    call: Callable[[], object]
    setup_seconds: float
    details: dict[str, Any]


def time_runtimes(
    inputs: torch.Tensor | tuple[torch.Tensor, ...] | Mapping[str, torch.Tensor],
    *,
    model: nn.Module | None = None,
    onnx: bytes | str | Path | None = None,
    runtimes: Sequence[str] | None = None,
    threads: int | None = None,
    seconds: float = 1.0,
    reference: torch.Tensor | None = None,
    min_agreement: float = MIN_AGREEMENT,
    atol: float | None = None,
    hint: str = "latency",
    warmup: int = 3,
    min_calls: int = 10,
    rounds: int = 5,
) -> RuntimeTable:
    """Time every available runtime for ``model`` and/or ``onnx`` on ``inputs`` (CPU) side by side.

    ``inputs``: one tensor, a tuple (positional inputs) or a mapping (keyword inputs, named as the ONNX
    inputs). ``onnx``: bytes or an ``.onnx`` file; without it, ``model`` is exported with
    :func:`nnopt.io.onnx_export.export_onnx` for the ONNX Runtime and OpenVINO rows. ``runtimes``: a
    subset of :data:`RUNTIMES` (default all). ``threads``: intra-op threads for every runtime (default
    ``torch.get_num_threads()``). ``reference``: the outputs to compare with (default: torch eager's, else
    the first runtime that ran). A row is faithful when its outputs have the reference's shape, are
    finite, agree on top-1 for at least ``min_agreement`` of the rows and, if ``atol`` is given, differ by
    at most ``atol``. ``hint``: OpenVINO's ``"latency"`` or ``"throughput"``.
    """
    from nnopt.cpu import cpu_model
    from nnopt.metrics.speed import compare_calls

    names = _check(inputs, model, onnx, runtimes, threads, seconds, min_agreement, atol)
    if hint not in ("latency", "throughput"):
        raise ConfigError(f"hint must be latency or throughput, got {hint!r}")
    previous = torch.get_num_threads()
    threads = threads or previous
    batch = _batch(inputs)
    reasons: dict[str, str] = {}
    built: dict[str, RuntimeCall] = {}
    outputs: dict[str, torch.Tensor] = {}
    compiled_used = False
    try:
        torch.set_num_threads(threads)
        with torch.inference_mode():
            source, export_facts = _onnx_source(model, onnx, inputs, names, reasons)
            for name in names:
                if name in reasons:
                    continue
                compiled_used |= name == "compiled"
                try:
                    candidate = build_runtime(name, inputs, model=model, onnx=source, threads=threads, hint=hint)
                    outputs[name] = first_output(candidate.call())  # the first call also warms up
                except (NnoptError, RuntimeError, ValueError, TypeError, NotImplementedError, ImportError) as exc:
                    reasons[name] = f"failed here: {_first_line(exc)}"
                    continue
                except Exception as exc:  # noqa: BLE001 - dynamo/inductor and the runtimes raise many types
                    reasons[name] = f"failed here: {type(exc).__name__}: {_first_line(exc)}"
                    continue
                if name in ("onnxruntime", "openvino"):
                    candidate.details.update(export_facts)
                built[name] = candidate
            if reference is not None:
                ref, ref_label = reference.detach().float().cpu(), "the given reference outputs"
            elif "torch" in outputs:
                ref, ref_label = outputs["torch"], "torch eager outputs"
            elif model is not None:
                ref, ref_label = first_output(_bind(model, inputs)()), "torch eager outputs"
            elif outputs:
                first = next(iter(outputs))
                ref, ref_label = outputs[first], f"{LABELS[first]} outputs (no torch model or reference given)"
            else:
                ref, ref_label = torch.empty(0), "none (nothing ran)"
            timings = compare_calls({n: b.call for n, b in built.items()}, batch, warmup=warmup, min_calls=min_calls,
                                    min_seconds=seconds, rounds=rounds) if built else {}
    finally:
        torch.set_num_threads(previous)
        if compiled_used:
            torch.compiler.reset()
    baseline = next((n for n in ("torch", "onnxruntime", "openvino", "compiled") if n in timings), None)
    rows = []
    for name in names:
        if name not in built:
            rows.append(RuntimeRow(name, LABELS[name], available=False, reason=reasons.get(name, "not built")))
            continue
        timing = timings[name]
        base_ms = timings[baseline].median_ms if baseline else None
        fidelity = _fidelity(outputs[name], ref, min_agreement, atol)
        rows.append(RuntimeRow(
            name, LABELS[name], available=True, median_ms=_sig(timing.median_ms), p10_ms=_sig(timing.p10_ms),
            p90_ms=_sig(timing.p90_ms), calls=timing.calls,
            speedup=round(base_ms / timing.median_ms, 3) if base_ms and timing.median_ms > 0 else None,
            setup_seconds=round(built[name].setup_seconds, 3), details=built[name].details, **fidelity,
        ))
    return RuntimeTable(
        rows=tuple(rows), device="cpu", cpu=cpu_model(), threads=threads, batch=batch, reference=ref_label,
        baseline=baseline, min_agreement=min_agreement,
        timing_method=f"median of time.perf_counter around each call; {warmup} warm-up calls, >= {min_calls} calls "
        f"and >= {seconds} s per runtime, alternated over {rounds} rounds (nnopt.metrics.compare_calls), "
        "torch.inference_mode",
        agreement_method=f"measured: max |output - reference|, share of rows with the reference's top-1 "
        f"(faithful: >= {min_agreement:.0%}" + (f", max |diff| <= {atol:g}" if atol is not None else "")
        + "), per-row cosine",
    )


def _check(inputs: Any, model: nn.Module | None, onnx: Any, runtimes: Sequence[str] | None, threads: int | None,
           seconds: float, min_agreement: float, atol: float | None) -> tuple[str, ...]:
    if model is None and onnx is None:
        raise ConfigError("time_runtimes needs a torch model, an ONNX model, or both")
    names = tuple(RUNTIMES if runtimes is None else runtimes)
    unknown = [n for n in names if n not in RUNTIMES]
    if unknown or not names or len(set(names)) != len(names):
        raise ConfigError(f"runtimes must be distinct names from {', '.join(RUNTIMES)}; got {list(names)}")
    if threads is not None and threads < 1:
        raise ConfigError(f"threads must be >= 1, got {threads}")
    if not (math.isfinite(seconds) and seconds >= 0):
        raise ConfigError(f"seconds must be a number >= 0, got {seconds}")
    if not 0 <= min_agreement <= 1:
        raise ConfigError(f"min_agreement must be between 0 and 1, got {min_agreement}")
    if atol is not None and not atol >= 0:
        raise ConfigError(f"atol must be >= 0, got {atol}")
    tensors = list(inputs.values()) if isinstance(inputs, Mapping) else (
        list(inputs) if isinstance(inputs, (tuple, list)) else [inputs])
    if not tensors or not all(isinstance(t, torch.Tensor) for t in tensors):
        raise ConfigError("inputs must be a tensor, a tuple of tensors or a mapping of names to tensors")
    if any(t.device.type != "cpu" for t in tensors) or (
            model is not None and any(p.device.type != "cpu" for p in model.parameters())):
        raise ConfigError("time_runtimes compares CPU runtimes: move the model and inputs to the CPU")
    return names


def _batch(inputs: Any) -> int:
    first = next(iter(inputs.values())) if isinstance(inputs, Mapping) else (
        inputs[0] if isinstance(inputs, (tuple, list)) else inputs)
    return int(first.shape[0]) if first.ndim else 1


def _bind(fn: Callable[..., object], inputs: Any) -> Callable[[], object]:
    """``fn`` on ``inputs``: keyword inputs for a mapping, positional ones for a tuple, else one argument."""
    if isinstance(inputs, Mapping):
        return functools.partial(fn, **inputs)
    if isinstance(inputs, (tuple, list)):
        return functools.partial(fn, *inputs)
    return functools.partial(fn, inputs)


def _onnx_source(model: nn.Module | None, onnx: bytes | str | Path | None, inputs: Any, names: Sequence[str],
                 reasons: dict[str, str]) -> tuple[bytes | str | Path | None, dict[str, Any]]:
    """The ONNX model the ONNX Runtime and OpenVINO rows run (exported from ``model`` when none is given);
    their reasons are filled in where they cannot run."""
    wanted = [n for n in names if n in ("onnxruntime", "openvino")]
    if "onnxruntime" in wanted and importlib.util.find_spec("onnxruntime") is None:
        reasons["onnxruntime"] = "onnxruntime is not installed; pip install 'nnopt[onnx]'"
    if "openvino" in wanted:
        from nnopt.io.openvino_export import OPENVINO_FIX, openvino_available

        if not openvino_available():
            reasons["openvino"] = f"openvino is not installed; {OPENVINO_FIX}"
    if "torch" in names and model is None:
        reasons["torch"] = "no torch model given (ONNX only)"
    if "compiled" in names and model is None:
        reasons["compiled"] = "no torch model given (ONNX only)"
    todo = [n for n in wanted if n not in reasons]
    if onnx is not None or not todo:
        return onnx, {}
    if importlib.util.find_spec("onnx") is None:
        for name in todo:
            reasons[name] = "exporting the torch model needs onnx; pip install 'nnopt[onnx]'"
        return None, {}
    from nnopt.io.onnx_export import export_onnx

    assert model is not None  # _check: a model or an ONNX file
    started = time.perf_counter()
    try:
        args = dict(inputs) if isinstance(inputs, Mapping) else (
            tuple(inputs) if isinstance(inputs, (tuple, list)) else inputs)
        # int8 layers in the fastest form that ONNX Runtime computes exactly on this CPU (a file timed here)
        data = export_onnx(model, args, int8_weights="auto")
    except NnoptError as exc:
        for name in todo:
            reasons[name] = f"ONNX export failed: {_first_line(exc)}"
        return None, {}
    return data, {"onnx_export_seconds": round(time.perf_counter() - started, 3), "onnx_bytes": len(data)}


def build_runtime(name: str, inputs: Any, *, model: nn.Module | None = None, onnx: bytes | str | Path | None = None,
                  threads: int | None = None, hint: str = "latency") -> RuntimeCall:
    """The call to time for one runtime (``torch`` and ``compiled`` need ``model``; ``onnxruntime`` and
    ``openvino`` need ``onnx``); its setup (compilation, session, conversion) is timed apart. Raises what
    the runtime raises when it cannot be built."""
    if name not in RUNTIMES:
        raise ConfigError(f"unknown runtime {name!r}; choose from {', '.join(RUNTIMES)}")
    if (name in ("torch", "compiled") and model is None) or (name not in ("torch", "compiled") and onnx is None):
        raise ConfigError(f"the {name} runtime needs {'a torch model' if name in ('torch', 'compiled') else 'ONNX'}")
    source = onnx
    started = time.perf_counter()
    if name == "torch":
        assert model is not None
        return RuntimeCall(_bind(model, inputs), 0.0, {})
    if name == "compiled":
        assert model is not None
        call = _bind(torch.compile(model), inputs)
        call()  # tracing and code generation happen on the first call: setup, not latency
        return RuntimeCall(call, time.perf_counter() - started, {})
    assert source is not None
    if name == "onnxruntime":
        from nnopt.io.onnx_export import OnnxRunner

        runner: Any = OnnxRunner(source, threads=threads)
        return RuntimeCall(_bind(runner, inputs), time.perf_counter() - started, {"provider": runner.provider})
    from nnopt.io.openvino_export import OpenVinoRunner, openvino_version

    runner = OpenVinoRunner(source, threads=threads, hint=hint)
    return RuntimeCall(_bind(runner, inputs), time.perf_counter() - started,
                  {"openvino": openvino_version(), **runner.settings()})


def first_output(value: object) -> torch.Tensor:
    """The output to compare: the tensor itself, or the first of a tuple, list or mapping, as float32 on
    the CPU (a quantized tensor dequantized)."""
    if isinstance(value, Mapping):
        value = next(iter(value.values()), None)
    elif isinstance(value, (tuple, list)):
        value = value[0] if value else None
    if not isinstance(value, torch.Tensor):
        raise UnsupportedModelError(f"cannot compare outputs of type {type(value).__name__}")
    if value.is_quantized:
        value = value.dequantize()
    return value.detach().float().cpu()


def _fidelity(output: torch.Tensor, reference: torch.Tensor, min_agreement: float,
              atol: float | None) -> dict[str, Any]:
    if output.shape != reference.shape or output.ndim == 0:
        return {"faithful": False}
    from nnopt.metrics.accuracy import output_fidelity

    max_abs = float((output - reference).abs().max()) if output.numel() else 0.0
    rows = output.reshape(output.shape[0], -1) if output.ndim > 1 else output.reshape(-1, 1)
    ref_rows = reference.reshape(rows.shape)
    fid = output_fidelity(rows, ref_rows)
    top1 = fid.agreement if rows.shape[1] > 1 else None
    faithful = (math.isfinite(max_abs) and (top1 is None or top1 >= min_agreement)
                and (atol is None or max_abs <= atol))
    return {"max_abs_diff": _sig(max_abs), "top1_agreement": None if top1 is None else round(top1, 4),
            "cosine_min": round(fid.cosine_min, 6), "faithful": faithful}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _sig(value: float) -> float:
    return float(f"{value:.6g}")


__all__ = ["LABELS", "MIN_AGREEMENT", "RUNTIMES", "RuntimeCall", "RuntimeRow", "RuntimeTable", "build_runtime",
           "time_runtimes"]
