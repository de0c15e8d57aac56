"""N:M semi-structured sparsity: in every group of M consecutive input weights, N are kept.

Groups run along the input dimension (in_features, or in_channels of a conv at each kernel
position), the layout that sparse tensor cores and 2:4 kernels expect.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from nnopt.config import Config
from nnopt.errors import ConfigError
from nnopt.pruning.masks import apply_masks
from nnopt.pruning.targets import layer_stats, prune_targets
from nnopt.select import validate_patterns
from nnopt.techniques import Technique, register_technique

NM_PASS = "prune-nm"


@dataclasses.dataclass(frozen=True)
class NMPruneConfig(Config):
    kind = "prune-nm"
    n: int = 2
    m: int = 4
    layers: tuple[str, ...] = ()

    def validate(self) -> None:
        if not 1 <= self.n < self.m:
            raise ConfigError(f"N:M needs 1 <= N < M, got {self.n}:{self.m}")
        validate_patterns(self.layers)


def grouped_view(weight: torch.Tensor, m: int, name: str) -> torch.Tensor:
    """(groups, m) view with each row one group of m consecutive input weights."""
    fan_in = _channels_last(weight).shape[-1]
    if fan_in % m:
        raise ConfigError(f"layer {name!r}: M={m} does not divide its input dimension {fan_in}")
    return _channels_last(weight).reshape(-1, m)


def _channels_last(weight: torch.Tensor) -> torch.Tensor:
    # A convolution's (out, in, *kernel) weight as (out, *kernel, in): groups run along the input channels.
    return weight.movedim(1, -1) if weight.ndim >= 3 else weight


def nm_mask(weight: torch.Tensor, n: int, m: int, name: str = "weight") -> torch.Tensor:
    """Keep-mask with exactly n largest-magnitude weights in each group of m."""
    groups = grouped_view(weight.detach().abs(), m, name)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(1, torch.topk(groups, n, dim=1).indices, True)
    keep = keep.view(_channels_last(weight).shape)
    return keep.movedim(-1, 1) if weight.ndim >= 3 else keep


def prune_nm(model: nn.Module, config: NMPruneConfig, **_: Any) -> dict[str, Any]:
    targets = prune_targets(model, config.layers)
    skipped = {}
    if not config.layers:  # by default, weights whose input dimension M does not divide are left dense
        fits = [(name, w) for name, w in targets if _channels_last(w).shape[-1] % config.m == 0]
        skipped = {name: f"input dimension {_channels_last(w).shape[-1]} is not a multiple of M={config.m}"
                   for name, w in targets if (name, w) not in fits}
        if not fits:
            raise ConfigError(f"M={config.m} does not divide the input dimension of any layer: " + "; ".join(
                f"{name}: {why}" for name, why in list(skipped.items())[:5]))
        targets = fits
    masks = {name: nm_mask(weight, config.n, config.m, name) for name, weight in targets}
    apply_masks(targets, masks)  # only after every layer's masks are known: a bad layer changes nothing
    return {"pattern": f"{config.n}:{config.m}", **layer_stats(targets), **({"skipped": skipped} if skipped else {})}


register_technique(Technique(NMPruneConfig, "prune", prune_nm))  # values only: nothing to replay
