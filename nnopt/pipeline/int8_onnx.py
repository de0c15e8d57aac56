"""Accuracy-aware static int8 of a CNN, deployed as an ONNX Runtime QDQ file.

The steps, each recorded in the result:
1. a copy of the model with BatchNorm folded into its convolutions (:mod:`nnopt.simplification.fold`);
2. cross-layer equalization where it is exact (:mod:`nnopt.quantization.equalize`); then either
   weight-quantization bias correction (``rounding="nearest"``), or learned rounding of every weight on
   the runtime's grid (``rounding="learned"``, AdaRound: :mod:`nnopt.quantization.learned_rounding`);
3. export to ONNX and ONNX Runtime's static QDQ quantization, per-channel weights, calibrated once with
   the chosen method on the calibration inputs (:mod:`nnopt.quantization.onnx_static`);
4. if the int8 graph's top-1 agreement with the float model on the *validation* inputs (rows after
   the calibration rows, never used to calibrate) is below ``target_agreement``: the layers ranked
   most sensitive by :func:`nnopt.quantization.layer_sensitivity.int8_layer_sensitivity` are kept in
   float, a few more at each step, until the target is met or ``max_float_layers`` is reached; if no
   step meets it, the step with the lowest softmax KL divergence from the float outputs is kept;
5. if the target is still not met and ``distill_steps`` > 0: that file is distilled through its own
   simulation (:func:`nnopt.quantization.qdq_simulation.distill_qdq`) on the calibration rows, and kept only
   where its validation KL is lower.
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
ROUNDINGS = ("nearest", "learned")


@dataclasses.dataclass(frozen=True)
class Int8OnnxOptions:
    """``calibration``: minmax, percentile or entropy. ``weights``: int8, uint8 or auto (module
    :mod:`nnopt.quantization.onnx_static`). ``rounding``: ``nearest`` (with bias correction) or ``learned``
    (``rounding_steps`` Adam steps per layer on the first ``rounding_samples`` calibration rows; minutes for
    a 224×224 CNN on 2 cores). ``target_agreement``: top-1 agreement with the float model on the validation
    rows that the fallback aims for (0 turns the fallback off). ``distill_steps``: where the target is still
    missed, Adam steps distilling the file on the calibration rows (``distill_train``: ``all`` weights and biases,
    or ``biases`` alone); 0, the default, skips it (minutes for a 224×224 CNN on 2 cores)."""

    calibration: str = "minmax"
    rounding: str = "nearest"
    rounding_steps: int = 300
    rounding_samples: int = 64
    calibration_samples: int = 128
    validation_samples: int = 128
    equalize: bool = True
    bias_correction: bool = True
    weights: str = "auto"
    target_agreement: float = 0.99
    max_float_layers: int = 12
    percentile: float = 99.999
    distill_steps: int = 0
    distill_train: str = "all"

    def validate(self) -> None:
        from nnopt.quantization.onnx_static import CALIBRATIONS, WEIGHT_TYPES
        from nnopt.quantization.qdq_simulation import DISTILL_LR

        if self.calibration not in CALIBRATIONS:
            raise ConfigError(f"calibration must be one of {', '.join(CALIBRATIONS)}, got {self.calibration!r}")
        if self.weights not in WEIGHT_TYPES:
            raise ConfigError(f"weights must be one of {', '.join(WEIGHT_TYPES)}, got {self.weights!r}")
        if self.rounding not in ROUNDINGS:
            raise ConfigError(f"rounding must be one of {', '.join(ROUNDINGS)}, got {self.rounding!r}")
        if self.calibration_samples < 1 or self.validation_samples < 1 or self.rounding_samples < 1:
            raise ConfigError("calibration_samples, validation_samples and rounding_samples must be >= 1")
        if self.rounding_steps < 1:
            raise ConfigError(f"rounding_steps must be >= 1, got {self.rounding_steps}")
        if not 0.0 <= self.target_agreement <= 1.0:
            raise ConfigError(f"target_agreement must lie in [0, 1], got {self.target_agreement}")
        if self.distill_steps < 0:
            raise ConfigError(f"distill_steps must be >= 0, got {self.distill_steps}")
        if self.distill_train not in DISTILL_LR:
            raise ConfigError(f"distill_train must be one of {', '.join(DISTILL_LR)}, got {self.distill_train!r}")
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
    validation_rows: int = 0
    path: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path) if self.path else None, "file_bytes": len(self.onnx),
            "float_layers": list(self.float_layers), "validation_agreement": self.validation_agreement,
            "validation_kl": self.validation_kl, "validation_rows": self.validation_rows, "met_target": self.met_target,
            "steps": self.steps,
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
            f"top-1 agreement with float {self.validation_agreement:.1%} on {self.validation_rows} "
            f"validation inputs (target {self.options.target_agreement:.1%}: {verdict}), softmax KL "
            f"{self.validation_kl:.4f}",
            f"layers kept in float: {kept}",
        ]
        for step in self.steps:
            distilled = (", distilled" + ("" if step["kept"] else " (not kept)")) if step.get("distilled") else ""
            lines.append(f"  {step['float_layers']:>3} float layers{distilled}: agreement {step['agreement']:.1%}, "
                         f"KL {step['kl']:.4f}")
        return "\n".join(lines)


def int8_onnx(model: nn.Module, data: torch.Tensor, options: Int8OnnxOptions = Int8OnnxOptions(),
              path: str | Path | None = None, progress: Callable[[str], None] | None = None,
              on_step: Callable[[dict[str, Any], bytes], None] | None = None) -> Int8OnnxResult:
    """Static int8 of ``model`` as an ONNX Runtime QDQ graph, meeting ``options.target_agreement`` where it can.

    ``data``: a float tensor of inputs (e.g. images, (N, 3, H, W)); the first ``calibration_samples`` rows
    calibrate, the next ``validation_samples`` rows check fidelity. ``model`` is not modified.
    ``on_step`` receives each fallback step (as in ``steps``) with its int8 file, e.g. to time every step.
    """
    from nnopt.io.onnx_export import export_onnx
    from nnopt.quantization.equalize import correct_bias
    from nnopt.quantization.layer_sensitivity import int8_layer_sensitivity
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
    rounded = prepared
    if options.rounding == "learned":
        rounded, preparation["learned_rounding"] = _learned_rounding(prepared, calibration, options, weights, say)
        shifts: dict[str, torch.Tensor] = {}  # the learned rounding fits each layer's output, its mean included
    else:
        shifts = _bias_shifts(prepared, calibration, options, weights)
        preparation["bias_correction"] = {name: float(s.abs().max()) for name, s in shifts.items() if s.numel()}
    say("exporting the prepared float model to ONNX")
    # the reference is the folded (and equalized) float model, which computes what the user's model computes
    reference_onnx = export_onnx(prepared, calibration[:1])
    reference = run_onnx(reference_onnx, validation.numpy())

    def float_graph(kept: tuple[str, ...]) -> bytes:
        """The float graph to quantize: bias-corrected or on the learned grid, except the layers kept in float."""
        corrected = copy.deepcopy(rounded)
        _restore_weights(corrected, prepared, kept)
        correct_bias(corrected, {name: s for name, s in shifts.items() if name not in kept})
        return export_onnx(corrected, calibration[:1])

    batches = [calibration[i:i + 16].numpy() for i in range(0, len(calibration), 16)]
    steps: list[dict[str, Any]] = []
    sensitivity: dict[str, float] = {}
    say(f"calibrating ({options.calibration}) on {len(calibration)} inputs")
    with QdqQuantizer(float_graph(()), batches, options.calibration, weights, options.percentile) as quantizer:
        best: tuple[float, bytes, tuple[str, ...], float] | None = None
        for count in float_layer_steps(options.max_float_layers):
            if count and not sensitivity:
                say("ranking layers by int8 sensitivity")
                sensitivity = int8_layer_sensitivity(prepared, calibration, validation[:64], weights)
            kept = tuple(n for n in sensitivity if n in quantizer.nodes)[:count]
            if count and len(kept) < count:
                break
            regraph = kept and (shifts or rounded is not prepared)
            int8 = quantizer.quantize(exclude=kept, fp32_onnx=float_graph(kept) if regraph else None)
            agreement, kl = agreement_and_kl(run_onnx(int8, validation.numpy()), reference)
            steps.append({"float_layers": count, "layers": list(kept), "agreement": agreement, "kl": kl})
            if on_step is not None:
                on_step(steps[-1], int8)
            say(f"{count} layers in float: validation agreement {agreement:.1%}")
            if agreement >= options.target_agreement:
                best = (agreement, int8, kept, kl)
                break
            # short of the target: keep the step closest to the float outputs by KL, which moves smoothly,
            # not by agreement, which a few near-tied rows of a small validation set decide
            if best is None or kl < best[3]:
                best = (agreement, int8, kept, kl)
    assert best is not None
    if options.distill_steps and best[0] < options.target_agreement:
        best, distilled = _distilled(best, float_graph(best[2]), reference_onnx, calibration, validation, reference,
                                     options, steps, preparation, say)
        if on_step is not None and distilled is not None:
            on_step(steps[-1], distilled)
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
        seconds=time.perf_counter() - start, validation_rows=len(validation), path=written,
    )


def _distilled(best: tuple[float, bytes, tuple[str, ...], float], float_onnx: bytes, reference_onnx: bytes,
               calibration: torch.Tensor, validation: torch.Tensor, reference: np.ndarray, options: Int8OnnxOptions,
               steps: list[dict[str, Any]], preparation: dict[str, Any],
               say: Callable[[str], None]) -> tuple[tuple[float, bytes, tuple[str, ...], float], bytes | None]:
    """``best``, or its file distilled through its simulation on the calibration rows where that lowers the
    validation KL; and the distilled file (None where the simulation cannot run the graph)."""
    from nnopt.errors import UnsupportedModelError
    from nnopt.quantization.onnx_static import run_onnx
    from nnopt.quantization.qdq_simulation import DistillConfig, distill_qdq

    _, int8, kept, kl = best
    teacher = torch.from_numpy(run_onnx(reference_onnx, calibration.numpy()))
    config = DistillConfig(steps=options.distill_steps, train=options.distill_train)
    say(f"distilling the int8 file ({config.train}) on {len(calibration)} calibration inputs")
    try:
        distilled, summary = distill_qdq(int8, float_onnx, calibration, teacher, config, progress=say)
    except UnsupportedModelError as exc:  # the file is still good: say why it was not distilled
        preparation["distillation"] = {"skipped": str(exc)}
        say(f"not distilled: {exc}")
        return best, None
    agreement_after, kl_after = agreement_and_kl(run_onnx(distilled, validation.numpy()), reference)
    better = kl_after < kl
    steps.append({"float_layers": len(kept), "layers": list(kept), "agreement": agreement_after, "kl": kl_after,
                  "distilled": True, "kept": better})
    preparation["distillation"] = summary | {"validation_kl_before": kl, "validation_kl_after": kl_after,
                                             "kept": better}
    say(f"distilled: validation agreement {agreement_after:.1%}, KL {kl_after:.4f} (before {kl:.4f}): "
        + ("kept" if better else "not kept"))
    return ((agreement_after, distilled, kept, kl_after) if better else best), distilled


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


def _learned_rounding(prepared: nn.Module, calibration: torch.Tensor, options: Int8OnnxOptions, weights: str,
                      say: Callable[[str], None]) -> tuple[nn.Module, dict[str, Any]]:
    """A copy of ``prepared`` with its weights on learned grid points, and what the report says of it."""
    from nnopt.quantization.learned_rounding import LearnedRoundingConfig, learn_rounding

    rows = calibration[:options.rounding_samples]
    say(f"learning the rounding of every layer on {len(rows)} inputs ({options.rounding_steps} steps each)")
    rounded, layers = learn_rounding(prepared, rows, weights, LearnedRoundingConfig(steps=options.rounding_steps),
                                     progress=say)
    summary = {
        "rows": len(rows), "steps": options.rounding_steps,
        "layers": {name: layer.to_dict() for name, layer in layers.items()},
        "method": "measured on the calibration rows: each layer's output error relative to its float output's mean "
                  "square, with 8-bit inputs, nearest vs learned rounding (a layer keeps nearest where learned is "
                  "not better)",
    }
    return rounded, summary


def _restore_weights(model: nn.Module, source: nn.Module, names: tuple[str, ...]) -> None:
    """Copy the named layers' weights back from ``source`` (the float model): layers kept in float."""
    modules, originals = dict(model.named_modules()), dict(source.named_modules())
    with torch.no_grad():
        for name in names:
            modules[name].weight.copy_(originals[name].weight)


