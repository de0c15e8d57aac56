"""nnopt's own errors. The CLI turns each into a one-line message and exit code 2."""

from __future__ import annotations


class NnoptError(Exception):
    """Base class: a problem with the user's input that nnopt can name."""

    exit_code = 2


class ConfigError(NnoptError, ValueError):
    """A configuration value is invalid (wrong type, out of range, unknown key)."""


class ModelFormatError(NnoptError):
    """A path is missing, is not an nnopt model, or its files are corrupt."""


class UnsafeFileError(NnoptError):
    """A file could execute code when loaded (pickle, Keras .h5) and was refused."""


class OutputError(NnoptError):
    """An output location is unsafe to write (it is the input, or holds foreign files)."""


class SelectionError(NnoptError):
    """A layer selection matched nothing."""


class UnsupportedModelError(NnoptError):
    """A model contains layers or operations that nnopt cannot handle."""


class IntegrityError(NnoptError):
    """A file's contents do not match its recorded hash, or an input changed during a run."""


class ResumeError(NnoptError):
    """A checkpoint cannot be resumed (missing, corrupt, or written by a different run)."""


def brief(exc: BaseException, limit: int = 300) -> str:
    """``Type: message`` on one line, cut at ``limit`` characters: library messages can span lines and
    quote whole configs, and the CLI prints one line."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:limit]}{'…' if len(text) > limit else ''}"
