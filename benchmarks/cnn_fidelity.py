"""cnn_fidelity: how close any int8 MobileNetV2 can come to fp32 on the held-out photo crops (issue 19's 99%).

Top-1 agreement with the fp32 model (``accuracy`` column) and softmax KL on the 500 held-out crops of
``nnopt.photos.photo_splits`` (whole photographs held out), for perturbations that isolate each part of int8:
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
No timing: fidelity only. Figures: measured (ONNX Runtime / torch outputs on this CPU).

    python benchmarks/cnn_fidelity.py [--quick] [--threads 2] [--out PATH]
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from _common import log, parse_args, row, run_workloads, write_results
from torch import nn

WORKLOADS = ("mobilenet_v2",)
PIXEL_STD = (0.229, 0.224, 0.225)  # ImageNet's, as nnopt.photos normalizes


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
    from nnopt.photos import photo_splits
    from nnopt.pipeline.int8_onnx import Int8OnnxOptions, agreement_and_kl, int8_onnx, prepare_for_int8
    from nnopt.quantization.onnx_static import QdqQuantizer, run_onnx

    model = pretrained_mobilenet_v2().eval()
    splits = photo_splits(fit=256, held_out=100 if args.quick else 500)
    log(splits.describe())
    held_out = splits.held_out
    reference = _outputs(model, held_out)
    probabilities = torch.softmax(reference, -1).topk(2, -1).values
    margins = probabilities[:, 0] - probabilities[:, 1]
    scores: dict[tuple[str, str], tuple[float, float]] = {}
    for levels in (0.5, 1.0):
        scores["torch", f"fp32, input ±{levels:g} pixel level"] = agreement_and_kl(
            _outputs(model, _pixel_noise(held_out, levels)).numpy(), reference.numpy())
    folded, _ = prepare_for_int8(model, splits.fit[:128], Int8OnnxOptions(equalize=False))
    for weights in ("uint8", "int8"):
        scores["nnopt", f"weights only, 8-bit per channel ({weights} codes)"] = agreement_and_kl(
            _outputs(_weights_on_grid(folded, weights), held_out).numpy(), reference.numpy())
    for calibration_method in ("minmax", "percentile", "entropy"):
        log(f"int8 (all layers), {calibration_method} calibration")
        result = int8_onnx(model, splits.fit, Int8OnnxOptions(calibration=calibration_method, target_agreement=0.0,
                                                              max_float_layers=0))
        scores["nnopt", f"int8 (CLE + bias correction), all layers, {calibration_method}"] = agreement_and_kl(
            run_onnx(result.onnx, held_out.numpy()), reference.numpy())
    first = next(n for n, m in folded.named_modules() if isinstance(m, nn.Conv2d))
    calibration = splits.fit[:128]
    batches = [calibration[i:i + 16].numpy() for i in range(0, len(calibration), 16)]
    with QdqQuantizer(export_onnx(folded, calibration[:1]), batches, "minmax", "auto") as quantizer:
        for label, exclude in (("all layers", ()), (f"first conv ({first}) in float", (first,))):
            log(f"int8 (fold only), {label}")
            scores["nnopt", f"int8 (fold only), {label}"] = agreement_and_kl(
                run_onnx(quantizer.quantize(exclude=exclude), held_out.numpy()), reference.numpy())
    rows = []
    for (tool, variant), (agreement, kl) in scores.items():
        log(f"{variant}: agreement {agreement:.1%}, KL {kl:.4f}")
        rows.append(row(workload=name, tool=tool, variant=variant, batch=None, accuracy=round(agreement, 4))
                    | {"softmax_kl": round(kl, 4)})
    rows[0] |= {"held_out_crops": len(held_out),
                "top2_margin_below_0_02": round(float((margins < 0.02).double().mean()), 4),
                "median_top1_probability": round(float(probabilities[:, 0].median()), 4)}
    return rows


def main() -> None:
    args, chosen = parse_args(__doc__ or "", "cnn_fidelity", WORKLOADS, "100 held-out crops")
    rows, env = run_workloads(args, chosen, {"mobilenet_v2": lambda a: fidelity_rows("mobilenet_v2", a)})
    env["images"] = "nnopt.photos.photo_splits: whole photographs held out; accuracy = top-1 agreement with fp32"
    write_results("cnn_fidelity", rows, args.out, env, extra_columns=("softmax_kl",))
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
