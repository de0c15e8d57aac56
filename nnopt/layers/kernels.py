"""Integer compute paths: int8 × int8 → int32 matrix products with a float epilogue.

``torch._int_mm`` multiplies int8 matrices into int32 on CPU (and CUDA) — exactly where it passed its
known-answer check (:mod:`nnopt.layers.kernel_checks`; some CPUs without VNNI saturate), else an
exact float32 product of the codes takes its place. Activations
are quantized asymmetrically to int8 (``x_q = round(x · S) + z``), so the product needs the
zero-point correction ``(x_q − z) · W_q = x_q · W_q − z · Σ_k W_q``; weights are symmetric, so
no second correction is needed. These are hot-path functions: float32 throughout, no copies
beyond what the kernels need.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F

from nnopt.layers.kernel_checks import kernel_passes

INT8_MIN, INT8_MAX = -128, 127


def dynamic_qparams(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor asymmetric int8 parameters ``(S, z)`` from ``x``'s range, which always holds 0.

    Returned as 0-d tensors so that nothing synchronises to Python in the hot path.
    """
    lo, hi = torch.aminmax(x)  # one pass over x
    lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
    span = (hi - lo).clamp(min=1e-12)  # an all-zero input still gets a finite scale
    scale = (INT8_MAX - INT8_MIN) / span
    zero = torch.round(INT8_MIN - lo * scale)
    return scale, zero


def quantize_activation(x: torch.Tensor, scale: torch.Tensor | float, zero: torch.Tensor | float) -> torch.Tensor:
    """int8 codes ``clamp(round(x · S) + z)`` (round half to even, as ONNX QuantizeLinear does)."""
    return torch.clamp(torch.round(x * scale) + zero, INT8_MIN, INT8_MAX).to(torch.int8)


