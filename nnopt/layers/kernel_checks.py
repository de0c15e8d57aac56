"""torch's int8 kernels under the known-answer check (:mod:`nnopt.kernel_check`), and every kernel's verdict.

int8 layers use a kernel only after it reproduced the exact integer product on this machine:
- ``onednn-u8s8``: oneDNN's int8 Linear (``torch.ops.onednn.qlinear_pointwise``), uint8 activations;
- ``torch-int-mm``: ``torch._int_mm`` (int8 × int8 → int32);
- ``fp32-exact``: int8 codes multiplied as float32 in blocks of at most 1024 products, exact as long as
  float32 matrix products are IEEE (not bf16/tf32-reduced).
ONNX Runtime's kernels (:mod:`nnopt.io.onnx_checks`) are listed beside them for ``nnopt env`` and
``nnopt advise``.
"""

from __future__ import annotations

import torch

from nnopt.io.onnx_checks import ONNXRUNTIME_KERNELS
from nnopt.kernel_check import (  # re-exported for callers and tests
    _RESULTS,
    KernelCheck,
    KernelSpec,
    checked,
    extreme_codes,
    known_answer_error,
    run_check,
)


def _onednn_u8s8(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    from nnopt.layers.kernels import onednn_int8_linear, prepack_int8_weight

    packed = prepack_int8_weight(w.to(torch.int8))
    return onednn_int8_linear(x.to(torch.uint8), 1.0, 0, packed, torch.ones(w.shape[0]), None, "none")


def _int_mm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch._int_mm(x.to(torch.int8), w.to(torch.int8).t())


def _fp32_exact(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    from nnopt.layers.kernels import fp32_exact_int8_matmul

    return fp32_exact_int8_matmul(x.to(torch.int8), w.to(torch.int8))


def _available_onednn() -> str | None:
    from nnopt.layers.kernels import onednn_int8_available

    return None if onednn_int8_available() else "this torch build has no oneDNN int8 Linear"


def _available_int_mm() -> str | None:
    return None if hasattr(torch, "_int_mm") else "this torch build has no torch._int_mm"


TORCH_KERNELS: dict[str, KernelSpec] = {
    "onednn-u8s8": KernelSpec(_onednn_u8s8, (0, 255), _available_onednn),
    "torch-int-mm": KernelSpec(_int_mm, (-128, 127), _available_int_mm),
    "fp32-exact": KernelSpec(_fp32_exact, (-128, 127)),
}
KERNELS: dict[str, KernelSpec] = {**TORCH_KERNELS, **ONNXRUNTIME_KERNELS}

__all__ = ["KERNELS", "TORCH_KERNELS", "KernelCheck", "check_all", "check_kernel", "extreme_codes",
           "kernel_passes", "known_answer_error", "run_check", "_RESULTS"]


def check_kernel(name: str) -> KernelCheck:
    """The verdict on kernel ``name`` in this process (checked on first request, then remembered)."""
    if name not in KERNELS:
        raise KeyError(f"unknown int8 kernel {name!r}; known: {', '.join(KERNELS)}")
    return checked(name, KERNELS[name])


def kernel_passes(name: str) -> bool:
    """True when kernel ``name`` exists here and reproduced the exact integer product."""
    return bool(check_kernel(name).passed)


def check_all(names: tuple[str, ...] | None = None) -> list[KernelCheck]:
    """Every kernel's verdict (for ``nnopt env`` and ``nnopt advise``)."""
    return [check_kernel(name) for name in (names or tuple(KERNELS))]
