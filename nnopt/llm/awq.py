"""AWQ (activation-aware weight quantization, Lin et al. 2023, arXiv:2306.00978) on the layer-by-layer engine.

Weight channels that meet large activations matter most. AWQ scales each input channel ``j`` of a group of
Linears fed the same input up by ``s_j`` before quantizing (``W' = W · diag(s)``; the producer of the input
absorbs ``1 / s``, :mod:`nnopt.llm.smoothing`), so that the channels with large activations get finer
steps relative to their weights, and searches ``s = a^α`` over a grid of ``α`` in ``[0, 1]``, where ``a_j``
is the channel's typical activation magnitude. nnopt uses the channel's RMS, ``sqrt(diag(H) / 2)`` with
``H = 2 XᵀX / n`` from the engine, as ``a`` (AWQ uses ``mean |x|``; the two differ by a per-channel factor
the search over ``α`` absorbs), and scores each candidate by the group's exact output error on every
calibration token, from the Hessian alone:

    error(s) = Σ_consumers tr(ΔW H ΔWᵀ),   ΔW = Q(W · diag(s)) · diag(1/s) − W

(the scaled weight's error seen by the scaled inputs ``x / s``; ``tr(ΔW H ΔWᵀ) = 2/n · ‖ΔW Xᵀ‖²``).
``s = 1`` (plain RTN) is always a candidate, so the chosen scales never do worse than RTN on this measure.
With ``duo_scaling`` the candidates are ``a^α / w^(1−α)`` (AutoAWQ's variant; ``w_j`` the mean of channel
``j``'s weights relative to their group's largest).

Clipping (AWQ's second step, ``clip``): for each quantization group of each row, the range ``[lo, hi]`` is
shrunk by a ratio from 1 down to ``1 − max_shrink`` and the ratio with the least output error of that
group, ``δ H_gg δᵀ`` (the group's block of the scaled Hessian), is kept. As in AWQ, q_proj and k_proj are
never clipped (attention scores are sensitive to their outliers). The codes are in
:func:`nnopt.llm.streaming.rtn_codes`' layout (a ratio of 1 gives exactly RTN's codes).

>>> import torch
>>> from nnopt.llm.gptq import hessian
>>> from nnopt.quantization.weights import WeightQuantConfig
>>> g = torch.Generator().manual_seed(0)
>>> x = torch.randn(512, 64, generator=g) * torch.linspace(0.1, 8, 64)  # a few loud channels
>>> w = torch.randn(32, 64, generator=g)
>>> found = search_scales([w], hessian(x), WeightQuantConfig(bits=4, group_size=32))
>>> found.error <= found.rtn_error
True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from nnopt.errors import ConfigError
from nnopt.layers import primitives as P
from nnopt.llm import smoothing, streaming
from nnopt.llm.layerwise import CalibrationConfig, LayerContext, LayerMethod, quantize_checkpoint_layerwise
from nnopt.quantization.weights import WeightQuantConfig

Codes = streaming.Codes
# Below this fraction of the loudest channel's RMS a channel counts as silent: its scale stays bounded.
_SILENT = 1e-4
# AWQ leaves these unclipped (the attention logits amplify their clipping error).
_UNCLIPPED = ("q_proj.weight", "k_proj.weight")


@dataclasses.dataclass(frozen=True)
class AWQConfig:
    """AWQ's settings: ``grid`` values of ``α`` evenly spaced over ``[0, 1]`` for ``s = a^α``;
    ``duo_scaling`` searches ``a^α / w^(1−α)`` instead (AutoAWQ); ``clip`` searches a clipping ratio per
    quantization group (not for q/k_proj), over ``clip_grid`` ratios from 1 down to ``1 − max_shrink``
    (exclusive), as AWQ does with 10 ratios to 0.55."""

    grid: int = 20
    duo_scaling: bool = False
    clip: bool = True
    clip_grid: int = 10
    max_shrink: float = 0.5

    def validate(self, weights: WeightQuantConfig | None = None) -> None:
        for field in ("grid", "clip_grid"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"AWQConfig.{field}: must be a positive integer, got {value!r}")
        if self.grid < 2:
            raise ConfigError(f"AWQConfig.grid: needs at least 2 points (α = 0 and 1), got {self.grid}")
        if isinstance(self.max_shrink, bool) or not isinstance(self.max_shrink, (int, float)) or not (
                0 <= self.max_shrink < 1):
            raise ConfigError(f"AWQConfig.max_shrink: must be in [0, 1), got {self.max_shrink!r}")
        for field in ("duo_scaling", "clip"):
            if not isinstance(getattr(self, field), bool):
                raise ConfigError(f"AWQConfig.{field}: must be true or false, got {getattr(self, field)!r}")
        if weights is not None:
            weights.validate()

    def alphas(self) -> list[float]:
        return [k / (self.grid - 1) for k in range(self.grid)]

    def clip_ratios(self) -> list[float]:
        return [1.0 - self.max_shrink * k / self.clip_grid for k in range(self.clip_grid)]


@dataclasses.dataclass(frozen=True)
class ScaleSearch:
    """The scales chosen for one group (float32, ``(in,)``; all ones when RTN won), the ``α`` that gave them
    (``None`` for the identity) and the group's output error ``Σ tr(ΔW H ΔWᵀ)`` with them and with RTN."""

    scales: torch.Tensor
    alpha: float | None
    error: float
    rtn_error: float


