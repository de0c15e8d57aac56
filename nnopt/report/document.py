"""The reader of a run's ``report.json`` document: :func:`read_report`.

It reads the document into one normalized view (:class:`ReportView`) that the HTML page, its Markdown
twin and the plots share, so that every renderer shows the same figures with the same labels. It knows
the generic parts of a report, not the run that wrote it:

- ``variants`` (the demo) or ``front`` (``nnopt auto``, with ``baseline``, ``objective``,
  ``max_drop`` and ``chosen``): one entry per model, each with optional ``accuracy`` (or ``cosine``),
  ``file_bytes`` (or ``bytes``), ``latency_ms`` (``{batch: {median, p10, p90[, samples]}}``, or one
  ``{median, p10, p90}`` at the report's ``batch``), ``energy_nj`` (a number, or a mapping with
  ``total_nj``, ``compute_nj``, ``memory_nj``, ``low_nj``, ``high_nj``, ``method``), and any other fields;
- the baseline, against which "smaller" and "faster" are said: ``baseline`` (an object beside
  ``front``, or the name of a variant), else the variant flagged ``"baseline": true`` or named
  "baseline"; without one, no comparison is made;
- ``layers``: ``[{name, sparsity, bits, structured_ratio[, energy_nj]}]``;
- ``environment``, ``device``, ``threads``, ``methods``, ``dataset``, ``config``.

Missing optional keys leave their section out; a document that is not a mapping, or has neither
``variants`` nor ``front``, is refused with :class:`~nnopt.errors.ModelFormatError`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, cast

from nnopt.errors import ModelFormatError

# The files of a run directory: the document, and the two renderings written beside it.
REPORT_JSON, REPORT_HTML, REPORT_MD = "report.json", "report.html", "report.md"

OBJECTIVE_UNITS = {"bytes": "file bytes", "latency": "ms", "energy": "nJ/inference"}
# What "best" means for each objective, and the comparative a better plan earns.
OBJECTIVE_PHRASES = {"bytes": ("the smallest weights file", "smaller"), "latency": ("the lowest latency", "faster"),
                     "energy": ("the least energy per inference", "less energy")}


@dataclasses.dataclass(frozen=True)
class LatencyPoint:
    """Latency of one call at one batch size (ms); ``batch`` is "" when the report does not say."""

    batch: str
    median: float | None
    p10: float | None = None
    p90: float | None = None
    samples: tuple[float, ...] = ()
    calls: int | None = None


@dataclasses.dataclass(frozen=True)
class Energy:
    """Energy per inference (nJ), with the method that produced it ("estimated: ..." or "measured: ...")."""

    total_nj: float | None
    compute_nj: float | None = None
    memory_nj: float | None = None
    low_nj: float | None = None
    high_nj: float | None = None
    method: str | None = None


@dataclasses.dataclass(frozen=True)
class Row:
    """One model of the report (a demo variant, the baseline, or a plan on the front)."""

    name: str
    data: Mapping[str, Any]
    accuracy: float | None
    file_bytes: float | None
    latency: tuple[LatencyPoint, ...]
    energy: Energy | None
    objective_value: float | None = None
    is_baseline: bool = False
    chosen: bool = False

    def latency_at(self, batch: str) -> LatencyPoint | None:
        return next((p for p in self.latency if p.batch == batch), None)


@dataclasses.dataclass(frozen=True)
class ReportView:
    """A report.json document, read: its models, their reference, and what the run was."""

    doc: Mapping[str, Any]
    kind: str
    title: str
    rows: tuple[Row, ...]  # every model: the demo's variants, or an auto run's baseline and plans
    front: tuple[Row, ...]  # the plans of an auto run (empty otherwise)
    baseline: Row | None
    layers: tuple[Mapping[str, Any], ...]
    environment: Mapping[str, Any]
    metric: str  # "accuracy" or "cosine"
    objective: str | None = None
    max_drop: float | None = None
    budget: float | None = None  # the lowest metric value a plan may have

    def get(self, *keys: str) -> Any:
        """The first of ``keys`` found in the document or its environment record."""
        for key in keys:
            for source in (self.doc, self.environment):
                if source.get(key) not in (None, ""):
                    return source[key]
        return None

    @property
    def device(self) -> str:
        return str(self.get("device") or "device not recorded")

    @property
    def threads(self) -> str:
        threads = self.get("threads")
        return f"{threads} threads" if threads is not None else "threads not recorded"

    @property
    def batches(self) -> tuple[str, ...]:
        seen: dict[str, None] = {}
        for row in self.rows:
            for point in row.latency:
                seen.setdefault(point.batch)
        return tuple(seen)

    def method(self, key: str) -> str | None:
        """How the figure ``key`` was obtained, from the document's ``methods`` record."""
        methods = self.doc.get("methods")
        text = methods.get(key) if isinstance(methods, Mapping) else None
        return str(text) if text else None


