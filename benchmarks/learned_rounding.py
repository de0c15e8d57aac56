"""learned_rounding: what learned rounding (AdaRound) buys pretrained MobileNetV2's 8-bit weights, on held-out crops.

Top-1 agreement with the fp32 model (``accuracy`` column) and softmax KL on the held-out crops of
``nnopt.photos.photo_splits`` (whole photographs held out), BatchNorm folded first:
- ``weights only``: every Conv/Linear weight on ONNX Runtime's per-channel uint8 grid, activations in float,
  rounded to nearest or learned (``nnopt.quantization.learned_rounding``, float inputs, 32 fitting crops,
  200 steps per layer): the weights' own share of the int8 error;
- ``int8, all layers``: ``nnopt.pipeline.int8_onnx.int8_onnx`` with no float fallback (ONNX Runtime QDQ,
  min-max calibration on 128 fitting crops), with the pipeline's default (equalization + bias correction) or
  ``rounding="learned"`` (equalization + learned rounding with 8-bit inputs, 64 crops, 300 steps per layer).
Both int8 files have the same graph (the same operators and tensor shapes; only the weight codes differ), so
they run at the same speed: see ``benchmarks/cnn.py`` for timings. Costs, measured on this machine's threads:
``seconds`` (wall) and ``cpu_seconds`` (this process's CPU time, all threads: less sensitive to other jobs'
load) of ``learn_rounding`` alone (weights only) and of the whole ``int8_onnx`` call (both int8 rows: the
learned row minus the default row is what learned rounding costs there). Figures: measured (ONNX Runtime /
torch outputs on this CPU).

    python benchmarks/learned_rounding.py [--quick] [--threads 2] [--out PATH]
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from _common import log, parse_args, row, run_workloads, write_results
from cnn_fidelity import _outputs, _weights_on_grid

WORKLOADS = ("mobilenet_v2",)


def rounding_rows(name: str, args: Any) -> list[dict[str, Any]]:
    from nnopt.models.imagenet_cnns import pretrained_mobilenet_v2
    from nnopt.photos import photo_splits
    from nnopt.pipeline.int8_onnx import Int8OnnxOptions, agreement_and_kl, int8_onnx, prepare_for_int8
    from nnopt.quantization.learned_rounding import LearnedRoundingConfig, learn_rounding
    from nnopt.quantization.onnx_static import run_onnx

    model = pretrained_mobilenet_v2().eval()
    splits = photo_splits(fit=256, held_out=100 if args.quick else 500)
    log(splits.describe())
    held_out = splits.held_out
    reference = _outputs(model, held_out).numpy()
    steps = 20 if args.quick else None
    scores: dict[str, tuple[float, float, tuple[float, float] | None]] = {}
    folded, _ = prepare_for_int8(model, splits.fit[:128], Int8OnnxOptions(equalize=False))
    scores["weights only (uint8 per channel), nearest"] = (
        *agreement_and_kl(_outputs(_weights_on_grid(folded, "uint8"), held_out).numpy(), reference), None)
    log("weights only, learned rounding")
    start = _clock()
    learned, _ = learn_rounding(folded, splits.fit[:32], "uint8",
                                LearnedRoundingConfig(steps=steps or 200, quantize_inputs=False))
    cost = _since(start)
    scores["weights only (uint8 per channel), learned rounding"] = (
        *agreement_and_kl(_outputs(learned, held_out).numpy(), reference), cost)
    plans = {"int8 all layers, equalization + bias correction (default)": Int8OnnxOptions(weights="uint8"),
             "int8 all layers, equalization + learned rounding": Int8OnnxOptions(
                 weights="uint8", rounding="learned", rounding_steps=steps or 300)}
    for label, options in plans.items():
        log(label)
        options = dataclasses.replace(options, target_agreement=0.0, max_float_layers=0)
        start = _clock()
        result = int8_onnx(model, splits.fit, options, progress=lambda m: log(f"  {m}"))
        cost = _since(start)
        scores[label] = (*agreement_and_kl(run_onnx(result.onnx, held_out.numpy()), reference), cost)
    rows = []
    for variant, (agreement, kl, seconds) in scores.items():
        log(f"{variant}: agreement {agreement:.1%}, KL {kl:.4f}"
            + (f", {seconds[0]:.0f} s wall, {seconds[1]:.0f} s CPU" if seconds else ""))
        rows.append(row(workload=name, tool="nnopt", variant=variant, batch=None, accuracy=round(agreement, 4))
                    | {"softmax_kl": round(kl, 4), "seconds": round(seconds[0], 1) if seconds else None,
                       "cpu_seconds": round(seconds[1], 1) if seconds else None})
    return rows


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _since(start: tuple[float, float]) -> tuple[float, float]:
    """Wall and CPU seconds since ``start``."""
    wall, cpu = _clock()
    return wall - start[0], cpu - start[1]


def main() -> None:
    args, chosen = parse_args(__doc__ or "", "learned_rounding", WORKLOADS, "100 held-out crops, 20 steps per layer")
    rows, env = run_workloads(args, chosen, {"mobilenet_v2": lambda a: rounding_rows("mobilenet_v2", a)})
    env["images"] = "nnopt.photos.photo_splits: whole photographs held out; accuracy = top-1 agreement with fp32"
    env["settings"] = ("--quick: 100 held-out crops, 20 steps per layer" if args.quick
                       else "500 held-out crops; 200 steps per layer (weights only), 300 (int8)")
    write_results("learned_rounding", rows, args.out, env, extra_columns=("softmax_kl", "seconds", "cpu_seconds"))
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