def quantize_checkpoint_awq(
    src_dir: str | Path, out_dir: str | Path, config: WeightQuantConfig, *, awq: AWQConfig | None = None,
    calibration: CalibrationConfig | None = None, tokens: torch.Tensor | None = None,
    progress: streaming.ProgressFn | None = None, include_lm_head: bool = False,
    shard_bytes: int = streaming.DEFAULT_SHARD_BYTES,
) -> dict[str, Any]:
    """AWQ-quantize a Hugging Face safetensors checkpoint to ``out_dir`` layer by layer (compressed-tensors
    pack-quantized, as :func:`nnopt.llm.layerwise.quantize_checkpoint_gptq` writes; the norms and v/up_proj
    rows that absorbed the scales are written changed). ``lm_head`` (with ``include_lm_head``) gets RTN.
    Returns the writer's figures plus the calibration tokens and, under ``awq_groups``, each searched
    group's ``α`` and output errors (AWQ's and RTN's, on the calibration tokens)."""
    awq = awq or AWQConfig()
    config.validate()
    awq.validate(config)
    record: list[dict[str, Any]] = []
    result = quantize_checkpoint_layerwise(
        src_dir, out_dir, config, layer_method=awq_layer_method(config, awq, record), method="nnopt-awq",
        settings={"awq": dataclasses.asdict(awq)}, calibration=calibration, tokens=tokens, progress=progress,
        include_lm_head=include_lm_head, shard_bytes=shard_bytes)
    result["awq_groups"] = record
    return result


def awq_layer_method(config: WeightQuantConfig, awq: AWQConfig | None = None,
                     record: list[dict[str, Any]] | None = None) -> LayerMethod:
    """The :data:`~nnopt.llm.layerwise.LayerMethod`: search and fold each group's scales
    (:mod:`nnopt.llm.smoothing` order), then clip-search the codes of the chosen weights (or leave them to
    the engine's RTN without ``clip``). Appends one dict per searched group to ``record``."""
    awq = awq or AWQConfig()
    awq.validate(config)

    def method(context: LayerContext) -> dict[str, Codes]:
        prefix = context.unit + "."
        input_scales: dict[str, torch.Tensor] = {}
        for group in smoothing.scale_groups(context.layer):
            names = [prefix + consumer + ".weight" for consumer in group.consumers]
            chosen = [name for name in names if name in context.linears]
            if not chosen:
                continue
            found = search_scales([context.linears[n].weight.detach() for n in chosen],
                                  context.stats[chosen[0]].hessian, config, awq)
            if record is not None:
                record.append({"unit": context.unit, "producer": group.producer, "alpha": found.alpha,
                               "error": found.error, "rtn_error": found.rtn_error})
            if found.alpha is None:
                continue
            smoothing.fold_scales(context.layer, group, found.scales)
            for name in names:
                input_scales[name] = found.scales
        if not awq.clip:
            return {}
        codes: dict[str, Codes] = {}
        for name, module in context.linears.items():
            if name.endswith(_UNCLIPPED):
                continue  # the engine's RTN of the scaled weight
            h = context.stats[name].hessian
            if name in input_scales:
                h = smoothing.scaled_hessian(h, input_scales[name].double())
            codes[name] = clip_codes(module.weight.detach(), h, config, awq)
        return codes

    return method


