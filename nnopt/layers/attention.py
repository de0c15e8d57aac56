"""Multi-head attention with separate q/k/v/out projections, so whole heads can be cut.

``nn.MultiheadAttention`` keeps q, k and v in one ``in_proj_weight`` and assumes an inner width
equal to ``embed_dim``; removing heads from it is impossible. :class:`SplitMultiheadAttention` is
a drop-in replacement with the same ``forward`` signature and results, whose four projections are
ordinary ``nn.Linear`` layers of inner width ``heads · head_dim`` (which may be smaller than
``embed_dim``). :func:`split_multihead_attention` builds one from an ``nn.MultiheadAttention``
with equal outputs.

    >>> import torch
    >>> from torch import nn
    >>> mha = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    >>> split = split_multihead_attention(mha)
    >>> x = torch.randn(2, 5, 16)
    >>> torch.allclose(mha(x, x, x)[0], split(x, x, x)[0], atol=1e-5)
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nnopt.errors import ConfigError, UnsupportedModelError
from nnopt.layers.protocol import attention_score_macs


class SplitMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` with q/k/v/out as separate ``nn.Linear`` layers.

    ``heads`` and ``head_dim`` give the inner width ``heads · head_dim`` of ``q_proj``, ``k_proj``
    and ``v_proj`` (rows) and ``out_proj`` (columns); the scale stays ``head_dim ** -0.5`` when
    heads are removed. Returns ``(output, weights)``: weights (averaged over heads unless
    ``average_attn_weights=False``) only with ``need_weights=True``, else ``None``.
    """

    def __init__(
        self, embed_dim: int, heads: int, head_dim: int, *, kdim: int | None = None, vdim: int | None = None,
        bias: bool = True, dropout: float = 0.0, batch_first: bool = False,
    ) -> None:
        super().__init__()
        if heads < 1 or head_dim < 1:
            raise ConfigError(f"SplitMultiheadAttention needs heads and head_dim >= 1, got {heads} and {head_dim}")
        inner = heads * head_dim
        self.embed_dim, self.heads, self.head_dim = embed_dim, heads, head_dim
        self.dropout, self.batch_first = dropout, batch_first
        self.q_proj = nn.Linear(embed_dim, inner, bias=bias)
        self.k_proj = nn.Linear(kdim or embed_dim, inner, bias=bias)
        self.v_proj = nn.Linear(vdim or embed_dim, inner, bias=bias)
        self.out_proj = nn.Linear(inner, embed_dim, bias=bias)

    def own_macs(self, output: Any, args: Sequence[Any]) -> int:
        """MACs of its own beside its projection layers' (counted as theirs): scores and the mix of values."""
        return attention_score_macs(self.heads * self.head_dim, self.batch_first, output, args)

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
        attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True, is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        unbatched = query.dim() == 2
        if unbatched:  # (L, E): one sequence
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        elif not self.batch_first:  # (L, N, E) → (N, L, E)
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        n, length, source = query.shape[0], query.shape[1], key.shape[1]
        q = self._split(self.q_proj(query))  # (n, heads, L, head_dim)
        k = self._split(self.k_proj(key))  # (n, heads, S, head_dim)
        v = self._split(self.v_proj(value))
        mask = self._mask(attn_mask, key_padding_mask, n, length, source, q.dtype)
        dropout = self.dropout if self.training else 0.0
        causal = is_causal and mask is None  # nn.MultiheadAttention treats is_causal as a hint beside attn_mask
        weights = None
        if need_weights:
            scores = q @ k.transpose(-2, -1) * self.head_dim**-0.5  # (n, heads, L, S)
            if mask is not None:
                scores = scores + mask
            elif causal:
                scores = scores.masked_fill(torch.ones(length, source, dtype=torch.bool).triu(1), float("-inf"))
            weights = scores.softmax(dim=-1)
            out = F.dropout(weights, dropout, self.training) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)
        out = self.out_proj(out.transpose(1, 2).reshape(n, length, self.heads * self.head_dim))  # (n, L, E)
        if unbatched:
            out = out.squeeze(0)
            weights = None if weights is None else weights.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=-3)
        return out, weights

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        heads: torch.Tensor = x.unflatten(-1, (self.heads, self.head_dim))  # (n, L, heads, head_dim)
        return heads.transpose(1, 2)

    def _mask(
        self, attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None, n: int, length: int,
        source: int, dtype: torch.dtype,
    ) -> torch.Tensor | None:
        """One additive float mask broadcastable to (n, heads, L, S); True in a bool mask means "masked"."""
        mask = None
        if attn_mask is not None:
            mask = _additive(attn_mask, dtype)
            if mask.dim() == 3:  # (n · heads, L, S): one mask per head, heads as they are now
                if mask.shape[0] != n * self.heads:
                    raise ConfigError(f"attn_mask has {mask.shape[0]} per-head masks; this attention has "
                                      f"{n} × {self.heads} (heads were removed?)")
                mask = mask.view(n, self.heads, length, source)
        if key_padding_mask is not None:
            padding = _additive(key_padding_mask, dtype).view(n, 1, 1, source)
            mask = padding if mask is None else mask + padding
        return mask

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, heads={self.heads}, head_dim={self.head_dim}, "
                f"batch_first={self.batch_first}")


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def split_refusal(mha: nn.MultiheadAttention) -> str:
    """Why ``mha`` cannot become a :class:`SplitMultiheadAttention` ("" when it can)."""
    if mha.bias_k is not None or mha.bias_v is not None:
        return "nn.MultiheadAttention with add_bias_kv=True"
    if mha.add_zero_attn:
        return "nn.MultiheadAttention with add_zero_attn=True"
    return ""


