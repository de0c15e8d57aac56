"""Masks that keep pruned weights at exactly zero through fine-tuning.

Masks live in a training callback, never in the model: after each optimizer step the callback
multiplies the weights by their masks (Adam's momentum would otherwise revive them). When
training ends, the model holds plain dense weights with zeros: no mask tensors, no copies.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from nnopt.pruning.targets import Target, target_weight, weight_names


def apply_masks(targets: Sequence[Target], masks: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, weight in targets:
            zero_where_dropped(weight, masks[name])


def zero_where_dropped(weight: torch.Tensor, keep: torch.Tensor) -> None:
    # masked_fill writes +0.0; multiplying by the mask would leave -0.0 for negative weights, which
    # is a distinct bit pattern that the packed format (exact to the bit) would have to store.
    weight.masked_fill_(~keep, 0.0)


class MaskKeeper:
    """A training callback (``after_step``) that re-applies fixed keep-masks."""

    def __init__(self, masks: dict[str, torch.Tensor]) -> None:
        self.masks = masks

    @classmethod
    def from_zeros(cls, model: nn.Module) -> MaskKeeper:
        """Masks from the zeros already in every prunable weight that has any."""
        masks = {}
        for name, module in model.named_modules():
            for param in weight_names(module):
                weight = getattr(module, param)
                if bool((weight == 0).any()):
                    masks[name if param == "weight" else f"{name}.{param}"] = weight.detach() != 0
        return cls(masks)

    def after_step(self, model: nn.Module) -> None:
        with torch.no_grad():
            for name, mask in self.masks.items():
                zero_where_dropped(target_weight(model, name), mask)
