"""Low-rank factorization: a Linear's weight replaced by its truncated SVD, as two thinner Linears.

``W`` (out, in) ``= U S Vᵀ``; keeping the ``r`` largest singular values gives the best rank-``r``
approximation ``W_r = U_r S_r V_rᵀ`` (Eckart–Young), with squared Frobenius error
``‖W − W_r‖² = Σ_{i>r} σ_i²``. The layer becomes ``x ↦ (x V_r √S_r)(√S_r U_rᵀ) + b``: an ``in → r``
Linear without bias, then an ``r → out`` Linear with the original bias, costing ``r·(in + out)``
multiply-accumulates per row instead of ``in·out``. It pays only when ``r·(in + out) < in·out``;
other layers are left alone with the reason recorded. The result approximates the model: measure
its accuracy (and fine-tune if needed).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

from nnopt.config import Config
from nnopt.errors import ConfigError, ModelFormatError, SelectionError, UnsupportedModelError
from nnopt.layers.lowrank import LowRankLinear
from nnopt.lineage import AppliedPass
from nnopt.select import replace_layer, select_layers, validate_patterns
from nnopt.techniques import Technique, register_technique

PASS_NAME = "lowrank"


@dataclasses.dataclass(frozen=True)
class LowRankConfig(Config):
    """Replace selected ``nn.Linear`` layers by truncated-SVD factor pairs (:class:`LowRankLinear`).

    Set at most one of ``energy`` and ``rank`` (neither: energy 0.9). ``energy`` in (0, 1]: each
    layer keeps the smallest rank ``r`` whose singular values retain that share of the weight's
    energy, ``Σ_{i≤r} σ_i² / Σ_i σ_i² ≥ energy`` (never more than the weight's numerical rank, so
    ``energy=1.0`` reproduces a rank-deficient layer exactly). ``rank``: the same ``r`` for every
    layer (at most ``min(in, out)``). A layer where ``r·(in + out) ≥ in·out`` would cost as much as
    it saves and is skipped, with the reason recorded.

    ``layers`` selects layers (names, ``re:`` patterns, ``type:`` names; only ``nn.Linear`` layers
    among the matches are factorized); empty means every ``nn.Linear`` except the model's last (the
    classifier, usually the most sensitive).

    >>> by_energy = LowRankConfig(energy=0.95)
    >>> fixed = LowRankConfig(rank=192, layers=("re:intermediate\\\\.dense$",))
    """

    kind = "lowrank"
    energy: float | None = None
    rank: int | None = None
    layers: tuple[str, ...] = ()

    DEFAULT_ENERGY = 0.9

    @property
    def retained_energy(self) -> float | None:
        """The energy rule in force: ``energy``, or 0.9 when neither field is set; None with a rank."""
        if self.rank is not None:
            return None
        return self.DEFAULT_ENERGY if self.energy is None else self.energy

    def validate(self) -> None:
        if self.energy is not None and self.rank is not None:
            raise ConfigError(
                f"LowRankConfig.energy/rank: set one of them, not both (energy={self.energy!r}, rank={self.rank!r})"
            )
        if self.energy is not None and not 0.0 < self.energy <= 1.0:
            raise ConfigError(f"LowRankConfig.energy: must be in (0, 1], got {self.energy!r}")
        if self.rank is not None and self.rank < 1:
            raise ConfigError(f"LowRankConfig.rank: must be >= 1, got {self.rank!r}")
        validate_patterns(self.layers)


# --------------------------------------------------------------------------- pure maths


def energy_rank(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest ``r`` with ``Σ_{i≤r} σ_i² ≥ energy · Σ σ_i²`` (``singular_values`` sorted, descending)."""
    squares = singular_values.double() ** 2
    cumulative = torch.cumsum(squares, 0)
    total = cumulative[-1]
    if total <= 0:
        return 1
    r = int(torch.searchsorted(cumulative, energy * total, right=False)) + 1
    return min(r, singular_values.numel())


def numerical_rank(singular_values: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype) -> int:
    """Singular values above ``σ_1 · max(out, in) · eps(dtype)`` (torch.linalg.matrix_rank's rule):
    the rest are rounding noise of the stored weights."""
    tolerance = singular_values[0] * max(shape) * torch.finfo(dtype).eps
    return max(1, int((singular_values > tolerance).sum()))


