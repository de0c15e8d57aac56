"""Atomic outputs: write into a temporary sibling, fsync, then rename into place.

A crash, Ctrl-C or SIGKILL leaves either the old output or the new one at the destination, never a
half-written mix. On Linux the new directory is swapped in with ``renameat2(RENAME_EXCHANGE)``, so
the destination never disappears; elsewhere the old output is first moved aside to a
``.NAME.old-*`` sibling, and if the process dies before the new one is in place, the next write
to that destination (or :func:`recover_directory`) puts the old one back.

Temporary siblings are named ``.NAME.tmp-HOST-PID-RAND`` (``old``/``del`` for directories being
replaced or removed). A later write to the same destination removes those whose writer is gone:
its process is dead (same host) or, for names it cannot attribute, they are a day old. Siblings
of live writers are never touched, so concurrent writers do not break each other's work.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import errno
import hashlib
import os
import platform
import re
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator
from functools import cache
from pathlib import Path

from nnopt.errors import OutputError

# Names of leftovers that cannot be attributed to a process on this host (another host, an older
# nnopt) are removed only once they are this old: no save takes a day between mkdir and rename.
FOREIGN_STALE_SECONDS = 24 * 3600
_KINDS = ("tmp", "old", "del")


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
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(path)
    tmp = sibling_name(path, "tmp")
    try:
        write_bytes_durable(tmp, data)
        os.replace(tmp, path)
        fsync_dir(path.parent)
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
    names in ``replace_if`` (the first one is the marker, which must be there) and its manifest.

    Call it before long work too, so that a refusal comes first rather than after minutes.
    """
    from nnopt.io.manifest import MANIFEST_FILE

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
    allowed = {*names, MANIFEST_FILE}
    foreign = sorted(p.name for p in path.iterdir() if p.name not in allowed)
    if foreign:
        raise OutputError(
            f"refusing to overwrite {path}: it holds files nnopt did not write ({', '.join(foreign[:5])})"
        )


# Checks that must pass immediately before an output becomes visible (an input that changed
# during the run, for example). A context variable rather than a parameter so that writers deep
# inside a run (save_model) honour the run's checks without knowing about them.
_COMMIT_GUARDS: contextvars.ContextVar[tuple[Callable[[], None], ...]] = contextvars.ContextVar(
    "nnopt_commit_guards", default=()
)


@contextlib.contextmanager
def commit_guard(check: Callable[[], None]) -> Iterator[None]:
    """Within the block, every :func:`atomic_directory` runs ``check()`` after its files are
    written and just before the rename; an error from ``check`` aborts it, nothing written."""
    token = _COMMIT_GUARDS.set((*_COMMIT_GUARDS.get(), check))
    try:
        yield
    finally:
        _COMMIT_GUARDS.reset(token)


@contextlib.contextmanager
def atomic_directory(
    path: Path, replace_if: Collection[str] | None = None, manifest: bool = True
) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``path`` when the block ends without error.

    An existing ``path`` is replaced only if it is an earlier output of the same kind (see
    :func:`check_replaceable`); anything else is refused, so user files are never lost. With
    ``manifest``, a ``manifest.json`` listing the sha256 and size of every file is written last.
    """
    path = Path(path)
    clean_leftovers(path)
    check_replaceable(path, replace_if)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = sibling_name(path, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        if manifest:
            from nnopt.io.manifest import write_manifest

            write_manifest(tmp)
        fsync_dir(tmp)
        for check in _COMMIT_GUARDS.get():
            check()
        # Again at the end: something may have appeared at `path` during the run, and only an
        # earlier output of the same kind may ever be replaced.
        check_replaceable(path, replace_if)
        _commit(tmp, path, may_replace=replace_if is not None)
        fsync_dir(path.parent)
    finally:
        if tmp.exists():  # the failed output, or after an exchange the replaced one
            shutil.rmtree(tmp, ignore_errors=True)


def remove_directory(path: Path) -> None:
    """Remove a directory so that an interruption never leaves it half deleted at ``path``."""
    path = Path(path)
    if not path.exists():
        return
    doomed = sibling_name(path, "del")
    os.replace(path, doomed)
    fsync_dir(path.parent)
    shutil.rmtree(doomed, ignore_errors=True)


def _commit(tmp: Path, path: Path, may_replace: bool) -> None:
    if not may_replace or not path.exists():
        try:
            _rename_noreplace(tmp, path)
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            raise OutputError(f"{path} appeared while this output was being written (another run writing "
                              "there?); it was left as it is") from None
        return
    if exchange_paths(tmp, path):
        return  # tmp now holds the old output; the caller removes it
    old = sibling_name(path, "old")
    os.replace(path, old)
    # A kill here leaves no `path`, only `old`: clean_leftovers / recover_directory put it back.
    try:
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.rename(old, path)  # the old output goes back if its place is still free
        raise
    # Renamed to a `del` name first: a half-deleted `old` must never be taken for one to recover.
    doomed = sibling_name(path, "del")
    os.replace(old, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


# --------------------------------------------------------------------------- swapping


_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_SYS_RENAMEAT2 = {"x86_64": 316, "aarch64": 276}  # used only where libc lacks the wrapper (glibc < 2.28)
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV}


@cache
def _renameat2() -> Callable[..., int] | None:
    """libc's renameat2 (glibc >= 2.28), else the raw system call on known machines, else None."""
    if sys.platform != "linux":
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    if hasattr(libc, "renameat2"):
        fn = libc.renameat2
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        fn.restype = ctypes.c_int
        return fn
    number = _SYS_RENAMEAT2.get(platform.machine())
    if number is None or not hasattr(libc, "syscall"):
        return None
    syscall = libc.syscall
    syscall.restype = ctypes.c_long

    def raw(olddfd: int, old: bytes, newdfd: int, new: bytes, flags: int) -> int:
        return int(syscall(ctypes.c_long(number), ctypes.c_long(olddfd), ctypes.c_char_p(old),
                           ctypes.c_long(newdfd), ctypes.c_char_p(new), ctypes.c_ulong(flags)))

    return raw


