"""What machine a measurement ran on: device, CPU model and features, threads, library versions.

``environment()`` is the short record every result carries. The full picture that ``nnopt env``
prints adds the verdicts of nnopt's int8 kernels, so it sits above the layers, in
:mod:`nnopt.metrics.system`; this module needs nothing of nnopt but the CPU facts.
"""

from __future__ import annotations

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
           "library_versions", "onnxruntime_info"]

def environment(device: str = "cpu") -> dict[str, object]:
    import torch

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


def library_versions() -> dict[str, str]:
    """Versions of nnopt and the libraries every result depends on."""
    import platform

    import numpy
    import safetensors
    import torch

    from nnopt._version import __version__

    return {
        "nnopt": __version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "safetensors": safetensors.__version__,
        "python": platform.python_version(),
    }
