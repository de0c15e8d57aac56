"""The user's own ``nn.Module``: how its record names the architecture, and how it is rebuilt.

A user module's record (architecture :data:`~nnopt.lineage.USER_MODULE`) holds three fields, all data:
``class`` (``package.module:QualName`` of the module's class), ``factory`` (the import path of what
rebuilds the untrained module: the class itself by default, ``None`` when it cannot be imported) and
``kwargs`` (JSON keyword arguments for it). Nothing stored is ever evaluated; a recorded path is
imported only when the caller allows it (``trust_import=True``), after checks:

- the path is dotted Python identifiers, one colon, no dunder part (``os:system; rm`` or
  ``__import__`` never reach ``importlib``);
- its top-level package is not the standard library (``os``, ``subprocess``, ``builtins``...);
- the object is an ``nn.Module`` subclass, or a plain Python function annotated to return one
  (a builtin such as ``eval`` or an unannotated function is refused before it is called);
- what it returns is an ``nn.Module``.

>>> user_builder({"class": "os:system", "factory": "os:system", "kwargs": {}})  # doctest: +SKIP
Traceback (most recent call last):
UnsafeFileError: ... pass factory=... or trust_import=True ...
"""

from __future__ import annotations

import builtins
import contextlib
import importlib
import inspect
import re
import sys
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from nnopt.errors import ConfigError, ModelFormatError, NnoptError, UnsafeFileError
from nnopt.lineage import USER_MODULE, AppliedPass, Lineage, class_path, unimportable_reason

Builder = Callable[[], nn.Module]
TRUST_HINT = "trust_import=True (CLI: --trust-import)"
FACTORY_HINT = "factory=<a callable returning the untrained module>"


_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
# What may be imported: dotted identifiers, one colon, dotted identifiers (matched in full, no newline).
_IMPORT_PATH = re.compile(rf"{_IDENT}(?:\.{_IDENT})*:{_IDENT}(?:\.{_IDENT})*")
# A recorded class path: data only (never imported), so a local class's "<locals>" part is allowed.
_PART = rf"(?:{_IDENT}|<locals>)"
_CLASS_PATH = re.compile(rf"{_IDENT}(?:\.{_IDENT})*:{_PART}(?:\.{_PART})*")


class FactoryError(ModelFormatError):
    """The user's factory raised, or returned something that is not an ``nn.Module``."""


def is_import_path(text: object) -> bool:
    """Whether ``text`` is ``package.module:name`` (dotted Python identifiers, one colon), nothing more."""
    return isinstance(text, str) and _IMPORT_PATH.fullmatch(text) is not None


def check_user_config(config: Mapping[str, Any]) -> tuple[str, str | None, dict[str, Any]]:
    """The record's ``class``, ``factory`` and ``kwargs``, validated as data (nothing is imported)."""
    if not isinstance(config, Mapping):
        raise ModelFormatError("malformed user-module record: its config must be a mapping")
    cls, factory, kwargs = config.get("class"), config.get("factory", ...), config.get("kwargs", {})
    if not isinstance(cls, str) or not _CLASS_PATH.fullmatch(cls):
        raise ModelFormatError(f"malformed user-module record: 'class' must be package.module:Name, got {cls!r}")
    if factory is ...:
        raise ModelFormatError(f"malformed user-module record for {cls}: it has no 'factory' field (an import "
                               f"path, or null); pass load_model(..., {FACTORY_HINT})")
    if factory is not None and not (isinstance(factory, str) and is_import_path(factory)):
        raise ModelFormatError(
            f"user-module record for {cls}: factory {str(factory)[:100]!r} is not an import path of the form "
            "package.module:name (dotted Python identifiers, one colon); it is never imported")
    if not (isinstance(kwargs, dict) and all(isinstance(k, str) for k in kwargs)):
        raise ModelFormatError(f"user-module record for {cls}: 'kwargs' must be a mapping with string keys")
    return cls, factory, dict(kwargs)


def user_builder(
    config: Mapping[str, Any], factory: Callable[..., Any] | None = None, trust_import: bool = False
) -> Builder:
    """A zero-argument builder of the untrained module a user-module record describes.

    With ``factory`` (the caller's own callable) it is called with the recorded ``kwargs``. Otherwise
    the recorded factory path is imported, only when ``trust_import``; without it nothing is imported
    and the error names the path and both ways on.
    """
    cls, recorded, kwargs = check_user_config(config)
    if factory is not None:
        if not callable(factory):
            raise ConfigError(f"factory must be a callable returning the untrained module, "
                              f"got {type(factory).__name__}")
        return lambda: call_factory(factory, kwargs, _describe(factory))
    if recorded is None:
        reason = unimportable_reason(cls) or "no importable factory was recorded"
        raise ModelFormatError(
            f"the model is the user module {cls}, which nnopt cannot import ({reason}); pass "
            f"load_model(..., {FACTORY_HINT})")
    if not trust_import:
        raise UnsafeFileError(
            f"the model is the user module {cls}: rebuilding it needs {recorded}{_call_text(kwargs)}. "
            f"nnopt imports code named in a file only when you allow it: pass {FACTORY_HINT}, or "
            f"{TRUST_HINT} to import {recorded.partition(':')[0]}")
    target = resolve(recorded, may_import=True)
    return lambda: call_factory(target, kwargs, recorded)