def _bias_shifts(prepared: nn.Module, calibration: torch.Tensor, options: Int8OnnxOptions,
                 weights: str) -> dict[str, torch.Tensor]:
    from nnopt.quantization.equalize import bias_shifts, input_means
    from nnopt.quantization.layer_sensitivity import SIMULATED_TYPES

    if not options.bias_correction:
        return {}
    names = [n for n, m in prepared.named_modules() if isinstance(m, SIMULATED_TYPES)]
    batches = [calibration[i:i + 32] for i in range(0, len(calibration), 32)]
    means = input_means(prepared, names, batches, lambda m, x: m(x))
    return bias_shifts(prepared, means, weights)


def float_layer_steps(max_float_layers: int) -> list[int]:
    """How many layers each fallback step keeps in float: 0, 1, 2, 3, 4, 6, 8, 12, ... up to the maximum."""
    steps = [c for c in FLOAT_LAYER_STEPS if c <= max_float_layers]
    if max_float_layers > 32:
        steps += list(range(48, max_float_layers, 16))
    return steps if steps[-1] == max_float_layers else [*steps, max_float_layers]


def agreement_and_kl(outputs: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """Top-1 agreement and mean softmax KL of ``outputs`` against ``reference``."""
    from nnopt.quantization.layer_sensitivity import softmax_kl

    out, ref = torch.from_numpy(outputs), torch.from_numpy(reference)
    return float((out.argmax(-1) == ref.argmax(-1)).double().mean()), softmax_kl(ref, out)


# --------------------------------------------------------------------------- the deploy workflow


@dataclasses.dataclass
class Int8Deployment:
    """What ``nnopt int8-onnx`` measured: held-out fidelity and every runtime × precision, side by side."""

    result: Int8OnnxResult
    held_out_agreement: float
    held_out_kl: float
    held_out_rows: int
    data: str
    timings: dict[str, dict[str, Any]]
    fastest: str
    env: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"int8": self.result.to_dict(), "held_out": {
            "agreement": self.held_out_agreement, "softmax_kl": self.held_out_kl, "rows": self.held_out_rows,
            "data": self.data, "method": "measured: ONNX Runtime outputs of the int8 file against the float model's "
                                      "ONNX outputs on held-out inputs never used for calibration or validation"},
            "latency_ms": self.timings, "fastest": self.fastest, "env": self.env}

    def __str__(self) -> str:
        lines = [str(self.result),
                 f"held-out: top-1 agreement {self.held_out_agreement:.1%}, softmax KL {self.held_out_kl:.4f} on "
                 f"{self.held_out_rows} inputs ({self.data})",
                 f"latency, measured side by side ({self.env['cpu']}, {self.env['threads']} threads, median ms):"]
        for name, row in self.timings.items():
            lines.append(f"  {name:<24} batch {row['batch']:>3}: {row['median']:9.2f} ms"
                         + ("   <- fastest" if name == self.fastest else ""))
        return "\n".join(lines)


