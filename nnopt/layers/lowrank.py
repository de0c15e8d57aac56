"""The low-rank Linear: a Linear replaced by two thinner ones (truncated SVD).

It is a container of two plain ``nn.Linear`` layers, so profile, energy, quantization and export
see and handle those as usual; it stores nothing compressed itself, so it needs no
:class:`~nnopt.layers.protocol.CompressedLayer` members. :mod:`nnopt.simplification.lowrank` creates it.
"""

from __future__ import annotations

import torch
from torch import nn


class LowRankLinear(nn.Module):
    """``x ↦ up(down(x))``: ``down`` is ``in → rank`` without bias, ``up`` is ``rank → out`` with the
    original layer's bias. Both are plain ``nn.Linear`` layers, so other passes (quantization,
    profiling) see and handle them as such."""

    def __init__(
        self, in_features: int, out_features: int, rank: int, bias: bool = True,
        device: torch.device | str | None = None, dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not 1 <= rank <= min(in_features, out_features):
            raise ValueError(f"rank must be in 1..{min(in_features, out_features)}, got {rank}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))  # (..., rank) in between

    def weight_product(self) -> torch.Tensor:
        """The rank-``r`` weight ``(out, in)`` the pair computes."""
        return self.up.weight @ self.down.weight

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"
