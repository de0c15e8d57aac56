"""``nn.MultiheadAttention`` whose projection matrices are child modules holding codes (weight-only
quantization) or a codebook: each call rebuilds the float matrices and runs torch's own
``F.multi_head_attention_forward`` (the general path of ``nn.MultiheadAttention.forward``), so masks,
``batch_first``, ``bias_k``/``bias_v``, ``add_zero_attn`` and separate key/value sizes behave as in torch.

Children are named after the source's parameters: ``in_proj_weight`` (or ``q_proj_weight``,
``k_proj_weight``, ``v_proj_weight``) and ``out_proj_weight`` (``out_proj.weight``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nnopt.layers.protocol import attention_macs

OUT_PROJ = "out_proj_weight"


def attention_matrices(source: nn.MultiheadAttention) -> dict[str, torch.Tensor]:
    """The projection matrices of ``source`` by the child names :class:`MultiheadAttentionParts` gives them."""
    names = ("in_proj_weight",) if source._qkv_same_embed_dim else ("q_proj_weight", "k_proj_weight", "v_proj_weight")
    matrices = {name: getattr(source, name) for name in names}
    matrices[OUT_PROJ] = source.out_proj.weight
    return matrices


class MultiheadAttentionParts(nn.Module):
    """An ``nn.MultiheadAttention`` with compressed projection matrices (``parts``: name → module with
    ``dense_weight()``); biases stay float parameters."""

    def __init__(self, source: nn.MultiheadAttention, parts: Mapping[str, nn.Module]) -> None:
        super().__init__()
        expected = set(attention_matrices(source))
        if set(parts) != expected:
            raise ValueError(f"attention parts must be {sorted(expected)}, got {sorted(parts)}")
        self.embed_dim, self.num_heads, self.dropout = source.embed_dim, source.num_heads, source.dropout
        self.batch_first, self.add_zero_attn = source.batch_first, source.add_zero_attn
        self.separate_qkv = not source._qkv_same_embed_dim
        for name, part in parts.items():
            self.add_module(name, part)
        for name in ("in_proj_bias", "bias_k", "bias_v"):
            value = getattr(source, name)
            self.register_parameter(name, None if value is None else nn.Parameter(value.detach().clone()))
        bias = source.out_proj.bias
        self.out_proj_bias = None if bias is None else nn.Parameter(bias.detach().clone())

    def composite_macs(self, output: Any, args: Sequence[Any]) -> int:
        """MACs of one call, as the dense ``nn.MultiheadAttention`` it stands for."""
        names = ("k_proj_weight", "v_proj_weight") if self.separate_qkv else ("in_proj_weight", "in_proj_weight")
        kdim, vdim = (int(getattr(self, n).dense_weight().shape[-1]) for n in names)
        return attention_macs(self.embed_dim, kdim, vdim, self.batch_first, output, args)

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True, attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        key_padding_mask = F._canonical_mask(
            mask=key_padding_mask, mask_name="key_padding_mask", other_type=F._none_or_dtype(attn_mask),
            other_name="attn_mask", target_type=query.dtype)
        attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                      target_type=query.dtype, check_other=False)
        batched = query.dim() == 3
        if self.batch_first and batched:  # the functional form is sequence-first
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        parts: Any = self
        if self.separate_qkv:
            in_proj, projections = None, (parts.q_proj_weight.dense_weight(), parts.k_proj_weight.dense_weight(),
                                          parts.v_proj_weight.dense_weight())
        else:
            in_proj, projections = parts.in_proj_weight.dense_weight(), (None, None, None)
        out, weights = F.multi_head_attention_forward(
            query, key, value, self.embed_dim, self.num_heads, in_proj, parts.in_proj_bias, parts.bias_k, parts.bias_v,
            self.add_zero_attn, self.dropout, parts.out_proj_weight.dense_weight(), self.out_proj_bias,
            training=self.training, key_padding_mask=key_padding_mask, need_weights=need_weights,
            attn_mask=attn_mask, use_separate_proj_weight=self.separate_qkv, q_proj_weight=projections[0],
            k_proj_weight=projections[1], v_proj_weight=projections[2], average_attn_weights=average_attn_weights,
            is_causal=is_causal)
        if self.batch_first and batched:
            out = out.transpose(0, 1)
        return out, weights

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}"
