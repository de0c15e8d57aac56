"""Data sets: the bundled ones (nothing is downloaded: digits ships inside scikit-learn) and the user's own,
converted by :func:`as_dataset` from tensors, numpy arrays, ``(x, y)`` tuples, ``torch.utils.data`` Datasets
and DataLoaders. Labels are optional: unlabelled data recovers by distillation from the original model.

Inputs are one tensor ``(n, ...)`` of any shape (features, images ``(n, C, H, W)``, sequences, int64 token ids),
a tuple of such tensors (the model is called as ``model(*x)``) or a dict of them (``model(**x)``, e.g. a
Hugging Face encoder's ``input_ids`` and ``attention_mask``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from nnopt.errors import ConfigError

DEFAULT_SEED = 0

Inputs = Any  # a tensor (n, ...), a tuple of them (model(*x)) or a dict of them (model(**x))


def input_rows(x: Inputs) -> int:
    """Rows of ``x`` (all parts of a tuple or dict have the same number)."""
    if isinstance(x, Mapping):
        x = next(iter(x.values()))
    elif isinstance(x, tuple | list):
        x = x[0]
    return int(x.shape[0])


def take_rows(x: Inputs, index: torch.Tensor | slice) -> Inputs:
    """The rows ``index`` of ``x``, keeping its structure (tensor, tuple or dict)."""
    if isinstance(x, Mapping):
        return {key: value[index] for key, value in x.items()}
    if isinstance(x, tuple | list):
        return tuple(part[index] for part in x)
    return x[index]


def call_model(model: nn.Module | Callable[..., Any], x: Inputs) -> Any:
    """``model(**x)`` for a dict of inputs, ``model(*x)`` for a tuple, else ``model(x)``."""
    if isinstance(x, Mapping):
        return model(**x)
    if isinstance(x, tuple | list):
        return model(*x)
    return model(x)


@dataclasses.dataclass(frozen=True)
class Split:
    """Inputs ``x`` and integer labels ``y`` (None: unlabelled) of one split.

    ``x``: (n, ...) tensor (bundled data: float32 normalized features), or a tuple / dict of such tensors.
    """

    x: Inputs
    y: torch.Tensor | None = None  # (n,) int64

    def __post_init__(self) -> None:
        if self.y is not None and int(self.y.shape[0]) != input_rows(self.x):
            raise ConfigError(f"{int(self.y.shape[0])} labels for {input_rows(self.x)} input rows")

    def __len__(self) -> int:
        return input_rows(self.x)

    @property
    def labelled(self) -> bool:
        return self.y is not None

    def batches(
        self, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None
    ) -> Iterator[tuple[Inputs, torch.Tensor | None]]:
        """Yield ``(x, y)`` mini-batches (``y`` None when unlabelled); the last one may be smaller."""
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        order = torch.randperm(len(self), generator=generator) if shuffle else torch.arange(len(self))
        for start in range(0, len(self), batch_size):
            idx = order[start : start + batch_size]
            yield take_rows(self.x, idx), (None if self.y is None else self.y[idx])

    def take(self, index: torch.Tensor) -> Split:
        """The rows ``index`` (inputs and labels)."""
        return Split(take_rows(self.x, index), None if self.y is None else self.y[index])

    def subset(self, n: int, seed: int = DEFAULT_SEED) -> Split:
        """A random subset of ``n`` rows (stratified when labelled) for calibration or quick checks."""
        if not 1 <= n <= len(self):
            raise ConfigError(f"subset size must be in 1..{len(self)}, got {n}")
        if n == len(self):
            return self
        from sklearn.model_selection import train_test_split

        stratify = None if self.y is None else _stratify_or_none(self.y.numpy(), n)
        idx, _ = train_test_split(np.arange(len(self)), train_size=n, stratify=stratify, random_state=seed)
        return self.take(torch.as_tensor(np.sort(idx)))


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A named train/test split with its normalization and a calibration subset.

    ``num_classes`` is None for unlabelled data; ``feature_shape`` is one row's shape (of the first input
    for tuple or dict inputs)."""

    name: str
    train: Split
    test: Split
    num_classes: int | None
    feature_shape: tuple[int, ...]
    normalization: dict[str, Any]

    @property
    def labelled(self) -> bool:
        return self.train.labelled and self.test.labelled

    def calibration(self, n: int = 128, seed: int = DEFAULT_SEED) -> Split:
        """A subset of the training split (stratified when labelled), never of the test split."""
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


