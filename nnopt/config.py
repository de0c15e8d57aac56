"""Frozen, validated configuration objects shared by the Python API, the CLI and recipes.

Every technique is configured by one subclass of :class:`Config`. A config validates itself on
construction, converts to and from plain dicts (JSON/YAML), and rejects unknown keys by name.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, ClassVar, TypeVar

from nnopt.errors import ConfigError

C = TypeVar("C", bound="Config")

CONFIG_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Config:
    """Base class. Subclasses are frozen dataclasses and override :meth:`validate`."""

    kind: ClassVar[str] = "config"

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            # Lists from YAML/JSON become tuples so configs stay hashable and immutable.
            if isinstance(value, list):
                object.__setattr__(self, field.name, tuple(value))
        self._check_types()
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the bad field. Subclasses extend this."""

    def _check_types(self) -> None:
        hints = typing.get_type_hints(type(self))
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not _matches(value, hints[field.name]):
                raise ConfigError(
                    f"{type(self).__name__}.{field.name}: expected {_type_name(hints[field.name])}, "
                    f"got {type(value).__name__} {value!r}"
                )

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form, with the config's kind and version for later reloading."""
        data = {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}
        return {"kind": self.kind, "version": CONFIG_VERSION, **data}

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any], where: str = "") -> C:
        """Build from plain data; unknown keys are an error that names them and ``where``."""
        if not isinstance(data, dict):
            raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
        payload = dict(data)
        kind = payload.pop("kind", cls.kind)
        payload.pop("version", None)
        if kind != cls.kind:
            raise ConfigError(f"{where or cls.__name__}: kind {kind!r} is not {cls.kind!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(payload) - names)
        if unknown:
            place = f" in {where}" if where else ""
            raise ConfigError(
                f"unknown key(s) {', '.join(map(repr, unknown))}{place} for {cls.__name__}; "
                f"allowed: {', '.join(sorted(names))}"
            )
        return cls(**payload)


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Config):
        return value.to_dict()
    return value


def _matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(v, args[0]) for v in value)
        return len(args) == len(value) and all(_matches(v, a) for v, a in zip(value, args))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if hint is float:
        # An int is a fine float; a bool is not a number here.
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
