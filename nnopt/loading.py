"""Loading an nnopt model directory: the architecture by name, then each recorded pass's replay.

This is the load path of the layering: it sits above the techniques, which it imports so that
their registrations (:mod:`nnopt.techniques`) can replay the structure each recorded pass
produced. Nothing stored is executed: ``nnopt.json`` is JSON, the weights are safetensors (or
nnopt's packed format), and every tensor's name, dtype and shape is checked before it is loaded.

>>> import nnopt
>>> saved = nnopt.save_model(nnopt.create_model("simplenet"), "simplenet-dir")
>>> type(load_model(saved.path)).__name__
'MLP'
"""

from __future__ import annotations

import contextlib
from pathlib import Path

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
from nnopt.models.registry import build_from_lineage
from nnopt.techniques import replay_structure

__all__ = ["load_model"]


def load_model(path: str | Path) -> nn.Module:
    """Load an nnopt model directory without executing any stored code.

    The weights file's sha256 must match the record; the architecture is rebuilt by name, the
    recorded passes re-create their structure, then tensors are loaded strictly.
    """
    path = Path(path)
    meta = read_meta(path)
    lineage = Lineage.from_dict(meta)
    weights = path / weights_file(meta)
    # First on the meta device, which allocates nothing: a record claiming huge layers is refused before
    # any real memory is taken for it, and a packed file may not declare more bytes than the model holds.
    expected = None
    with contextlib.suppress(_MetaUnsupported):
        expected = _build(path, lineage, torch.device("meta")).state_dict()
    limit = None if expected is None else sum(t.numel() * t.element_size() for t in expected.values())
    tensors = read_weights(path, meta, max_bytes=limit)
    if expected is not None:
        check_tensors(weights, expected, tensors, finite=False)
    model = _build(path, lineage, None)
    check_tensors(weights, model.state_dict(), tensors)
    model.load_state_dict(tensors, strict=True)  # cannot fail now: names, dtypes and shapes were checked
    set_lineage(model, lineage)
    for layer in compressed_layers(model).values():
        layer.check_loaded()
    return model.eval()


class _MetaUnsupported(Exception):
    """An architecture or replay that cannot be built on the meta device (then only the real build checks)."""


def _build(path: Path, lineage: Lineage, device: torch.device | None) -> nn.Module:
    try:
        with device if device is not None else contextlib.nullcontext():
            model = build_from_lineage(lineage)
            for applied in lineage.applied:
                replay_structure(model, applied)
        return model
    except NnoptError:
        raise
    except (KeyError, AttributeError, ValueError, TypeError, RuntimeError, NotImplementedError) as exc:
        if device is not None:
            raise _MetaUnsupported from exc
        raise ModelFormatError(f"{path / META_FILE} describes a model that cannot be built: {exc!r}") from None
