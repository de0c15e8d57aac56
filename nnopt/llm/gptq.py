"""GPTQ (Frantar et al. 2022, arXiv:2210.17323) for one weight matrix, given its input Hessian.

GPTQ quantizes the columns (inputs) of ``W`` one at a time and spreads each column's rounding error over the
columns not yet quantized, weighted by the inverse Hessian ``H⁻¹`` of the layer's inputs
(``H = 2 XᵀX / n`` over the calibration tokens), so that ``‖(W − Ŵ) X‖`` stays small rather than
``‖W − Ŵ‖``. As in the reference implementation: ``H`` is dampened by 1% of its mean diagonal, inputs that
never fire (zero diagonal) get weight 0 and diagonal 1, updates are applied lazily in blocks of 128
columns, and the upper Cholesky factor of ``H⁻¹`` gives the row used for each column's update.

Groups: a group's scale and zero point are computed from its (already error-updated) weights when the
quantizer reaches its first column ("static" per group, the stored layout of :func:`nnopt.llm.streaming.
rtn_codes`), with a partial last group where the group size does not divide the inputs. Act-order
(columns in decreasing order of ``diag(H)``) is supported per channel or per tensor only: with groups it
would scatter each stored group's columns over the order, which this layout cannot hold.

The result is exactly the writer's layout: int8 codes ``(out, in)``, the step ``1/S`` (float32) and the zero
point (int8), ``(out, groups)``, ``(out, 1)`` per channel or ``(1, 1)`` per tensor; ``w ≈ (q − z) · step``.

>>> import torch
>>> from nnopt.quantization.weights import WeightQuantConfig
>>> x = torch.randn(256, 64, generator=torch.Generator().manual_seed(0))
>>> w = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
>>> codes, step, zero = gptq_codes(w, hessian(x), WeightQuantConfig(bits=4, group_size=32))
>>> codes.shape, step.shape, int(codes.abs().max()) <= 7
(torch.Size([8, 64]), torch.Size([8, 2]), True)
"""

from __future__ import annotations

import dataclasses

import torch

from nnopt.errors import ConfigError
from nnopt.layers import primitives as P
from nnopt.quantization.weights import WeightQuantConfig

BLOCK = 128


@dataclasses.dataclass(frozen=True)
class GPTQConfig:
    """GPTQ's own settings: ``damp`` (fraction of the mean of diag(H) added to it), ``block`` (columns per
    lazy update; rounded to whole groups), ``act_order`` (columns in decreasing diag(H); per channel or per
    tensor only)."""

    damp: float = 0.01
    block: int = BLOCK
    act_order: bool = False

    def validate(self, weights: WeightQuantConfig) -> None:
        if not 0 < self.damp < 1:
            raise ConfigError(f"GPTQConfig.damp: must be in (0, 1), got {self.damp!r}")
        if self.block < 1:
            raise ConfigError(f"GPTQConfig.block: must be >= 1, got {self.block!r}")
        if self.act_order and weights.group_size is not None:
            raise ConfigError("GPTQConfig.act_order with group_size: act-order scatters a stored group's columns "
                              "over the quantization order, which the group layout cannot hold; use act_order "
                              "with per_channel, or groups without act_order")


def hessian(x: torch.Tensor) -> torch.Tensor:
    """``2 XᵀX / n`` in float64 for inputs ``x`` (``(..., in)``; every leading index is a token)."""
    flat = x.reshape(-1, x.shape[-1]).double()
    return 2.0 * flat.t() @ flat / max(flat.shape[0], 1)