# ----------------------------------------------------------------------------- the user's data


def as_split(data: Any, labels: Any = None) -> Split:
    """One :class:`Split` from the user's data (see :func:`as_dataset` for what is accepted)."""
    if isinstance(data, Split):
        if labels is not None:
            raise ConfigError("labels= cannot be given with a Split, which carries its own")
        return data
    if isinstance(data, Dataset):
        raise ConfigError("a Dataset has two splits: pass dataset.train (or dataset.test)")
    if isinstance(data, torch.utils.data.DataLoader):
        x, y = _from_batches(data, "DataLoader")
    elif isinstance(data, torch.utils.data.Dataset):
        x, y = _from_items(data)
    elif isinstance(data, list) and all(isinstance(item, torch.Tensor) for item in data):
        if not data:
            raise ConfigError("the data is empty (an empty list of input batches)")
        x, y = _concatenated(data), None  # a list of input batches (calibration data)
    elif isinstance(data, tuple | list) and not _is_array(data):
        if len(data) != 2:
            raise ConfigError(f"a tuple of data must be (inputs, labels), with labels None when there are none; "
                              f"got {len(data)} items")
        x, y = data
    else:
        x, y = data, None
    if labels is not None:
        if y is not None:
            raise ConfigError("labels given twice: in the data and as labels=")
        y = labels
    inputs = _inputs(x)
    return Split(inputs, None if y is None else _labels(y, input_rows(inputs)))


def as_dataset(
    data: Any, labels: Any = None, test_fraction: float = 0.2, seed: int = DEFAULT_SEED, name: str = "data",
    test: Any = None,
) -> Dataset:
    """The user's data as an nnopt :class:`Dataset`: a train split and a held-out test split.

    ``data`` is a tensor or numpy array of inputs ``(n, ...)`` (any shape: features, images, sequences,
    int64 token ids), a tuple ``(inputs, labels)`` (``labels`` may be None), a dict of input tensors
    (``model(**x)``), a ``torch.utils.data.Dataset`` whose items are ``x``, ``(x, y)`` or dicts (``y`` under
    ``"label"``, ``"labels"`` or ``"y"``; ``x`` under ``"x"``, or the remaining keys as named inputs), a
    ``DataLoader`` of such batches, a list of input batches (tensors, concatenated; unlabelled), a :class:`Split`
    or a :class:`Dataset` (returned as is). ``labels``
    (integer class ids, ``(n,)``) are optional: without them nnopt measures and recovers against the
    original model. ``test`` gives the held-out rows explicitly; otherwise ``test_fraction`` of the rows
    (seeded, stratified when labelled) are held out. Inputs are used as given (no normalization).

    >>> import torch, nnopt
    >>> data = nnopt.as_dataset(torch.randn(50, 3, 16))  # 50 unlabelled sequences of 3 channels
    >>> len(data.train), len(data.test), data.num_classes, data.feature_shape
    (40, 10, None, (3, 16))
    """
    if isinstance(data, Dataset):
        if labels is not None or test is not None:
            raise ConfigError("a Dataset carries its own labels and test split")
        return data
    split = as_split(data, labels)
    if test is not None:
        train, held_out = split, as_split(test)
        if train.labelled != held_out.labelled:
            raise ConfigError("the training data and the test data must both have labels, or neither")
    else:
        train, held_out = holdout(split, test_fraction, seed)
    num_classes = None if train.y is None else int(max(int(train.y.max()), int(held_out.y.max())) + 1)  # type: ignore[union-attr]
    return Dataset(name=name, train=train, test=held_out, num_classes=num_classes,
                   feature_shape=feature_shape(train.x), normalization={})


