"""Training checkpoints: an interrupted fine-tuning run resumes exactly where it stopped.

Every ``every`` epochs (and after the last one) :func:`nnopt.train` writes, atomically, a
checkpoint directory holding

- ``tensors.safetensors``: model and optimizer state tensors, callback tensors (pruning masks,
  the best weights kept so far) and the random number generators' states;
- ``checkpoint.json``: the epoch and optimizer step reached, the history so far, scalar state
  of the optimizer, the callbacks (the pruning schedule's position) and the generators (Python's
  ``random``, NumPy's, the data-shuffling one and torch's), and the run's fingerprint;
- ``manifest.json``: sha256 of both, checked before anything is restored.

The fingerprint hashes what makes a run the same run: the training config, the data, the
model's state when training started, the callbacks and the loss, plus what the caller adds
(the pruning or QAT config, the input model's files). Resuming restores every piece, so the
resumed run computes bit for bit what the uninterrupted one would have (on the same machine).

Resuming with no checkpoint is an error rather than a silent fresh start (a typo in the
directory would otherwise throw the progress away); so is starting afresh over an existing
checkpoint. The checkpoint is removed when the run succeeds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from nnopt.errors import ConfigError, ModelFormatError, OutputError, ResumeError
from nnopt.io.atomic import atomic_directory, check_replaceable, clean_leftovers, remove_directory, write_bytes_durable
from nnopt.io.json_file import read_json

STATE_FILE = "checkpoint.json"
TENSORS_FILE = "tensors.safetensors"
CHECKPOINT_FILES = (STATE_FILE, TENSORS_FILE)  # the first one marks a checkpoint directory
FORMAT = "nnopt-checkpoint"
FORMAT_VERSION = 1
RESUME_HINT = "--resume (resume=True in Python)"


@dataclasses.dataclass(frozen=True)
class CheckpointSpec:
    """Where and how often :func:`nnopt.train` checkpoints.

    ``identity`` adds fingerprint parts (name → JSON-able value) that must match on resume;
    ``remove_on_success=False`` leaves the removal to a caller with more work after training
    (a CLI run removes it once its output is committed).

    >>> spec = CheckpointSpec("run.ckpt", every=2)
    >>> train(model, data, TrainConfig(epochs=10), checkpoint=spec)  # doctest: +SKIP
    >>> train(model, data, TrainConfig(epochs=10), checkpoint=spec, resume=True)  # after Ctrl-C  # doctest: +SKIP
    """

    directory: Path
    every: int = 1
    identity: dict[str, Any] = dataclasses.field(default_factory=dict)
    remove_on_success: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "directory", Path(self.directory))
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise ConfigError(f"checkpoint every must be an integer >= 1 (epochs), got {self.every!r}")

    def with_identity(self, parts: dict[str, Any]) -> CheckpointSpec:
        return dataclasses.replace(self, identity={**self.identity, **parts})


def is_checkpoint(directory: str | Path) -> bool:
    return (Path(directory) / STATE_FILE).is_file()


def check_start(spec: CheckpointSpec, resume: bool) -> None:
    """Before any work: resuming needs a checkpoint, starting afresh needs none."""
    directory = spec.directory
    clean_leftovers(directory)  # a checkpoint moved aside by a killed writer comes back first
    exists = directory.exists() or directory.is_symlink()
    if resume and not exists:
        raise ResumeError(
            f"no checkpoint at {directory} to resume: the run finished (its checkpoint is removed then) or "
            "stopped before its first checkpoint; run without --resume to start afresh"
        )
    if not resume and exists:
        if not is_checkpoint(directory):
            raise OutputError(f"refusing to write checkpoints to {directory}: it exists and is not an nnopt checkpoint")
        raise ResumeError(
            f"{directory} holds the checkpoint of an interrupted run: continue it with {RESUME_HINT}, "
            "or delete it to start afresh"
        )
    if exists:
        check_replaceable(directory, CHECKPOINT_FILES)


def remove_checkpoint(directory: str | Path) -> None:
    """Remove a checkpoint directory (only one: anything else there is left alone)."""
    directory = Path(directory)
    if is_checkpoint(directory):
        check_replaceable(directory, CHECKPOINT_FILES)
        remove_directory(directory)


def checkpoint_progress(directory: str | Path) -> tuple[int, int] | None:
    """``(epoch, epochs)`` saved in the checkpoint at ``directory``; None without a readable one."""
    try:
        state = read_json(Path(directory) / STATE_FILE)
        return int(state["epoch"]), int(state["epochs"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


# --------------------------------------------------------------------------- fingerprint


def _digest(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=repr)
    return hashlib.sha256(text.encode()).hexdigest()


def tensor_digest(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes."""
    t = tensor.detach().cpu().contiguous()
    digest = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _describe_split(split: Any) -> dict[str, Any]:
    return {"rows": len(split), "x": tensor_digest(split.x), "y": tensor_digest(split.y)}