def split_multihead_attention(mha: nn.MultiheadAttention) -> SplitMultiheadAttention:
    """A :class:`SplitMultiheadAttention` computing what ``mha`` computes (same weights, split)."""
    reason = split_refusal(mha)
    if reason:
        raise UnsupportedModelError(f"cannot split {reason} into separate projections")
    e, heads = mha.embed_dim, mha.num_heads
    reference = mha.out_proj.weight
    split = SplitMultiheadAttention(
        e, heads, mha.head_dim, kdim=mha.kdim, vdim=mha.vdim, bias=mha.in_proj_bias is not None,
        dropout=mha.dropout, batch_first=mha.batch_first,
    ).to(device=reference.device, dtype=reference.dtype)
    packed: torch.Tensor | None = getattr(mha, "in_proj_weight", None)  # None when kdim/vdim differ
    if packed is not None:  # (3E, E): q | k | v rows
        weights = packed.detach().split(e, dim=0)
    else:
        weights = (mha.q_proj_weight.detach(), mha.k_proj_weight.detach(), mha.v_proj_weight.detach())
    biases = mha.in_proj_bias.detach().split(e) if mha.in_proj_bias is not None else (None, None, None)
    with torch.no_grad():
        for layer, weight, bias in zip((split.q_proj, split.k_proj, split.v_proj), weights, biases):
            layer.weight.copy_(weight)
            if bias is not None:
                layer.bias.copy_(bias)
        split.out_proj.weight.copy_(mha.out_proj.weight.detach())
        if mha.out_proj.bias is not None:
            split.out_proj.bias.copy_(mha.out_proj.bias.detach())
    split.train(mha.training)
    return split


def empty_split_like(mha: nn.MultiheadAttention) -> SplitMultiheadAttention:
    """A :class:`SplitMultiheadAttention` of ``mha``'s shapes with fresh values (replay on load:
    the saved weights fill it)."""
    return SplitMultiheadAttention(
        mha.embed_dim, mha.num_heads, mha.head_dim, kdim=mha.kdim, vdim=mha.vdim,
        bias=mha.in_proj_bias is not None, dropout=mha.dropout, batch_first=mha.batch_first,
    ).to(device=mha.out_proj.weight.device, dtype=mha.out_proj.weight.dtype)
