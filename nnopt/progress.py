"""Progress bars for long work: shown on a terminal, silent in pipes, tests and CI."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Protocol


class Tracker(Protocol):
    def advance(self, steps: int = 1, **fields: str) -> None: ...


class _Silent:
    def advance(self, steps: int = 1, **fields: str) -> None:
        pass


class _RichTracker:
    def __init__(self, progress: object, task: object) -> None:
        self._progress = progress
        self._task = task

    def advance(self, steps: int = 1, **fields: str) -> None:
        self._progress.update(self._task, advance=steps, **fields)  # type: ignore[attr-defined]


@contextlib.contextmanager
def track(description: str, total: int, enabled: bool | None = None) -> Iterator[Tracker]:
    """A progress bar over ``total`` steps; ``enabled=None`` means "only on a terminal"."""
    show = sys.stderr.isatty() if enabled is None else enabled
    if not show:
        yield _Silent()
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task(description, total=total, status="")
        yield _RichTracker(progress, task)
