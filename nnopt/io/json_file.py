"""Read a JSON file that may be hostile or damaged: one error type for every way it can be unreadable."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class JSONFileError(ValueError):
    """``path`` is not UTF-8 JSON, or nests deeper than the parser's recursion limit."""


def read_json(path: str | Path) -> Any:
    """The JSON value in ``path``. Not UTF-8, not JSON or nested too deep to parse -> :class:`JSONFileError`
    (a ``ValueError``) with a short reason; ``OSError`` from reading passes through."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        # a deeply nested document exhausts the decoder's recursion: bad input, not a crash
        raise JSONFileError(str(exc)[:200]) from None


def read_json_document(path: Path, error: type[Exception], missing: str, unreadable: str) -> Any:
    """:func:`read_json` of a file that must be there: ``error(missing)`` when it is not a file,
    ``error(f"{unreadable}: {reason}")`` when it cannot be parsed."""
    if not path.is_file():
        raise error(missing)
    try:
        return read_json(path)
    except JSONFileError as exc:
        raise error(f"{unreadable}: {exc}") from None