def activation_magnitude(hessian: torch.Tensor) -> torch.Tensor:
    """Each input channel's RMS over the calibration tokens, ``sqrt(diag(H) / 2)`` (float32, ``(in,)``)."""
    return torch.diagonal(hessian).clamp(min=0).div(2).sqrt().float()


def search_scales(weights: Sequence[torch.Tensor], hessian: torch.Tensor, config: WeightQuantConfig,
                  awq: AWQConfig | None = None) -> ScaleSearch:
    """AWQ's grid search (module docstring) for Linears ``weights`` (each ``(out_i, in)``) fed one input with
    Hessian ``hessian`` (``(in, in)``): the candidate scales with the least summed output error."""
    awq = awq or AWQConfig()
    in_f = hessian.shape[0]
    if not weights or any(w.ndim != 2 or w.shape[1] != in_f for w in weights) or hessian.shape != (in_f, in_f):
        raise ConfigError(f"AWQ needs (out, {in_f}) weights for a ({in_f}, {in_f}) Hessian, got "
                          f"{[tuple(w.shape) for w in weights]} and {tuple(hessian.shape)}")
    h = hessian.float()
    ws = [w.detach().float() for w in weights]
    ones = torch.ones(in_f)
    rtn_error = _output_error(ws, h, ones, config)
    best = ScaleSearch(ones, None, rtn_error, rtn_error)
    a = activation_magnitude(hessian)
    if float(a.max()) == 0:
        return best  # nothing ever reached these inputs: nothing to weigh
    a = a.clamp(min=float(a.max()) * _SILENT)
    w_mean = _relative_weight_magnitude(ws, config).clamp(min=1e-4) if awq.duo_scaling else None
    for alpha in awq.alphas():
        s = a.pow(alpha)
        if w_mean is not None:
            s = s / w_mean.pow(1.0 - alpha)
        s = s / (s.max() * s.min()).sqrt()  # centred on 1: keeps the folded norms and weights in range
        error = _output_error(ws, h, s, config)
        if error < best.error:
            best = ScaleSearch(s, alpha, error, rtn_error)
    return best


def clip_codes(weight: torch.Tensor, hessian: torch.Tensor, config: WeightQuantConfig,
               awq: AWQConfig | None = None) -> Codes:
    """Codes of one ``(out, in)`` weight with each quantization group's range shrunk by the ratio (of
    ``awq.clip_ratios()``) that least increases that group's output error ``δ H_gg δᵀ``; per-tensor
    quantization is not clipped (RTN)."""
    awq = awq or AWQConfig()
    out_f, in_f = weight.shape
    if config.group_size is None and not config.per_channel:
        return streaming.rtn_codes(weight, config)
    width = in_f if config.group_size is None else config.group_size
    count = P.group_count(in_f, width)
    w = weight.detach().float()
    grouped = _pad(w, count * width).reshape(out_f, count, width)
    h = _pad(_pad(hessian.float(), count * width).t(), count * width)  # (count·width, count·width)
    blocks = torch.stack([h[g * width:(g + 1) * width, g * width:(g + 1) * width] for g in range(count)])
    best_error = torch.full((out_f, count), float("inf"))
    best_ratio = torch.ones(out_f, count)
    for ratio in awq.clip_ratios():
        delta = _fake_quant_grouped(grouped, config, ratio) - grouped  # (out, count, width)
        by_group = delta.transpose(0, 1)  # (count, out, width)
        error = (torch.bmm(by_group, blocks) * by_group).sum(-1).t()  # (out, count)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_ratio = torch.where(better, torch.full_like(best_ratio, ratio), best_ratio)
    return codes_with_ratio(weight, best_ratio, config)