def deploy_int8(model: nn.Module, fit: torch.Tensor, held_out: torch.Tensor, out: str | Path,
                options: Int8OnnxOptions = Int8OnnxOptions(), batch: int = 32, threads: int | None = None,
                seconds: float = 1.0, data_label: str = "", runtimes: tuple[str, ...] = ("onnxruntime", "openvino"),
                progress: Callable[[str], None] | None = None) -> Int8Deployment:
    """:func:`int8_onnx` on ``fit``, written to ``out``; then held-out fidelity, and the float and int8 files
    timed in every installed runtime side by side at ``batch``. A runtime that fails is left out, with why."""
    import importlib.util

    from nnopt.cpu import cpu_model
    from nnopt.io.onnx_export import export_onnx
    from nnopt.metrics.runtimes import build_runtime, first_output
    from nnopt.metrics.speed import compare_calls
    from nnopt.quantization.onnx_static import run_onnx

    if batch < 1:
        raise ConfigError(f"batch must be >= 1, got {batch}")
    if not isinstance(held_out, torch.Tensor) or len(held_out) < 1:
        raise ConfigError("deploy_int8 needs held-out inputs (a non-empty tensor) to measure fidelity on")
    unknown = [r for r in runtimes if r not in ("onnxruntime", "openvino")]
    if unknown or not runtimes:
        raise ConfigError(f"runtimes: choose onnxruntime and/or openvino, got {', '.join(runtimes) or 'none'}")
    threads = threads or torch.get_num_threads()
    result = int8_onnx(model, fit, options, path=out, progress=progress)
    fp32 = export_onnx(copy.deepcopy(model).eval(), held_out[:1])
    agreement, kl = agreement_and_kl(run_onnx(result.onnx, held_out.numpy()), run_onnx(fp32, held_out.numpy()))
    inputs = held_out[:batch] if len(held_out) >= batch else held_out[:1].expand(batch, *held_out.shape[1:]).clone()
    calls: dict[str, Callable[[], object]] = {}
    skipped: dict[str, str] = {}
    for runtime in runtimes:
        if importlib.util.find_spec(runtime) is None:
            skipped[runtime] = "not installed"
            continue
        for precision, graph in (("fp32", fp32), ("int8", result.onnx)):
            try:
                calls[f"{runtime} {precision}"] = build_runtime(runtime, inputs, onnx=graph, threads=threads).call
            except Exception as exc:  # a runtime's own error types; the row is left out with the reason
                skipped[f"{runtime} {precision}"] = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    if not calls:
        raise ConfigError("no runtime could run the files: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    if progress:
        progress(f"timing {', '.join(calls)} side by side at batch {batch}")
    # each runtime's own answers on the timed batch, against the float model's ONNX Runtime outputs
    reference = torch.from_numpy(run_onnx(fp32, inputs.numpy())).argmax(-1)
    agreement_here = {name: float((first_output(call()).argmax(-1) == reference).double().mean())
                      for name, call in calls.items()}
    timed = compare_calls(calls, batch, warmup=3, min_calls=5, min_seconds=seconds, rounds=3)
    timings = {name: {"batch": batch, **t.to_dict(), "top1_agreement_on_timed_batch": agreement_here[name]}
               for name, t in timed.items()}
    fastest = min(timings, key=lambda name: timings[name]["median"])
    env = {"cpu": cpu_model(), "threads": threads, "batch": batch,
           "skipped_runtimes": skipped, "timing": "measured: medians of alternated rounds (compare_calls)"}
    return Int8Deployment(result, agreement, kl, len(held_out), data_label, timings, fastest, env)

