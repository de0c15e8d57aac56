"""Calibration observers: watch activations (or weights) batch by batch, then propose ``(S, z)``.

Each observer has one job: turn what it saw into a clipping range ``[lo, hi]``. The range becomes
``(S, z)`` through :func:`nnopt.layers.primitives.qparams_from_range`, the same formula the
weight path uses.

>>> obs = make_observer("percentile", percentile=99.9)
>>> for batch in torch.randn(4, 32, 16):  # calibration activations, (rows, features) each
...     obs.update(batch)
>>> scale, zero = obs.qparams(bits=8, symmetric=False)

- ``minmax``: the exact running min and max (optionally per channel). Outliers stretch the range.
- ``percentile``: clips at a percentile of a bounded uniform sample, so one outlier does not.
- ``mse``: picks the clipping range that minimises the mean squared quantization error.
"""

from __future__ import annotations

import abc
import inspect
from typing import Any

import torch

from nnopt.errors import ConfigError
from nnopt.layers import primitives as P

NO_DATA = "observer saw no data: the calibration set is empty"

# Values go through the reservoir in chunks so that the temporary keys stay small for big activations.
_CHUNK = 1 << 20
# torch.quantile refuses inputs above 2**24 elements.
_MAX_SAMPLE = 1 << 24


def _checked(x: Any) -> torch.Tensor:
    """``x`` detached, after rejecting what cannot be calibrated on (empty, complex, NaN/inf)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"observer.update expects a torch.Tensor, got {type(x).__name__}")
    if x.is_complex() or x.dtype == torch.bool:
        raise ValueError(f"observer needs real numbers, got a tensor of dtype {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"observer got an empty tensor (shape {tuple(x.shape)}); every batch must hold values")
    x = x.detach()
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"observer got {bad} non-finite value(s) (NaN or inf) in a batch of {x.numel()}")
    return x


class Reservoir:
    """A uniform random sample of at most ``size`` values out of everything added (float64).

    Bottom-k sampling: every value gets a random key and the ``size`` smallest keys are kept, so the
    sample is uniform over all batches however they are split, and memory stays ``O(size)``.
    Seeded with its own generator: no global random state is touched.
    """

    def __init__(self, size: int = 1 << 17, seed: int = 0) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= _MAX_SAMPLE:
            raise ConfigError(f"sample_size must be an integer in 1..{_MAX_SAMPLE}, got {size!r}")
        self.size = size
        self._generator = torch.Generator().manual_seed(seed)
        self._values = torch.empty(0, dtype=torch.float64)
        self._keys = torch.empty(0, dtype=torch.float64)

    @property
    def values(self) -> torch.Tensor:
        """The sample, shape ``(min(size, values added),)``, in no particular order."""
        return self._values

    def add(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1)
        for start in range(0, flat.numel(), _CHUNK):
            chunk = flat[start : start + _CHUNK]
            keys = torch.rand(chunk.numel(), generator=self._generator, dtype=torch.float64)
            if self._keys.numel() == self.size:
                # Full: only keys below the largest kept one can enter (few, once many values were seen).
                enter = keys < self._keys.max()
                chunk, keys = chunk[enter], keys[enter]
            keys = torch.cat((self._keys, keys))
            values = torch.cat((self._values, chunk.to(torch.float64)))
            if keys.numel() > self.size:
                keys, index = torch.topk(keys, self.size, largest=False, sorted=False)
                values = values[index]
            self._keys, self._values = keys, values


class Observer(abc.ABC):
    """Base class: :meth:`update` accumulates batches, :meth:`qparams` turns them into ``(S, z)``.

    ``count`` is the number of values seen.
    """

    def __init__(self) -> None:
        self.count = 0

    def update(self, x: torch.Tensor) -> None:
        """Accumulate one batch; raises ValueError for an empty tensor or NaN/inf values."""
        x = _checked(x)
        self._observe(x)
        self.count += x.numel()

    def clip_range(self, bits: int = 8, symmetric: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """The range ``(lo, hi)`` (float64 tensors) that the quantizer should represent."""
        P.check_quant_bits(bits)
        if self.count == 0:
            raise ValueError(NO_DATA)
        return self._range(bits, symmetric)

    def qparams(self, bits: int = 8, symmetric: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale multiplier ``S`` (float32) and zero point ``z`` (int32) for the data seen so far."""
        lo, hi = self.clip_range(bits, symmetric)
        return P.qparams_from_range(lo, hi, bits, symmetric)

    @abc.abstractmethod
    def _observe(self, x: torch.Tensor) -> None: ...

    @abc.abstractmethod
    def _range(self, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]: ...


