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
from collections.abc import Callable

import torch

from nnopt.errors import ConfigError
from nnopt.layers import primitives as P
from nnopt.quantization.weights import WeightQuantConfig

BLOCK = 128
_TILE = 512  # rows and columns of an in×in matrix handled at a time where a whole-matrix temporary is avoided
_UPDATE_ELEMENTS = 1 << 21

Codes = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


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
    return gptq_codes_consuming(weight, h, config, gptq, consume=False)


def gptq_codes_consuming(weight: torch.Tensor, h: torch.Tensor, config: WeightQuantConfig,
                         gptq: GPTQConfig | None = None, *, consume: bool = True) -> Codes:
    """:func:`gptq_codes` that may use ``h`` (float64, C-contiguous) as its working memory, overwriting it,
    where ``consume``: the caller's last use of that Hessian (:mod:`nnopt.llm.distributed` frees each one after
    its last matrix). Spares one ``in × in`` float64 copy: 242 MiB for a 5632-input down_proj. A float64
    ``weight`` is overwritten as well (the working copy GPTQ would make of it). The codes are
    :func:`gptq_codes`' own, except that an ``H`` still not positive definite after the dampening (possible
    only with a tiny ``damp``) raises instead of being dampened further: it is gone."""
    gptq = gptq or GPTQConfig()
    _check(weight, h.shape, config, gptq)
    inverse = hessian_inverse(h, gptq, consume=consume)
    return gptq_codes_from_inverse(weight, inverse, config, gptq, consume=consume)


@dataclasses.dataclass
class HessianInverse:
    """What GPTQ needs of a Hessian, the same for every matrix fed the same inputs (q/k/v, gate/up):
    ``upper`` the upper Cholesky factor of the dampened ``H⁻¹`` (in act order with ``perm``), ``dead`` the
    inputs that never fired (their weights become 0), ``perm`` the act order or None."""

    upper: torch.Tensor
    dead: torch.Tensor
    perm: torch.Tensor | None


def hessian_inverse(h: torch.Tensor, gptq: GPTQConfig | None = None, *, consume: bool = False) -> HessianInverse:
    """:class:`HessianInverse` of ``h`` for :func:`gptq_codes_from_inverse`: computed once for all the
    matrices that share ``h``, in ``h``'s own memory where ``consume`` (``h`` float64 C-contiguous, without
    act order; ``h`` is then overwritten and a Hessian still not positive definite after the dampening
    raises), else in a copy, dampened further where needed as :func:`gptq_codes` does."""
    gptq = gptq or GPTQConfig()
    if h.ndim != 2 or h.shape[0] != h.shape[1]:
        raise ConfigError(f"the Hessian must be square, got {tuple(h.shape)}")
    if not _all_finite(h):
        raise ConfigError("GPTQ got a weight or Hessian with NaN or infinite values")
    n = h.shape[0]
    dead = torch.diagonal(h) == 0
    perm = torch.argsort(torch.diagonal(h).masked_fill(dead, 1.0), descending=True) if gptq.act_order else None
    in_place = consume and perm is None and h.dtype == torch.float64 and h.is_contiguous()
    work = h.detach() if in_place else torch.empty(n, n, dtype=torch.float64)

    def prepare(extra: float) -> None:
        """``work`` = the dampened ``H`` (plus ``extra`` on its diagonal), from the caller's ``h``."""
        if not in_place:
            if perm is None:
                work.copy_(h)
            else:
                work.copy_(h.detach().to(torch.float64)[perm][:, perm])
        _symmetric_from_lower(work)  # Cholesky reads the lower triangle, as torch does for H itself
        diagonal = torch.diagonal(work)
        diagonal.masked_fill_(diagonal == 0, 1.0)  # dead inputs: weight 0, diagonal 1
        diagonal.add_(gptq.damp * float(diagonal.mean()))
        if extra:
            diagonal.add_(extra)

    return HessianInverse(_upper_cholesky_of_inverse_in_place(work, prepare, retry=not in_place), dead, perm)


