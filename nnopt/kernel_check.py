"""Known-answer checks: a kernel is trusted only after it reproduced an exact integer product here.

Why: on x86 CPUs without VNNI (an AVX2-only AMD EPYC, say) int8 GEMMs multiply unsigned × signed
bytes with ``vpmaddubsw``, which sums each pair of products into a *saturating* 16-bit lane:
255·127 + 255·127 = 64770 does not fit, and the result is silently wrong (oneDNN's u8×s8 matmul,
ONNX Runtime's u8×s8 MatMulInteger). Whether a kernel is affected depends on the CPU, on
``ONEDNN_MAX_CPU_ISA``, on the library build and even on how the library dispatches a shape, so
nnopt does not guess from CPU flags: on first use in a process each kernel multiplies codes at
the extremes of their range (the pairs that saturate first) and a few random ones, in several
shapes, and is compared with the exact int64 product. A kernel that disagrees is not used.

This module is the check itself (base layer); the kernels under test are named where they live:
torch's in :mod:`nnopt.layers.kernel_checks`, ONNX Runtime's in :mod:`nnopt.io.onnx_checks`.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections.abc import Callable
from typing import Any

import torch

# Shapes (rows, depth, columns): batch 1, a few rows and more rows (kernels dispatch by shape); a depth of
# at most 512 keeps |Σ| of u8 × s8 products (≤ 255 · 127 · 512 < 2^24) exact in a float32 output too.
CHECK_SHAPES = ((1, 256, 48), (33, 512, 40), (96, 384, 64))
SATURATION = "differs from the exact integer product (u8×s8 pair sums saturating in 16 bits: a CPU without VNNI?)"

# A gemm under test: activation codes (m, k) int64, weight codes (n, k) int64 in -127..127 -> (m, n) result.
Gemm = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class KernelCheck:
    """One kernel's verdict on this machine: passed (True), wrong (False) or not available (None)."""

    kernel: str
    passed: bool | None
    max_abs_error: float | None = None
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        if self.passed is None:
            return f"not available ({self.detail})"
        if self.passed:
            return "passed (exact on extreme codes)"
        off = "" if self.max_abs_error is None else f"off by up to {self.max_abs_error:g}: "
        return f"FAILED ({off}{self.detail}); not used"


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """A kernel to check: its gemm, the range of its activation codes, and why it is unavailable (or None)."""

    gemm: Gemm
    activation_range: tuple[int, int]
    unavailable: Callable[[], str | None] = lambda: None


def extreme_codes(m: int, k: int, n: int, activation_range: tuple[int, int], seed: int = 0) -> tuple[
        torch.Tensor, torch.Tensor]:
    """Activation codes (m, k) and symmetric weight codes (n, k), int64, with the saturating extremes first.

    Rows alternate all-max, all-min and random activations; columns alternate +127, −127 and random
    weights, so that a max-activation row meets same-sign weight pairs (the largest pair sums).
    """
    lo, hi = activation_range
    generator = torch.Generator().manual_seed(seed)
    x = torch.randint(lo, hi + 1, (m, k), generator=generator)
    x[0::3] = hi
    x[1::3] = lo
    w = torch.randint(-127, 128, (n, k), generator=generator)
    w[0::3] = 127
    w[1::3] = -127
    return x, w


def known_answer_error(gemm: Gemm, activation_range: tuple[int, int] = (0, 255)) -> float:
    """Largest |gemm − exact| over :data:`CHECK_SHAPES`; ``gemm`` gets codes in ``activation_range``."""
    worst = 0.0
    for seed, (m, k, n) in enumerate(CHECK_SHAPES):
        x, w = extreme_codes(m, k, n, activation_range, seed)
        exact = x @ w.t()  # int64: the answer
        got = gemm(x, w)
        if tuple(got.shape) != (m, n):
            return float("inf")
        diff = (got.to(torch.float64) - exact.to(torch.float64)).abs()
        worst = max(worst, float(diff.max()) if bool(torch.isfinite(diff).all()) else float("inf"))
    return worst


def run_check(name: str, gemm: Gemm, activation_range: tuple[int, int]) -> KernelCheck:
    """Run the known-answer check of ``gemm`` (not cached): any exception or mismatch fails it.

    Eager and in full precision whatever the caller's context: autocast would turn float32 products
    into bf16 ones, and a failure under tracing would say nothing about the kernel.
    """
    try:
        with torch.inference_mode(), torch.autocast("cpu", enabled=False):
            error = known_answer_error(gemm, activation_range)
    except Exception as exc:  # noqa: BLE001 - a kernel that raises on valid codes is not usable either
        first_line = (str(exc).strip().splitlines() or [""])[0]
        return KernelCheck(name, False, None, f"raised {type(exc).__name__}: {first_line}"[:200])
    if not math.isfinite(error):
        return KernelCheck(name, False, None, "returned the wrong shape or non-finite values")
    # float32 outputs of exact integers below 2^24 are exact; anything off is a wrong kernel
    return KernelCheck(name, error == 0, error, "" if error == 0 else SATURATION)


_RESULTS: dict[str, KernelCheck] = {}  # one verdict per kernel name and process
_LOCK = threading.Lock()


def checked(name: str, spec: KernelSpec) -> KernelCheck:
    """The verdict on kernel ``name`` in this process (checked on first request, then remembered)."""
    known = _RESULTS.get(name)  # the hot path (every int8 GEMM asks): no lock once a verdict exists
    if known is not None:
        return known
    # A layer's first call may come inside torch.compile: the check runs eagerly, never traced. Wrapped
    # here, not at import: torch.compiler.disable imports torch._dynamo (1.5 s).
    verdict: KernelCheck = torch.compiler.disable(_first_check)(name, spec)
    return verdict


def _first_check(name: str, spec: KernelSpec) -> KernelCheck:
    why = spec.unavailable()  # outside the lock: an ONNX Runtime check takes seconds; equal verdicts may race
    verdict = KernelCheck(name, None, None, why) if why else run_check(name, spec.gemm, spec.activation_range)
    with _LOCK:
        return _RESULTS.setdefault(name, verdict)
