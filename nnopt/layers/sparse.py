"""The sparse (CSR) Linear layer: a pruned Linear's weight in compressed sparse row form.

Row offsets, column indices and the non-zero values (32-bit indices when they fit), multiplied with
the sparse kernels torch ships (MKL on x86 CPUs): ``addmv`` for one sample, the transposed product
``(W_csr @ xᵀ)ᵀ`` for a batch. Which layers take it is measured by :mod:`nnopt.sparse.kernels`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from nnopt.layers.protocol import KernelCost, float_dtype_name, linear_macs, own_bytes

_INT32_MAX = 2**31 - 1
_BETA_WARNING = "Sparse CSR tensor support is in beta state"


class _CsrCache:
    """The assembled CSR tensor per inference-mode state, remembered with the buffers it views.

    torch cannot deep-copy or pickle a CSR tensor's storage, so copies and pickles of the cache
    start empty and are rebuilt from the (copied) buffers on first use.
    """

    __slots__ = ("entries",)

    def __init__(self) -> None:
        self.entries: dict[bool, tuple[tuple[torch.Tensor, ...], torch.Tensor]] = {}

    def __deepcopy__(self, memo: dict[int, Any]) -> _CsrCache:
        return _CsrCache()

    def __reduce__(self) -> tuple[type, tuple[()]]:
        return (_CsrCache, ())


class SparseLinear(nn.Module):
    """``y = x Wᵀ + b`` with ``W`` stored only as CSR (``weight_crow_indices``, ``weight_col_indices``,
    ``weight_values``); for inference.

    The three CSR parts are non-persistent buffers, so ``.to()``, ``.double()`` and ``copy.deepcopy``
    work (torch cannot deep-copy a CSR tensor itself); the CSR tensor viewing them is assembled
    once and cached until a buffer is replaced. ``state_dict()`` yields the dense float ``weight``
    (out, in) and ``bias`` like ``nn.Linear``; ``load_state_dict`` converts a dense ``weight`` to CSR.

    >>> sparse = SparseLinear.from_linear(pruned.fc1)  # doctest: +SKIP
    """

    weight_crow_indices: torch.Tensor
    weight_col_indices: torch.Tensor
    weight_values: torch.Tensor

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        """An all-zero weight of shape (out_features, in_features); load or set weights afterwards."""
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        dtype = dtype or torch.get_default_dtype()
        self.register_buffer("weight_crow_indices", torch.zeros(out_features + 1, dtype=torch.int32, device=device),
                             persistent=False)
        self.register_buffer("weight_col_indices", torch.zeros(0, dtype=torch.int32, device=device), persistent=False)
        self.register_buffer("weight_values", torch.zeros(0, dtype=dtype, device=device), persistent=False)
        bias_param = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        self.register_parameter("bias", bias_param)
        self._csr_cache = _CsrCache()

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> SparseLinear:
        weight = linear.weight.detach()
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, weight.dtype, weight.device)
        module.set_weight(weight)
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        return module

    # -- the weight ---------------------------------------------------------------------------
    def set_weight(self, dense: torch.Tensor) -> None:
        """Store ``dense`` (out, in) as CSR, keeping this module's value dtype and device."""
        if tuple(dense.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight must have shape {(self.out_features, self.in_features)}, "
                             f"got {tuple(dense.shape)}")
        if dense.is_sparse or dense.layout != torch.strided:
            dense = dense.to_dense()
        dense = dense.detach().to(device=self.weight_values.device, dtype=self.weight_values.dtype)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", _BETA_WARNING, UserWarning)
            csr = dense.to_sparse_csr()
        crow, col = csr.crow_indices(), csr.col_indices()
        small = col.numel() <= _INT32_MAX and max(self.in_features, self.out_features) <= _INT32_MAX
        index_dtype = torch.int32 if small else torch.int64
        self.weight_crow_indices = crow.to(index_dtype)
        self.weight_col_indices = col.to(index_dtype)
        self.weight_values = csr.values()

    def sparse_weight(self) -> torch.Tensor:
        """The weight as a torch CSR tensor (shares memory with the buffers; cached)."""
        buffers = self._buffers  # direct: Module.__getattr__ costs about a microsecond per name
        parts = (buffers["weight_crow_indices"], buffers["weight_col_indices"], buffers["weight_values"])
        # A tensor made in inference mode must not reach autograd, so each mode has its own.
        mode = torch.is_inference_mode_enabled()
        entry = self._csr_cache.entries.get(mode)
        if entry is not None:
            (crow, col, values), csr = entry
            if crow is parts[0] and col is parts[1] and values is parts[2]:
                return csr
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", _BETA_WARNING, UserWarning)
            csr = torch.sparse_csr_tensor(*parts, (self.out_features, self.in_features), check_invariants=False)
        # Keep the other mode's tensor only if it views these same buffers (not replaced ones).
        entries = {m: e for m, e in self._csr_cache.entries.items() if _same(e[0], parts)}
        entries[mode] = (parts, csr)
        self._csr_cache.entries = entries
        return csr

    @property
    def weight(self) -> torch.Tensor:
        """The weight as a CSR tensor (read-only); ``dense_weight()`` gives a dense copy."""
        return self.sparse_weight()

    def dense_weight(self) -> torch.Tensor:
        """A dense copy of the weight (made on request; the module never keeps one)."""
        return self.sparse_weight().to_dense()

    # -- the compressed-layer protocol ----------------------------------------------------------
    keras_layer = "Dense"

    @property
    def weight_storage(self) -> str:
        return f"csr {str(self.weight_values.dtype).removeprefix('torch.')}"

    def weight_codes(self) -> None:
        return None  # float values

    def stored_codes(self) -> dict[str, int]:
        return {}  # the state dict holds nn.Linear's dense weight

    def macs(self, output: torch.Tensor) -> int:
        return linear_macs(self.in_features, output)

    def kernel_cost(self, inputs: Sequence[torch.Tensor], output: torch.Tensor) -> KernelCost:
        """One MAC per stored non-zero per row."""
        rows = output.numel() // self.out_features if self.out_features else 0
        return KernelCost("csr", float_dtype_name(self.weight_values.dtype), self.nonzeros * rows, own_bytes(self))

    def check_loaded(self) -> None:
        """The CSR parts are rebuilt from the loaded dense weight, so they hold no foreign indices."""

    @property
    def nonzeros(self) -> int:
        return int(torch.count_nonzero(self.weight_values))

    @property
    def density(self) -> float:
        numel = self.in_features * self.out_features
        return self.nonzeros / numel if numel else 0.0

    # -- compute ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.sparse_weight()
        bias = self._parameters["bias"]
        rows = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        if rows.shape[0] == 1:
            # One sample: sparse matrix × vector (MKL's mv is several times faster than mm here).
            y = torch.mv(weight, rows[0]) if bias is None else torch.addmv(bias, weight, rows[0])
            y = y.unsqueeze(0)
        else:
            # (W xᵀ)ᵀ: CSR on the left is MKL's fast path; x @ W_csrᵀ (dense @ sparse) is far slower.
            xt = rows.t()
            y = torch.mm(weight, xt) if bias is None else torch.addmm(bias.unsqueeze(1), weight, xt)
            y = y.t().contiguous()  # nn.Linear's output layout, so callers may .view() it
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)

    # -- state_dict in nn.Linear's format -----------------------------------------------------
    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        destination[prefix + "weight"] = self.dense_weight()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any],
                              strict: bool, missing_keys: list[str], unexpected_keys: list[str],
                              error_msgs: list[str]) -> None:
        key = prefix + "weight"
        if key in state_dict:
            dense = state_dict[key]
            want = (self.out_features, self.in_features)
            if not isinstance(dense, torch.Tensor):
                error_msgs.append(f"{key}: expected a tensor, got {type(dense).__name__}")
            elif tuple(dense.shape) != want:
                error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(dense.shape)} "
                                  f"from checkpoint, the shape in current model is {torch.Size(want)}.")
            else:
                with torch.no_grad():
                    self.set_weight(dense)
        elif strict:
            missing_keys.append(key)
        rest = {k: v for k, v in state_dict.items() if k != key}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, nnz={self.weight_values.numel()}, layout=csr")


def _same(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> bool:
    return all(x is y for x, y in zip(a, b))
