"""Read a YAML recipe file safely (``yaml.safe_load``: nothing in it is executed), with one clear error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nnopt.errors import ConfigError


def read_yaml_file(path: str | Path) -> Any:
    """The data in the YAML file ``path``; a missing file, a directory, text that is not UTF-8 or invalid
    YAML is a :class:`ConfigError` naming the file (and the line and column where YAML says)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such recipe file" if not path.exists() else f"{path}: not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: {where}invalid YAML: {problem}") from None
