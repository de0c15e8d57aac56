"""The classic example end to end: train SimpleNet, prune with θ, quantize with round(w·S).

The classic four variants (baseline, pruned, quantized, pruned+quantized), then gradual pruning,
structured pruning (half the hidden neurons removed) and the quantization schemes (static int8
and QAT on int8 kernels, grouped int4 weights, a 4-bit k-means codebook) are saved as model
directories and measured side by side in one process: accuracy on the held-out test split,
counts, bytes of the written weights file, and latency.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from torch import nn

from nnopt.config import Config
from nnopt.data import load_digits
from nnopt.errors import ConfigError
from nnopt.io.atomic import atomic_directory, check_replaceable, write_bytes_durable
from nnopt.layers.primitives import QUANT_MAX_BITS, QUANT_MIN_BITS
from nnopt.lineage import get_lineage
from nnopt.metrics import Measurement, compare_latency, measure, measurement_rows
from nnopt.metrics.speed import LatencyStats
from nnopt.metrics.table import render_table
from nnopt.models import create_model
from nnopt.pruning import GradualPruneConfig, StructuredPruneConfig, ThresholdPruneConfig, prune
from nnopt.quantization import ClusterConfig, QATConfig, StaticQuantConfig, WeightQuantConfig, quantize
from nnopt.report.document import REPORT_HTML, REPORT_JSON, REPORT_MD
from nnopt.saving import save_model
from nnopt.sparse import SparseKernelConfig, kernel_summary, sparsify
from nnopt.training import TrainConfig, TrainHistory, train


@dataclasses.dataclass(frozen=True)
class ClassicConfig(Config):
    kind = "classic-demo"
    epochs: int = 20
    threshold: float = 0.01
    bits: int = 8
    batch_size: int = 32
    lr: float = 1e-3
    seed: int = 0
    latency_batches: tuple[int, ...] = (1, 256)
    latency_seconds: float = 1.0
    sparsity: float = 0.9
    gradual_epochs: int = 15

    def validate(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}")
        if not QUANT_MIN_BITS <= self.bits <= QUANT_MAX_BITS:
            raise ConfigError(f"bits must be in {QUANT_MIN_BITS}..{QUANT_MAX_BITS}, got {self.bits}")
        ThresholdPruneConfig(threshold=self.threshold)  # validates θ
        GradualPruneConfig(final_sparsity=self.sparsity, epochs=self.gradual_epochs)
        TrainConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, seed=self.seed)
        if not self.latency_batches or any(b < 1 for b in self.latency_batches):
            raise ConfigError(f"latency_batches must be >= 1, got {self.latency_batches}")
        if not math.isfinite(self.latency_seconds) or self.latency_seconds < 0:
            raise ConfigError(f"latency seconds must be a finite number >= 0, got {self.latency_seconds}")


@dataclasses.dataclass(frozen=True)
class Variant:
    """One optimized model of the demo, its measurement and where it was saved."""

    measurement: Measurement
    directory: str
    compute: str
    energy: dict[str, Any] | None = None  # estimated nJ per inference at batch 1 (power × time), with its method

    def energy_cell(self) -> str:
        if not self.energy:
            return "-"
        e = self.energy
        return f"{_micro(e['total_nj'])} ({_micro(e['low_nj'])}–{_micro(e['high_nj'])})"


def _micro(nanojoules: float) -> str:
    microjoules = nanojoules / 1e3
    return f"{microjoules:,.0f}" if microjoules >= 100 else f"{microjoules:.3g}"


@dataclasses.dataclass(frozen=True)
class ClassicResult:
    config: ClassicConfig
    environment: dict[str, Any]
    dataset: dict[str, Any]
    history: TrainHistory
    variants: tuple[Variant, ...]

    def variant(self, name: str) -> Variant:
        return next(v for v in self.variants if v.measurement.name == name)

    def to_report(self) -> dict[str, Any]:
        """The ``report.json`` document (later versions add fields, never rename them)."""
        env = self.environment
        return {
            "nnopt_version": env["nnopt"],
            "device": env["device"],
            "threads": env["threads"],
            "environment": env,
            "dataset": self.dataset,
            "config": self.config.to_dict(),
            "training": {"epochs": self.history.epochs, "seconds": self.history.seconds,
                         "final_loss": self.history.loss[-1]},
            "methods": METHODS,
            "variants": [
                {**v.measurement.to_dict(), "directory": v.directory, "compute": v.compute,
                 "energy_nj": v.energy}
                for v in self.variants
            ],
        }

    def __str__(self) -> str:
        columns, rows = measurement_rows([v.measurement for v in self.variants])
        energy_batch = next((v.energy["batch"] for v in self.variants if v.energy), 1)
        columns.append(f"µJ @{energy_batch} est. (range)")
        for row, variant in zip(rows, self.variants):
            row.append(variant.energy_cell())
        env = self.environment
        caption = (
            f"{env['device']} ({env['cpu']}), {env['threads']} threads. Accuracy on the held-out "
            f"test split ({self.dataset['test']} rows); latency measured; MACs counted for a dense kernel; "
            f"energy estimated per inference at batch {energy_batch} as the CPU's active power × the measured time, "
            "the same power for every variant (the range is the power's bounds)."
        )
        return render_table(columns, rows, title="nnopt demo: the classic SimpleNet", caption=caption)


METHODS = {
    "accuracy": "measured: top-1 on the held-out stratified test split (never used for training)",
    "params": "counted: weight values (parameters and integer codes)",
    "nonzeros": "counted: weight values that are not zero",
    "macs": "estimated: analytic multiply-accumulates per sample for a dense kernel, zeros included",
    "file_bytes": "measured: size of the weights file as written (model.safetensors, or model.nnpk when packed)",
    "compression_ratio": "measured: bytes of the same architecture as a dense fp32 safetensors file / file_bytes",
    "latency_ms": "measured: time.perf_counter per forward call after warm-up, variants alternated "
    "in rounds within one process; median, p10, p90 (ms)",
    "energy_nj": "estimated: active power × measured time per inference at the smallest batch timed (1 by default; "
    "the CPU's TDP share of the "
    "threads used × 0.5–1.0, the same for every variant, so energy orders the variants as their latencies do); "
    "compute_nj/memory_nj split that total by the shares of the analytic table horowitz-45nm (MACs executed × pJ "
    "+ bytes moved × pJ), never used on their own; not measured (this machine has no energy counter unless the "
    "report says so)",
}

VARIANT_NAMES = (
    "baseline", "pruned", "quantized", "pruned+quantized", "gradual", "gradual+quantized",
    "int8-static", "qat-int8", "int4-weight-g32", "structured-50", "cluster-4bit", "int8-dynamic-measured",
)


def _report_names() -> tuple[str, ...]:
    """What an earlier demo report holds (report.json first: it marks the directory)."""
    return (REPORT_JSON, REPORT_MD, REPORT_HTML, *(_directory(n) for n in VARIANT_NAMES))


def _energy(model: nn.Module, latency: LatencyStats) -> dict[str, Any]:
    """Energy per inference at the smallest batch timed (1 by default) on this CPU: active power × the variant's
    measured time (the same power for every variant, so the column orders them as their latencies do); the
    analytic table gives the split."""
    import torch

    from nnopt.energy import cpu_active_power, device_energy, estimate_energy

    timing = min(latency.timings, key=lambda t: t.batch)  # batch 1 by default: the smallest batch timed
    power = cpu_active_power(torch.get_num_threads())
    return device_energy(timing.median_ms / 1e3, timing.batch, power,
                         estimate=estimate_energy(model, batch=timing.batch)).to_nj_dict()


def _directory(variant: str) -> str:
    return variant.replace("+", "_")


_COMPUTE_FP32 = "fp32 dense"
_COMPUTE_DEQUANT = "fp32 dense; {bits}-bit codes (stored as {dtype}) dequantized on every call"


def _compute_int8() -> str:
    """How the static int8 variants multiply here: the kernel that passed its known-answer check."""
    from nnopt.layers.kernels import int8_gemm_path, why_not_int8

    path = int8_gemm_path(dynamic=False)
    product = "int8 × int8 GEMM (torch._int_mm)" if path == "torch-int-mm" else (
        f"int8 codes multiplied exactly in {path.split('-')[0]} ({why_not_int8(path)})")
    return f"{product}, activation ranges calibrated on training rows"


def _measured_int8(model: nn.Module, batch: int) -> tuple[nn.Module, str, str]:
    """int8 dynamic where this machine runs a layer's int8 kernel faster, fp32 where it does not."""
    from nnopt.quantization import DynamicQuantConfig

    chosen = quantize(model, DynamicQuantConfig(kernels="measured", kernel_batch=batch))
    details = get_lineage(chosen).applied[-1].details
    int8 = sum("measured" in info for info in details["layers"].values())
    total = int8 + len(details["kernel_choice"]["kept_fp32"])
    compute = (f"per-layer kernel choice measured at batch {batch}: {int8} of {total} Linears int8 dynamic "
               f"(faster here), the others fp32 dense (their int8 kernel measured slower)")
    return chosen, compute, "safetensors"


