"""A small fine-tuning loop: Adam, cross-entropy on logits (distillation from the model as it was when
training started, or a given teacher, when the data has no labels), seeded shuffling, a progress bar.

Later techniques hook in through callbacks (``after_step`` runs after every optimizer step:
re-applying pruning masks, for example) instead of growing this loop.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from nnopt.config import Config
from nnopt.data import Split, as_split, call_model, input_rows
from nnopt.errors import ConfigError
from nnopt.progress import track

if TYPE_CHECKING:
    from nnopt.checkpoint import CheckpointSpec


@dataclasses.dataclass(frozen=True)
class TrainConfig(Config):
    kind = "train"
    epochs: int = 20
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0
    distill: float = 0.0  # with labels: weight of distillation from the teacher (without labels it is 1)
    temperature: float = 4.0  # softening of the teacher's and the student's logits when distilling

    def validate(self) -> None:
        if self.epochs < 0:
            raise ConfigError(f"TrainConfig.epochs must be >= 0, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"TrainConfig.batch_size must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise ConfigError(f"TrainConfig.lr must be > 0, got {self.lr}")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"seed must be in 0..2**32-1, got {self.seed}")
        if self.weight_decay < 0:
            raise ConfigError(f"TrainConfig.weight_decay must be >= 0, got {self.weight_decay}")
        if not 0.0 <= self.distill <= 1.0:
            raise ConfigError(f"TrainConfig.distill must lie in [0, 1], got {self.distill}")
        if not self.temperature > 0:
            raise ConfigError(f"TrainConfig.temperature must be > 0, got {self.temperature}")


class TrainCallback(Protocol):
    """Runs after every optimizer step; may also define ``after_epoch(model, epoch)`` (0-based),
    and ``checkpoint_state()`` / ``restore_state(state, model)`` to be resumed from a checkpoint."""

    def after_step(self, model: nn.Module) -> None: ...


@dataclasses.dataclass
class TrainHistory:
    """Per-epoch mean training loss and accuracies; ``seconds`` is wall-clock training time."""

    loss: list[float] = dataclasses.field(default_factory=list)
    train_accuracy: list[float] = dataclasses.field(default_factory=list)
    eval_accuracy: list[float] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    @property
    def epochs(self) -> int:
        return len(self.loss)


def train(
    model: nn.Module,
    data: Split | Any,
    config: TrainConfig = TrainConfig(),
    eval_data: Split | Any | None = None,
    callbacks: Sequence[TrainCallback] = (),
    progress: bool | None = None,
    loss: Callable[[torch.Tensor, Any, torch.Tensor | None], torch.Tensor] | None = None,
    checkpoint: CheckpointSpec | None = None,
    resume: bool = False,
    data_parallel: int = 1,
    teacher: nn.Module | None = None,
) -> TrainHistory:
    """Fine-tune ``model`` in place and return its history.

    ``data`` is a :class:`~nnopt.data.Split` or anything :func:`nnopt.as_dataset` takes (tensors, arrays,
    ``(x, y)``, torch Datasets and DataLoaders). Without labels the loss is distillation from ``teacher``
    (default: a frozen copy of ``model`` as it is when training starts, i.e. before the pruning or
    quantization the callbacks apply); with labels it is cross-entropy, mixed with distillation when
    ``config.distill`` > 0 (see :class:`~nnopt.training.distill.DistillationLoss`).
    ``loss(outputs, x, y)`` replaces both (``y`` is None for unlabelled rows).
    ``checkpoint`` writes the whole training state every ``checkpoint.every`` epochs;
    ``resume=True`` continues from it (same model, data and config, else
    :class:`~nnopt.errors.ResumeError`) with the same result as an uninterrupted run.
    ``data_parallel`` > 1 runs the same loop in that many DistributedDataParallel processes
    (:func:`nnopt.training.ddp.ddp_train`: same global batches, callbacks on every rank, the same weights
    within floating-point tolerance unless something depends on per-process statistics: BatchNorm in
    training mode, dropout; QAT's observed ranges are all-reduced); it does not checkpoint, ``loss`` and
    ``callbacks`` must be picklable, and a script must call it under ``if __name__ == "__main__":``.

    >>> history = train(model, dataset.train, TrainConfig(epochs=2), eval_data=dataset.test)
    >>> history.eval_accuracy[-1]  # doctest: +SKIP
    """
    from nnopt.metrics.accuracy import accuracy

    data = as_split(data)
    eval_data = None if eval_data is None else as_split(eval_data)
    loss = training_loss(model, data, config, loss, teacher)
    if resume and checkpoint is None:
        raise ConfigError("resume=True needs checkpoint=CheckpointSpec(directory) to resume from")
    if check_data_parallel(data_parallel) > 1:
        if checkpoint is not None:
            raise ConfigError("data-parallel training does not checkpoint: drop checkpoint/resume or use "
                              "data_parallel=1")
        if not data.labelled or not isinstance(data.x, torch.Tensor):
            raise ConfigError("data-parallel training needs labelled rows with one input tensor; distillation "
                              "on unlabelled data and tuple/dict inputs train in one process: use data_parallel=1")
        from nnopt.training.ddp import ddp_train

        return ddp_train(model, data, config, world_size=data_parallel, loss=loss, eval_data=eval_data,
                         callbacks=callbacks, progress=progress)
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    history = TrainHistory()
    first_epoch, step, saver = 0, 0, None
    if checkpoint is not None:
        from nnopt.checkpoint import Checkpointer, training_fingerprint

        held_out = None if eval_data is None else fingerprint_view(eval_data)
        fingerprint = training_fingerprint(config, fingerprint_view(data), model, callbacks, eval_data=held_out,
                                           loss=loss, identity=checkpoint.identity)
        saver = Checkpointer(checkpoint, fingerprint, config.epochs, model, optimizer, generator, callbacks)
        first_epoch, step = saver.begin(resume, history)
    earlier_seconds, start = history.seconds, time.perf_counter()
    with track("training", total=config.epochs, enabled=progress) as bar:
        if first_epoch:
            bar.advance(first_epoch, status="resumed")
        for _ in range(first_epoch, config.epochs):
            model.train()
            total_loss, correct = 0.0, 0
            for x, y in data.batches(config.batch_size, shuffle=True, generator=generator):
                optimizer.zero_grad(set_to_none=True)
                logits = call_model(model, x)  # (batch, classes) logits, or (batch, dim) embeddings
                # no loss: labelled rows (training_loss distils where there are none)
                value = loss(logits, x, y) if loss is not None else nn.functional.cross_entropy(logits, y)  # type: ignore[arg-type]
                value.backward()
                optimizer.step()
                step += 1
                for callback in callbacks:
                    callback.after_step(model)
                total_loss += float(value.detach()) * input_rows(x)
                if y is not None:
                    correct += int((logits.detach().argmax(-1) == y).sum())
            history.loss.append(total_loss / len(data))
            if data.labelled:
                history.train_accuracy.append(correct / len(data))
            if eval_data is not None and eval_data.labelled:
                history.eval_accuracy.append(accuracy(model, eval_data))
            run_after_epoch(callbacks, model, history.epochs - 1)
            if saver is not None:
                history.seconds = earlier_seconds + time.perf_counter() - start
                saver.end_epoch(history.epochs, step, history)
            bar.advance(status=epoch_status(history))
    model.eval()
    history.seconds = earlier_seconds + time.perf_counter() - start
    if saver is not None:
        saver.finish()
    return history


def training_loss(
    model: nn.Module, data: Split, config: TrainConfig, loss: Callable[..., torch.Tensor] | None,
    teacher: nn.Module | None,
) -> Callable[..., torch.Tensor] | None:
    """The loss :func:`train` uses: ``loss`` if given; distillation from ``teacher`` (default: a frozen copy of
    ``model`` now) without labels or with ``config.distill`` > 0; else None (cross-entropy)."""
    if loss is not None:
        if teacher is not None:
            raise ConfigError("give train() a loss or a teacher, not both")
        return loss
    if data.labelled and config.distill == 0:
        return None
    import copy

    from nnopt.training.distill import DistillationLoss

    reference = copy.deepcopy(teacher if teacher is not None else model)  # private: the caller's stays as it is
    reference.eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    weight = config.distill if data.labelled else 1.0
    return DistillationLoss(reference, weight=weight, temperature=config.temperature)


def fingerprint_view(split: Split) -> Split:
    """The split as one tensor of inputs and one of labels, for checkpoint fingerprints (which digest both)."""
    import hashlib

    x = split.x
    if not isinstance(x, torch.Tensor) or split.y is None:
        digest = hashlib.sha256()
        parts = sorted(x.items()) if isinstance(x, dict) else list(enumerate(x)) if isinstance(x, tuple) else [(0, x)]
        for name, part in parts:
            t = part.detach().cpu().contiguous()
            digest.update(f"{name}{t.dtype}{tuple(t.shape)}".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        x = torch.frombuffer(bytearray(digest.digest()), dtype=torch.uint8).reshape(1, -1)
        labels = torch.full((1,), -1) if split.y is None else split.y
        return _FingerprintSplit(x, labels, len(split))  # type: ignore[return-value]
    return split


class _FingerprintSplit:
    """What a checkpoint fingerprint reads of a split: its rows and one digestible tensor of each part."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, rows: int) -> None:
        self.x, self.y, self.rows = x, y, rows

    def __len__(self) -> int:
        return self.rows


def run_after_epoch(callbacks: Sequence[TrainCallback], model: nn.Module, epoch: int) -> None:
    """Call ``after_epoch(model, epoch)`` (0-based) on the callbacks that define it."""
    for callback in callbacks:
        after_epoch = getattr(callback, "after_epoch", None)
        if after_epoch is not None:
            after_epoch(model, epoch)


def epoch_status(history: TrainHistory) -> str:
    """The progress bar's text after an epoch: its loss, and its eval accuracy when measured."""
    status = f"loss {history.loss[-1]:.4f}"
    if history.eval_accuracy:
        status += f"  eval acc {history.eval_accuracy[-1]:.3f}"
    return status


def parallel_context(data_parallel: int) -> dict[str, int]:
    """Keyword arguments for a verb's passes: only when > 1, so passes that do not train never see it."""
    return {"data_parallel": data_parallel} if check_data_parallel(data_parallel) > 1 else {}


def check_data_parallel(processes: int, name: str = "data_parallel") -> int:
    """``processes`` if it is an integer >= 1, else a ConfigError naming it as ``name``."""
    if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
        raise ConfigError(f"{name} must be an integer >= 1 (processes), got {processes!r}")
    return processes
