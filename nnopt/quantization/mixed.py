"""Mixed-precision weight quantization: measure each layer's sensitivity, then give each layer its own width.

Sensitivity of a layer at ``b`` bits is measured with *only that layer* quantized (the rest stays fp32):

- ``metric="output_error"``: ``mean((logits_q − logits_fp32)²) / var(logits_fp32)`` over ``data``, i.e. the
  error energy relative to the logits' spread (0 = identical outputs, 1 = as large as the signal). MSE rather
  than 1 − cosine because independent quantization noises add in MSE, which is what the planner assumes.
- ``metric="accuracy"``: top-1 accuracy of the fp32 model minus that of the quantized one (needs labels).

Size is counted per layer as the weights' storage: ``numel · b / 8`` bytes of codes (bit-packed, as the
``packed`` weights format stores them) plus 8 bytes (fp32 scale + int32 zero point) per scale group.
``max_bytes_ratio`` is that total over the fp32 bytes (4 per weight) of the *selected* layers' weights;
biases and unselected layers are not counted.

The plan starts with every layer at the widest option and greedily takes the narrowing step (layer, width)
with the smallest predicted error increase per byte saved, treating per-layer errors as additive.

>>> q = quantize(model, MixedPrecisionConfig(bits_options=(8, 4), max_bytes_ratio=0.2), data=dataset.calibration())
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from nnopt.config import Config
from nnopt.data import Split
from nnopt.errors import ConfigError, ModelFormatError, UnsupportedModelError
from nnopt.layers.weight_only import QUANTIZED_TYPES
from nnopt.lineage import AppliedPass
from nnopt.metrics.table import render_table
from nnopt.progress import track
from nnopt.quantization import weights
from nnopt.select import replace_layer, select_layers, validate_patterns
from nnopt.techniques import Technique, always, register_technique, train_split

PASS_NAME = "mixed-precision"
METRICS: tuple[str, ...] = ("output_error", "accuracy")
QPARAM_BYTES = 8  # one fp32 scale + one int32 zero point per scale group
_FP32_BYTES = 4
_BATCH_SIZE = 512

__all__ = [
    "LayerSensitivity", "MixedPrecisionConfig", "SensitivityReport", "apply_mixed_precision", "assign_bits",
    "sensitivity",
]


def _weight_config_has(field: str) -> bool:
    return field in {f.name for f in dataclasses.fields(weights.WeightQuantConfig)}


def _weight_config(
    bits: int, name: str | None = None, per_channel: bool = True, group_size: int | None = None
) -> weights.WeightQuantConfig:
    """The single-layer WeightQuantConfig used for one (layer, width); validates the combination."""
    extra: dict[str, Any] = {}
    if group_size is not None:
        # group_size is newer than this module: pass it only where WeightQuantConfig knows it.
        if not _weight_config_has("group_size"):
            raise ConfigError("group_size is not supported by this nnopt's weight quantization")
        extra["group_size"] = group_size
    layers = (name,) if name is not None else ()
    return weights.WeightQuantConfig(bits=bits, per_channel=per_channel, layers=layers, **extra)


def _check_options(bits_options: Sequence[int], metric: str, per_channel: bool, group_size: int | None,
                   where: str) -> tuple[int, ...]:
    """Validate the shared settings; returns the widths widest first."""
    if not bits_options:
        raise ConfigError(f"{where}.bits_options must name at least one bit width")
    if len(set(bits_options)) != len(bits_options):
        raise ConfigError(f"{where}.bits_options has duplicates: {tuple(bits_options)}")
    for bits in bits_options:
        try:
            _weight_config(bits, per_channel=per_channel, group_size=group_size)
        except ConfigError as exc:
            raise ConfigError(f"{where}.bits_options: {exc}") from None
    if metric not in METRICS:
        raise ConfigError(f"{where}.metric must be one of {', '.join(METRICS)}, got {metric!r}")
    return tuple(sorted(bits_options, reverse=True))


@dataclasses.dataclass(frozen=True)
class MixedPrecisionConfig(Config):
    """Per-layer weight widths from ``bits_options`` under exactly one budget.

    ``max_bytes_ratio``: quantized weight bytes / fp32 weight bytes of the selected layers must not exceed it.
    ``max_error``: total error in ``metric`` units (relative output MSE, or accuracy drop as a fraction)
    measured on ``data`` must not exceed it. ``layers`` selects layers (names, ``re:``, ``type:``); empty
    means every Linear and Conv2d. ``per_channel`` and ``group_size`` are passed to weight quantization.
    """

    kind = "mixed-precision"
    bits_options: tuple[int, ...] = (8, 4)
    max_bytes_ratio: float | None = None
    max_error: float | None = None
    metric: str = "output_error"
    layers: tuple[str, ...] = ()
    per_channel: bool = True
    group_size: int | None = None

    def validate(self) -> None:
        _check_options(self.bits_options, self.metric, self.per_channel, self.group_size, "MixedPrecisionConfig")
        if (self.max_bytes_ratio is None) == (self.max_error is None):
            raise ConfigError("MixedPrecisionConfig needs exactly one budget: max_bytes_ratio or max_error")
        if self.max_bytes_ratio is not None and not (
            math.isfinite(self.max_bytes_ratio) and 0 < self.max_bytes_ratio <= 1
        ):
            raise ConfigError(f"MixedPrecisionConfig.max_bytes_ratio must be in (0, 1], got {self.max_bytes_ratio}")
        if self.max_error is not None and not (math.isfinite(self.max_error) and self.max_error >= 0):
            raise ConfigError(f"MixedPrecisionConfig.max_error must be a finite number >= 0, got {self.max_error}")
        validate_patterns(self.layers)

    @property
    def widths(self) -> tuple[int, ...]:
        """``bits_options`` widest first."""
        return tuple(sorted(self.bits_options, reverse=True))


# ---------------------------------------------------------------- sensitivity


@dataclasses.dataclass(frozen=True)
class LayerSensitivity:
    """One layer: its weight size in fp32 and at each width, and the error with only it quantized."""

    name: str
    shape: tuple[int, ...]
    fp32_bytes: int
    bytes: dict[int, int]  # width -> bytes of codes + qparams
    error: dict[int, float]  # width -> sensitivity in the report's metric

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "shape": list(self.shape), "fp32_bytes": self.fp32_bytes,
            "bytes": {str(b): v for b, v in self.bytes.items()}, "error": {str(b): v for b, v in self.error.items()},
        }


@dataclasses.dataclass(frozen=True)
class SensitivityReport:
    """Per-layer sensitivity at each width; ``str()`` is a table.

    ``reference`` is the fp32 model's accuracy (metric ``accuracy``) or its logits' variance
    (``output_error``) on the ``rows`` rows measured.
    """

    metric: str
    bits_options: tuple[int, ...]  # widest first
    layers: tuple[LayerSensitivity, ...]
    reference: float
    rows: int

    def layer(self, name: str) -> LayerSensitivity:
        for item in self.layers:
            if item.name == name:
                return item
        raise KeyError(name)

    @property
    def fp32_bytes(self) -> int:
        return sum(item.fp32_bytes for item in self.layers)

    def bytes_of(self, assignment: Mapping[str, int]) -> int:
        """Weight bytes of the selected layers with ``assignment``'s widths."""
        return sum(item.bytes[assignment[item.name]] for item in self.layers)

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric, "bits_options": list(self.bits_options), "reference": self.reference,
            "rows": self.rows, "layers": [item.to_dict() for item in self.layers],
        }

    def __str__(self) -> str:
        columns = ["layer", "weights", "fp32 bytes"]
        columns += [f"error @{b}b" for b in self.bits_options] + [f"bytes @{b}b" for b in self.bits_options]
        rows = [
            [item.name, math.prod(item.shape), item.fp32_bytes, *(item.error[b] for b in self.bits_options),
             *(item.bytes[b] for b in self.bits_options)]
            for item in self.layers
        ]
        what = "relative output MSE" if self.metric == "output_error" else "accuracy drop"
        return render_table(columns, rows, title=f"Sensitivity ({what}, one layer quantized at a time)",
                            caption=f"{self.rows} rows; reference {self.reference:.4g}")