def read_report(doc: Any) -> ReportView:
    """Normalize a ``report.json`` document; strict about its shape, tolerant of missing optional keys."""
    if not isinstance(doc, Mapping):
        raise ModelFormatError(f"a report must be a JSON object at the top level, got {type(doc).__name__}")
    variants = _mapping_list(doc, "variants")
    front_docs = _mapping_list(doc, "front")
    if variants is None and front_docs is None:
        raise ModelFormatError("the report has neither 'variants' nor 'front': nothing to render")
    environment = doc.get("environment") or {}
    if not isinstance(environment, Mapping):
        raise ModelFormatError(f"'environment' must be an object, got {type(environment).__name__}")
    baseline_doc = doc.get("baseline")
    if baseline_doc is not None and not isinstance(baseline_doc, (Mapping, str)):
        raise ModelFormatError(f"'baseline' must be an object (or a variant's name), got {type(baseline_doc).__name__}")
    kind = str(doc.get("kind") or _config(doc).get("kind") or ("auto" if front_docs is not None else "run"))
    objective = _objective(doc.get("objective"))
    chosen = doc.get("chosen")
    batch = _batch_label(doc.get("batch", doc.get("latency_batch", _config(doc).get("batch"))))

    def row(entry: Mapping[str, Any], index: int, baseline: bool = False) -> Row:
        name = str(entry.get("name") or ("baseline" if baseline else f"variant {index + 1}"))
        return _row(name, entry, doc, objective, batch, baseline, chosen is not None and name == str(chosen))

    front = tuple(row(e, i) for i, e in enumerate(front_docs or ()))
    if variants is not None:
        rows = tuple(row(e, i) for i, e in enumerate(variants))
        # The reference is the row the document names (or flags, or calls "baseline"); never a guess.
        named = str(baseline_doc) if isinstance(doc.get("baseline"), str) else "baseline"
        base = next((r for r in rows if r.data.get("baseline") is True), None) or next(
            (r for r in rows if r.name == named), None)
        rows = tuple(dataclasses.replace(r, is_baseline=r is base) for r in rows)
        base = next((r for r in rows if r.is_baseline), None)
    else:
        base = row(baseline_doc, 0, baseline=True) if isinstance(baseline_doc, Mapping) else None
        rows = ((base,) if base else ()) + front
    has = {key: any(_number(r.data.get(key)) is not None for r in rows + front) for key in ("accuracy", "cosine")}
    metric = doc["metric"] if doc.get("metric") in ("accuracy", "cosine") else (
        "cosine" if has["cosine"] and not has["accuracy"] else "accuracy")
    max_drop = _max_drop(doc.get("max_drop"))
    budget = _number(doc.get("budget", doc.get("accuracy_floor")))
    if budget is None and max_drop is not None and base is not None and base.accuracy is not None:
        budget = base.accuracy - max_drop
    layers = _mapping_list(doc, "layers") or []
    return ReportView(
        doc=doc, kind=kind, title=_title(kind, doc, objective), rows=rows, front=front, baseline=base,
        layers=tuple(layers), environment=environment, metric=metric, objective=objective, max_drop=max_drop,
        budget=budget,
    )


def number(value: Any) -> float | None:
    """A finite number, or None (booleans, strings and NaN are not figures)."""
    return _number(value)


# -- reading ---------------------------------------------------------------------------------------------


def _mapping_list(doc: Mapping[str, Any], key: str) -> list[Mapping[str, Any]] | None:
    value = doc.get(key)
    if value is None:
        return None
    if not isinstance(value, list):
        raise ModelFormatError(f"'{key}' must be a list of objects, got {type(value).__name__}")
    for i, item in enumerate(value):
        if not isinstance(item, Mapping):
            raise ModelFormatError(f"'{key}' entry {i + 1} must be an object, got {type(item).__name__}")
    return value


def _config(doc: Mapping[str, Any]) -> Mapping[str, Any]:
    config = doc.get("config")
    return config if isinstance(config, Mapping) else {}


