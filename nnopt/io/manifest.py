"""``manifest.json``: the sha256 and size of every file of an output directory, and checking them.

:func:`~nnopt.io.atomic.atomic_directory` writes the manifest last, just before the directory
becomes visible, so a directory whose files all match it is exactly what nnopt wrote. Paths are
relative, POSIX-style, recursive and sorted; the manifest does not list itself but records the
sha256 of its own file list, so an edit of the manifest is told apart from an edit of a file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from nnopt.errors import ModelFormatError
from nnopt.io.atomic import sha256_file, write_bytes_durable
from nnopt.io.json_file import JSONFileError, read_json

MANIFEST_FILE = "manifest.json"
FORMAT = "nnopt-manifest"
FORMAT_VERSION = 1


def list_files(directory: str | Path) -> dict[str, dict[str, Any]]:
    """``{relative POSIX path: {"bytes", "sha256"}}`` of every regular file under ``directory``,
    sorted; the top-level manifest itself is left out. Symbolic links are not followed."""
    root = Path(directory)
    found: dict[str, dict[str, Any]] = {}
    for rel in _walk(root):
        if rel == MANIFEST_FILE:
            continue
        file = root / rel
        if file.is_symlink() or not file.is_file():
            continue
        found[rel] = {"bytes": file.stat().st_size, "sha256": sha256_file(file)}
    return dict(sorted(found.items()))


def _walk(root: Path) -> list[str]:
    """Relative POSIX paths of every non-directory entry under ``root`` (links included, not followed)."""
    entries = []
    for current, dirs, files in os.walk(root):
        base = Path(current).relative_to(root)
        links = [d for d in dirs if (Path(current) / d).is_symlink()]
        for name in (*files, *links):
            entries.append((base / name).as_posix())
    return sorted(entries)


def _digest(files: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(files, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_manifest(directory: str | Path) -> dict[str, Any]:
    """Write ``manifest.json`` into ``directory`` (durably) listing every other file; returns it."""
    files = list_files(directory)
    doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "files": files, "files_sha256": _digest(files)}
    write_bytes_durable(Path(directory) / MANIFEST_FILE, (json.dumps(doc, indent=2) + "\n").encode())
    return doc


@dataclasses.dataclass(frozen=True)
class VerifyResult:
    """How a directory compares with its manifest: relative paths of changed, missing and extra
    files; ``notes`` says more where a path alone does not (an unreadable manifest, say)."""

    path: Path
    checked: int
    changed: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()
    extra: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not (self.changed or self.missing or self.extra or self.notes)

    def __str__(self) -> str:
        if self.ok:
            return f"OK: {self.path} ({self.checked} files match {MANIFEST_FILE})"
        lines = [f"MISMATCH: {self.path} does not match {MANIFEST_FILE}"]
        for label, names in (("changed", self.changed), ("missing", self.missing), ("extra", self.extra)):
            lines += [f"  {label}: {name}" for name in names]
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def verify_directory(path: str | Path) -> VerifyResult:
    """Compare every file under ``path`` with its ``manifest.json``.

    Raises :class:`~nnopt.errors.ModelFormatError` when ``path`` is not a directory or has no
    manifest (nothing to compare with); a manifest that was edited or cannot be read is reported
    as changed.
    """
    path = Path(path)
    if not path.is_dir():
        what = "does not exist" if not path.exists() else "is not a directory"
        raise ModelFormatError(f"{path} {what}; nnopt verify takes an output directory")
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise ModelFormatError(f"{path} has no {MANIFEST_FILE}: it was not written by this nnopt, so there is "
                               "nothing to verify it against")
    recorded, problem = _read(manifest_path)
    present = set(_walk(path)) - {MANIFEST_FILE}
    if recorded is None:
        return VerifyResult(path, 0, changed=(MANIFEST_FILE,), notes=(f"{MANIFEST_FILE} {problem}",))
    changed = [MANIFEST_FILE] if problem else []
    for rel, entry in recorded.items():
        if rel not in present:
            continue
        file = path / rel
        if file.is_symlink() or not file.is_file():
            changed.append(rel)
        elif file.stat().st_size != entry.get("bytes") or sha256_file(file) != entry.get("sha256"):
            changed.append(rel)
    return VerifyResult(
        path, len(recorded), changed=tuple(changed), missing=tuple(sorted(set(recorded) - present)),
        extra=tuple(sorted(present - set(recorded))), notes=(f"{MANIFEST_FILE} {problem}",) if problem else (),
    )


def _read(manifest_path: Path) -> tuple[dict[str, dict[str, Any]] | None, str]:
    """The recorded file list and a problem description ("" when the manifest is intact)."""
    try:
        doc = read_json(manifest_path)
    except JSONFileError as exc:
        return None, f"is not valid JSON ({exc})"
    if not (isinstance(doc, dict) and doc.get("format") == FORMAT and isinstance(doc.get("files"), dict)):
        return None, f"is not an nnopt manifest (format {FORMAT!r} with a files mapping)"
    if doc.get("format_version") != FORMAT_VERSION:
        return None, f"has format_version {doc.get('format_version')!r}; this nnopt reads {FORMAT_VERSION}"
    files = {k: v for k, v in doc["files"].items() if isinstance(v, dict)}
    if len(files) != len(doc["files"]) or doc.get("files_sha256") != _digest(doc["files"]):
        return files, "was edited: its file list does not match its own sha256"
    return files, ""
