"""Layers that hold several weight matrices (``nn.LSTM``, ``nn.GRU``, ``nn.MultiheadAttention``): their
matrices by name, and the nnopt layer that computes with compressed versions of them.

Weight-only quantization and clustering compress each matrix into a child module (codes or a codebook)
and wrap them with :class:`~nnopt.layers.recurrent.RecurrentParts` or
:class:`~nnopt.layers.attention_parts.MultiheadAttentionParts`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from nnopt.errors import UnsupportedModelError
from nnopt.layers.attention_parts import MultiheadAttentionParts, attention_matrices
from nnopt.layers.recurrent import RecurrentParts, RNNShape

MULTI_MATRIX_TYPES: tuple[type[nn.Module], ...] = (nn.LSTM, nn.GRU, nn.MultiheadAttention)


def matrices(module: nn.Module) -> dict[str, torch.Tensor]:
    """The weight matrices of an LSTM/GRU (``weight_ih_l0``, ...) or attention (``in_proj_weight``, ...)."""
    if isinstance(module, nn.MultiheadAttention):
        return attention_matrices(module)
    shape = RNNShape.of(module)
    return {name: getattr(module, name) for name in shape.weight_names()}


def assemble(module: nn.Module, parts: Mapping[str, nn.Module]) -> nn.Module:
    """The nnopt layer standing for ``module`` whose matrices are ``parts``."""
    if isinstance(module, nn.MultiheadAttention):
        return MultiheadAttentionParts(module, parts)
    return RecurrentParts(module, parts)


def refusal(module: nn.Module) -> str | None:
    """Why a multi-matrix layer cannot be compressed, or None."""
    if type(module) in (nn.LSTM, nn.GRU):
        try:
            RNNShape.of(module)
        except UnsupportedModelError as exc:
            return str(exc)
    return None