def weight_bytes(shape: Sequence[int], bits: int, per_channel: bool = True, group_size: int | None = None) -> int:
    """Storage of one weight tensor at ``bits``: bit-packed codes plus :data:`QPARAM_BYTES` per scale group."""
    numel = math.prod(shape)
    if group_size is not None:
        # Groups of group_size consecutive inputs within each output channel.
        groups = shape[0] * math.ceil((numel // shape[0]) / group_size)
    else:
        groups = shape[0] if per_channel else 1
    return math.ceil(numel * bits / 8) + QPARAM_BYTES * groups


@dataclasses.dataclass
class _Data:
    inputs: list[torch.Tensor]
    labels: list[torch.Tensor] | None
    rows: int


def _materialize(data: Any, need_labels: bool, batch_size: int = _BATCH_SIZE) -> _Data:
    """Batches as a list (a generator is read once) from a Split, a tensor, or an iterable of batches."""
    if data is None:
        raise ConfigError("MixedPrecisionConfig needs data=... for sensitivity")
    if isinstance(data, Split):
        pairs: list[tuple[torch.Tensor, torch.Tensor | None]] = list(data.batches(batch_size))
    elif isinstance(data, torch.Tensor):
        pairs = [(data, None)]  # one batch of inputs; iterating it would yield single rows
    else:
        if not isinstance(data, Iterable):
            raise ConfigError(f"data must be a Split or an iterable of batches, got {type(data).__name__}")
        pairs = []
        for item in data:
            if isinstance(item, torch.Tensor):
                pairs.append((item, None))
            elif isinstance(item, (tuple, list)) and item and isinstance(item[0], torch.Tensor):
                label = item[1] if len(item) > 1 and isinstance(item[1], torch.Tensor) else None
                pairs.append((item[0], label))
            else:
                raise ConfigError(f"each batch must be an input tensor or an (inputs, labels) pair, got "
                                  f"{type(item).__name__}")
    rows = sum(int(x.shape[0]) if x.ndim else 1 for x, _ in pairs)
    if rows == 0:
        raise ConfigError("the data for mixed-precision sensitivity is empty (0 rows)")
    labels = [y for _, y in pairs if y is not None]
    if need_labels and len(labels) < len(pairs):
        raise ConfigError("metric='accuracy' needs labels: pass a Split or (inputs, labels) batches")
    return _Data([x for x, _ in pairs], labels if len(labels) == len(pairs) else None, rows)


def _logits(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise UnsupportedModelError(f"mixed precision needs a model that returns a tensor, got {type(output).__name__}")


class _Evaluator:
    """Scores ``{layer: bits}`` assignments against the fp32 outputs on fixed data.

    Works on the model itself: quantized twins are swapped in and the original layers put back
    afterwards (also on errors), so no second copy of the model is held.
    """

    def __init__(self, model: nn.Module, data: _Data, metric: str, per_channel: bool,
                 group_size: int | None) -> None:
        self.model, self.data, self.metric = model, data, metric
        self.per_channel, self.group_size = per_channel, group_size
        self.reference_outputs = self._outputs()
        if metric == "accuracy":
            self.reference = self._accuracy(self.reference_outputs)
        else:
            flat = torch.cat([o.detach().reshape(-1).double() for o in self.reference_outputs])
            self.reference = float(flat.var(unbiased=False))
        # Constant logits have no spread to compare against: fall back to the absolute MSE.
        self._scale = self.reference if self.reference > 0 else 1.0

    def _outputs(self) -> list[torch.Tensor]:
        with torch.inference_mode():
            return [_logits(self.model(x)) for x in self.data.inputs]

    def _accuracy(self, outputs: list[torch.Tensor]) -> float:
        assert self.data.labels is not None
        correct = sum(int((o.argmax(-1) == y).sum()) for o, y in zip(outputs, self.data.labels))
        return correct / self.data.rows

    def score(self, assignment: Mapping[str, int]) -> float:
        originals: dict[str, nn.Module] = {}
        try:
            for name, bits in assignment.items():
                originals[name] = self.model.get_submodule(name)
                weights.quantize_weights(self.model, _weight_config(bits, name, self.per_channel, self.group_size))
            outputs = self._outputs()
        finally:
            for name, module in originals.items():
                replace_layer(self.model, name, module)
        if self.metric == "accuracy":
            return self.reference - self._accuracy(outputs)
        squared = sum(float(((o.double() - r.double()) ** 2).sum()) for o, r in zip(outputs, self.reference_outputs))
        count = sum(r.numel() for r in self.reference_outputs)
        return squared / count / self._scale


# Embedding tables are quantized by WeightQuantConfig but left out of the default plan here: the sensitivity
# sweep would spend most of its time on a transformer's vocabulary table. Name them in ``layers`` to include them.
_DEFAULT_TYPES = tuple(t for t in QUANTIZED_TYPES if t is not nn.Embedding)


def _targets(model: nn.Module, layers: Sequence[str]) -> list[tuple[str, nn.Module]]:
    # Quantized twins are in the default selection so that quantize_weights names the problem.
    default_types = (*_DEFAULT_TYPES, *QUANTIZED_TYPES.values())
    targets = select_layers(model, layers, default_types=default_types)
    # Checked before any measuring, with weight quantization's own wording.
    for name, module in targets:
        if isinstance(module, tuple(QUANTIZED_TYPES.values())):
            raise UnsupportedModelError(f"layer {name!r} is already quantized")
        if type(module) not in QUANTIZED_TYPES:
            raise UnsupportedModelError(
                f"layer {name!r} is a {type(module).__name__}; weight quantization supports "
                + ", ".join(t.__name__ for t in QUANTIZED_TYPES)
            )
    return targets


def _sensitivity(
    model: nn.Module, data: _Data, widths: tuple[int, ...], targets: list[tuple[str, nn.Module]], metric: str,
    per_channel: bool, group_size: int | None, progress: bool | None,
) -> tuple[SensitivityReport, _Evaluator]:
    was_training = model.training
    model.eval()
    try:
        evaluator = _Evaluator(model, data, metric, per_channel, group_size)
        items = []
        with track("sensitivity", total=len(targets) * len(widths), enabled=progress) as bar:
            for name, module in targets:
                shape = tuple(module.weight.shape)
                errors = {}
                for bits in widths:
                    errors[bits] = evaluator.score({name: bits})
                    bar.advance(status=f"{name} @{bits}b")
                items.append(LayerSensitivity(
                    name=name, shape=shape, fp32_bytes=_FP32_BYTES * math.prod(shape),
                    bytes={b: weight_bytes(shape, b, per_channel, group_size) for b in widths}, error=errors,
                ))
    finally:
        model.train(was_training)
    report = SensitivityReport(metric, widths, tuple(items), evaluator.reference, data.rows)
    return report, evaluator


def sensitivity(
    model: nn.Module,
    data: Any,
    bits_options: Sequence[int] = (8, 4, 2),
    layers: Sequence[str] = (),
    metric: str = "output_error",
    per_channel: bool = True,
    group_size: int | None = None,
    progress: bool | None = False,
) -> SensitivityReport:
    """Error of ``model`` on ``data`` with only one layer quantized, for every selected layer and width.

    ``data`` is a :class:`~nnopt.data.Split` or an iterable of input batches (or ``(inputs, labels)``
    pairs; labels are needed for ``metric="accuracy"``). The model is left as it was.

    >>> print(sensitivity(model, dataset.calibration(256)))  # doctest: +SKIP
    """
    widths = _check_options(tuple(bits_options), metric, per_channel, group_size, "sensitivity")
    validate_patterns(tuple(layers))
    batches = _materialize(data, need_labels=metric == "accuracy")
    report, _ = _sensitivity(model, batches, widths, _targets(model, tuple(layers)), metric, per_channel,
                             group_size, progress)
    return report


# ---------------------------------------------------------------- assignment


def _monotone_errors(report: SensitivityReport) -> dict[str, dict[int, float]]:
    """Per-layer errors used for planning: >= 0 and never smaller at a narrower width.

    Measurement noise (an accuracy that rises by one row when quantized) must not reward fewer bits.
    """
    out = {}
    for item in report.layers:
        running, errors = 0.0, {}
        for bits in report.bits_options:  # widest first
            running = max(running, item.error[bits])
            errors[bits] = running
        out[item.name] = errors
    return out


def _plan(report: SensitivityReport, max_bytes: float | None, max_error: float | None) -> list[dict[str, int]]:
    """The greedy trajectory: the all-widest assignment, then one assignment per narrowing step.

    Size budget: step until the bytes fit, then widen back any layer that still fits (largest error
    reduction per byte first). Error budget: take the cheapest step whose predicted total stays within
    the budget, until none does.
    """
    errors = _monotone_errors(report)
    items = {item.name: item for item in report.layers}
    current = {name: report.bits_options[0] for name in items}
    trajectory = [dict(current)]

    def steps() -> list[tuple[float, int, int, str, int]]:
        """Narrowing steps as (error added, bytes saved, model order, layer, width)."""
        return [
            (errors[name][lower] - errors[name][bits], items[name].bytes[bits] - items[name].bytes[lower],
             order, name, lower)
            for order, (name, bits) in enumerate(current.items())
            for lower in report.bits_options
            if lower < bits
        ]

    while True:
        if max_bytes is not None and report.bytes_of(current) <= max_bytes:
            break
        predicted = sum(errors[name][bits] for name, bits in current.items())
        # A tiny tensor may save no whole byte by narrowing: never worth a step.
        candidates = [
            s for s in steps() if s[1] > 0 and (max_error is None or predicted + s[0] <= max_error)
        ]
        if not candidates:
            break
        # Least error per byte saved; ties: more bytes saved, then model order.
        _, d_bytes, _, name, lower = min(candidates, key=lambda s: (s[0] / s[1], -s[1], s[2]))
        if max_bytes is not None:
            gap = report.bytes_of(current) - max_bytes
            if d_bytes >= gap:
                # This step ends the search, and so would any other that closes the gap alone:
                # of those, take the one that adds the least error.
                _, _, _, name, lower = min((s for s in candidates if s[1] >= gap), key=lambda s: (s[0], s[2]))
        current[name] = lower
        trajectory.append(dict(current))

    if max_bytes is not None:
        # Widen back while the budget allows (a step may save more than needed): most error removed per byte.
        while True:
            room = max_bytes - report.bytes_of(current)
            ups = [
                (errors[name][bits] - errors[name][higher], items[name].bytes[higher] - items[name].bytes[bits],
                 order, name, higher)
                for order, (name, bits) in enumerate(current.items())
                for higher in report.bits_options
                if higher > bits
            ]
            ups = [u for u in ups if u[0] > 0 and 0 < u[1] <= room]
            if not ups:
                break
            _, _, _, name, higher = max(ups, key=lambda u: (u[0] / u[1], -u[2]))
            current[name] = higher
            trajectory.append(dict(current))
    return trajectory


def _min_ratio_check(report: SensitivityReport, max_bytes_ratio: float) -> None:
    lowest = report.bits_options[-1]
    smallest = report.bytes_of({item.name: lowest for item in report.layers}) / report.fp32_bytes
    if smallest > max_bytes_ratio:
        raise ConfigError(
            f"max_bytes_ratio={max_bytes_ratio:g} cannot be met: the smallest achievable ratio is {smallest:.4f} "
            f"(every selected layer at {lowest} bits, counting {QPARAM_BYTES} bytes of scale and zero point "
            "per scale group); add a narrower width to bits_options or raise max_bytes_ratio"
        )


def assign_bits(
    report: SensitivityReport, max_bytes_ratio: float | None = None, max_error: float | None = None
) -> dict[str, int]:
    """Per-layer widths from ``report`` under exactly one budget, predicted from the report alone.

    ``max_bytes_ratio`` is over the fp32 weight bytes of the report's layers; ``max_error`` is in the
    report's metric, per-layer errors added. :func:`apply_mixed_precision` also verifies the error on data.
    """
    if (max_bytes_ratio is None) == (max_error is None):
        raise ConfigError("assign_bits needs exactly one budget: max_bytes_ratio or max_error")
    if max_bytes_ratio is not None:
        _min_ratio_check(report, max_bytes_ratio)
        return _plan(report, max_bytes_ratio * report.fp32_bytes, None)[-1]
    return _plan(report, None, max_error)[-1]


# ---------------------------------------------------------------- the pass


def apply_mixed_precision(model: nn.Module, config: MixedPrecisionConfig, **context: Any) -> dict[str, Any]:
    """Measure sensitivity on ``context["data"]``, plan widths under the budget, quantize each layer in place."""
    data = context.get("data")
    if data is None:
        raise ConfigError("MixedPrecisionConfig needs data=... for sensitivity")
    batches = _materialize(data, need_labels=config.metric == "accuracy")
    targets = _targets(model, config.layers)
    widths = config.widths
    if config.max_bytes_ratio is not None:
        # Sizes need no data: fail before the expensive measurements.
        _min_ratio_check(_size_only_report(targets, widths, config), config.max_bytes_ratio)

    report, evaluator = _sensitivity(model, batches, widths, targets, config.metric, config.per_channel,
                                     config.group_size, context.get("progress"))
    was_training = model.training
    model.eval()
    try:
        if config.max_bytes_ratio is not None:
            assignment = assign_bits(report, max_bytes_ratio=config.max_bytes_ratio)
            measured = evaluator.score(assignment)
            backed_off = 0
        else:
            assert config.max_error is not None
            trajectory = _plan(report, None, config.max_error)
            # Errors do not add exactly: verify on data and undo steps until the measured total fits.
            backed_off = 0
            while True:
                assignment = trajectory[-1]
                measured = evaluator.score(assignment)
                if measured <= config.max_error or len(trajectory) == 1:
                    break
                trajectory.pop()
                backed_off += 1
            if measured > config.max_error:
                raise ConfigError(
                    f"max_error={config.max_error:g} cannot be met: with every selected layer at {widths[0]} bits "
                    f"the measured {config.metric} is {measured:.4g}; add a wider width to bits_options "
                    "or raise max_error"
                )
    finally:
        model.train(was_training)

    predicted = sum(_monotone_errors(report)[name][bits] for name, bits in assignment.items())
    layers: dict[str, Any] = {}
    for item in report.layers:
        bits = assignment[item.name]
        result = weights.quantize_weights(
            model, _weight_config(bits, item.name, config.per_channel, config.group_size)
        )
        layers[item.name] = {
            "bits": bits, "shape": list(item.shape), "bytes": item.bytes[bits], "fp32_bytes": item.fp32_bytes,
            "sensitivity": {str(b): item.error[b] for b in widths},
            # What weight quantization recorded for this layer, handed back to its replay on load.
            "weight_details": result.get("layers", {}).get(item.name, {}),
        }
    achieved = report.bytes_of(assignment)
    return {
        "layers": layers,
        "metric": config.metric,
        "rows": batches.rows,
        "reference": report.reference,
        "bytes": achieved,
        "fp32_bytes": report.fp32_bytes,
        "bytes_ratio": achieved / report.fp32_bytes,
        "predicted_error": predicted,
        "measured_error": measured,
        "backed_off_steps": backed_off,
    }


def _size_only_report(targets: list[tuple[str, nn.Module]], widths: tuple[int, ...],
                      config: MixedPrecisionConfig) -> SensitivityReport:
    items = []
    for name, module in targets:
        shape = tuple(module.weight.shape)
        sizes = {b: weight_bytes(shape, b, config.per_channel, config.group_size) for b in widths}
        items.append(LayerSensitivity(name, shape, _FP32_BYTES * math.prod(shape), sizes, dict.fromkeys(widths, 0.0)))
    return SensitivityReport(config.metric, widths, tuple(items), 0.0, 0)


def replay(model: nn.Module, applied: AppliedPass) -> None:
    """Re-create each recorded layer as weight quantization at its recorded width (codes load afterwards)."""
    config = MixedPrecisionConfig.from_dict(applied.config, where=f"pass {applied.name!r}")
    layers = applied.details.get("layers")
    if not isinstance(layers, dict):
        raise ModelFormatError(f"pass {applied.name!r} records no per-layer widths")
    for name, record in layers.items():
        if not isinstance(record, dict) or not isinstance(record.get("bits"), int):
            raise ModelFormatError(f"pass {applied.name!r}: layer {name!r} has no recorded bit width")
        try:
            wcfg = _weight_config(record["bits"], name, config.per_channel, config.group_size)
        except ConfigError as exc:
            raise ModelFormatError(f"pass {applied.name!r}: layer {name!r}: {exc}") from None
        details = record.get("weight_details")
        details = details if isinstance(details, dict) else {}
        weights.replay(model, AppliedPass(weights.PASS_NAME, wcfg.to_dict(), {"layers": {name: details}}))


register_technique(Technique(MixedPrecisionConfig, "quantize", apply_mixed_precision, replay,
                             needs_data=always("sensitivity measurement"), data_for=train_split))
