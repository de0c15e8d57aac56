"""Pruning of an LLM checkpoint's projection weights, layer by layer: magnitude, Wanda and SparseGPT.

Three ways to choose which weights of each ``(out, in)`` matrix become zero, each **unstructured** (a
target fraction of zeros) or **N:M** (in every group of ``M`` consecutive inputs of a row, ``N`` are kept;
2:4 is the layout of sparse tensor cores):

* ``magnitude``: the smallest ``|W_ij|`` of each output row (per row, like Wanda, so that it is the
  like-for-like control: only the score differs). Reads no calibration statistics.
* ``wanda`` (Sun et al. 2023, arXiv:2306.11695): score ``|W_ij| · ‖X_j‖₂`` (the norm of input ``j`` over
  every calibration token), the lowest scores of each output row pruned; no weight update.
* ``sparsegpt`` (Frantar & Alistarh 2023, arXiv:2301.00774): OBS-style pruning with the inverse Hessian
  ``H⁻¹`` of the layer's inputs (``H = 2 XᵀX / n``), as GPTQ (:mod:`nnopt.llm.gptq`) does for rounding:
  columns are visited in order, each pruned weight's error is spread over the row's columns not yet
  visited, in lazy blocks of ``block`` columns. Unstructured: the mask of each block is chosen when the
  block is reached, from the updated weights, by the score ``w² / [H⁻¹]_cc²`` (Cholesky form) over the
  whole block (every row at once, so a row's sparsity adapts; each block prunes its exact share, so the
  matrix's sparsity is exact). N:M: each group's mask is chosen when its first column is reached.

:func:`prune_checkpoint` runs one of them on the layer-by-layer engine
(:func:`nnopt.llm.layerwise.quantize_checkpoint_layerwise` with ``quantize=False``): each decoder layer is
pruned with statistics of its inputs as the already pruned layers before it produce them, and the output is
a float safetensors checkpoint (the source's dtype, zeros in place, ``nnopt_sparsity`` recorded in
config.json) that transformers loads as a plain model. Resumable as the engine is.

A float checkpoint with zeros is no faster by itself: dense kernels multiply the zeros too. It is smaller
only once compressed or stored in a sparse format.

>>> import torch
>>> w = torch.tensor([[0.1, -2.0, 0.3, 4.0], [1.0, 0.2, -0.1, 3.0]])
>>> magnitude_mask(w, n_m=(2, 4)).int().tolist()
[[0, 1, 0, 1], [1, 0, 0, 1]]
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from nnopt.errors import ConfigError
from nnopt.llm import streaming
from nnopt.llm.gptq import GPTQConfig, hessian_inverse
from nnopt.llm.layerwise import CalibrationConfig, InputStats, LayerContext, quantize_checkpoint_layerwise
from nnopt.quantization.weights import WeightQuantConfig

METHODS = ("magnitude", "wanda", "sparsegpt")
CONFIG_ENTRY = "nnopt_sparsity"  # config.json key recording what was pruned
BLOCK = 128
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)\.weight$")


@dataclasses.dataclass(frozen=True)
class PruneConfig:
    """Which weights become zero: ``method`` (``magnitude``, ``wanda`` or ``sparsegpt``); ``sparsity``, the
    fraction of zeros of each matrix (unstructured; ``None`` means 0.5), or ``n_m=(N, M)``: ``N`` kept in
    every group of ``M`` consecutive inputs of a row (``sparsity`` then ``None`` or ``1 − N/M``); SparseGPT's
    ``damp`` (fraction of the mean of diag(H) added to it) and ``block`` (columns per lazy update and per
    mask choice; a multiple of ``M`` with N:M).

    >>> PruneConfig("wanda", n_m=(2, 4)).target_sparsity
    0.5
    """

    method: str = "wanda"
    sparsity: float | None = None
    n_m: tuple[int, int] | None = None
    damp: float = 0.01
    block: int = BLOCK

    @property
    def target_sparsity(self) -> float:
        """The fraction of zeros asked for: ``1 − N/M`` with ``n_m``, else ``sparsity`` (0.5 by default)."""
        if self.n_m is not None:
            return 1.0 - self.n_m[0] / self.n_m[1]
        return 0.5 if self.sparsity is None else float(self.sparsity)

    @property
    def pattern(self) -> str:
        """``"N:M"`` or ``"unstructured"``."""
        return "unstructured" if self.n_m is None else f"{self.n_m[0]}:{self.n_m[1]}"

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"PruneConfig.method: must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.n_m is not None:
            n_m = self.n_m
            if (not isinstance(n_m, (tuple, list)) or len(n_m) != 2
                    or any(isinstance(v, bool) or not isinstance(v, int) for v in n_m)):
                raise ConfigError(f"PruneConfig.n_m: must be two integers (N, M), e.g. (2, 4), got {n_m!r}")
            n, m = n_m
            if not 1 <= n < m:
                raise ConfigError(f"PruneConfig.n_m: N:M keeps N of every M weights and needs 1 <= N < M, "
                                  f"got {n}:{m}")
        if self.sparsity is not None:
            value = self.sparsity
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
                raise ConfigError(f"PruneConfig.sparsity: must be a fraction in (0, 1), got {value!r}")
            if self.n_m is not None and not math.isclose(value, self.target_sparsity):
                raise ConfigError(f"PruneConfig.sparsity: {value} contradicts n_m={self.pattern} (which prunes "
                                  f"{self.target_sparsity:g}); give one of them")
        if isinstance(self.damp, bool) or not isinstance(self.damp, (int, float)) or not 0 < self.damp < 1:
            raise ConfigError(f"PruneConfig.damp: must be in (0, 1), got {self.damp!r}")
        if isinstance(self.block, bool) or not isinstance(self.block, int) or self.block < 1:
            raise ConfigError(f"PruneConfig.block: must be a positive integer, got {self.block!r}")
        if self.n_m is not None and self.block % self.n_m[1]:
            raise ConfigError(f"PruneConfig.block: {self.block} must be a multiple of M={self.n_m[1]} so that no "
                              f"group of M inputs straddles two blocks")


# ------------------------------------------------------------------------------------------ per matrix


def keep_mask(scores: torch.Tensor, sparsity: float = 0.5, n_m: tuple[int, int] | None = None,
              name: str = "weight") -> torch.Tensor:
    """Keep-mask (bool, like ``scores``, ``(out, in)``) of each row's highest scores: all but
    ``round(sparsity · in)`` per row, or ``N`` of every group of ``M`` consecutive inputs."""
    out_f, in_f = scores.shape
    if n_m is not None:
        n, m = n_m
        _check_groups(in_f, m, name)
        groups = scores.reshape(-1, m)
        keep = torch.zeros_like(groups, dtype=torch.bool)
        keep.scatter_(1, torch.topk(groups, n, dim=1).indices, True)
        return keep.view(out_f, in_f)
    keep = torch.ones(out_f, in_f, dtype=torch.bool)
    pruned = round(sparsity * in_f)
    if pruned:
        keep.scatter_(1, torch.topk(scores, pruned, dim=1, largest=False).indices, False)
    return keep


def magnitude_mask(weight: torch.Tensor, sparsity: float = 0.5, n_m: tuple[int, int] | None = None,
                   name: str = "weight") -> torch.Tensor:
    """Keep-mask of the largest ``|W_ij|`` of each output row (unstructured) or of each group of ``M``."""
    return keep_mask(weight.detach().abs().float(), sparsity, n_m, name)


def wanda_scores(weight: torch.Tensor, stats: InputStats) -> torch.Tensor:
    """``|W_ij| · ‖X_j‖₂`` up to one constant factor: ``diag(H) = 2 Σ x_j² / n``, so ``√diag(H)`` is
    ``‖X_j‖₂`` times ``√(2/n)``, which does not change any row's order."""
    norms = torch.diagonal(stats.hessian).clamp(min=0).sqrt().float()
    if norms.shape[0] != weight.shape[1]:
        raise ConfigError(f"Wanda: the statistics are for {norms.shape[0]} inputs, the weight has {weight.shape[1]}")
    return weight.detach().abs().float() * norms