def _rename_noreplace(src: Path, dst: Path) -> None:
    """Rename that fails with EEXIST when ``dst`` exists (os.rename would replace an empty directory)."""
    fn = _renameat2()
    if fn is not None:
        if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in _UNSUPPORTED:
            raise OSError(err, os.strerror(err), str(src), None, str(dst))
    if dst.exists():  # no atomic no-replace here: a narrow window remains
        raise OSError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


def exchange_paths(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step; False where the OS or filesystem cannot."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in _UNSUPPORTED:
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


# --------------------------------------------------------------------------- leftovers


@cache
def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def sibling_name(path: Path, kind: str) -> Path:
    """A fresh ``.NAME.KIND-HOST-PID-RAND`` sibling of ``path`` owned by this process."""
    assert kind in _KINDS
    return path.parent / f".{path.name}.{kind}-{_host_tag()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _leftover_pattern(name: str) -> re.Pattern[str]:
    # Current names carry host and pid; ``.NAME.tmp-RAND`` is what nnopt wrote before.
    return re.compile(
        rf"^\.{re.escape(name)}\.(?P<kind>tmp|old|del)-"
        r"(?:(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-)?[0-9a-f]{8}$"
    )


def leftovers(path: Path) -> list[tuple[Path, str, bool]]:
    """``(sibling, kind, stale)`` for every temporary sibling of ``path`` that nnopt named."""
    path = Path(path)
    try:
        entries = list(path.parent.iterdir())
    except OSError:  # no parent yet, or unreadable: nothing of ours there
        return []
    pattern = _leftover_pattern(path.name)
    found = []
    for entry in entries:
        match = pattern.match(entry.name)
        if match:
            found.append((entry, match["kind"], _is_stale(entry, match["host"], match["pid"])))
    return found


def _is_stale(entry: Path, host: str | None, pid: str | None) -> bool:
    if host == _host_tag() and pid is not None:
        return int(pid) != os.getpid() and not _alive(int(pid))
    try:
        age = time.time() - entry.lstat().st_mtime
    except OSError:
        return False
    return age > FOREIGN_STALE_SECONDS


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def recover_directory(path: Path) -> bool:
    """Put back an earlier output that a killed writer had moved aside; True if one was restored.

    Only when ``path`` is missing and the writer is gone; the most recently moved complete one wins.
    """
    from nnopt.io.manifest import MANIFEST_FILE, verify_directory

    path = Path(path)
    if path.exists() or path.is_symlink():
        return False
    candidates = []
    for entry, kind, stale in leftovers(path):
        if kind != "old" or not stale:
            continue
        with contextlib.suppress(Exception):  # an unreadable or incomplete one is not a candidate
            if (entry / MANIFEST_FILE).is_file() and not verify_directory(entry).ok:
                continue
            candidates.append((entry.lstat().st_ctime, entry))
    for _, entry in sorted(candidates, reverse=True):
        try:
            os.rename(entry, path)
        except OSError:  # another process restored one first, or this one vanished
            continue
        fsync_dir(path.parent)
        return True
    return False


def clean_leftovers(path: Path) -> list[Path]:
    """Recover a moved-aside output of ``path``, then remove the stale temporary siblings.

    Returns what was removed.
    """
    path = Path(path)
    recover_directory(path)
    removed = []
    for entry, _, stale in leftovers(path):
        if not stale:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                entry.unlink()
        if not entry.exists():
            removed.append(entry)
    return removed


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (best effort: some filesystems cannot fsync a directory)."""
    with contextlib.suppress(OSError):  # some filesystems cannot fsync a directory
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