def holdout(split: Split, fraction: float, seed: int = DEFAULT_SEED) -> tuple[Split, Split]:
    """``(train, test)``: ``fraction`` of the rows held out, seeded, stratified when every class has 2 rows."""
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"test_fraction must be in (0, 1), got {fraction}")
    n = len(split)
    held = round(fraction * n)
    if n < 2 or not 1 <= held < n:
        raise ConfigError(f"{n} rows are too few to hold out {fraction:.0%} for testing; give more rows or test=...")
    from sklearn.model_selection import train_test_split

    stratify = None
    if split.y is not None:
        counts = np.bincount(split.y.numpy())
        counts = counts[counts > 0]
        if counts.min() >= 2 and held >= len(counts) and n - held >= len(counts):
            stratify = split.y.numpy()
    train_idx, test_idx = train_test_split(np.arange(n), test_size=held, stratify=stratify, random_state=seed)
    return split.take(torch.as_tensor(np.sort(train_idx))), split.take(torch.as_tensor(np.sort(test_idx)))


def feature_shape(x: Inputs) -> tuple[int, ...]:
    """One row's shape (of the first input for tuple or dict inputs)."""
    if isinstance(x, Mapping):
        x = next(iter(x.values()))
    elif isinstance(x, tuple | list):
        x = x[0]
    return tuple(int(d) for d in x.shape[1:])


def _is_array(value: Any) -> bool:
    return isinstance(value, torch.Tensor | np.ndarray)