def _row(name: str, entry: Mapping[str, Any], doc: Mapping[str, Any], objective: str | None, batch: str,
         baseline: bool, chosen: bool) -> Row:
    latency = _latency(entry.get("latency_ms"), _batch_label(entry.get("batch")) or batch)
    energy = _energy(entry, doc)
    accuracy = _number(entry.get("accuracy", entry.get("cosine")))
    file_bytes = _number(entry.get("file_bytes", entry.get("bytes")))
    value = _number(entry.get("objective_value"))
    if value is None:  # the baseline has no objective_value: take the figure the objective names
        value = {"bytes": file_bytes, "latency": latency[0].median if latency else None,
                 "energy": energy.total_nj if energy else None}.get(objective or "")
    return Row(name, entry, accuracy, file_bytes, latency, energy, value, baseline, chosen)


def _latency(value: Any, batch: str) -> tuple[LatencyPoint, ...]:
    if isinstance(value, Mapping):
        if any(k in value for k in ("median", "p10", "p90", "samples")):
            return (_point(batch, value),)
        points = [_point(str(b), v) for b, v in value.items() if isinstance(v, Mapping)]
        return tuple(sorted(points, key=lambda p: (not p.batch.isdigit(), int(p.batch) if p.batch.isdigit() else 0)))
    if isinstance(value, list):
        return (_point(batch, {"samples": value}),)
    median = _number(value)
    return (LatencyPoint(batch, median),) if median is not None else ()


def _point(batch: str, value: Mapping[str, Any]) -> LatencyPoint:
    raw = value.get("samples")
    samples = tuple(x for x in (_number(s) for s in raw) if x is not None) if isinstance(raw, list) else ()
    ordered = sorted(samples)

    def pick(key: str, q: float) -> float | None:
        figure = _number(value.get(key))
        if figure is None and ordered:  # nearest-rank percentile of the raw samples
            figure = ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]
        return figure

    calls = _number(value.get("calls"))
    return LatencyPoint(batch, pick("median", 0.5), pick("p10", 0.1), pick("p90", 0.9), samples,
                        int(calls) if calls is not None else (len(samples) or None))


def _energy(entry: Mapping[str, Any], doc: Mapping[str, Any]) -> Energy | None:
    value = entry.get("energy_nj")
    methods = cast(Mapping[str, Any], doc.get("methods")) if isinstance(doc.get("methods"), Mapping) else {}
    method = entry.get("energy_method") or doc.get("energy_method") or methods.get("energy_nj")
    if isinstance(value, Mapping):
        total = _number(value.get("total_nj", value.get("total")))
        parts = {k: _number(value.get(k)) for k in ("compute_nj", "memory_nj", "low_nj", "high_nj")}
        method = value.get("method") or method
    else:
        total = _number(value)
        if total is None and _number(entry.get("energy_mj")) is not None:
            total = _number(entry.get("energy_mj")) * 1e6  # type: ignore[operator]
        parts = {k: _number(entry.get(f"energy_{k}")) for k in ("compute_nj", "memory_nj", "low_nj", "high_nj")}
    if total is None and parts["compute_nj"] is not None and parts["memory_nj"] is not None:
        total = parts["compute_nj"] + parts["memory_nj"]
    if total is None:
        return None
    return Energy(total, method=str(method) if method else None, **parts)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _batch_label(value: Any) -> str:
    return str(value) if value not in (None, "") else ""


def _objective(value: Any) -> str | None:
    if not value:
        return None
    text = str(value).lower()
    for key, hints in (("bytes", ("byte", "size")), ("latency", ("lat", "speed", "time")), ("energy", ("energ",))):
        if any(h in text for h in hints):
            return key
    return str(value)


def _max_drop(value: Any) -> float | None:
    """An accuracy drop as a fraction, as `nnopt auto --max-drop` takes it: 0.01 → 0.01; "1%" → 0.01."""
    if isinstance(value, str):
        text = value.strip()
        try:
            return float(text.rstrip("%")) / 100 if text.endswith("%") else _max_drop(float(text))
        except ValueError:
            return None
    drop = _number(value)
    return drop if drop is not None and 0 <= drop <= 1 else None


def _title(kind: str, doc: Mapping[str, Any], objective: str | None) -> str:
    if doc.get("title"):
        return str(doc["title"])
    if kind == "classic-demo":
        return "nnopt demo: the classic SimpleNet"
    if kind == "auto":
        best = OBJECTIVE_PHRASES.get(objective or "", (f"the best {objective or 'objective'}", ""))[0]
        return f"nnopt auto: {best} within the accuracy budget"
    return f"nnopt report: {kind}"