def gptq_codes_from_inverse(weight: torch.Tensor, inverse: HessianInverse, config: WeightQuantConfig,
                            gptq: GPTQConfig | None = None, *, consume: bool = False) -> Codes:
    """:func:`gptq_codes` of ``weight`` given its Hessian's :func:`hessian_inverse` (not changed); a float64
    ``weight`` is overwritten where ``consume``."""
    gptq = gptq or GPTQConfig()
    hinv, dead, perm = inverse.upper, inverse.dead, inverse.perm
    _check(weight, hinv.shape, config, gptq)
    out_f, in_f = weight.shape
    group = config.group_size
    bits, symmetric = config.bits, config.symmetric
    qmin, qmax = P.qrange(bits, symmetric)
    w = weight.detach()
    if not (consume and w.dtype == torch.float64):
        w = w.to(torch.float64, copy=True)
    w[:, dead] = 0.0
    if perm is not None:
        w = w[:, perm]

    n_cols = 1 if group is None else P.group_count(in_f, group)
    per_tensor = group is None and not config.per_channel
    steps = torch.empty(out_f, n_cols, dtype=torch.float32)
    zeros = torch.empty(out_f, n_cols, dtype=torch.int32)
    if group is None:  # one scale for the whole row (or tensor), from the weights before any update
        scale, zero = P.compute_qparams(w, bits, symmetric, channel_axis=None if per_tensor else 0)
        steps[:], zeros[:] = _step(scale).expand(out_f, 1), zero.expand(out_f, 1)
    codes = torch.empty(out_f, in_f, dtype=torch.int8)
    # A block holds whole groups, so a group's qparams come from weights that every earlier block updated.
    block = gptq.block if group is None else group * max(1, gptq.block // group)
    # Columns of the lazy update at a time: bounds its temporary (out × columns, float64) to ~16 MiB.
    chunk = max(block, (_UPDATE_ELEMENTS // max(out_f, 1)) // block * block)
    step_col = steps[:, 0].double()
    zero_col = zeros[:, 0].double()
    for b0 in range(0, in_f, block):
        b1 = min(b0 + block, in_f)
        w1 = w[:, b0:b1].clone()
        q1 = torch.empty_like(w1)
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
            q1[:, i] = q
            err = (x - (q - zero_col) * step_col) / hinv1[i, i]
            w1[:, i:] -= err.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
            err1[:, i] = err
        codes[:, b0:b1] = q1.to(torch.int8)  # integers in [qmin, qmax]: exact
        for c0 in range(b1, in_f, chunk):
            c1 = min(c0 + chunk, in_f)
            w[:, c0:c1] -= err1 @ hinv[b0:b1, c0:c1]
    del w
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    if per_tensor:
        return codes, steps[:1].contiguous(), zeros[:1].to(torch.int8)
    return codes, steps, zeros.to(torch.int8)


def _check(weight: torch.Tensor, h_shape: tuple[int, ...], config: WeightQuantConfig, gptq: GPTQConfig) -> None:
    """The settings, the weight's shape against its Hessian's and the weight's values (the Hessian's are
    :func:`hessian_inverse`'s to check)."""
    config.validate()
    gptq.validate(config)
    if weight.ndim != 2:
        raise ConfigError(f"GPTQ needs a 2-D weight matrix, got shape {tuple(weight.shape)}")
    in_f = weight.shape[1]
    if tuple(h_shape) != (in_f, in_f):
        raise ConfigError(f"the Hessian must be ({in_f}, {in_f}) for a weight with {in_f} inputs, "
                          f"got {tuple(h_shape)}")
    if not _all_finite(weight):
        raise ConfigError("GPTQ got a weight or Hessian with NaN or infinite values")
    if config.group_size is not None and config.group_size > in_f:
        raise ConfigError(f"WeightQuantConfig.group_size: {config.group_size} exceeds the input dimension {in_f}")


def _step(scale: torch.Tensor) -> torch.Tensor:
    """The stored step ``1/S`` in float32, as :func:`nnopt.llm.streaming.rtn_codes` computes it."""
    return (1.0 / scale.double()).float()


def _all_finite(t: torch.Tensor) -> bool:
    """No NaN or infinity in ``t`` (2-D), checked a block of rows at a time: no ``in × in`` mask."""
    return all(bool(torch.isfinite(t[r:r + _TILE]).all()) for r in range(0, t.shape[0], _TILE))


def _symmetric_from_lower(h: torch.Tensor) -> None:
    """Copy the lower triangle of square ``h`` over its upper one, in place, a tile at a time."""
    n = h.shape[0]
    for i0 in range(0, n, _TILE):
        i1 = min(i0 + _TILE, n)
        h[i0:i1, i0:i1].copy_(h[i0:i1, i0:i1].tril() + h[i0:i1, i0:i1].tril(-1).t())
        for j0 in range(i1, n, _TILE):
            h[i0:i1, j0:j0 + _TILE] = h[j0:j0 + _TILE, i0:i1].t()


def _upper_cholesky_of_inverse(h: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of ``H⁻¹`` for a dampened float64 ``h`` (left as it is; its lower triangle is
    read); more dampening where it is still not positive definite (a rank-deficient Hessian from few
    calibration tokens). Raises :class:`ConfigError` if that does not help either."""
    n = h.shape[0]
    work = torch.empty(n, n, dtype=torch.float64)

    def prepare(extra: float) -> None:
        work.copy_(h)
        _symmetric_from_lower(work)
        if extra:
            torch.diagonal(work).add_(extra)

    return _upper_cholesky_of_inverse_in_place(work, prepare, retry=True)


def _upper_cholesky_of_inverse_in_place(work: torch.Tensor, prepare: Callable[[float], None], *,
                                        retry: bool) -> torch.Tensor:
    """Upper Cholesky factor of ``H⁻¹``, computed in ``work``'s memory (an F-contiguous view of it is
    returned): ``prepare(extra)`` fills ``work`` with the symmetric dampened ``H`` plus ``extra`` on the
    diagonal. Each factorization runs in place on ``work``'s transpose, which LAPACK takes without a copy
    (torch copies a C-contiguous matrix first); the factors are the ones ``torch.linalg.cholesky`` gives
    on ``H`` itself. With ``retry``, more dampening where the dampened ``H`` is still not positive definite
    (a rank-deficient Hessian from few calibration tokens)."""
    view = work.t()
    info = torch.empty((), dtype=torch.int32)
    extra = 0.0
    mean_diag = 0.0
    for attempt in range(6):
        prepare(extra)
        if attempt == 0:
            mean_diag = float(torch.diagonal(work).mean())
        torch.linalg.cholesky_ex(view, out=(view, info))
        if int(info) == 0:
            torch.cholesky_inverse(view, out=view)
            torch.linalg.cholesky_ex(view, upper=True, out=(view, info))
            if int(info) == 0:
                return view
        if not retry:
            break
        extra = mean_diag * (0.1 if extra == 0 else extra / mean_diag * 10)
    raise ConfigError("GPTQ: the input Hessian is not positive definite even after dampening; calibrate on "
                      "more tokens" + ("" if retry else " or raise GPTQConfig.damp"))