def resolve(path: str, may_import: bool) -> Callable[..., Any]:
    """The module class or annotated function at ``path``, after the checks of this module's docstring.

    ``may_import=False``: only a module already imported in this process is used (no code runs).
    """
    if not is_import_path(path):
        raise ModelFormatError(f"{str(path)[:100]!r} is not an import path of the form package.module:name")
    reason = unimportable_reason(path)
    if reason is not None:
        raise UnsafeFileError(f"refusing to import {path}: {reason}")
    module_name, _, attr_path = path.partition(":")
    top = module_name.split(".")[0]
    if top in sys.stdlib_module_names or top == "builtins":
        raise UnsafeFileError(f"refusing to import {path}: nnopt rebuilds models from your packages, never "
                              "from the standard library")
    target: Any = _import(module_name, path) if may_import else sys.modules.get(module_name)
    if target is None:
        raise ModelFormatError(f"{module_name} is not imported in this process; pass factory= to rebuild {path}")
    for part in attr_path.split("."):
        if not hasattr(target, part):
            raise ModelFormatError(f"cannot rebuild the model: {module_name} has no attribute {attr_path!r}")
        target = getattr(target, part)
    if isinstance(target, type) and issubclass(target, nn.Module):
        return target
    if inspect.isfunction(target):
        if _returns_module(target):
            return target
        raise UnsafeFileError(
            f"refusing to call {path}: a factory function must declare that it returns an nn.Module "
            "(def make(...) -> nn.Module), so that nnopt can tell it from other functions before calling it")
    raise UnsafeFileError(f"refusing to call {path}: it is a {type(target).__name__}, not an nn.Module class or a "
                          "function returning one")


def call_factory(factory: Callable[..., Any], kwargs: Mapping[str, Any], where: str) -> nn.Module:
    """``factory(**kwargs)``, which must return an ``nn.Module``; its own errors become one line."""
    try:
        model = factory(**kwargs)
    except NnoptError:
        raise
    except Exception as exc:  # the user's code: name it, in one line
        raise FactoryError(f"{where}{_call_text(dict(kwargs))} raised {type(exc).__name__}: {exc}"[:500]) from None
    if not isinstance(model, nn.Module):
        raise FactoryError(f"{where} returned a {type(model).__name__}, not a torch nn.Module")
    return model


def save_record(
    model: nn.Module, lineage: Lineage, factory: str | Callable[..., Any] | None,
    factory_kwargs: Mapping[str, Any] | None,
) -> tuple[Lineage, Builder]:
    """The lineage to save for a user module (``factory``/``factory_kwargs`` applied) and the builder that
    rebuilds its untrained architecture in this process, for the check before saving.

    A string ``factory`` is imported (your explicit choice); a callable is used as is and recorded by its
    import path when it has one. Without ``factory``, the recorded path is used only if this process has
    already imported it (saving never imports code a loaded file named).
    """
    cls, recorded, kwargs = check_user_config(lineage.config)
    if factory_kwargs is not None:
        if not isinstance(factory_kwargs, Mapping) or not all(isinstance(k, str) for k in factory_kwargs):
            raise ConfigError("factory_kwargs must be a mapping with string keys")
        kwargs = _json_kwargs(factory_kwargs)
    target: Callable[..., Any]
    if isinstance(factory, str):
        target = resolve(factory, may_import=True)
        recorded = factory
    elif factory is not None:
        if not callable(factory):
            raise ConfigError(f"factory must be an import path (package.module:function) or a callable, got "
                              f"{type(factory).__name__}")
        target = factory
        path = _describe(factory)
        recorded = path if _resolves_to(path, factory) else None
    elif recorded is not None and recorded == cls == class_path(type(model)):
        target = type(model)  # the class itself, already in this process
    elif recorded is not None:
        target = resolve(recorded, may_import=False)
    else:
        target = type(model)  # unimportable: verified here, and loading will need factory=
    config = {"class": cls, "factory": recorded, "kwargs": kwargs}
    # the sample shape and dtype noted from the data it was optimized with (see nnopt.lineage.note_input)
    config.update({key: lineage.config[key] for key in ("input_shape", "input_dtype") if key in lineage.config})
    saved = Lineage(USER_MODULE, config, list(lineage.applied))
    where = recorded or _describe(target)
    return saved, lambda: call_factory(target, kwargs, where)