def codes_with_ratio(weight: torch.Tensor, ratio: torch.Tensor, config: WeightQuantConfig) -> Codes:
    """RTN codes of an ``(out, in)`` weight whose group (or row, per channel) ranges are multiplied by
    ``ratio`` (``(out, groups)``) first; values outside the shrunk range clamp. A ratio of 1 gives exactly
    :func:`nnopt.llm.streaming.rtn_codes`."""
    out_f, in_f = weight.shape
    width = in_f if config.group_size is None else config.group_size
    count = P.group_count(in_f, width)
    if config.group_size is None and not config.per_channel:
        raise ConfigError("codes_with_ratio needs per-channel or grouped quantization")
    w = weight.detach().float()
    grouped = _pad(w, count * width).reshape(out_f, count, width)
    r = ratio.to(torch.float64).reshape(out_f, count)
    lo = grouped.amin(-1).double() * r
    hi = grouped.amax(-1).double() * r
    scale, zero = P.qparams_from_range(lo, hi, config.bits, config.symmetric)  # (out, count)
    step = (1.0 / scale.double()).float()  # the stored step 1/S, as rtn_codes computes it
    step_full = step.repeat_interleave(width, dim=1)[:, :in_f]
    zero_full = zero.repeat_interleave(width, dim=1)[:, :in_f]
    qmin, qmax = P.qrange(config.bits, config.symmetric)
    codes = torch.round(w / step_full).add_(zero_full).clamp_(qmin, qmax).to(torch.int8)
    return codes, step, zero.to(torch.int8)


# ------------------------------------------------------------------------------------------ helpers


def _output_error(weights: list[torch.Tensor], h: torch.Tensor, s: torch.Tensor, config: WeightQuantConfig) -> float:
    """``Σ tr(ΔW H ΔWᵀ)`` with ``ΔW = Q(W diag(s)) diag(1/s) − W`` (float32 products, float64 sum)."""
    total = 0.0
    for w in weights:
        delta = fake_quantize(w * s, config) / s - w
        total += float(((delta @ h) * delta).sum(dtype=torch.float64))
    return total


def fake_quantize(w: torch.Tensor, config: WeightQuantConfig) -> torch.Tensor:
    """``w`` (``(out, in)``) rounded to its quantization grid as RTN would store it (float32)."""
    out_f, in_f = w.shape
    if config.group_size is None and not config.per_channel:
        return _fake_quant_grouped(w.reshape(1, 1, -1), config, 1.0).reshape(out_f, in_f)
    width = in_f if config.group_size is None else config.group_size
    count = P.group_count(in_f, width)
    grouped = _pad(w, count * width).reshape(out_f, count, width)
    return _fake_quant_grouped(grouped, config, 1.0).reshape(out_f, count * width)[:, :in_f]


def _fake_quant_grouped(x: torch.Tensor, config: WeightQuantConfig, ratio: float) -> torch.Tensor:
    """Quantize-dequantize each ``(…, width)`` group of ``x`` with its range (widened to 0) times ``ratio``."""
    qmin, qmax = P.qrange(config.bits, config.symmetric)
    lo = x.amin(-1, keepdim=True).clamp(max=0) * ratio
    hi = x.amax(-1, keepdim=True).clamp(min=0) * ratio
    if config.symmetric:
        step = torch.maximum(-lo, hi) / qmax
        step = torch.where(step > 0, step, torch.ones_like(step))
        return torch.round(x / step).clamp_(qmin, qmax).mul_(step)
    step = (hi - lo) / (qmax - qmin)
    step = torch.where(step > 0, step, torch.ones_like(step))
    zero = qmin - torch.round(lo / step)
    return (torch.round(x / step).add_(zero).clamp_(qmin, qmax) - zero).mul_(step)


def _relative_weight_magnitude(weights: list[torch.Tensor], config: WeightQuantConfig) -> torch.Tensor:
    """AutoAWQ's ``w_mean``: each weight relative to the largest of its quantization group (row, per
    channel), averaged over every row of every consumer, per input channel."""
    rows = []
    for w in weights:
        out_f, in_f = w.shape
        width = in_f if config.group_size is None else config.group_size
        count = P.group_count(in_f, width)
        grouped = _pad(w.abs(), count * width).reshape(out_f, count, width)
        rel = grouped / (grouped.amax(-1, keepdim=True) + 1e-6)
        rows.append(rel.reshape(out_f, -1)[:, :in_f])
    return torch.cat(rows).mean(0)


def _pad(t: torch.Tensor, size: int) -> torch.Tensor:
    """``t`` zero-padded along its last dimension to ``size``."""
    return t if t.shape[-1] == size else torch.nn.functional.pad(t, (0, size - t.shape[-1]))