class MinMaxObserver(Observer):
    """Exact running minimum and maximum, per tensor or per slice along ``channel_axis``.

    Per channel, ``lo``/``hi`` and the qparams keep the batches' dimensions (size 1 except the
    channel axis), so they broadcast against the observed tensors: ``(1, C)`` for ``(batch, C)``.
    """

    def __init__(self, channel_axis: int | None = None) -> None:
        super().__init__()
        if channel_axis is not None and (isinstance(channel_axis, bool) or not isinstance(channel_axis, int)):
            raise ConfigError(f"channel_axis must be an integer or None, got {channel_axis!r}")
        self.channel_axis = channel_axis
        self._lo: torch.Tensor | None = None
        self._hi: torch.Tensor | None = None

    def _observe(self, x: torch.Tensor) -> None:
        if self.channel_axis is None:
            # 0-dim: broadcasts against anything.
            lo, hi = x.amin(), x.amax()
        else:
            if not -x.ndim <= self.channel_axis < x.ndim:
                raise ValueError(f"channel_axis {self.channel_axis} is out of range for a {x.ndim}-d tensor")
            dims = P.reduce_dims(x, self.channel_axis)
            # dims == () (a 1-D tensor): every element is its own channel; amin(dim=()) would reduce all.
            lo, hi = (x, x) if not dims else (x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True))
        lo, hi = lo.to(torch.float64), hi.to(torch.float64)  # exact: min/max only pick values
        if self._lo is None or self._hi is None:
            self._lo, self._hi = lo, hi
            return
        if lo.shape != self._lo.shape:
            raise ValueError(
                f"per-channel observer saw channel shape {tuple(self._lo.shape)} before and {tuple(lo.shape)} now"
            )
        self._lo, self._hi = torch.minimum(self._lo, lo), torch.maximum(self._hi, hi)

    def _range(self, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
        assert self._lo is not None and self._hi is not None
        return self._lo, self._hi


class PercentileObserver(Observer):
    """Clips at the ``percentile``-th percentile of ``|x|`` (symmetric) or at both tails (asymmetric).

    Percentiles come from a uniform :class:`Reservoir` of ``sample_size`` values: exact while fewer
    values were seen, a bounded estimate afterwards (2 MiB of values and keys at the default size).
    """

    def __init__(self, percentile: float = 99.99, sample_size: int = 1 << 17, seed: int = 0) -> None:
        super().__init__()
        if isinstance(percentile, bool) or not isinstance(percentile, (int, float)) or not 50 < percentile <= 100:
            raise ConfigError(f"percentile must be a number in (50, 100], got {percentile!r}")
        self.percentile = float(percentile)
        self.reservoir = Reservoir(sample_size, seed)

    def _observe(self, x: torch.Tensor) -> None:
        self.reservoir.add(x)

    def _range(self, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
        sample, q = self.reservoir.values, self.percentile / 100
        if symmetric:
            top = torch.quantile(sample.abs(), q)
            return -top, top
        return torch.quantile(sample, 1 - q), torch.quantile(sample, q)


class MSEObserver(Observer):
    """Searches ``candidates`` clipping ranges ``f · [min, max]`` (``f`` = 1/n … 1) for the one with
    the least mean squared quantization error at the requested bits, on a uniform sample.

    ``f = 1`` is the min–max range, so on the sample the error is never worse than min–max's.
    Both ends shrink by the same fraction (a 1-D search, ``candidates`` fake-quantizations).
    """

    def __init__(self, candidates: int = 100, sample_size: int = 1 << 16, seed: int = 0) -> None:
        super().__init__()
        if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 1:
            raise ConfigError(f"candidates must be an integer >= 1, got {candidates!r}")
        self.candidates = candidates
        self._minmax = MinMaxObserver()  # the exact extremes: the sample may miss them
        self.reservoir = Reservoir(sample_size, seed)

    def _observe(self, x: torch.Tensor) -> None:
        self._minmax._observe(x)
        self.reservoir.add(x)

    def _range(self, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = self._minmax._range(bits, symmetric)
        if symmetric:
            hi = torch.maximum(-lo, hi)
            lo = -hi
        sample = self.reservoir.values
        fractions = torch.arange(1, self.candidates + 1, dtype=torch.float64) / self.candidates
        errors = torch.empty(self.candidates, dtype=torch.float64)
        for i, f in enumerate(fractions):
            scale, zero = P.qparams_from_range(lo * f, hi * f, bits, symmetric)
            approx = P.fake_quantize(sample, scale, zero, bits, symmetric).to(torch.float64)
            errors[i] = ((sample - approx) ** 2).mean()
        # On ties keep the widest range: it clips least on data the calibration did not see.
        best = self.candidates - 1 - int(torch.argmin(errors.flip(0)))
        return lo * fractions[best], hi * fractions[best]


# Explicit registry: name -> observer class (no discovery).
OBSERVERS: dict[str, type[Observer]] = {
    "minmax": MinMaxObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
}


def make_observer(name: str, **kw: Any) -> Observer:
    """A fresh observer by registered name; unknown names and options raise :class:`ConfigError`.

    >>> make_observer("minmax", channel_axis=1).channel_axis
    1
    """
    cls = OBSERVERS.get(name)
    if cls is None:
        raise ConfigError(f"unknown observer {name!r}; known observers: {', '.join(OBSERVERS)}")
    signature = inspect.signature(cls)
    try:
        signature.bind(**kw)
    except TypeError:
        unknown = sorted(set(kw) - set(signature.parameters))
        allowed = ", ".join(signature.parameters) or "none"
        raise ConfigError(
            f"observer {name!r} got unknown option(s) {', '.join(map(repr, unknown))}; allowed: {allowed}"
        ) from None
    return cls(**kw)