def int8_linear(
    x_q: torch.Tensor,
    x_scale: torch.Tensor | float,
    x_zero: torch.Tensor | float,
    w_q: torch.Tensor,
    w_step: torch.Tensor,
    w_colsum: torch.Tensor,
    bias: torch.Tensor | None,
    w_float: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(x_q − z) W_qᵀ / (S_x S_w) + b`` with an int8 GEMM.

    x_q: (m, in) int8; w_q: (out, in) int8; w_step: (out,) = 1 / S_w; w_colsum: (out,) int32 Σ_k W_q;
    w_float: the codes as float32, where the layer keeps them for the exact float32 fallback.
    """
    acc = int8_matmul(x_q, w_q, w_float)  # (m, out) int32, exact
    # Integer correction: |Σ W_q · z| can pass 2^24, beyond float32's exact integers.
    zero = x_zero.to(torch.int32) if isinstance(x_zero, torch.Tensor) else int(x_zero)
    acc = acc - w_colsum * zero
    out = acc.to(torch.float32) * (w_step / x_scale)
    return out if bias is None else out + bias


def int8_matmul(x_q: torch.Tensor, w_q: torch.Tensor, w_float: torch.Tensor | None = None) -> torch.Tensor:
    """Exact int32 ``x_q · w_qᵀ`` for int8 ``x_q`` (m, k) and ``w_q`` (n, k).

    On CUDA ``torch._int_mm`` needs more than 16 rows and k, n multiples of 8; other shapes (batch 1,
    a 10-way classifier) take a float64 product, which is exact for int8 codes (|Σ| < 2^53). On CPU
    ``torch._int_mm`` runs only where it passed its known-answer check in this process (it saturates
    on some CPUs without VNNI, :mod:`nnopt.layers.kernel_checks`); else the exact float32 product.
    """
    m, k = x_q.shape
    if x_q.is_cuda:
        if m <= 16 or k % 8 or w_q.shape[0] % 8:
            return (x_q.double() @ w_q.double().t()).to(torch.int32)
        return torch._int_mm(x_q, w_q.t())
    path = "fp32-exact" if w_float is not None else int8_gemm_path(dynamic=False)  # the layer chose already
    if path == "torch-int-mm":
        return torch._int_mm(x_q, w_q.t())
    if path == "fp32-exact":
        return fp32_exact_int8_matmul(x_q, w_q, w_float)
    with torch.autocast("cpu", enabled=False):
        return (x_q.double() @ w_q.double().t()).to(torch.int32)


# |int8 · int8| ≤ 128 · 128 = 2^14, so any sum of at most 2^10 products is an integer of at most 2^24 in
# magnitude: exactly representable in float32, whatever order the float32 GEMM adds in.
EXACT_FP32_DEPTH = 1024


def fp32_exact_int8_matmul(x_q: torch.Tensor, w_q: torch.Tensor, w_float: torch.Tensor | None = None) -> torch.Tensor:
    """Exact int32 ``x_q · w_qᵀ`` by float32 GEMMs over blocks of :data:`EXACT_FP32_DEPTH` inputs.

    The fallback where no int8 kernel passed its check: fp32 speed, integer-exact results. ``w_float``
    (``w_q`` as float32, kept by the layer) saves converting the weights on every call.
    """
    x, w = x_q.to(torch.float32), (w_q.to(torch.float32) if w_float is None else w_float)
    depth = x.shape[1]
    with torch.autocast(x.device.type, enabled=False):  # autocast would make these bf16 products: inexact
        if depth <= EXACT_FP32_DEPTH:
            return (x @ w.t()).to(torch.int32)
        acc = torch.zeros(x.shape[0], w.shape[0], dtype=torch.int32, device=x.device)
        for start in range(0, depth, EXACT_FP32_DEPTH):
            stop = start + EXACT_FP32_DEPTH
            acc += (x[:, start:stop] @ w[:, start:stop].t()).to(torch.int32)
        return acc


def int8_gemm_path(dynamic: bool, device: str = "cpu") -> str:
    """The kernel an int8 layer's GEMM runs on ``device`` here: ``onednn`` (dynamic layers on CPU), else
    ``torch-int-mm`` or ``fp32-exact`` (those whose known-answer check passed; where both did, the faster
    here, timed once per process), else ``float64``."""
    if device != "cpu":
        return "torch-int-mm"
    if dynamic and onednn_int8_exact():
        return "onednn"
    exact = [name for name in ("torch-int-mm", "fp32-exact") if kernel_passes(name)]
    if len(exact) == 2:
        return faster_exact_gemm()
    return exact[0] if exact else "float64"


def why_not_int8(path: str) -> str:
    """Why int8 layers multiply their codes in float here (``path`` is ``fp32-exact`` or ``float64``)."""
    if path == "fp32-exact" and kernel_passes("torch-int-mm"):
        return "torch._int_mm is exact here but timed slower than the exact float32 product"
    return "no int8 kernel passed its known-answer check here"


# Where both are exact, which of torch._int_mm and the float32 product runs faster on this CPU. _int_mm
# passes its check on AVX2-only CPUs too, but runs there far slower than float32 (MiniLM's int8 layers on
# an AMD EPYC with AVX2: 6.1 s per batch of 8 × 128 tokens against 0.26 s in fp32, measured).
_FASTER: dict[str, str] = {}
_TIMING_SHAPE = (128, 512, 512)  # rows, inputs, outputs: a mid-sized Linear


def faster_exact_gemm() -> str:
    """``"torch-int-mm"`` or ``"fp32-exact"``, whichever timed faster here (measured on first request)."""
    known = _FASTER.get("cpu")  # the hot path: every int8 GEMM asks
    if known is None:
        # eager even inside torch.compile; wrapped here, not at import (torch.compiler imports torch._dynamo)
        known = _FASTER["cpu"] = torch.compiler.disable(_time_exact_gemms)()
    return known


def _time_exact_gemms(rounds: int = 3) -> str:

    rows, inputs, outputs = _TIMING_SHAPE
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(-128, 128, (rows, inputs), dtype=torch.int8, generator=generator)
    w = torch.randint(-127, 128, (outputs, inputs), dtype=torch.int8, generator=generator)
    w_float = w.to(torch.float32)
    return fastest({"torch-int-mm": lambda: torch._int_mm(x, w.t()),
                    "fp32-exact": lambda: fp32_exact_int8_matmul(x, w, w_float)}, rounds)


def fastest(calls: dict[str, Callable[[], object]], rounds: int) -> str:
    """The name of the call with the best time over ``rounds`` alternated rounds (after one warm-up round)."""
    import time

    best = dict.fromkeys(calls, float("inf"))
    with torch.inference_mode():
        for _ in range(rounds + 1):
            for name, call in calls.items():
                start = time.perf_counter()
                call()
                best[name] = min(best[name], time.perf_counter() - start)
    return min(best, key=lambda name: best[name])


# --------------------------------------------------------------------------- convolutions over int8 codes


def conv_path(groups: int, device: str = "cpu") -> str:
    """The kernel a static int8 convolution runs: ``torch-int-mm`` (im2col + int8 GEMM) where that is the int8
    GEMM chosen here and the convolution has one group; else ``fp32-exact`` (float32 convolutions of the codes,
    exact where they passed their check: :func:`conv_fp32_exact`), else ``float64``."""
    if device != "cpu":
        return "float64"
    exact = conv_fp32_exact()
    if groups == 1 and int8_gemm_path(dynamic=False) == "torch-int-mm" and (not exact or _faster_conv() == "im2col"):
        return "torch-int-mm"
    return "fp32-exact" if exact else "float64"


_FASTER_CONV: list[str] = []


def _faster_conv() -> str:
    """``"im2col"`` (unfold + ``torch._int_mm``) or ``"fp32-exact"``, whichever ran a mid-sized 3×3 convolution
    faster here (timed once per process): the unfold costs the int8 GEMM path more than the GEMM timing shows."""
    if not _FASTER_CONV:
        _FASTER_CONV.append(torch.compiler.disable(_time_conv_paths)())
    return _FASTER_CONV[0]


def _time_conv_paths(rounds: int = 3) -> str:

    generator = torch.Generator().manual_seed(0)
    codes = torch.randint(-128, 128, (4, 32, 32, 32), generator=generator).to(torch.float32)
    w_q = torch.randint(-127, 128, (64, 32, 3, 3), dtype=torch.int8, generator=generator)
    w_float, w_flat = w_q.to(torch.float32), w_q.flatten(1)

    def im2col() -> torch.Tensor:
        cols = F.unfold(F.pad(codes, (1, 1, 1, 1), value=3.0), 3)  # (n, in · 9, positions)
        patches = cols.transpose(1, 2).reshape(-1, cols.shape[1]).to(torch.int8)
        return torch._int_mm(patches, w_flat.t())

    return fastest({"im2col": im2col, "fp32-exact": lambda: F.conv2d(codes, w_float, None, 1, 1)}, rounds)


_CONV_EXACT: list[bool] = []


def conv_fp32_exact() -> bool:
    """Whether float32 convolutions of centered int8 codes give exact integer sums here (no Winograd/FFT, no
    bf16 or tf32 reduction): checked once per process on extreme codes, plain and depthwise, against float64."""
    if not _CONV_EXACT:
        generator = torch.Generator().manual_seed(0)
        ok = True
        for channels, groups, kernel in ((32, 1, 4), (32, 32, 3)):  # depth 512 and a depthwise 3×3
            x = torch.randint(-255, 256, (1, channels, 6, 6), generator=generator).to(torch.float32)
            w = torch.randint(-127, 128, (channels, channels // groups, kernel, kernel), generator=generator)
            w = torch.where(w >= 0, 127, -127).to(torch.float32)  # extreme magnitudes: the largest sums
            with torch.autocast("cpu", enabled=False), torch.inference_mode():
                got = F.conv2d(x, w, None, 1, 0, 1, groups)
                want = F.conv2d(x.double(), w.double(), None, 1, 0, 1, groups)
            ok = ok and bool(torch.equal(got.double(), want))
        _CONV_EXACT.append(ok)
    return _CONV_EXACT[0]


def activation_codes_float(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """:func:`quantize_activation`'s int8 codes, held as float32 (a convolution's input)."""
    return torch.round(x * scale).add_(zero).clamp_(INT8_MIN, INT8_MAX)


def int8_conv(
    codes: torch.Tensor, w_codes: torch.Tensor, conv: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    groups: int, path: str,
) -> torch.Tensor:
    """Exact ``Σ x_q · w_q`` of a convolution ``conv(x, w)`` over int8 activation codes held as float32
    (n, in, *spatial) and weight codes as float32 (out, in / groups, *kernel). Returns float32 sums, or
    float64 where they may pass float32's exact integers.

    ``fp32-exact``: one float32 convolution where the depth (in / groups · kernel) is at most
    :data:`EXACT_FP32_DEPTH`, else float32 convolutions over blocks of input channels (within each group)
    of at most that depth, summed in float64; ``float64``: one float64 convolution.
    """
    with torch.autocast(codes.device.type, enabled=False):
        per_group, window = w_codes.shape[1], w_codes[0, 0].numel()
        step = EXACT_FP32_DEPTH // window
        if path != "fp32-exact" or step == 0:  # step 0: one channel's window is deeper than float32 sums exactly
            return conv(codes.double(), w_codes.double())
        if step >= per_group:
            return conv(codes, w_codes)
        n, spatial = codes.shape[0], codes.shape[2:]
        grouped = codes.reshape(n, groups, per_group, *spatial)
        acc: torch.Tensor | None = None
        for start in range(0, per_group, step):
            stop = min(start + step, per_group)
            block = grouped[:, :, start:stop].reshape(n, groups * (stop - start), *spatial)
            part = conv(block, w_codes[:, start:stop].contiguous()).double()
            acc = part if acc is None else acc.add_(part)
        assert acc is not None
        return acc


_INT8_GEMM_OK: dict[str, bool] = {}


def require_int8_gemm(device: str = "cpu") -> None:
    """Fail early, naming the fix, where this torch build has no int8 GEMM for ``device``."""
    from nnopt.errors import UnsupportedModelError

    if device not in _INT8_GEMM_OK:
        try:
            rows = torch.ones(17, 16, dtype=torch.int8, device=device)  # CUDA wants more than 16 rows
            _INT8_GEMM_OK[device] = int(torch._int_mm(rows, rows[:16].t())[0, 0]) == 16
        except (RuntimeError, AttributeError):
            _INT8_GEMM_OK[device] = False
    if not _INT8_GEMM_OK[device]:
        raise UnsupportedModelError(
            f"this torch build has no int8 matrix kernel (torch._int_mm) on {device}; "
            "use a weight-only scheme (int8-weight, int4-weight) or torch >= 2.4"
        )


# --------------------------------------------------------------------------- oneDNN (x86 CPU)
# oneDNN's int8 matrix kernel uses AMX or AVX-512 VNNI where the CPU has them and fuses GELU
# into its epilogue (without VNNI its u8×s8 pair sums saturate: layers use it only after its
# known-answer check passed, ``onednn_int8_exact``); ``torch._int_mm`` on CPU does neither (measured
# 14.5 ms vs 5.0 ms for a 4096×384 · 384×1536 product on this project's Xeon). The same int8 codes go
# into both, so the two paths compute the same function up to float32 rounding of the epilogue.

ONEDNN_ACTIVATIONS = ("none", "gelu")
_ONEDNN_OK: list[bool] = []


def onednn_int8_available() -> bool:
    """Whether this torch build has oneDNN's int8 Linear and uint8 activation quantization."""
    if not _ONEDNN_OK:
        try:
            with warnings.catch_warnings():  # quantized-tensor creation warns once per process; say it once here
                warnings.simplefilter("ignore")
                rows = torch.ones(4, 16)
                codes, step, zero = quantize_activation_u8(rows)
                packed = prepack_int8_weight(torch.ones(3, 16, dtype=torch.int8))
                out = onednn_int8_linear(codes, step, zero, packed, torch.ones(3), None, "none")
            _ONEDNN_OK.append(bool(torch.allclose(out, torch.full((4, 3), 16.0), atol=0.2)))
        except (RuntimeError, AttributeError, NotImplementedError):
            _ONEDNN_OK.append(False)
    return _ONEDNN_OK[0]


