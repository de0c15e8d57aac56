"""cnn_fidelity: how close any int8 MobileNetV2 can come to fp32 on the held-out photo crops (issue 19's 99%).

Top-1 agreement with the fp32 model (``accuracy`` column) and softmax KL on two sets of 500 held-out crops
(``images``): ``scenes``, from ``nnopt.photos.photo_splits`` (scikit-learn's and scikit-image's photographs,
whole photographs held out), and ``stamps``, from the photographs among Tux Paint's stamps (Debian package
``tuxpaint-stamps-default``; left out where it is not installed), for perturbations that isolate each part of
int8:
- ``fp32, input ±0.5 pixel level``: uniform noise of half an 8-bit pixel level per input value (in the normalized
  units, 1/255/std per channel): what quantizing the input to uint8 does (ONNX Runtime's range for these crops,
  about [-2.1, 2.6], gives a step of about 1.07 pixel levels). Also ±1 level.
- ``weights only, 8-bit per channel``: every Conv/Linear weight rounded to ONNX Runtime's per-channel grid
  (``nnopt.quantization.equalize.weight_grid``, uint8 and int8 codes), activations left in float; BatchNorm folded
  first, as the int8 pipeline does.
- ``int8 (CLE + bias correction), all layers``: ``nnopt.pipeline.int8_onnx.int8_onnx`` with no float fallback
  (ONNX Runtime QDQ, per-channel weights, min-max, percentile or entropy calibration on 128 fitting crops);
  ``int8 (fold only)``: the same
  quantizer on the folded model without equalization or bias correction, with all layers and with the first
  convolution kept in float (the input is then not quantized).
- ``int8 file simulated``: the all-int8 file (CLE, min-max, no bias correction) run in torch through
  ``nnopt.quantization.qdq_simulation.QdqSimulation``, its own quantization points and ranges, with weights or
  activations at other widths (``float``: not rounded, activations still clipped to the calibrated range): how
  much of int8's error each part makes, and how many activation bits 99% would take;
- ``distilled``: that file with its biases (or all weights) trained through the simulation to follow fp32 on
  fitting crops (scenes, plus stamps of the fitting side), written back as codes (``distill_qdq``);
- the fallback's frontier: ``int8_onnx`` with every step of its fallback, from no layer to all of them in float
  (the most int8-sensitive first, with the additions and activations around them), each step's file timed at
  batch 32 in ONNX Runtime beside ONNX Runtime fp32 (alternated in one process), and its held-out agreement.
Figures: measured (ONNX Runtime / torch outputs and latency on this CPU).

    python benchmarks/cnn_fidelity.py [--quick] [--threads 2] [--no-stamps] [--no-frontier] [--no-distill] [--out PATH]
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from _common import log, parse_args, row, run_workloads, write_results
from torch import nn

WORKLOADS = ("mobilenet_v2",)
PIXEL_STD = (0.229, 0.224, 0.225)  # ImageNet's, as nnopt.photos normalizes
FRONTIER_BATCH = 32


def _outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([model(x[i:i + 50]) for i in range(0, len(x), 50)])


def _pixel_noise(x: torch.Tensor, levels: float, seed: int = 1) -> torch.Tensor:
    """Uniform noise of ±``levels`` 8-bit pixel levels on normalized images."""
    step = 1.0 / 255 / torch.tensor(PIXEL_STD).view(1, 3, 1, 1)
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return x + noise * levels * step


def _weights_on_grid(model: nn.Module, weights: str) -> nn.Module:
    from nnopt.quantization.equalize import weight_grid

    rounded = copy.deepcopy(model)
    for module in rounded.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            module.weight.data = weight_grid(module.weight.data, weights)
    return rounded


def fidelity_rows(name: str, args: Any) -> list[dict[str, Any]]:
    from nnopt.io.onnx_export import export_onnx
    from nnopt.models.imagenet_cnns import pretrained_mobilenet_v2
    from nnopt.photos import TUXPAINT_STAMPS, photo_splits
    from nnopt.pipeline.int8_onnx import Int8OnnxOptions, agreement_and_kl, int8_onnx, prepare_for_int8
    from nnopt.quantization.onnx_static import QdqQuantizer, run_onnx

    model = pretrained_mobilenet_v2().eval()
    crops = 100 if args.quick else 500
    splits = photo_splits(fit=256, held_out=crops)
    log(splits.describe())
    held_out = {"scenes": splits.held_out}
    if TUXPAINT_STAMPS.is_dir() and not args.no_stamps:
        stamps = photo_splits(fit=1, held_out=crops, sources=("tuxpaint",))
        held_out["stamps"] = stamps.held_out
        log(f"{crops} held-out crops of {len(stamps.held_out_photos)} Tux Paint stamps")
    references = {images: _outputs(model, x) for images, x in held_out.items()}
    scores: dict[tuple[str, str], dict[str, tuple[float, float]]] = {}

    def score(tool: str, variant: str, outputs: Callable[[torch.Tensor], Any]) -> None:
        scores[tool, variant] = {images: agreement_and_kl(np.asarray(outputs(x)), references[images].numpy())
                                 for images, x in held_out.items()}
        measured = scores[tool, variant].items()
        log(f"{variant}: " + ", ".join(f"{images} {a:.1%} (KL {kl:.4f})" for images, (a, kl) in measured))

    for levels in (0.5, 1.0):
        score("torch", f"fp32, input ±{levels:g} pixel level",
              lambda x, lv=levels: _outputs(model, _pixel_noise(x, lv)).numpy())
    folded, _ = prepare_for_int8(model, splits.fit[:128], Int8OnnxOptions(equalize=False))
    for weights in ("uint8", "int8"):
        on_grid = _weights_on_grid(folded, weights)
        score("nnopt", f"weights only, 8-bit per channel ({weights} codes)",
              lambda x, m=on_grid: _outputs(m, x).numpy())
    for calibration_method in ("minmax", "percentile", "entropy"):
        result = int8_onnx(model, splits.fit, Int8OnnxOptions(calibration=calibration_method, target_agreement=0.0,
                                                              max_float_layers=0))
        score("nnopt", f"int8 (CLE + bias correction), all layers, {calibration_method}",
              lambda x, f=result.onnx: run_onnx(f, x.numpy()))
    first = next(n for n, m in folded.named_modules() if isinstance(m, nn.Conv2d))
    calibration = splits.fit[:128]
    batches = [calibration[i:i + 16].numpy() for i in range(0, len(calibration), 16)]
    with QdqQuantizer(export_onnx(folded, calibration[:1]), batches, "minmax", "auto") as quantizer:
        for label, exclude in (("all layers", ()), (f"first conv ({first}) in float", (first,))):
            int8 = quantizer.quantize(exclude=exclude)
            score("nnopt", f"int8 (fold only), {label}", lambda x, f=int8: run_onnx(f, x.numpy()))
    _width_and_distill_rows(model, splits.fit, batches, score, args)
    rows = []
    for (tool, variant), by_images in scores.items():
        for images, (agreement, kl) in by_images.items():
            rows.append(row(workload=name, tool=tool, variant=variant, batch=None, accuracy=round(agreement, 4))
                        | {"softmax_kl": round(kl, 4), "images": images})
    for images, reference in references.items():
        probabilities = torch.softmax(reference, -1).topk(2, -1).values
        margins = probabilities[:, 0] - probabilities[:, 1]
        first_row = next(r for r in rows if r["images"] == images)
        first_row |= {"held_out_crops": len(reference),
                      "top2_margin_below_0_02": round(float((margins < 0.02).double().mean()), 4),
                      "median_top1_probability": round(float(probabilities[:, 0].median()), 4)}
    if not args.no_frontier:
        rows += _frontier_rows(name, model, splits.fit, held_out, references, args)
    return rows


def _width_and_distill_rows(model: nn.Module, fit: torch.Tensor, batches: list[np.ndarray],
                            score: Callable[[str, str, Callable[[torch.Tensor], Any]], None], args: Any) -> None:
    """The all-int8 file (CLE, min-max, no bias correction) run in torch through ``QdqSimulation`` with each part at
    other widths, keeping every tensor's calibrated range; then the file distilled through that simulation."""
    from nnopt.io.onnx_export import export_onnx
    from nnopt.photos import TUXPAINT_STAMPS, photo_splits
    from nnopt.pipeline.int8_onnx import Int8OnnxOptions, prepare_for_int8
    from nnopt.quantization.onnx_static import QdqQuantizer, run_onnx
    from nnopt.quantization.qdq_simulation import DISTILL_LR, DistillConfig, QdqSimulation, distill_qdq

    prepared, _ = prepare_for_int8(model, fit[:128], Int8OnnxOptions())  # folded and equalized
    float_onnx = export_onnx(prepared, fit[:1])
    with QdqQuantizer(float_onnx, batches, "minmax", "auto") as quantizer:
        int8 = quantizer.quantize()
    score("nnopt", "int8 file (CLE, no bias correction), all layers", lambda x: run_onnx(int8, x.numpy()))
    simulation = QdqSimulation(int8, float_onnx).eval()

    widths = ((None, None), (8, None), (None, 8), (None, 10), (None, 12), (8, 8))
    for weight_bits, activation_bits in widths[:3] if args.quick else widths:
        simulation.weight_bits, simulation.activation_bits = weight_bits, activation_bits
        weights = f"{weight_bits}-bit" if weight_bits else "float"
        activations = f"{activation_bits}-bit" if activation_bits else "float (clipped to the calibrated range)"
        score("nnopt", f"int8 file simulated: weights {weights}, activations {activations}",
              lambda x: _outputs(simulation, x).numpy())
    if args.no_distill:
        return
    rows = [fit]
    if TUXPAINT_STAMPS.is_dir() and not args.no_stamps:  # stamps of the fitting side: never in the held-out set
        rows.append(photo_splits(fit=len(fit), held_out=1, sources=("tuxpaint",)).fit)
    inputs = torch.cat(rows)
    teacher = torch.from_numpy(run_onnx(float_onnx, inputs.numpy()))
    steps = 20 if args.quick else 200
    for config in (DistillConfig(steps=steps, train=train) for train in DISTILL_LR):
        log(f"distilling the int8 file ({config.train}, {steps} steps) on {len(inputs)} fitting crops")
        distilled, summary = distill_qdq(int8, float_onnx, inputs, teacher, config)
        log(f"training KL {summary['kl_first_steps']:.4f} -> {summary['kl_last_steps']:.4f}")
        score("nnopt", f"int8 file distilled through its simulation ({config.train}, {steps} steps, "
                       f"lr {config.learning_rate:g}, {len(inputs)} fitting crops)",
              lambda x, f=distilled: run_onnx(f, x.numpy()))