def check_rebuild(model: nn.Module, lineage: Lineage, builder: Builder,
                  replay: Callable[[nn.Module, AppliedPass], None]) -> nn.Module:
    """Refuse to save unless ``builder`` + the recorded passes (each re-created by ``replay``, the technique
    registry's) give exactly ``model``'s tensor names, shapes and dtypes. Built on the meta device (no
    memory), on the CPU when that fails. Returns the untrained build."""
    cls = lineage.config.get("class")
    how = f"{lineage.config.get('factory') or cls}{_call_text(lineage.config.get('kwargs', {}))}"
    passes = f" and its {len(lineage.applied)} recorded passes" if lineage.applied else ""
    fix = ("pass save_model(..., factory='package.module:function', factory_kwargs={...}) (or a callable) that "
           "builds this architecture untrained")
    last: Exception | None = None
    for device in (torch.device("meta"), None):
        try:
            with device if device is not None else contextlib.nullcontext():
                rebuilt = builder()
                for applied in lineage.applied:
                    replay(rebuilt, applied)
        except Exception as exc:  # meta-unsupported ops, then the real failure on the CPU
            last = exc
            continue
        difference = _difference(model.state_dict(), rebuilt.state_dict())
        if difference:
            raise ModelFormatError(f"cannot save {type(model).__name__}: rebuilding it as {how}{passes} gives "
                                   f"different tensors ({difference}); {fix}")
        return rebuilt
    detail = str(last) if isinstance(last, NnoptError) else f"{type(last).__name__}: {last}"
    not_ours = " was not created by nnopt and" if not lineage.applied else ""
    raise ModelFormatError(f"{type(model).__name__}{not_ours} cannot be rebuilt as {how}{passes} ({detail[:300]}); "
                           f"{fix}")


def _difference(model: Mapping[str, torch.Tensor], rebuilt: Mapping[str, torch.Tensor]) -> str:
    """The first difference in names, dtypes or shapes between two state dicts, in words ("" if none)."""
    missing, extra = sorted(set(model) - set(rebuilt)), sorted(set(rebuilt) - set(model))
    if missing:
        return f"the model has tensor {missing[0]!r} that the rebuilt one lacks ({len(missing)} such)"
    if extra:
        return f"the rebuilt module has tensor {extra[0]!r} that the model lacks ({len(extra)} such)"
    for name, tensor in model.items():
        other = rebuilt[name]
        if tensor.dtype != other.dtype or tensor.shape != other.shape:
            return (f"tensor {name!r} is {tensor.dtype} {tuple(tensor.shape)} in the model, "
                    f"{other.dtype} {tuple(other.shape)} when rebuilt")
    return ""


def _import(module_name: str, path: str) -> Any:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise ModelFormatError(f"cannot rebuild the model from {path}: no module named {exc.name!r} on the "
                                   "Python path (install it, or pass factory=)") from None
        raise ModelFormatError(f"importing {module_name} for {path} failed: {exc}") from None
    except Exception as exc:  # the module's own import-time code failed
        raise ModelFormatError(f"importing {module_name} for {path} failed: {type(exc).__name__}: {exc}") from None


def _returns_module(function: Callable[..., Any]) -> bool:
    """Whether ``function``'s return annotation names an nn.Module subclass, resolved by attribute lookup
    only (a string annotation is never evaluated)."""
    annotation = inspect.get_annotations(function).get("return")
    if isinstance(annotation, str):
        parts = annotation.strip().split(".")
        if not all(part.isidentifier() and not part.startswith("__") for part in parts):
            return False
        namespace = getattr(function, "__globals__", {})
        annotation = namespace.get(parts[0], getattr(builtins, parts[0], None))
        for part in parts[1:]:
            annotation = getattr(annotation, part, None)
    return isinstance(annotation, type) and issubclass(annotation, nn.Module)


def _describe(obj: Any) -> str:
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if isinstance(module, str) and isinstance(qualname, str):
        return f"{module}:{qualname}"
    return repr(obj)[:100]


def _resolves_to(path: str, obj: Any) -> bool:
    """Whether ``path`` names ``obj`` in a module this process has imported (so a later process can import it)."""
    if not is_import_path(path) or unimportable_reason(path) is not None:
        return False
    with contextlib.suppress(NnoptError):
        return resolve(path, may_import=False) is obj
    return False


def _json_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    import json

    try:
        return dict(json.loads(json.dumps(dict(kwargs), allow_nan=False)))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"factory_kwargs must be JSON data (numbers, strings, lists, mappings): {exc}") from None


def _call_text(kwargs: Mapping[str, Any]) -> str:
    return "(" + ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) + ")"
