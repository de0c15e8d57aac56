"""What machine a measurement ran on: device, CPU model, threads, library versions."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str = "cpu") -> dict[str, object]:
    import torch

    from nnopt.io.model_dir import library_versions
    from nnopt.runtime import runtime_settings

    return {
        "device": device, "cpu": cpu_model(), "threads": torch.get_num_threads(), **library_versions(),
        **runtime_settings(),
    }