def _dtype(bits: int) -> str:
    from nnopt.layers.primitives import storage_dtype

    return str(storage_dtype(bits)).removeprefix("torch.")


def run_classic(config: ClassicConfig, out_dir: str | Path, progress: bool | None = None) -> ClassicResult:
    """Run the classic pipeline and write the report directory atomically.

    >>> result = run_classic(ClassicConfig(epochs=5), "nnopt-report")  # doctest: +SKIP
    >>> print(result)  # doctest: +SKIP
    """
    from nnopt.envinfo import environment
    from nnopt.report.html import write_reports

    check_replaceable(Path(out_dir), _report_names())
    dataset = load_digits(seed=config.seed)
    model = create_model("simplenet", seed=config.seed)
    train_cfg = TrainConfig(epochs=config.epochs, batch_size=config.batch_size, lr=config.lr, seed=config.seed)
    history = train(model, dataset.train, train_cfg, progress=progress)

    prune_cfg = ThresholdPruneConfig(threshold=config.threshold)
    quant_cfg = WeightQuantConfig(bits=config.bits)
    pruned = prune(model, prune_cfg)
    dequant_path = _COMPUTE_DEQUANT.format(bits=config.bits, dtype=_dtype(config.bits))
    gradual_cfg = GradualPruneConfig(final_sparsity=config.sparsity, epochs=config.gradual_epochs,
                                     batch_size=config.batch_size, lr=config.lr, seed=config.seed)
    gradual = prune(model, gradual_cfg, data=dataset.train, progress=progress)
    # Sparse kernels replace dense ones only where measured faster here, at batch 1.
    gradual_fast = sparsify(gradual, SparseKernelConfig(batch_size=1, min_seconds=min(0.2, config.latency_seconds)))
    kernels = kernel_summary(get_lineage(gradual_fast).applied[-1].details)
    zeros_note = " (zeros still multiplied)"
    # (model, compute path, weights file format): the classic four keep the standard dense file,
    # the gradual ones show what the packed format does with the zeros.
    models: dict[str, tuple[nn.Module, str, str]] = {
        "baseline": (model, _COMPUTE_FP32, "safetensors"),
        "pruned": (pruned, _COMPUTE_FP32 + zeros_note, "safetensors"),
        "quantized": (quantize(model, quant_cfg), dequant_path, "safetensors"),
        "pruned+quantized": (quantize(pruned, quant_cfg), dequant_path, "safetensors"),
        "gradual": (gradual_fast, f"fp32; {kernels}", "packed"),
        "gradual+quantized": (quantize(gradual, quant_cfg), dequant_path + zeros_note, "packed"),
        "int8-static": (quantize(model, StaticQuantConfig(), data=dataset.train), _compute_int8(), "safetensors"),
        "qat-int8": (quantize(model, QATConfig(epochs=3, seed=config.seed), data=dataset.train, progress=progress),
                     _compute_int8() + ", after 3 epochs of fake-quantized training", "safetensors"),
        "int4-weight-g32": (quantize(model, WeightQuantConfig(bits=4, group_size=32)),
                            "int4 codes (two per byte), one scale per 32 inputs; int4 weight-only kernel with bf16 "
                            "activations where torch has one, else dequantized per call",
                            "safetensors"),
        "structured-50": (prune(model, StructuredPruneConfig(ratio=0.5, finetune_epochs=3, seed=config.seed),
                                data=dataset.train),
                          "fp32 dense, half the hidden neurons removed (gradient importance Σ|∂L/∂w|, 3 epochs "
                          "of recovery): a smaller dense model", "safetensors"),
        "cluster-4bit": (quantize(model, ClusterConfig(bits=4, finetune_epochs=2, seed=config.seed),
                                  data=dataset.train, progress=progress),
                         "fp32 dense; 16-centroid codebook gathered per call (centroids fine-tuned 2 epochs)",
                         "packed"),
        "int8-dynamic-measured": _measured_int8(model, max(config.latency_batches)),
    }
    assert tuple(models) == VARIANT_NAMES, "VARIANT_NAMES lists what a report may hold: keep it in step"
    timings = compare_latency(
        {name: m for name, (m, _, _) in models.items()}, model.input_shape,
        config.latency_batches, min_seconds=config.latency_seconds,
    )
    variants = []
    with atomic_directory(Path(out_dir), replace_if=_report_names()) as tmp:
        for name, (variant_model, compute, weights_format) in models.items():
            measured = measure(variant_model, dataset.test, name=name, latency=timings[name])
            directory = _directory(name)
            saved = save_model(variant_model, tmp / directory, metrics=measured.to_dict(),
                               weights_format=weights_format)
            measured = dataclasses.replace(measured, file_bytes=saved.file_bytes,
                                           compression_ratio=saved.compression_ratio)
            variants.append(Variant(measured, directory, f"{compute}; {weights_format} file",
                                    _energy(variant_model, timings[name])))
        result = ClassicResult(
            config=config, environment=environment(), dataset=dataset.describe(),
            history=history, variants=tuple(variants),
        )
        report = result.to_report()
        write_bytes_durable(tmp / REPORT_JSON, (json.dumps(report, indent=2, allow_nan=False) + "\n").encode())
        write_reports(tmp, report)  # report.html and report.md, from the same document `nnopt report` reads
    return result
