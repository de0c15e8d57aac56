"""Integer compute paths: int8 × int8 → int32 matrix products with a float epilogue.

``torch._int_mm`` multiplies int8 matrices exactly into int32 on CPU (and CUDA). Activations
are quantized asymmetrically to int8 (``x_q = round(x · S) + z``), so the product needs the
zero-point correction ``(x_q − z) · W_q = x_q · W_q − z · Σ_k W_q``; weights are symmetric, so
no second correction is needed. These are hot-path functions: float32 throughout, no copies
beyond what the kernels need.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

INT8_MIN, INT8_MAX = -128, 127


def dynamic_qparams(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor asymmetric int8 parameters ``(S, z)`` from ``x``'s range, which always holds 0.

    Returned as 0-d tensors so that nothing synchronises to Python in the hot path.
    """
    lo = x.min().clamp(max=0.0)
    hi = x.max().clamp(min=0.0)
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
) -> torch.Tensor:
    """``(x_q − z) W_qᵀ / (S_x S_w) + b`` with an int8 GEMM.

    x_q: (m, in) int8; w_q: (out, in) int8; w_step: (out,) = 1 / S_w; w_colsum: (out,) int32 Σ_k W_q.
    """
    acc = torch._int_mm(x_q, w_q.t())  # (m, out) int32, exact
    # Integer correction: |Σ W_q · z| can pass 2^24, beyond float32's exact integers.
    zero = x_zero.to(torch.int32) if isinstance(x_zero, torch.Tensor) else int(x_zero)
    acc = acc - w_colsum * zero
    out = acc.to(torch.float32) * (w_step / x_scale)
    return out if bias is None else out + bias


def im2col_codes(
    x_q: torch.Tensor, zero: torch.Tensor | float, kernel_size: tuple[int, int], stride: tuple[int, int],
    padding: tuple[int, int], dilation: tuple[int, int],
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Unfold int8 activation codes for a convolution; padding holds the zero point (the code of 0.0).

    Returns the (n · out_h · out_w, in · kh · kw) int8 patch matrix and the output size.
    """
    n, _, h, w = x_q.shape
    codes = x_q.to(torch.float32)  # unfold has no int8 kernel; codes are exact in float32
    if any(padding):
        codes = F.pad(codes, (padding[1], padding[1], padding[0], padding[0]), value=float(zero))
    cols = F.unfold(codes, kernel_size, dilation=dilation, stride=stride)  # (n, c·kh·kw, L)
    out_h = (h + 2 * padding[0] - dilation[0] * (kernel_size[0] - 1) - 1) // stride[0] + 1
    out_w = (w + 2 * padding[1] - dilation[1] * (kernel_size[1] - 1) - 1) // stride[1] + 1
    patches = cols.transpose(1, 2).reshape(n * out_h * out_w, -1).to(torch.int8)
    return patches, (out_h, out_w)


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
