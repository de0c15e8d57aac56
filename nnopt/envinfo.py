"""What machine a measurement ran on: device, CPU model and features, threads, library versions.

``environment()`` is the short record every result carries; ``system_report()`` is the full
picture that ``nnopt env`` prints (CPU features that nnopt's kernels use, torch build, GPU,
ONNX Runtime providers, allocator).
"""

from __future__ import annotations

import os
from typing import Any

from nnopt import cpu
from nnopt.cpu import (  # re-exported: nnopt.envinfo is where results and `nnopt env` read machine facts
    CPU_FEATURES,
    bf16_support,
    cpu_features,
    cpu_model,
    effective_cpu_features,
    has_vnni,
    isa_class,
    onednn_isa_cap,
    parse_cpu_flags,
    require_native_bf16,
)

__all__ = ["CPU_FEATURES", "bf16_support", "cpu_features", "cpu_model", "effective_cpu_features", "has_vnni",
           "isa_class", "onednn_isa_cap", "parse_cpu_flags", "require_native_bf16", "environment", "gpu_info",
           "onnxruntime_info", "system_report", "render_system_report"]

def environment(device: str = "cpu") -> dict[str, object]:
    import torch

    from nnopt.io.model_dir import library_versions
    from nnopt.runtime import runtime_settings

    return {
        "device": device, "cpu": cpu.cpu_model(), "isa": cpu.isa_class(), "onednn_max_cpu_isa": cpu.onednn_isa_cap(),
        "threads": torch.get_num_threads(), **library_versions(), **runtime_settings(),
    }


def gpu_info() -> list[dict[str, Any]]:
    """One entry per visible CUDA device (name, memory, compute capability); empty without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return []
    gpus = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        gpus.append({
            "index": index, "name": props.name, "memory_bytes": int(props.total_memory),
            "capability": f"{props.major}.{props.minor}",
        })
    return gpus


def onnxruntime_info() -> dict[str, Any]:
    """ONNX Runtime's version and execution providers; version None when it is not installed."""
    try:
        import onnxruntime as ort
    except ImportError:
        return {"onnxruntime": None, "onnxruntime_providers": []}
    return {"onnxruntime": ort.__version__, "onnxruntime_providers": list(ort.get_available_providers())}


def system_report(device: str | None = None) -> dict[str, Any]:
    """Everything about this machine and process that a speed measurement depends on.

    Flat keys of :func:`environment` (device, cpu, threads, library versions, allocator) plus
    CPU features, logical cores, inter-op threads, torch build facts, GPUs and ONNX Runtime.

    >>> report = system_report()
    >>> isinstance(report["cpu_features"]["avx2"], (bool, type(None)))
    True
    """
    import torch

    from nnopt.quantization.kernel_checks import check_all
    from nnopt.quantization.kernels import onednn_int8_available

    gpus = gpu_info()
    device = device or ("cuda" if gpus else "cpu")
    report: dict[str, Any] = environment(device)
    report.update({
        "cpu_features": cpu.cpu_features(),
        "cpu_features_source": str(cpu.CPUINFO) if cpu._cpuinfo_text() is not None else "unavailable",
        "logical_cores": os.cpu_count(),
        "interop_threads": torch.get_num_interop_threads(),
        "mkldnn": bool(torch.backends.mkldnn.is_available()),
        "onednn_int8": bool(onednn_int8_available()),
        "int8_kernels": {check.kernel: check.to_dict() for check in check_all()},
        "torch_cuda": torch.version.cuda,
        "gpu": gpus or "none",
        **onnxruntime_info(),
    })
    return report


def render_system_report(report: dict[str, Any]) -> str:
    """``system_report()`` as a two-column table."""
    from nnopt.metrics.table import render_table

    def yes_no(value: bool | None) -> str:
        return "unknown" if value is None else ("yes" if value else "no")

    rows: list[tuple[str, Any]] = [
        ("device", report["device"]),
        ("CPU", report["cpu"]),
        ("logical cores", report["logical_cores"]),
        ("torch threads (intra-op)", report["threads"]),
        ("torch threads (inter-op)", report["interop_threads"]),
    ]
    rows.append(("ISA class (int8/bf16 kernels)", report["isa"] + (
        f" (ONEDNN_MAX_CPU_ISA={report['onednn_max_cpu_isa']})" if report.get("onednn_max_cpu_isa") else "")))
    features = report["cpu_features"]
    rows += [(f"CPU feature {name}", "present" if features[name] else
              ("unknown" if features[name] is None else "absent")) for name in features]
    rows += [
        ("oneDNN (mkldnn) in torch", yes_no(report["mkldnn"])),
        ("oneDNN int8 kernels", yes_no(report["onednn_int8"])),
        *((f"int8 kernel {name}", _check_summary(check)) for name, check in report["int8_kernels"].items()),
        ("torch CUDA build", report["torch_cuda"] or "none"),
    ]
    gpus = report["gpu"]
    if isinstance(gpus, list):
        rows += [(f"GPU {g['index']}", f"{g['name']}, {g['memory_bytes'] / 2**30:.1f} GiB, "
                  f"capability {g['capability']}") for g in gpus]
    else:
        rows.append(("GPU", "none"))
    for name in ("nnopt", "torch", "numpy", "safetensors", "python"):
        rows.append((name, report.get(name, "-")))
    ort = report["onnxruntime"]
    rows.append(("onnxruntime", ort or "not installed (pip install 'nnopt[onnx]')"))
    if ort:
        rows.append(("onnxruntime providers", ", ".join(report["onnxruntime_providers"]) or "none"))
    rows.append(("allocator", report["allocator"]))
    return render_table(("item", "value"), rows, caption=f"CPU features read from {report['cpu_features_source']}")


def _check_summary(check: dict[str, Any]) -> str:
    from nnopt.kernel_check import KernelCheck

    return KernelCheck(**check).summary()
