"""The machine report of ``nnopt env``: CPU facts (:mod:`nnopt.envinfo`) plus the verdicts of nnopt's
int8 kernels on this CPU (:mod:`nnopt.layers.kernel_checks`).

It sits above the layers because it asks them; :mod:`nnopt.envinfo` holds the facts that need nothing
of nnopt.
"""

from __future__ import annotations

import os
from typing import Any

from nnopt import cpu
from nnopt.envinfo import environment, gpu_info, onnxruntime_info

__all__ = ["render_system_report", "system_report"]


def system_report(device: str | None = None) -> dict[str, Any]:
    """Everything about this machine and process that a speed measurement depends on.

    Flat keys of :func:`environment` (device, cpu, threads, library versions, allocator) plus
    CPU features, logical cores, inter-op threads, torch build facts, GPUs and ONNX Runtime.

    >>> report = system_report()
    >>> isinstance(report["cpu_features"]["avx2"], (bool, type(None)))
    True
    """
    import torch

    from nnopt.layers.kernel_checks import check_all
    from nnopt.layers.kernels import onednn_int8_available

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
