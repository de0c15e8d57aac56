"""Atomic outputs: write into a temporary sibling, fsync, then rename into place.

A crash or Ctrl-C leaves either the old output or the new one, never a half-written mix.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import uuid
from collections.abc import Collection, Iterable, Iterator
from pathlib import Path

from nnopt.errors import OutputError


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_bytes_durable(path: Path, data: bytes) -> None:
    """Write and fsync one file inside a directory that is itself not yet visible."""
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically (temporary file in the same directory, rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        write_bytes_durable(tmp, data)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def refuse_input_overlap(output: Path, inputs: Iterable[Path]) -> None:
    """Error when ``output`` is an input, lies inside one, or contains one."""
    out = Path(output).resolve()
    for item in inputs:
        src = Path(item).resolve()
        if out == src or src in out.parents or out in src.parents:
            raise OutputError(f"refusing to write {output}: it overlaps the input {item}")


def check_replaceable(path: Path, replace_if: Collection[str] | None) -> None:
    """Error unless ``path`` is free, or an earlier nnopt output that holds nothing but the
    names in ``replace_if`` (the first one is the marker, which must be there).

    Call it before long work too, so that a refusal comes first rather than after minutes.
    """
    path = Path(path)
    here = Path.cwd().resolve()
    if path.resolve() == here or path.resolve() in here.parents:
        raise OutputError(f"refusing to write to {path}: it is the current directory or one above it")
    if path.is_symlink():
        raise OutputError(f"refusing to write to {path}: it is a symbolic link")
    if not path.exists():
        return
    if not path.is_dir():
        raise OutputError(f"refusing to overwrite {path}: it is a file, not an earlier nnopt output")
    if not replace_if:
        raise OutputError(f"refusing to overwrite {path}: it exists")
    names = list(replace_if)
    if not (path / names[0]).is_file():
        raise OutputError(f"refusing to overwrite {path}: it has no {names[0]}, so it is not an earlier nnopt output")
    foreign = sorted(p.name for p in path.iterdir() if p.name not in names)
    if foreign:
        raise OutputError(
            f"refusing to overwrite {path}: it holds files nnopt did not write ({', '.join(foreign[:5])})"
        )


@contextlib.contextmanager
def atomic_directory(path: Path, replace_if: Collection[str] | None = None) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``path`` when the block ends without error.

    An existing ``path`` is replaced only if it is an earlier output of the same kind (see
    :func:`check_replaceable`); anything else is refused, so user files are never lost.
    """
    path = Path(path)
    check_replaceable(path, replace_if)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        _fsync_dir(tmp)
        if path.exists():
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # some filesystems cannot fsync a directory
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