def wanda_prune(weight: torch.Tensor, stats: InputStats, sparsity: float = 0.5,
                n_m: tuple[int, int] | None = None, name: str = "weight") -> torch.Tensor:
    """Wanda: a copy of ``weight`` with the lowest ``|W_ij| · ‖X_j‖₂`` of each output row (or of each group
    of ``M`` inputs) set to zero; the other weights unchanged."""
    keep = keep_mask(wanda_scores(weight, stats), sparsity, n_m, name)
    return weight.detach().masked_fill(~keep, 0)


def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float = 0.5,
                    n_m: tuple[int, int] | None = None, *, damp: float = 0.01, block: int = BLOCK,
                    name: str = "weight") -> torch.Tensor:
    """SparseGPT: a pruned and updated copy of one ``(out, in)`` matrix (same dtype) given the ``(in, in)``
    Hessian of its inputs (``2 XᵀX / n``). As in the reference implementation: ``H`` dampened by ``damp``
    of its mean diagonal, inputs that never fire (zero diagonal) get weight 0, the upper Cholesky factor of
    ``H⁻¹`` gives each column's update, applied lazily in blocks of ``block`` columns."""
    if weight.ndim != 2:
        raise ConfigError(f"SparseGPT needs a 2-D weight matrix, got {name} of shape {tuple(weight.shape)}")
    out_f, in_f = weight.shape
    if hessian.shape != (in_f, in_f):
        raise ConfigError(f"SparseGPT: the Hessian must be ({in_f}, {in_f}) for {name} with {in_f} inputs, "
                          f"got {tuple(hessian.shape)}")
    if not bool(torch.isfinite(weight).all()):  # the Hessian's values are hessian_inverse's to check
        raise ConfigError(f"SparseGPT got a weight with NaN or infinite values ({name})")
    if n_m is not None:
        _check_groups(in_f, n_m[1], name)
        if block % n_m[1]:
            raise ConfigError(f"SparseGPT: block {block} must be a multiple of M={n_m[1]}")

    w = weight.detach().to(torch.float64).clone()
    try:  # GPTQ's: the same dampening, dead inputs and factor
        inverse = hessian_inverse(hessian, GPTQConfig(damp=damp))
    except ConfigError as exc:
        raise ConfigError(f"SparseGPT, {name}: {exc}") from None
    hinv, dead = inverse.upper, inverse.dead
    w[:, dead] = 0.0

    for b0 in range(0, in_f, block):
        b1 = min(b0 + block, in_f)
        w1 = w[:, b0:b1].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[b0:b1, b0:b1]
        diag_sq = torch.diagonal(hinv1).square()
        pruned = torch.zeros_like(w1, dtype=torch.bool)
        if n_m is None:
            # this block's exact share of the matrix's zeros (cumulative rounding: the total is exact)
            count = round(sparsity * out_f * b1) - round(sparsity * out_f * b0)
            if count:
                scores = (w1.square() / diag_sq).flatten()
                pruned.view(-1)[torch.topk(scores, count, largest=False).indices] = True
        for i in range(b1 - b0):
            if n_m is not None and i % n_m[1] == 0:
                n, m = n_m
                scores = w1[:, i:i + m].square() / diag_sq[i:i + m]
                pruned.scatter_(1, i + torch.topk(scores, m - n, dim=1, largest=False).indices, True)
            column = w1[:, i]
            q = column.masked_fill(pruned[:, i], 0.0)
            q1[:, i] = q
            err = (column - q) / hinv1[i, i]
            w1[:, i:] -= err.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w[:, b0:b1] = q1  # exact zeros where pruned
        w[:, b1:] -= err1 @ hinv[b0:b1, b1:]
    return w.to(weight.dtype)