def onednn_int8_exact() -> bool:
    """Whether oneDNN's int8 Linear exists here *and* passed its known-answer check (it saturates on CPUs
    without VNNI, and under ``ONEDNN_MAX_CPU_ISA=AVX2``); int8 layers take it only then."""
    return onednn_int8_available() and kernel_passes("onednn-u8s8")


def quantize_activation_u8(x: torch.Tensor) -> tuple[torch.Tensor, float, int]:
    """Per-tensor asymmetric uint8 codes of ``x`` and their ``(step, zero point)``, in two passes.

    The codes equal :func:`quantize_activation`'s int8 codes + 128 (same range, same grid).
    """
    lo, hi = torch.aminmax(x)
    lo_f, hi_f = min(float(lo), 0.0), max(float(hi), 0.0)
    step = max(hi_f - lo_f, 1e-12) / (INT8_MAX - INT8_MIN)
    zero = min(max(round(-lo_f / step), 0), 255)
    codes = torch.quantize_per_tensor(x, step, zero, torch.quint8).view(torch.uint8)  # a view, no copy
    return codes, step, zero


def prepack_int8_weight(weight_q: torch.Tensor) -> torch.Tensor:
    """oneDNN's blocked layout of (out, in) int8 weight codes; an opaque tensor that cannot be copied."""
    return torch.ops.onednn.qlinear_prepack(weight_q, None)