def training_fingerprint(
    config: Any, data: Any, model: nn.Module, callbacks: Sequence[Any], eval_data: Any = None, loss: Any = None,
    identity: dict[str, Any] | None = None,
) -> dict[str, str]:
    """Per part (training, data, model, ...) a sha256; resuming requires every one to match."""
    parts: dict[str, Any] = {
        "training config": config.to_dict(),
        "training data": _describe_split(data),
        "model at the start": {name: tensor_digest(t) for name, t in model.state_dict().items()},
        "callbacks": [type(c).__qualname__ for c in callbacks],
        "loss": "cross-entropy" if loss is None else getattr(loss, "__qualname__", type(loss).__qualname__),
    }
    if eval_data is not None:
        parts["evaluation data"] = _describe_split(eval_data)
    parts.update(identity or {})
    return {name: _digest(value) for name, value in parts.items()}


# --------------------------------------------------------------------------- state encoding


def _encode(obj: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-able form of nested state; tensors move to ``tensors`` and leave a reference."""
    if isinstance(obj, torch.Tensor):
        name = f"{len(tensors)}:{key}"  # the counter keeps names unique whatever the keys contain
        tensors[name] = obj.detach().cpu().contiguous().clone()
        return {"$tensor": name}
    if isinstance(obj, dict):
        return {"$map": [[k, _encode(v, f"{key}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        items = [_encode(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]
        return {"$tuple": items} if isinstance(obj, tuple) else items
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise ConfigError(f"checkpoint state {key}: cannot store a {type(obj).__name__}")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "$tensor" in obj:
            return tensors[obj["$tensor"]]
        if "$tuple" in obj:
            return tuple(_decode(v, tensors) for v in obj["$tuple"])
        return {k: _decode(v, tensors) for k, v in obj["$map"]}
    return obj


def _rng_state(generator: torch.Generator) -> dict[str, Any]:
    # legacy=True (the default) with the global MT19937: the 5-tuple, never the dict form
    state = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state())
    kind, keys, pos, has_gauss, cached = state
    return {
        "torch": torch.get_rng_state(),
        "shuffle": generator.get_state(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "python": random.getstate(),
    }


def _set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["shuffle"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])


# --------------------------------------------------------------------------- the checkpointer


class Checkpointer:
    """Writes and restores the state of one training loop (see the module docstring).

    Callbacks take part by defining ``checkpoint_state() -> dict`` (tensors and JSON-able values)
    and ``restore_state(state, model)``.
    """

    def __init__(
        self, spec: CheckpointSpec, fingerprint: dict[str, str], epochs: int, model: nn.Module,
        optimizer: torch.optim.Optimizer, generator: torch.Generator, callbacks: Sequence[Any],
    ) -> None:
        self.spec, self.fingerprint, self.epochs = spec, fingerprint, epochs
        self.model, self.optimizer, self.generator, self.callbacks = model, optimizer, generator, callbacks

    def begin(self, resume: bool, history: Any) -> tuple[int, int]:
        """Check the directory; on resume restore everything. Returns ``(epoch, step)`` reached."""
        check_start(self.spec, resume)
        if not resume:
            return 0, 0
        state, tensors = self._read()
        self._check_fingerprint(state)
        self.model.load_state_dict(_decode(state["model"], tensors), strict=True)
        self.optimizer.load_state_dict(_decode(state["optimizer"], tensors))
        saved_callbacks = _decode(state["callbacks"], tensors)
        for index, callback in enumerate(self.callbacks):
            restore = getattr(callback, "restore_state", None)
            if restore is not None:
                if index not in saved_callbacks:
                    raise ResumeError(f"the checkpoint in {self.spec.directory} holds no state for callback "
                                      f"{type(callback).__qualname__}")
                restore(saved_callbacks[index], self.model)
        for name, value in _decode(state["history"], tensors).items():
            setattr(history, name, value)
        _set_rng_state(_decode(state["rng"], tensors), self.generator)
        return int(state["epoch"]), int(state["step"])

    def end_epoch(self, epoch: int, step: int, history: Any) -> None:
        """After ``epoch`` (1-based) epochs: write a checkpoint when one is due."""
        if epoch % self.spec.every and epoch != self.epochs:
            return
        tensors: dict[str, torch.Tensor] = {}
        callbacks = {
            index: callback.checkpoint_state()
            for index, callback in enumerate(self.callbacks) if hasattr(callback, "checkpoint_state")
        }
        state = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "epoch": epoch, "epochs": self.epochs,
            "step": step, "fingerprint": self.fingerprint,
            "history": _encode(dataclasses.asdict(history), "history", tensors),
            "model": _encode(self.model.state_dict(), "model", tensors),
            "optimizer": _encode(self.optimizer.state_dict(), "optimizer", tensors),
            "callbacks": _encode(callbacks, "callbacks", tensors),
            "rng": _encode(_rng_state(self.generator), "rng", tensors),
        }
        from safetensors.torch import save as st_save

        payload = st_save(tensors, metadata={"format": FORMAT})
        with atomic_directory(self.spec.directory, replace_if=CHECKPOINT_FILES) as tmp:
            write_bytes_durable(tmp / TENSORS_FILE, payload)
            write_bytes_durable(tmp / STATE_FILE, (json.dumps(state) + "\n").encode())

    def finish(self) -> None:
        if self.spec.remove_on_success:
            remove_checkpoint(self.spec.directory)

    def _read(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        from safetensors import SafetensorError
        from safetensors.torch import load as st_load

        from nnopt.io.manifest import verify_directory

        directory = self.spec.directory
        try:
            result = verify_directory(directory)
        except ModelFormatError as exc:
            raise ResumeError(f"{directory} is not a complete checkpoint ({exc}); delete it to start afresh") from None
        if not result.ok:
            damaged = ", ".join((*result.changed, *result.missing, *result.extra))
            raise ResumeError(f"the checkpoint in {directory} is damaged ({damaged} do not match its manifest); "
                              "delete it to start afresh")
        try:
            state = read_json(directory / STATE_FILE)
            tensors = st_load((directory / TENSORS_FILE).read_bytes())
        except (OSError, ValueError, SafetensorError) as exc:
            raise ResumeError(f"the checkpoint in {directory} cannot be read: {exc}") from None
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise ResumeError(f"{directory / STATE_FILE} is not an nnopt checkpoint")
        if state.get("format_version") != FORMAT_VERSION:
            raise ResumeError(f"{directory / STATE_FILE} has format_version {state.get('format_version')!r}; "
                              f"this nnopt resumes {FORMAT_VERSION}")
        return state, tensors

    def _check_fingerprint(self, state: dict[str, Any]) -> None:
        stored = state.get("fingerprint")
        if not isinstance(stored, dict):
            raise ResumeError(f"{self.spec.directory / STATE_FILE} has no fingerprint")
        differ = sorted(k for k in {*stored, *self.fingerprint} if stored.get(k) != self.fingerprint.get(k))
        if differ:
            raise ResumeError(
                f"the checkpoint in {self.spec.directory} belongs to a different run: {', '.join(differ)} "
                f"differ{'s' if len(differ) == 1 else ''}; resume with the same command, input and data, "
                "or delete it to start afresh"
            )


def checkpoint_context(checkpoint: CheckpointSpec | None, resume: bool) -> dict[str, Any]:
    """Keyword arguments for a verb's passes: only when set, so passes that do not train never see them."""
    return {"checkpoint": checkpoint, "resume": resume} if checkpoint is not None or resume else {}
