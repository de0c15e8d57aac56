"""The user's data from files (``--data PATH`` of every command that reads data).

Layouts (documented in docs/data.md):

- ``.npz``: arrays ``x`` and optional ``y``; or ``x_train``/``y_train``/``x_test``/``y_test`` (the given split).
- ``.npy``: one array of inputs (unlabelled).
- ``.csv``: a header row, then numeric rows; the label column is ``label`` or ``y`` (or ``label_column``);
  without one the rows are unlabelled.
- a folder of images in class subfolders, ``root/<class>/*.png|jpg|jpeg|bmp``: decoded with Pillow, resized to
  ``image_size`` (default: the first image's size), scaled to [0, 1] and normalized per channel with the
  training split's mean and standard deviation; classes are the subfolder names, sorted.
- a text file (``.txt``): one sentence per line (blank lines skipped), tokenized for a sentence encoder.

Every malformed file gives one :class:`~nnopt.errors.ConfigError` line naming the file and the problem.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nnopt.data import DEFAULT_SEED, Dataset, Split, as_dataset, as_split, holdout, load_dataset
from nnopt.errors import ConfigError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
LABEL_COLUMNS = ("label", "y")
BUNDLED = ("digits",)


def load_data(
    source: str | Path, *, label_column: str | None = None, image_size: tuple[int, int] | int | None = None,
    test_fraction: float = 0.2, seed: int = DEFAULT_SEED, tokenizer: Callable[[list[str]], Any] | None = None,
) -> Dataset:
    """A bundled data set by name (``digits``) or the user's data from a file or folder (layouts above).

    ``test_fraction`` of the rows (seeded; stratified when labelled) are held out for testing unless the
    file gives its own test split. ``tokenizer`` (text files) maps a list of sentences to a dict of
    ``(n, tokens)`` tensors; default: the bundled MiniLM encoder's tokenizer.

    >>> import numpy as np, nnopt
    >>> np.savez("rows.npz", x=np.random.rand(30, 4), y=np.arange(30) % 3)
    >>> data = nnopt.load_data("rows.npz")
    >>> len(data.train), len(data.test), data.num_classes
    (24, 6, 3)
    """
    text = str(source)
    if text in BUNDLED and not Path(text).exists():
        return load_dataset(text)
    path = Path(text)
    if not path.exists():
        raise ConfigError(f"unknown data set {text!r}: neither a bundled one ({', '.join(BUNDLED)}) nor an existing "
                          "file or folder (.npz, .npy, .csv, .txt, a folder of class subfolders of images)")
    name = path.stem or path.name
    if path.is_dir():
        return _image_folder(path, image_size, test_fraction, seed)
    suffix = path.suffix.lower()
    readers: dict[str, Callable[[], Dataset]] = {
        ".npz": lambda: _npz(path, test_fraction, seed),
        ".npy": lambda: as_dataset(_npy(path), test_fraction=test_fraction, seed=seed, name=name),
        ".csv": lambda: _csv(path, label_column, test_fraction, seed),
        ".txt": lambda: _text(path, tokenizer, test_fraction, seed),
    }
    if suffix not in readers:
        raise ConfigError(f"{path}: unknown data file type {suffix or '(none)'!r}; known: .npz, .npy, .csv, .txt, "
                          "or a folder of class subfolders of images")
    try:
        return readers[suffix]()
    except ConfigError as exc:
        message = str(exc)
        raise ConfigError(message if message.startswith(str(path)) else f"{path}: {message}") from None


# ------------------------------------------------------------------------------------------ numpy


def _npy(path: Path) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)  # no pickle: an .npy file never runs code
    except (ValueError, OSError, EOFError) as exc:
        raise ConfigError(f"{path}: not a readable .npy array ({_first_line(exc)})") from None
    if not isinstance(array, np.ndarray):
        raise ConfigError(f"{path}: not a single .npy array")
    return array


def _npz(path: Path, test_fraction: float, seed: int) -> Dataset:
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (ValueError, OSError, EOFError) as exc:
        raise ConfigError(f"{path}: not a readable .npz archive ({_first_line(exc)})") from None
    name = path.stem
    if "x_train" in arrays or "x_test" in arrays:
        missing = [k for k in ("x_train", "x_test") if k not in arrays]
        if missing:
            raise ConfigError(f"{path}: has {'x_test' if missing == ['x_train'] else 'x_train'} but no {missing[0]}")
        if ("y_train" in arrays) != ("y_test" in arrays):
            raise ConfigError(f"{path}: give both y_train and y_test, or neither")
        train = as_split(arrays["x_train"], arrays.get("y_train"))
        return as_dataset(train, test=(arrays["x_test"], arrays.get("y_test")), name=name)
    if "x" not in arrays:
        raise ConfigError(f"{path}: missing array 'x' (found: {', '.join(sorted(arrays)) or 'none'}); an .npz holds "
                          "x and optional y, or x_train/y_train/x_test/y_test")
    return as_dataset(arrays["x"], labels=arrays.get("y"), test_fraction=test_fraction, seed=seed, name=name)


# ------------------------------------------------------------------------------------------ CSV


def _csv(path: Path, label_column: str | None, test_fraction: float, seed: int) -> Dataset:
    with _open_text(path) as handle:
        rows = list(csv.reader(handle))
    rows = [(number, row) for number, row in enumerate(rows, start=1) if row and any(c.strip() for c in row)]
    if not rows:
        raise ConfigError(f"{path}: the CSV file is empty")
    header = [cell.strip() for cell in rows[0][1]]
    if len(rows) < 2:
        raise ConfigError(f"{path}: the CSV file has a header but no rows")
    if label_column is not None:
        if label_column not in header:
            raise ConfigError(f"{path}: no column {label_column!r} in the header ({', '.join(header)})")
        label = header.index(label_column)
    else:
        found = [c for c in LABEL_COLUMNS if c in header]
        label = header.index(found[0]) if found else None
    values = np.empty((len(rows) - 1, len(header)), dtype=np.float64)
    for i, (line, row) in enumerate(rows[1:]):
        if len(row) != len(header):
            raise ConfigError(f"{path}: line {line} has {len(row)} values, the header has {len(header)} columns")
        for j, cell in enumerate(row):
            try:
                values[i, j] = float(cell)
            except ValueError:
                raise ConfigError(f"{path}: line {line}, column {header[j]!r}: {cell!r} is not a number") from None
    if not np.isfinite(values).all():
        line = rows[1 + int(np.argwhere(~np.isfinite(values))[0][0])][0]
        raise ConfigError(f"{path}: line {line} holds a value that is not finite (nan or inf)")
    features = [j for j in range(len(header)) if j != label]
    if not features:
        raise ConfigError(f"{path}: the CSV file has no feature columns besides the label")
    x = values[:, features].astype(np.float32)
    y = None if label is None else values[:, label]
    return as_dataset(x, labels=y, test_fraction=test_fraction, seed=seed, name=path.stem)


# ------------------------------------------------------------------------------------------ images


def _image_folder(root: Path, image_size: tuple[int, int] | int | None, test_fraction: float, seed: int) -> Dataset:
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise ConfigError("reading a folder of images needs Pillow: pip install 'nnopt[images]'") from None
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ConfigError(f"{root}: no class subfolders (expected {root}/<class>/*.png or .jpg)")
    files = [(c, f) for c in classes for f in sorted((root / c).iterdir())
             if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES]
    empty = [c for c in classes if not any(name == c for name, _ in files)]
    if empty:
        raise ConfigError(f"{root}: class folder {empty[0]!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    size = (image_size, image_size) if isinstance(image_size, int) else image_size
    images, labels, mode = [], [], None
    for label, file in files:
        try:
            with Image.open(file) as opened:
                image = opened.convert("L" if opened.mode in ("1", "L", "I;16", "I") else "RGB")
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise ConfigError(f"{root}: unreadable image {file.relative_to(root)} ({_first_line(exc)})") from None
        mode = mode or image.mode
        if image.mode != mode:
            image = image.convert(mode)  # one channel count for the whole set: that of the first image
        size = size or image.size
        if image.size != size:
            image = image.resize(size, Image.BILINEAR)
        array = np.asarray(image, dtype=np.float32) / 255.0  # (H, W) or (H, W, C) in [0, 1]
        images.append(array[None] if array.ndim == 2 else array.transpose(2, 0, 1))  # (C, H, W)
        labels.append(classes.index(label))
    x = torch.from_numpy(np.stack(images))  # (n, C, H, W)
    split = as_split(x, np.asarray(labels))
    train, test = holdout(split, test_fraction, seed)
    # Per-channel statistics of the training split only: the test rows stay unseen.
    mean = train.x.mean(dim=(0, 2, 3), keepdim=True)
    std = train.x.std(dim=(0, 2, 3), keepdim=True).clamp(min=1e-6)
    train, test = Split((train.x - mean) / std, train.y), Split((test.x - mean) / std, test.y)
    return Dataset(name=root.name, train=train, test=test, num_classes=len(classes),
                   feature_shape=tuple(int(d) for d in x.shape[1:]),
                   normalization={"scale": 1 / 255.0, "mean": mean.flatten().tolist(), "std": std.flatten().tolist(),
                                  "classes": classes, "image_size": list(size or ())})


# ------------------------------------------------------------------------------------------ text


def _text(path: Path, tokenizer: Callable[[list[str]], Any] | None, test_fraction: float, seed: int) -> Dataset:
    with _open_text(path) as handle:
        sentences = [line.strip() for line in handle if line.strip()]
    if not sentences:
        raise ConfigError(f"{path}: the text file holds no sentences (one per line)")
    if tokenizer is None:
        from nnopt.models.hf_encoder import encode_batch

        def tokenizer(batch: list[str]) -> dict[str, torch.Tensor]:
            return encode_batch(batch, pad_to_max_length=False)

    encoded = tokenizer(sentences)
    if not isinstance(encoded, dict):
        raise ConfigError(f"{path}: the tokenizer returned {type(encoded).__name__}, not a dict of tensors")
    inputs = {k: torch.as_tensor(v) for k, v in encoded.items()}
    dataset = as_dataset(inputs, test_fraction=test_fraction, seed=seed, name=path.stem)
    return Dataset(name=dataset.name, train=dataset.train, test=dataset.test, num_classes=None,
                   feature_shape=dataset.feature_shape, normalization={"text": "tokenized, one sentence per line"})


def _open_text(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (Excel's "CSV UTF-8") is not a header
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    import io

    return io.StringIO(text, newline="")


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]