def onednn_int8_linear(
    x_codes: torch.Tensor, x_step: float, x_zero: int, packed: torch.Tensor, w_step: torch.Tensor,
    bias: torch.Tensor | None, activation: str, w_zero: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32, residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """``act((x_codes − z)·x_step · (W_q · w_step)ᵀ + b) [+ residual]`` written as ``out_dtype``,
    in one oneDNN call (the residual is added in the epilogue, into a new tensor).

    x_codes: (m, in) uint8; w_step: (out,) float32 per output channel (symmetric weights, so the
    weight zero points ``w_zero`` are 0); residual: (m, out) float32.
    """
    if w_zero is None:
        w_zero = torch.zeros(w_step.shape, dtype=torch.int64)
    if bias is not None and bias.dtype != out_dtype:
        bias = bias.to(out_dtype)  # oneDNN wants the bias in the output's type
    if residual is None:
        return torch.ops.onednn.qlinear_pointwise(
            x_codes, x_step, x_zero, packed, w_step, w_zero, bias, 1.0, 0, out_dtype, activation, [], "none"
        )
    return torch.ops.onednn.qlinear_pointwise.binary(
        x_codes, x_step, x_zero, packed, w_step, w_zero, residual, bias, 1.0, 0, out_dtype, 1.0, 0, "add", 1.0,
        activation, [], "none",
    )


class OnednnWeightCache:
    """A module's int8 weight in oneDNN's layout, packed on first use.

    The packed tensor is opaque (it can be neither copied nor pickled), so copies of the module
    start with an empty cache and pack again; :meth:`clear` drops it when the codes change.
    """

    def __init__(self) -> None:
        self.packed: torch.Tensor | None = None
        self.zero: torch.Tensor | None = None

    def get(self, weight_q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.packed is None or self.zero is None:
            self.packed = prepack_int8_weight(weight_q)
            self.zero = torch.zeros(weight_q.shape[0], dtype=torch.int64)
        return self.packed, self.zero

    def clear(self) -> None:
        self.packed = self.zero = None

    def __deepcopy__(self, memo: dict[int, object]) -> OnednnWeightCache:
        return OnednnWeightCache()

    def __getstate__(self) -> dict[str, object]:
        return {}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__init__()  # type: ignore[misc]


class SharedInputCodes:
    """One quantization of an input that several int8 Linears read (attention's query, key, value).

    The first member to see a tensor quantizes it; another member reuses the codes only when
    the same tensor object comes in unmodified (same version counter) and its smoothing vector
    equals the one the codes were made with, so sharing never changes a result. (Inference
    tensors have no version counter; for them the group relies on identity, and members are
    called back to back within one attention block.)
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._source: weakref.ref[torch.Tensor] | None = None
        self._version = -1
        self._smoothing: torch.Tensor | None = None
        self._codes: tuple[torch.Tensor, float, int] | None = None
        self._uses = 0

    def lookup(self, x: torch.Tensor, smoothing: torch.Tensor | None) -> tuple[torch.Tensor, float, int] | None:
        if self._codes is None or self._source is None or self._source() is not x or tensor_version(x) != self._version:
            return None
        same = smoothing is None if self._smoothing is None else (
            smoothing is not None and torch.equal(smoothing, self._smoothing))
        if not same:
            return None
        codes = self._codes
        self._uses += 1
        if self._uses >= self.size:  # every member has read it: free the codes
            self._codes = self._source = self._smoothing = None
        return codes

    def store(self, x: torch.Tensor, smoothing: torch.Tensor | None, codes: tuple[torch.Tensor, float, int]) -> None:
        self._source, self._version, self._smoothing = weakref.ref(x), tensor_version(x), smoothing
        self._codes, self._uses = codes, 1

    def __deepcopy__(self, memo: dict[int, object]) -> SharedInputCodes:
        return SharedInputCodes(self.size)  # deepcopy's memo keeps members of one copy sharing one group

    def __getstate__(self) -> dict[str, object]:
        return {"size": self.size}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__init__(int(state["size"]))  # type: ignore[misc, arg-type]


def tensor_version(x: torch.Tensor) -> int:
    """``x``'s in-place version counter, for caches; -1 for inference tensors, which keep none (the caches'
    owners clear them when they replace their tensors)."""
    return -1 if x.is_inference() else x._version