def _frontier_rows(name: str, model: nn.Module, fit: torch.Tensor, held_out: dict[str, torch.Tensor],
                   references: dict[str, torch.Tensor], args: Any) -> list[dict[str, Any]]:
    """The fallback's every step, up to all layers in float: held-out agreement and batch-32 latency beside
    ONNX Runtime fp32, timed side by side in one process."""
    from nnopt.io.onnx_export import export_onnx
    from nnopt.metrics.runtimes import build_runtime
    from nnopt.metrics.speed import compare_calls
    from nnopt.pipeline.int8_onnx import Int8OnnxOptions, agreement_and_kl, int8_onnx
    from nnopt.quantization.onnx_static import run_onnx

    layers = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())
    files: dict[str, bytes] = {"onnxruntime fp32": export_onnx(model, fit[:1])}
    kept: dict[str, list[str]] = {}

    def keep(step: dict[str, Any], onnx: bytes) -> None:
        if step.get("distilled"):
            return  # the frontier is the fallback's own steps
        label = f"nnopt int8, {step['float_layers']} most sensitive layers in float"
        files[label], kept[label] = onnx, step["layers"]
        log(f"{label}: validation agreement {step['agreement']:.1%}")

    log(f"fallback frontier: 0 to {layers} layers in float")
    int8_onnx(model, fit, Int8OnnxOptions(target_agreement=1.0, max_float_layers=layers), on_step=keep)
    inputs = torch.randn(FRONTIER_BATCH, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    calls = {label: build_runtime("onnxruntime", inputs, onnx=onnx, threads=args.threads).call
             for label, onnx in files.items()}
    log(f"timing {len(calls)} files at batch {FRONTIER_BATCH}")
    with torch.inference_mode():
        timings = compare_calls(calls, FRONTIER_BATCH, warmup=2, min_calls=3, min_seconds=0.5 if args.quick else 3.0,
                                rounds=3 if args.quick else 7)
    base = timings["onnxruntime fp32"].median_ms
    rows = []
    for label, onnx in files.items():
        timing = timings[label]
        for images, x in held_out.items():
            agreement, kl = agreement_and_kl(run_onnx(onnx, x.numpy()), references[images].numpy())
            rows.append(row(
                workload=name, tool=label.split()[0], variant=label, batch=FRONTIER_BATCH,
                latency_ms_median=round(timing.median_ms, 2), latency_ms_p10=round(timing.p10_ms, 2),
                latency_ms_p90=round(timing.p90_ms, 2), speedup_vs_baseline=round(base / timing.median_ms, 3),
                accuracy=round(agreement, 4), file_bytes=len(onnx),
            ) | {"softmax_kl": round(kl, 4), "images": images, "baseline": "onnxruntime fp32",
                 "float_layers": kept.get(label)})
    return rows


def main() -> None:
    args, chosen = parse_args(__doc__ or "", "cnn_fidelity", WORKLOADS, "100 held-out crops", extra=(
        (("--no-stamps",), {"action": "store_true", "help": "leave out the Tux Paint stamps (held-out crops, and the "
                                                               "fitting-side stamps distillation trains on)"}),
        (("--no-frontier",), {"action": "store_true", "help": "leave out the fallback's steps and their timing"}),
        (("--no-distill",), {"action": "store_true", "help": "leave out the distillation through the simulation"}),
    ))
    rows, env = run_workloads(args, chosen, {"mobilenet_v2": lambda a: fidelity_rows("mobilenet_v2", a)})
    env["images"] = "nnopt.photos.photo_splits: whole photographs held out; accuracy = top-1 agreement with fp32"
    env["stamps"] = ("held-out crops of the photographs among Tux Paint's stamps (Debian tuxpaint-stamps-default), "
                     "never used to calibrate")
    write_results("cnn_fidelity", rows, args.out, env, extra_columns=("images", "softmax_kl"))
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
