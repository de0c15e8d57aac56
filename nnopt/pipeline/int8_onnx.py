"""Accuracy-aware static int8 of a CNN, deployed as an ONNX Runtime QDQ file.

The steps, each recorded in the result:
1. a copy of the model with BatchNorm folded into its convolutions (:mod:`nnopt.simplification.fold`);
2. cross-layer equalization where it is exact, then weight-quantization bias correction
   (:mod:`nnopt.quantization.equalize`);
3. export to ONNX and ONNX Runtime's static QDQ quantization, per-channel weights, calibrated once with
   the chosen method on the calibration inputs (:mod:`nnopt.quantization.onnx_static`);
4. if the int8 graph's top-1 agreement with the float model on the *validation* inputs (rows after
   the calibration rows, never used to calibrate) is below ``target_agreement``: the layers ranked
   most sensitive by :func:`nnopt.quantization.layer_sensitivity.int8_layer_sensitivity` are kept in
   float, a few more at each step, until the target is met or ``max_float_layers`` is reached.
Held-out fidelity and speed are for the caller to measure on inputs this function never saw
(``nnopt deploy`` and ``benchmarks/cnn.py`` do).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from nnopt.errors import ConfigError

FLOAT_LAYER_STEPS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32)


@dataclasses.dataclass(frozen=True)
class Int8OnnxOptions:
    """``calibration``: minmax, percentile or entropy. ``weights``: int8, uint8 or auto (module
    :mod:`nnopt.quantization.onnx_static`). ``target_agreement``: top-1 agreement with the float model
    on the validation rows that the fallback aims for (0 turns the fallback off)."""

    calibration: str = "minmax"
    calibration_samples: int = 128
    validation_samples: int = 128
    equalize: bool = True
    bias_correction: bool = True
    weights: str = "auto"
    target_agreement: float = 0.99
    max_float_layers: int = 12
    percentile: float = 99.999

    def validate(self) -> None:
        from nnopt.quantization.onnx_static import CALIBRATIONS, WEIGHT_TYPES

        if self.calibration not in CALIBRATIONS:
            raise ConfigError(f"calibration must be one of {', '.join(CALIBRATIONS)}, got {self.calibration!r}")
        if self.weights not in WEIGHT_TYPES:
            raise ConfigError(f"weights must be one of {', '.join(WEIGHT_TYPES)}, got {self.weights!r}")
        if self.calibration_samples < 1 or self.validation_samples < 1:
            raise ConfigError("calibration_samples and validation_samples must be >= 1")
        if not 0.0 <= self.target_agreement <= 1.0:
            raise ConfigError(f"target_agreement must lie in [0, 1], got {self.target_agreement}")
        if self.max_float_layers < 0:
            raise ConfigError(f"max_float_layers must be >= 0, got {self.max_float_layers}")


@dataclasses.dataclass
class Int8OnnxResult:
    onnx: bytes
    float_layers: tuple[str, ...]
    validation_agreement: float
    validation_kl: float
    met_target: bool
    steps: list[dict[str, Any]]
    preparation: dict[str, Any]
    sensitivity: dict[str, float]
    weights: str
    options: Int8OnnxOptions
    seconds: float
    path: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path) if self.path else None, "file_bytes": len(self.onnx),
            "float_layers": list(self.float_layers), "validation_agreement": self.validation_agreement,
            "validation_kl": self.validation_kl, "met_target": self.met_target, "steps": self.steps,
            "preparation": self.preparation, "sensitivity_top": dict(list(self.sensitivity.items())[:10]),
            "weights": self.weights, "options": dataclasses.asdict(self.options), "seconds": round(self.seconds, 1),
            "method": "validation rows: inputs after the calibration rows, never used to calibrate (measured with "
                      "ONNX Runtime on this CPU)",
        }

    def __str__(self) -> str:
        verdict = "met" if self.met_target else "NOT met"
        kept = ", ".join(self.float_layers) or "none"
        lines = [
            f"int8 (ONNX Runtime QDQ, per-channel {self.weights} weights, {self.options.calibration} calibration): "
            f"top-1 agreement with float {self.validation_agreement:.1%} on {self.options.validation_samples} "
            f"validation inputs (target {self.options.target_agreement:.1%}: {verdict}), softmax KL "
            f"{self.validation_kl:.4f}",
            f"layers kept in float: {kept}",
        ]
        for step in self.steps:
            lines.append(f"  {step['float_layers']:>3} float layers: agreement {step['agreement']:.1%}, "
                         f"KL {step['kl']:.4f}")
        return "\n".join(lines)


def int8_onnx(model: nn.Module, data: torch.Tensor, options: Int8OnnxOptions = Int8OnnxOptions(),
              path: str | Path | None = None, progress: Callable[[str], None] | None = None) -> Int8OnnxResult:
    """Static int8 of ``model`` as an ONNX Runtime QDQ graph, meeting ``options.target_agreement`` where it can.

    ``data``: a float tensor of inputs (e.g. images, (N, 3, H, W)); the first ``calibration_samples`` rows
    calibrate, the next ``validation_samples`` rows check fidelity. ``model`` is not modified.
    """
    from nnopt.io.onnx_export import export_onnx
    from nnopt.quantization.layer_sensitivity import int8_layer_sensitivity, softmax_kl
    from nnopt.quantization.onnx_static import QdqQuantizer, resolve_weight_type, run_onnx

    options.validate()
    say = progress or (lambda _message: None)
    if not isinstance(data, torch.Tensor) or not data.is_floating_point() or data.ndim < 2:
        raise ConfigError("int8_onnx takes a float tensor of inputs (rows first), e.g. images (N, 3, H, W)")
    n_cal = options.calibration_samples
    if len(data) < n_cal + 1:
        raise ConfigError(f"int8_onnx needs more than calibration_samples={n_cal} rows (the rest validate); "
                          f"got {len(data)}")
    start = time.perf_counter()
    calibration, validation = data[:n_cal], data[n_cal:n_cal + options.validation_samples]
    prepared, preparation = prepare_for_int8(model, calibration, options)
    weights = resolve_weight_type(options.weights)
    preparation["bias_correction"] = _bias_correction(prepared, calibration, options, weights)
    say("exporting the prepared float model to ONNX")
    fp32 = export_onnx(prepared, calibration[:1])
    batches = [calibration[i:i + 16].numpy() for i in range(0, len(calibration), 16)]
    reference_t = torch.from_numpy(run_onnx(fp32, validation.numpy()))
    steps: list[dict[str, Any]] = []
    sensitivity: dict[str, float] = {}
    say(f"calibrating ({options.calibration}) on {len(calibration)} inputs")
    with QdqQuantizer(fp32, batches, options.calibration, weights, options.percentile) as quantizer:
        best: tuple[float, bytes, tuple[str, ...], float] | None = None
        for count in [c for c in FLOAT_LAYER_STEPS if c <= options.max_float_layers]:
            if count and not sensitivity:
                say("ranking layers by int8 sensitivity")
                sensitivity = int8_layer_sensitivity(prepared, calibration, validation[:64], weights)
            kept = tuple(n for n in sensitivity if n in quantizer.nodes)[:count]
            if count and len(kept) < count:
                break
            int8 = quantizer.quantize(exclude=kept)
            out = torch.from_numpy(run_onnx(int8, validation.numpy()))
            agreement = float((out.argmax(-1) == reference_t.argmax(-1)).double().mean())
            kl = softmax_kl(reference_t, out)
            steps.append({"float_layers": count, "layers": list(kept), "agreement": agreement, "kl": kl})
            say(f"{count} layers in float: validation agreement {agreement:.1%}")
            if best is None or agreement > best[0]:
                best = (agreement, int8, kept, kl)
            if agreement >= options.target_agreement:
                best = (agreement, int8, kept, kl)
                break
    assert best is not None
    agreement, int8, kept, kl = best
    written = None
    if path is not None:
        from nnopt.io.atomic import atomic_write_bytes

        written = Path(path)
        atomic_write_bytes(written, int8)
    return Int8OnnxResult(
        onnx=int8, float_layers=kept, validation_agreement=agreement, validation_kl=kl,
        met_target=agreement >= options.target_agreement, steps=steps, preparation=preparation,
        sensitivity=sensitivity, weights=weights, options=options,
        seconds=time.perf_counter() - start, path=written,
    )


def prepare_for_int8(model: nn.Module, calibration: torch.Tensor,
                     options: Int8OnnxOptions) -> tuple[nn.Module, dict[str, Any]]:
    """A folded (and, if asked, equalized) float copy of ``model`` that computes the same function."""
    from nnopt.quantization.equalize import equalize
    from nnopt.simplification.fold import FoldBatchNormConfig, fold_batchnorm

    prepared = copy.deepcopy(model).eval()
    folded = fold_batchnorm(prepared, FoldBatchNormConfig(), data=calibration[:2])
    preparation: dict[str, Any] = {"folded": len(folded["folded"]), "fold_skipped": folded["skipped"]}
    if options.equalize:
        preparation["equalization"] = equalize(prepared)
    return prepared, preparation


def _bias_correction(prepared: nn.Module, calibration: torch.Tensor, options: Int8OnnxOptions,
                     weights: str) -> dict[str, float]:
    from nnopt.quantization.equalize import correct_bias, input_means
    from nnopt.quantization.layer_sensitivity import SIMULATED_TYPES

    if not options.bias_correction:
        return {}
    names = [n for n, m in prepared.named_modules() if isinstance(m, SIMULATED_TYPES)]
    batches = [calibration[i:i + 32] for i in range(0, len(calibration), 32)]
    means = input_means(prepared, names, batches, lambda m, x: m(x))
    return correct_bias(prepared, means, weights)


def agreement_and_kl(outputs: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """Top-1 agreement and mean softmax KL of ``outputs`` against ``reference``."""
    from nnopt.quantization.layer_sensitivity import softmax_kl

    out, ref = torch.from_numpy(outputs), torch.from_numpy(reference)
    return float((out.argmax(-1) == ref.argmax(-1)).double().mean()), softmax_kl(ref, out)
