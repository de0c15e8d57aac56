"""Loading an nnopt model directory: the architecture by name, then each recorded pass's replay.

This is the load path of the layering: it sits above the techniques, which it imports so that
their registrations (:mod:`nnopt.techniques`) can replay the structure each recorded pass
produced. Nothing stored is executed: ``nnopt.json`` is JSON, the weights are safetensors (or
nnopt's packed format), and every tensor's name, dtype and shape is checked before it is loaded.

A user's own module (record ``user-module``) is rebuilt by the caller's ``factory``, or by importing
the recorded path only when the caller allows it: ``trust_import=True``, or inside
:func:`trusting_imports` (which the CLI's ``--trust-import`` uses).

>>> import nnopt
>>> saved = nnopt.save_model(nnopt.create_model("simplenet"), "simplenet-dir")
>>> type(load_model(saved.path)).__name__
'MLP'
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import torch
from torch import nn

import nnopt.pruning  # noqa: F401  (the built-in techniques register their replays on import)
import nnopt.quantization  # noqa: F401
import nnopt.simplification  # noqa: F401
import nnopt.sparse  # noqa: F401
from nnopt.errors import ModelFormatError, NnoptError
from nnopt.io.model_dir import META_FILE, check_tensors, read_meta, read_weights, weights_file
from nnopt.layers.protocol import compressed_layers
from nnopt.lineage import Lineage, set_lineage
from nnopt.models.registry import architecture_builder
from nnopt.models.user_module import FactoryError
from nnopt.techniques import replay_structure

__all__ = ["load_model", "trusting_imports"]

# Whether load_model may import a user module's recorded path when its caller does not say (None).
# Set only inside `trusting_imports()`, and reset when that block ends.
_TRUST_IMPORT: ContextVar[bool] = ContextVar("nnopt_trust_import", default=False)


@contextlib.contextmanager
def trusting_imports(trust: bool = True) -> Iterator[None]:
    """Within this block, :func:`load_model` calls that leave ``trust_import`` unset use ``trust``.

    For code that loads models through layers that do not pass ``trust_import`` on (the CLI's
    ``--trust-import`` wraps a command in it).

    >>> with trusting_imports():  # doctest: +SKIP
    ...     model = load_model("my-net")
    """
    token = _TRUST_IMPORT.set(bool(trust))
    try:
        yield
    finally:
        _TRUST_IMPORT.reset(token)


def trusted_imports() -> bool:
    """Whether :func:`load_model` calls that leave ``trust_import`` unset may import now
    (see :func:`trusting_imports`)."""
    return _TRUST_IMPORT.get()


def load_model(
    path: str | Path, factory: Callable[..., Any] | None = None, trust_import: bool | None = None
) -> nn.Module:
    """Load an nnopt model directory without executing any stored code.

    The weights file's sha256 must match the record; the architecture is rebuilt by name, the
    recorded passes re-create their structure, then tensors are loaded strictly.

    A user's own module (saved by :func:`nnopt.save_model` from any ``nn.Module``) is rebuilt by
    ``factory``, a callable returning the untrained module (called with the keyword arguments the
    record holds: none unless ``factory_kwargs`` were given when saving). Without ``factory`` the
    recorded import path (``package.module:Name``) is imported only with ``trust_import=True``, as
    ``trust_remote_code`` elsewhere: it runs that package's code. Otherwise (the default, False; or
    the value of an enclosing :func:`trusting_imports` block) nothing is imported and the error names
    the path and both options.

    >>> model = load_model("my-net", factory=lambda: MyNet())  # doctest: +SKIP
    """
    path = Path(path)
    meta = read_meta(path)
    lineage = Lineage.from_dict(meta)
    trusted = _TRUST_IMPORT.get() if trust_import is None else bool(trust_import)
    # Every refusal (unknown architecture, import not allowed) comes now, before anything is read or built.
    builder = architecture_builder(lineage, factory, trusted)
    weights = path / weights_file(meta)
    # First on the meta device, which allocates nothing: a record claiming huge layers is refused before
    # any real memory is taken for it, and a packed file may not declare more bytes than the model holds.
    expected = None
    with contextlib.suppress(_MetaUnsupported):
        expected = _build(path, builder, lineage, torch.device("meta")).state_dict()
    limit = None if expected is None else sum(t.numel() * t.element_size() for t in expected.values())
    tensors = read_weights(path, meta, max_bytes=limit)
    if expected is not None:
        check_tensors(weights, expected, tensors, finite=False)
    model = _build(path, builder, lineage, None)
    check_tensors(weights, model.state_dict(), tensors)
    model.load_state_dict(tensors, strict=True)  # cannot fail now: names, dtypes and shapes were checked
    set_lineage(model, lineage)
    for layer in compressed_layers(model).values():
        layer.check_loaded()
    return model.eval()


class _MetaUnsupported(Exception):
    """An architecture or replay that cannot be built on the meta device (then only the real build checks)."""


def _build(path: Path, builder: Callable[[], nn.Module], lineage: Lineage, device: torch.device | None) -> nn.Module:
    try:
        with device if device is not None else contextlib.nullcontext():
            model = builder()
            for applied in lineage.applied:
                replay_structure(model, applied)
        return model
    except FactoryError:
        if device is not None:  # the user's code may not run on the meta device: the real build decides
            raise _MetaUnsupported from None
        raise
    except NnoptError:
        raise
    except (KeyError, AttributeError, ValueError, TypeError, RuntimeError, NotImplementedError) as exc:
        if device is not None:
            raise _MetaUnsupported from exc
        raise ModelFormatError(f"{path / META_FILE} describes a model that cannot be built: {exc!r}") from None