def gptq_codes(weight: torch.Tensor, h: torch.Tensor, config: WeightQuantConfig,
               gptq: GPTQConfig | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ codes of one ``(out, in)`` matrix given the ``(in, in)`` Hessian of its inputs: int8 codes, float32
    step and int8 zero point in :func:`nnopt.llm.streaming.rtn_codes`' layout."""
    gptq = gptq or GPTQConfig()
    config.validate()
    gptq.validate(config)
    if weight.ndim != 2:
        raise ConfigError(f"GPTQ needs a 2-D weight matrix, got shape {tuple(weight.shape)}")
    out_f, in_f = weight.shape
    if h.shape != (in_f, in_f):
        raise ConfigError(f"the Hessian must be ({in_f}, {in_f}) for a weight with {in_f} inputs, "
                          f"got {tuple(h.shape)}")
    if not bool(torch.isfinite(h).all()) or not bool(torch.isfinite(weight).all()):
        raise ConfigError("GPTQ got a weight or Hessian with NaN or infinite values")
    group = config.group_size
    if group is not None and group > in_f:
        raise ConfigError(f"WeightQuantConfig.group_size: {group} exceeds the input dimension {in_f}")
    bits, symmetric = config.bits, config.symmetric
    qmin, qmax = P.qrange(bits, symmetric)

    w = weight.detach().to(torch.float64).clone()
    h = h.detach().to(torch.float64).clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    perm = None
    if gptq.act_order:
        perm = torch.argsort(torch.diagonal(h), descending=True)
        w, h = w[:, perm], h[perm][:, perm]
    h += gptq.damp * float(torch.diagonal(h).mean()) * torch.eye(in_f, dtype=h.dtype)
    hinv = _upper_cholesky_of_inverse(h)

    n_cols = 1 if group is None else P.group_count(in_f, group)
    per_tensor = group is None and not config.per_channel
    steps = torch.empty(out_f, n_cols, dtype=torch.float32)
    zeros = torch.empty(out_f, n_cols, dtype=torch.int32)
    if group is None:  # one scale for the whole row (or tensor), from the weights before any update
        scale, zero = P.compute_qparams(w, bits, symmetric, channel_axis=None if per_tensor else 0)
        steps[:], zeros[:] = _step(scale).expand(out_f, 1), zero.expand(out_f, 1)
    codes = torch.empty(out_f, in_f, dtype=torch.float64)
    # A block holds whole groups, so a group's qparams come from weights that every earlier block updated.
    block = gptq.block if group is None else group * max(1, gptq.block // group)
    step_col = steps[:, 0].double()
    zero_col = zeros[:, 0].double()
    for b0 in range(0, in_f, block):
        b1 = min(b0 + block, in_f)
        w1 = w[:, b0:b1].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = b0 + i
            if group is not None and col % group == 0:
                g = col // group
                part = w1[:, i:i + group]
                scale, zero = P.compute_qparams(part, bits, symmetric, channel_axis=0)
                steps[:, g], zeros[:, g] = _step(scale)[:, 0], zero[:, 0]
                step_col, zero_col = steps[:, g].double(), zeros[:, g].double()
            x = w1[:, i]
            q = torch.round(x / step_col).add_(zero_col).clamp_(qmin, qmax)
            codes[:, col] = q
            err = (x - (q - zero_col) * step_col) / hinv1[i, i]
            w1[:, i:] -= err.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w[:, b1:] -= err1 @ hinv[b0:b1, b1:]
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    out_codes = codes.to(torch.int8)
    if per_tensor:
        return out_codes, steps[:1].contiguous(), zeros[:1].to(torch.int8)
    return out_codes, steps, zeros.to(torch.int8)


def _step(scale: torch.Tensor) -> torch.Tensor:
    """The stored step ``1/S`` in float32, as :func:`nnopt.llm.streaming.rtn_codes` computes it."""
    return (1.0 / scale.double()).float()


def _upper_cholesky_of_inverse(h: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of ``H⁻¹``; more dampening where the dampened ``H`` is still not positive
    definite (a rank-deficient Hessian from few calibration tokens)."""
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    extra = 0.0
    mean_diag = float(torch.diagonal(h).mean())
    for _ in range(6):
        chol, info = torch.linalg.cholesky_ex(h + extra * eye)
        if int(info) == 0:
            inv = torch.cholesky_inverse(chol)
            upper, info = torch.linalg.cholesky_ex(inv, upper=True)
            if int(info) == 0:
                return torch.as_tensor(upper)
        extra = mean_diag * (0.1 if extra == 0 else extra / mean_diag * 10)
    raise ConfigError("GPTQ: the input Hessian is not positive definite even after dampening; calibrate on "
                      "more tokens")