def _tensor(value: Any, what: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu()
    elif isinstance(value, np.ndarray):
        if value.dtype == object or not (np.issubdtype(value.dtype, np.number) or value.dtype == np.bool_):
            raise ConfigError(f"{what} must be numeric arrays, got dtype {value.dtype}")
        tensor = torch.from_numpy(np.ascontiguousarray(value))
    else:
        raise ConfigError(f"{what} must be tensors or numpy arrays, got {type(value).__name__}")
    if tensor.ndim == 0:
        raise ConfigError(f"{what} must have a first dimension of rows, got a scalar")
    if tensor.is_floating_point():
        return tensor.float()  # float64 numpy arrays become the float32 models run in
    if tensor.dtype in (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32):
        return tensor.long()
    return tensor


def _inputs(x: Any) -> Inputs:
    if x is None:
        raise ConfigError("the data has no inputs (x is None)")
    if isinstance(x, Mapping):
        if not x:
            raise ConfigError("the dict of inputs is empty")
        parts: Inputs = {str(key): _tensor(value, f"input {key!r}") for key, value in x.items()}
    elif isinstance(x, tuple | list) and not _is_array(x):
        if not x:
            raise ConfigError("the tuple of inputs is empty")
        parts = tuple(_tensor(value, f"input {i}") for i, value in enumerate(x))
    else:
        parts = _tensor(x, "inputs")
    values = list(parts.values()) if isinstance(parts, dict) else list(parts) if isinstance(parts, tuple) else [parts]
    rows = {int(v.shape[0]) for v in values}
    if len(rows) != 1:
        raise ConfigError(f"the inputs have different numbers of rows: {sorted(rows)}")
    if rows == {0}:
        raise ConfigError("the data has no rows")
    return parts


def _concatenated(batches: list[torch.Tensor]) -> torch.Tensor:
    shapes = {tuple(b.shape[1:]) for b in batches}
    if len(shapes) != 1 or any(b.ndim == 0 for b in batches):
        raise ConfigError(f"the input batches have different sample shapes: {sorted(shapes)[:4]}")
    return torch.cat(batches)


def _labels(y: Any, rows: int) -> torch.Tensor:
    labels = _tensor(y if _is_array(y) else np.asarray(y), "labels")
    if labels.ndim != 1:
        raise ConfigError(f"labels must have shape (n,), got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex():
        if not bool((labels == labels.round()).all()):
            raise ConfigError("labels must be integer class ids (0, 1, 2, ...); got fractional values")
        labels = labels.long()
    if int(labels.shape[0]) != rows:
        raise ConfigError(f"{int(labels.shape[0])} labels for {rows} input rows")
    if int(labels.min()) < 0:
        raise ConfigError(f"labels must be class ids >= 0, got {int(labels.min())}")
    return labels


def _from_items(dataset: Any) -> tuple[Inputs, Any]:
    """Stack a map-style Dataset's items (``x``, ``(x, y)`` or dicts) into tensors."""
    try:
        n = len(dataset)
    except TypeError:
        return _from_batches(_batched(dataset), "iterable Dataset")
    items = [dataset[i] for i in range(n)]
    if not items:
        raise ConfigError("the Dataset is empty")
    return _stack([_item_parts(item) for item in items], "Dataset items")


def _batched(iterable: Any) -> Iterator[Any]:
    for item in iterable:
        x, y = _item_parts(item)
        yield _unsqueeze(x), (None if y is None else torch.as_tensor(y).reshape(1))


def _unsqueeze(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {k: torch.as_tensor(v).unsqueeze(0) for k, v in x.items()}
    if isinstance(x, tuple | list) and not _is_array(x):
        return tuple(torch.as_tensor(v).unsqueeze(0) for v in x)
    return torch.as_tensor(x).unsqueeze(0)


_LABEL_KEYS = ("label", "labels", "y")


def _item_parts(item: Any) -> tuple[Any, Any]:
    """``(x, y)`` of one item or batch; ``y`` None when it carries no label."""
    if isinstance(item, Mapping):
        found = [key for key in _LABEL_KEYS if key in item]
        y = item[found[0]] if found else None
        if "x" in item:
            return item["x"], y
        return {k: v for k, v in item.items() if k not in _LABEL_KEYS}, y
    if isinstance(item, tuple | list) and not _is_array(item):
        if len(item) == 2:
            return item[0], item[1]
        if len(item) == 1:
            return item[0], None
        raise ConfigError(f"an item of {len(item)} parts is ambiguous: items must be x, (x, y) or a dict")
    return item, None


def _stack(parts: list[tuple[Any, Any]], what: str) -> tuple[Inputs, Any]:
    """Stack single items (``x`` or ``(x, y)`` parts) into rows."""
    x, y = _join([x for x, _ in parts], [y for _, y in parts], what, torch.stack,
                 "cannot be stacked into one tensor")
    return x, None if y is None else torch.as_tensor(np.asarray([int(torch.as_tensor(v)) for v in y]))


def _from_batches(batches: Any, what: str) -> tuple[Inputs, Any]:
    """Concatenate a DataLoader's batches (tensors, ``(x, y)`` or dicts) along the rows."""
    parts = [_item_parts(batch) for batch in batches]
    if not parts:
        raise ConfigError(f"the {what} yields no batches")
    x, y = _join([x for x, _ in parts], [y for _, y in parts], f"batches of the {what}", torch.cat,
                 "cannot be joined")
    return x, None if y is None else torch.cat([torch.as_tensor(v).reshape(-1) for v in y])


def _join(xs: list[Any], ys: list[Any], what: str, combine: Callable[[list[torch.Tensor]], torch.Tensor],
          failure: str) -> tuple[Inputs, list[Any] | None]:
    """``combine`` (stack or cat) the inputs, keeping their structure (tensors, tuples, dicts); the labels
    as given, or None when there are none (all or nothing)."""
    if any(y is None for y in ys) and not all(y is None for y in ys):
        raise ConfigError(f"some {what} have a label and some do not")
    first = xs[0]
    try:
        if isinstance(first, Mapping):
            x: Inputs = {k: combine([torch.as_tensor(item[k]) for item in xs]) for k in first}
        elif isinstance(first, tuple | list) and not _is_array(first):
            x = tuple(combine([torch.as_tensor(item[i]) for item in xs]) for i in range(len(first)))
        else:
            x = combine([torch.as_tensor(item) for item in xs])
    except (RuntimeError, KeyError, IndexError, TypeError) as exc:
        raise ConfigError(f"the {what} {failure} (pad sequences to one length): "
                          f"{str(exc).splitlines()[0]}") from None
    return x, None if ys[0] is None else ys


def training_data(data: Any) -> Any:
    """What a verb's passes read as ``data``: None, ready batches (a sentence encoder's dict, a list of token
    dicts, a list of ``(x, y)`` tuples) as given, a Dataset's training split, else the user's data converted
    to a :class:`Split`."""
    if data is None or isinstance(data, Split | dict):
        return data
    if isinstance(data, list) and data and all(
            isinstance(item, dict) or (isinstance(item, tuple) and len(item) == 2) for item in data):
        return data
    if isinstance(data, Dataset):
        return data.train
    return as_split(data)
