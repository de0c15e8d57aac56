"""Bundled data sets and loaders. Nothing is downloaded: digits ships inside scikit-learn."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import numpy as np
import torch

from nnopt.errors import ConfigError

DEFAULT_SEED = 0


@dataclasses.dataclass(frozen=True)
class Split:
    """Features ``x`` (float32, normalized) and integer labels ``y`` of one split."""

    x: torch.Tensor  # (n, features)
    y: torch.Tensor  # (n,) int64

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def batches(
        self, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(x, y)`` mini-batches; the last one may be smaller."""
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        order = torch.randperm(len(self), generator=generator) if shuffle else torch.arange(len(self))
        for start in range(0, len(self), batch_size):
            idx = order[start : start + batch_size]
            yield self.x[idx], self.y[idx]

    def subset(self, n: int, seed: int = DEFAULT_SEED) -> Split:
        """A stratified random subset of ``n`` rows (for calibration or quick checks)."""
        if not 1 <= n <= len(self):
            raise ConfigError(f"subset size must be in 1..{len(self)}, got {n}")
        if n == len(self):
            return self
        from sklearn.model_selection import train_test_split

        idx, _ = train_test_split(
            np.arange(len(self)), train_size=n, stratify=_stratify_or_none(self.y.numpy(), n),
            random_state=seed,
        )
        idx_t = torch.as_tensor(np.sort(idx))
        return Split(self.x[idx_t], self.y[idx_t])


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A named train/test split with its normalization and a calibration subset."""

    name: str
    train: Split
    test: Split
    num_classes: int
    feature_shape: tuple[int, ...]
    normalization: dict[str, float]

    def calibration(self, n: int = 128, seed: int = DEFAULT_SEED) -> Split:
        """A stratified subset of the training split, never of the test split."""
        return self.train.subset(min(n, len(self.train)), seed=seed)

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "train": len(self.train), "test": len(self.test)}


def load_digits(test_size: float = 0.2, seed: int = DEFAULT_SEED) -> Dataset:
    """scikit-learn's 1,797 8×8 digits: stratified split, standardized with train statistics."""
    if not 0.0 < test_size < 1.0:
        raise ConfigError(f"test_size must be in (0, 1), got {test_size}")
    if not 0 <= seed < 2**32:
        raise ConfigError(f"seed must be in 0..2**32-1, got {seed}")
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_load_digits()
    x = bunch.data.astype(np.float32) / 16.0  # pixel values are 0..16
    y = bunch.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_size, stratify=y, random_state=seed
    )
    # One global mean/std from the training split: per-pixel std is 0 at the always-blank borders.
    mean, std = float(x_train.mean()), float(x_train.std())
    x_train = (x_train - mean) / std
    x_test = (x_test - mean) / std
    return Dataset(
        name="digits",
        train=Split(torch.from_numpy(x_train), torch.from_numpy(y_train)),
        test=Split(torch.from_numpy(x_test), torch.from_numpy(y_test)),
        num_classes=10,
        feature_shape=(64,),
        normalization={"scale": 1 / 16.0, "mean": mean, "std": std},
    )


_DATASETS: dict[str, Callable[[], Dataset]] = {"digits": load_digits}


def load_dataset(name: str) -> Dataset:
    """A bundled data set by name (``digits``)."""
    if name not in _DATASETS:
        raise ConfigError(f"unknown data set {name!r}; known: {', '.join(sorted(_DATASETS))}")
    return _DATASETS[name]()


def _stratify_or_none(y: np.ndarray, n: int) -> np.ndarray | None:
    # Stratifying needs at least one row per class in the subset.
    return y if n >= len(np.unique(y)) else None