def truncated_svd(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(up (out, r), down (r, in), singular values)`` with ``up @ down`` the best rank-``r``
    approximation of ``weight``; the singular values are split evenly (√S on each side) so both
    factors have similar scales. Computed in float64."""
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank], s


def macs_saved(rank: int, in_features: int, out_features: int) -> bool:
    return rank * (in_features + out_features) < in_features * out_features


# --------------------------------------------------------------------------- the pass


def _targets(model: nn.Module, patterns: tuple[str, ...]) -> list[tuple[str, nn.Linear]]:
    # The factors of an earlier factorization are Linears too, but not candidates.
    factor_names = {
        f"{name}.{child}" for name, m in model.named_modules() if isinstance(m, LowRankLinear)
        for child in ("down", "up")
    }
    linears = [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear and n not in factor_names]
    if not patterns:
        if len(linears) < 2:
            raise SelectionError(
                "LowRankConfig.layers: the model has no nn.Linear besides its last (the classifier, which the "
                "default keeps); name the layers to factorize"
            )
        return linears[:-1]
    chosen = {n for n, _ in select_layers(model, patterns)}
    found = [(n, m) for n, m in linears if n in chosen]
    if not found:
        raise SelectionError(f"LowRankConfig.layers: {list(patterns)} select no nn.Linear layer")
    return found


def _rank(s: torch.Tensor, weight: torch.Tensor, config: LowRankConfig) -> int:
    full = min(weight.shape)
    if config.rank is not None:
        return min(config.rank, full)
    energy = config.retained_energy
    assert energy is not None
    return min(energy_rank(s, energy), numerical_rank(s, tuple(weight.shape), weight.dtype))


def factorize(model: nn.Module, config: LowRankConfig, **context: Any) -> dict[str, Any]:
    """Replace the selected Linears in place; returns the rank of each and why others stayed.

    Every selected layer is checked before any is replaced, so a failure leaves the model as it was.
    """
    targets = _targets(model, config.layers)
    for name, module in targets:
        if not bool(torch.isfinite(module.weight).all()):
            raise UnsupportedModelError(f"layer {name!r} has NaN or infinite weights; low-rank cannot take them")
    layers: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    for name, module in targets:
        weight = module.weight.detach()  # (out, in)
        out_features, in_features = weight.shape
        up, down, s = truncated_svd(weight, min(weight.shape))
        rank = _rank(s, weight, config)
        if not macs_saved(rank, in_features, out_features):
            skipped[name] = (f"rank {rank}: r·(in+out) = {rank * (in_features + out_features)} >= in·out = "
                             f"{in_features * out_features} multiply-accumulates, no saving")
            continue
        squares = s**2
        total = float(squares.sum())
        retained = float(squares[:rank].sum()) / total if total > 0 else 1.0
        new = LowRankLinear(in_features, out_features, rank, bias=module.bias is not None,
                            device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            new.up.weight.copy_(up[:, :rank].to(weight.dtype))
            new.down.weight.copy_(down[:rank].to(weight.dtype))
            if module.bias is not None:
                new.up.bias.copy_(module.bias.detach())
        new.train(module.training)
        replace_layer(model, name, new)
        layers[name] = {
            "rank": rank, "in": int(in_features), "out": int(out_features),
            "energy_retained": retained,
            "relative_error": math.sqrt(max(0.0, 1.0 - retained)),  # ‖W − W_r‖_F / ‖W‖_F
            "macs_ratio": rank * (in_features + out_features) / (in_features * out_features),
        }
    return {"layers": layers, "skipped": skipped}


def replay(model: nn.Module, applied: AppliedPass) -> None:
    """Re-create the recorded factor pairs on a fresh model (their values come from the saved weights)."""
    layers = applied.details.get("layers", {})
    if not isinstance(layers, dict):
        raise ModelFormatError(f"pass {applied.name!r}: 'layers' must map layer names to ranks")
    for name, info in layers.items():
        try:
            module = model.get_submodule(name)
            rank = int(info["rank"])
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise ModelFormatError(f"pass {applied.name!r}: bad record for {name!r}: {exc!r}") from None
        if type(module) is not nn.Linear:
            raise ModelFormatError(f"pass {applied.name!r}: recorded low-rank layer {name!r} is a "
                                   f"{type(module).__name__}, not Linear")
        try:
            new = LowRankLinear(module.in_features, module.out_features, rank, bias=module.bias is not None,
                                device=module.weight.device, dtype=module.weight.dtype)
        except ValueError as exc:
            raise ModelFormatError(f"pass {applied.name!r}: layer {name!r}: {exc}") from None
        replace_layer(model, name, new)


register_technique(Technique(LowRankConfig, "simplify", factorize, replay))