def _check_groups(in_f: int, m: int, name: str) -> None:
    if in_f % m:
        raise ConfigError(f"N:M pruning: M={m} does not divide the input dimension {in_f} of {name}")


# ------------------------------------------------------------------------------------------ on the engine

# (name, float32 weight, its input statistics, config) -> the pruned weight
_Pruner = Callable[[str, torch.Tensor, InputStats, PruneConfig], torch.Tensor]

PRUNERS: dict[str, _Pruner] = {
    "magnitude": lambda name, w, stats, p: w.masked_fill(~magnitude_mask(w, p.target_sparsity, p.n_m, name), 0),
    "wanda": lambda name, w, stats, p: wanda_prune(w, stats, p.target_sparsity, p.n_m, name),
    "sparsegpt": lambda name, w, stats, p: sparsegpt_prune(w, stats.hessian, p.target_sparsity, p.n_m,
                                                           damp=p.damp, block=p.block, name=name),
}


def layer_method(prune: PruneConfig) -> Callable[[LayerContext], dict[str, Any]]:
    """A :data:`nnopt.llm.layerwise.LayerMethod` that prunes each chosen Linear of the layer in place (and
    returns no codes: with ``quantize=False`` the engine writes the weights as it leaves them)."""
    prune.validate()
    pruner = PRUNERS[prune.method]

    def method(context: LayerContext) -> dict[str, Any]:
        stats = context.stats  # the engine's own dict, read by no one after the method: each entry can go
        last = {id(stats[name]): name for name in context.linears}  # early, after its last matrix
        for name, module in context.linears.items():
            entry = stats[name]
            pruned = pruner(name, module.weight.detach().float(), entry, prune)
            with torch.no_grad():
                module.weight.copy_(pruned)
            del pruned
            if last[id(entry)] == name:
                for user in [n for n, e in stats.items() if e is entry]:
                    del stats[user]
            del entry
        return {}

    return method


