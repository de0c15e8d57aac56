"""`nnopt verify DIR`: does an output directory still hold exactly what nnopt wrote?

Every file is compared with the directory's ``manifest.json``; each model directory inside it
(``nnopt.json``) is also checked against the sha256 its record holds for its weights. Exit status:
0 when everything matches, 1 on a mismatch (the files are named), 2 when there is nothing to
verify against (not a directory, no manifest).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from nnopt.io.atomic import sha256_file
from nnopt.io.json_file import read_json
from nnopt.io.manifest import VerifyResult, verify_directory

# nnopt.io.model_dir's names, without importing torch for a hash check (tests/cli/test_verify_cli.py compares them)
META_FILE = "nnopt.json"
WEIGHTS_FILES = ("model.safetensors", "model.nnpk")


def verify_output(path: str | Path) -> VerifyResult:
    """:func:`~nnopt.io.manifest.verify_directory`, plus each model record's weights sha256."""
    result = verify_directory(path)
    changed, notes = list(result.changed), list(result.notes)
    for rel, note in _model_record_mismatches(Path(path)):
        notes.append(note)
        if rel not in changed:
            changed.append(rel)
    return dataclasses.replace(result, changed=tuple(changed), notes=tuple(notes))


def _model_record_mismatches(root: Path) -> list[tuple[str, str]]:
    """``(relative path, note)`` for each file a model record lists whose sha256 is not the recorded one."""
    found = []
    for meta_path in sorted(root.rglob(META_FILE)):
        if meta_path.is_symlink() or not meta_path.is_file():
            continue
        model_dir = meta_path.parent
        try:
            meta = read_json(meta_path)
            files = meta["files"]
            entries = [(name, entry["sha256"]) for name, entry in files.items()]
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
            rel = meta_path.relative_to(root).as_posix()
            found.append((rel, f"{rel} is not a readable model record"))
            continue
        for name, recorded in entries:
            file = model_dir / str(name)
            if name not in WEIGHTS_FILES or not isinstance(recorded, str):
                # A tampered record could name a path outside the directory: report it, never read it.
                rel = meta_path.relative_to(root).as_posix()
                found.append((rel, f"{rel} lists {str(name)[:80]!r}, which is not a weights file nnopt writes"))
                continue
            rel = file.relative_to(root).as_posix()
            if not file.is_file():
                found.append((rel, f"{rel} is listed in {META_FILE} but missing"))
            elif sha256_file(file) != recorded:
                found.append((rel, f"{rel}: sha256 does not match the one in {META_FILE}"))
    return found
