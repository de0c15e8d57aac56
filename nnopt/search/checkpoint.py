"""A search's checkpoint: the trials evaluated so far, kept so that an interrupted run (Ctrl-C, a
crash) loses no finished work and resuming continues it.

``nnopt auto -o OUT`` keeps it in a hidden sibling of the output directory (``.OUT.nnopt-auto/``), never
inside it: the output appears only complete; ``nnopt.auto(..., checkpoint_dir=D)`` keeps it in ``D``.
``state.json`` is replaced atomically after every trial; trial models are written there too (their
bytes are the size objective; latency is timed from them). A finished run removes the checkpoint.

A fingerprint of the inputs and of every setting that changes what a trial measures is stored; a
resume with anything different is refused, naming the difference. Messages name the Python argument
(``resume=True``); the CLI says ``--resume``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from nnopt.errors import ResumeError
from nnopt.io.atomic import atomic_write_bytes
from nnopt.io.json_file import JSONFileError, read_json

STATE_FILE = "state.json"
FORMAT = "nnopt-auto-checkpoint"
VERSION_KEY = "space_version"  # the fingerprint's search-space version (nnopt.search.space.SPACE_VERSION)


def checkpoint_dir(out: str | Path) -> Path:
    out = Path(out)
    return out.parent / f".{out.name}.nnopt-auto"


class Checkpoint:
    """The evaluated state of one search; :meth:`save` after each step of work."""

    def __init__(self, directory: Path, fingerprint: dict[str, Any], state: dict[str, Any] | None = None) -> None:
        self.directory = directory
        self.fingerprint = fingerprint
        self.state = state if state is not None else {"trials": {}, "latency": {}, "elapsed_s": 0.0}
        self.resumed = state is not None

    @classmethod
    def open(cls, out: str | Path, fingerprint: dict[str, Any], resume: bool) -> Checkpoint:
        """The checkpoint of a run into ``out``, beside it (see :func:`checkpoint_dir`)."""
        return cls.at(checkpoint_dir(out), fingerprint, resume)

    @classmethod
    def at(cls, directory: str | Path, fingerprint: dict[str, Any], resume: bool) -> Checkpoint:
        """A fresh checkpoint in ``directory``, or the one an interrupted run left there (``resume``);
        checks come first, and nothing is written until the first :meth:`save`."""
        directory = Path(directory)
        state_file = directory / STATE_FILE
        if not resume:
            if directory.exists():
                raise ResumeError(f"an interrupted run left a checkpoint at {directory}: add resume=True to continue "
                                  "it, or delete that directory to start over")
            return cls(directory, fingerprint)
        if not state_file.is_file() and directory.is_dir():
            return cls(directory, fingerprint)  # interrupted before its first trial was saved: nothing to keep
        if not state_file.is_file():
            raise ResumeError(f"resume=True: no checkpoint at {directory} (no run using it was interrupted, or it "
                              "finished)")
        try:
            state = read_json(state_file)
        except JSONFileError as exc:
            raise ResumeError(f"{state_file} is corrupt ({exc}); delete {directory} to start over") from None
        if not isinstance(state, dict) or state.get("format") != FORMAT or not isinstance(state.get("trials"), dict):
            raise ResumeError(f"{state_file} is not an nnopt auto checkpoint; delete {directory} to start over")
        old = state.get("fingerprint", {})
        if old.get(VERSION_KEY) != fingerprint.get(VERSION_KEY):
            raise ResumeError(_version_message(directory, old.get(VERSION_KEY), fingerprint.get(VERSION_KEY)))
        differ = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
        if differ:
            shown = "; ".join(f"{k}: checkpoint {old.get(k)!r}, now {fingerprint.get(k)!r}" for k in differ[:4])
            raise ResumeError(f"resume=True: the checkpoint at {directory} was written by a different run ({shown}); "
                              "rerun with the same model, data and settings, or delete it to start over")
        state.setdefault("latency", {})
        return cls(directory, fingerprint, state)

    def trial_dir(self, index: int) -> Path:
        return self.directory / "trials" / f"trial-{index:03d}"

    def save(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        doc = {**self.state, "format": FORMAT, "fingerprint": self.fingerprint}
        atomic_write_bytes(self.directory / STATE_FILE, (json.dumps(doc, indent=1) + "\n").encode())

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def _version_message(directory: Path, old: Any, new: Any) -> str:
    """Why a checkpoint from another nnopt version cannot be resumed: rerunning the same command cannot help."""
    older = old is None or (isinstance(old, int) and isinstance(new, int) and old < new)
    which = "an older" if older else "a different"
    return (f"resume=True: the checkpoint at {directory} was written by {which} nnopt whose search space or trial "
            f"fields differ (search space version {old if old is not None else 'unrecorded'}, this nnopt's "
            f"{new}), so its trials cannot be reused; delete {directory} to start fresh")


def trials_kept(directory: str | Path) -> int:
    """How many evaluated trials the checkpoint in ``directory`` holds (0 when there is none or it is unreadable)."""
    try:
        state = read_json(Path(directory) / STATE_FILE)
    except (OSError, JSONFileError):
        return 0
    trials = state.get("trials") if isinstance(state, dict) else None
    return len(trials) if isinstance(trials, dict) else 0