def prune_checkpoint(
    src_dir: str | Path, out_dir: str | Path, prune: PruneConfig, *, calibration: CalibrationConfig | None = None,
    tokens: torch.Tensor | None = None, progress: streaming.ProgressFn | None = None, layers: Sequence[str] = (),
    shard_bytes: int = streaming.DEFAULT_SHARD_BYTES,
) -> dict[str, Any]:
    """Prune a Hugging Face safetensors checkpoint (Llama, Mistral, Qwen2/3) to ``out_dir`` layer by layer.

    ``layers`` (module names or ``re:`` patterns) narrows the default selection, the projections of every
    decoder layer (q/k/v/o, gate/up/down; never embeddings or ``lm_head``). Wanda and SparseGPT calibrate on
    ``tokens`` (``(k, window)`` ids) or the shipped calibration text cut as ``calibration`` says; magnitude
    reads no statistics and, given neither, carries two tokens only. Returns the engine's figures (seconds,
    peak RSS, ...) plus the sparsity measured in the written weights: ``sparsity`` (zeros / elements over
    every pruned matrix), ``sparsity_by_projection``, ``pruned_weights`` and, with N:M,
    ``pattern_holds`` (every group of M has at least M − N zeros)."""
    prune.validate()
    src = Path(src_dir)
    config = WeightQuantConfig(layers=tuple(layers))
    config.validate()
    chosen = _chosen(src, config)
    if prune.method == "magnitude" and calibration is None and tokens is None:
        tokens = torch.zeros(1, 2, dtype=torch.long)  # the engine carries something; magnitude reads nothing
    entry = {"method": prune.method, "sparsity": prune.target_sparsity, "pattern": prune.pattern,
             "scope": "per block of columns" if prune.method == "sparsegpt" and prune.n_m is None
             else "per output row" if prune.n_m is None else "per group of inputs",
             "layers": list(layers) or "decoder projections"}
    result = quantize_checkpoint_layerwise(
        src, out_dir, config, layer_method=layer_method(prune), method=f"nnopt-prune-{prune.method}",
        settings={"prune": dataclasses.asdict(prune)}, calibration=calibration, tokens=tokens, progress=progress,
        shard_bytes=shard_bytes, quantize=False, config_entries={CONFIG_ENTRY: entry})
    result.update(measured_sparsity(out_dir, chosen, prune.n_m))
    result["prune"] = dataclasses.asdict(prune)
    return result


def _chosen(src: Path, config: WeightQuantConfig) -> list[str]:
    """The weights the engine will hand to the method; refuses a selection reaching outside decoder layers
    (the engine carries no inputs there: ``lm_head`` would be written unpruned)."""
    names = [t.name for t in streaming._read_source(src) if streaming._selected(t, config, False)]
    outside = [n for n in names if not _LAYER.match(n)]
    if outside:
        raise ConfigError(f"pruning works on the decoder layers' Linear weights; the layers selection also picks "
                          f"{outside[0]!r}")
    return names


def measured_sparsity(out_dir: str | Path, names: Sequence[str], n_m: tuple[int, int] | None = None
                      ) -> dict[str, Any]:
    """Zeros counted in the written weights ``names`` of a checkpoint directory, one tensor at a time."""
    from safetensors import safe_open

    out = Path(out_dir)
    files = {t.name: t.file for t in streaming._read_source(out)}
    zeros: dict[str, int] = {}
    sizes: dict[str, int] = {}
    holds = True
    for name in names:
        with safe_open(str(out / files[name]), framework="pt") as fh:
            weight = fh.get_tensor(name)
        match = _LAYER.match(name)
        kind = match.group(2) if match else name
        is_zero = weight == 0
        zeros[kind] = zeros.get(kind, 0) + int(is_zero.sum())
        sizes[kind] = sizes.get(kind, 0) + weight.numel()
        if n_m is not None:
            holds &= bool((is_zero.reshape(-1, n_m[1]).sum(dim=1) >= n_m[1] - n_m[0]).all())
        del weight, is_zero
    total = sum(sizes.values())
    result: dict[str, Any] = {
        "sparsity": sum(zeros.values()) / total if total else 0.0,
        "sparsity_by_projection": {kind: zeros[kind] / sizes[kind] for kind in sorted(sizes)},
        "pruned_weights": len(names), "pruned_parameters": total,
    }
    if n_m is not None:
        result["pattern_holds"] = holds
    return result
