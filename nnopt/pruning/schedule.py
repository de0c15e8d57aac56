"""Gradual magnitude pruning (Zhu & Gupta, 2017) with fine-tuning between pruning steps.

Sparsity follows the cubic schedule s_t = s_f + (s_i − s_f)·(1 − (t − t0)/(n·Δt))³ at the
pruning steps t = t0, t0 + Δt, ..., t0 + n·Δt; between them the model trains with its masks held,
so weights pruned early have time to be compensated for by the others.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from nnopt.config import Config
from nnopt.data import Split
from nnopt.errors import ConfigError
from nnopt.pruning.magnitude import check_allocation, check_sparsity, magnitude_masks
from nnopt.pruning.masks import apply_masks
from nnopt.pruning.targets import Target, layer_stats, prune_targets, target_weight
from nnopt.select import validate_patterns
from nnopt.techniques import Technique, always, register_technique, train_split
from nnopt.training import TrainConfig, train

if TYPE_CHECKING:
    from nnopt.checkpoint import CheckpointSpec

GRADUAL_PASS = "prune-gradual"


@dataclasses.dataclass(frozen=True)
class GradualPruneConfig(Config):
    """Prune to ``final_sparsity`` over ``prune_steps`` events spread across the first
    ``ramp_fraction`` of ``epochs`` of fine-tuning; the remaining epochs recover accuracy."""

    kind = "prune-gradual"
    final_sparsity: float = 0.9
    initial_sparsity: float = 0.0
    epochs: int = 30
    ramp_fraction: float = 0.6
    prune_steps: int = 10
    allocation: str = "global"
    batch_size: int = 32
    lr: float = 1e-3
    seed: int = 0
    layers: tuple[str, ...] = ()

    def validate(self) -> None:
        check_sparsity(self.final_sparsity, "final_sparsity")
        check_sparsity(self.initial_sparsity, "initial_sparsity")
        if self.initial_sparsity > self.final_sparsity:
            raise ConfigError("initial_sparsity must not exceed final_sparsity")
        if not (math.isfinite(self.ramp_fraction) and 0.0 < self.ramp_fraction <= 1.0):
            raise ConfigError(f"ramp_fraction must be in (0, 1], got {self.ramp_fraction}")
        if self.prune_steps < 1:
            raise ConfigError(f"prune_steps must be >= 1, got {self.prune_steps}")
        check_allocation(self.allocation)
        validate_patterns(self.layers)
        self.train_config()  # validates epochs, batch size, lr and seed

    def train_config(self) -> TrainConfig:
        return TrainConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, seed=self.seed)


def cubic_sparsity(step: int, begin: int, end: int, initial: float, final: float) -> float:
    """Target sparsity at ``step`` on the cubic ramp from ``begin`` to ``end``."""
    if step <= begin:
        return initial
    if step >= end:
        return final
    progress = (step - begin) / (end - begin)
    return final + (initial - final) * (1.0 - progress) ** 3


class GradualPruner:
    """Training callback: prunes at the scheduled steps and holds the masks after every step."""

    def __init__(self, model: nn.Module, targets: list[Target], config: GradualPruneConfig, total_steps: int) -> None:
        # Names, not tensors: in data-parallel training each process prunes its own copy of the model.
        self.names = [name for name, _ in targets]
        self.config = config
        self.end = max(1, int(config.ramp_fraction * total_steps))
        self.interval = max(1, self.end // config.prune_steps)
        self.step = 0
        self.history: list[tuple[int, float]] = []
        self.masks = self._prune(model, config.initial_sparsity) if config.initial_sparsity > 0 else {}

    def _targets(self, model: nn.Module) -> list[Target]:
        return [(name, target_weight(model, name)) for name in self.names]

    def _prune(self, model: nn.Module, sparsity: float) -> dict[str, torch.Tensor]:
        targets = self._targets(model)
        masks = magnitude_masks(targets, sparsity, self.config.allocation)
        apply_masks(targets, masks)
        self.history.append((self.step, sparsity))
        return masks

    def after_step(self, model: nn.Module) -> None:
        self.step += 1
        if self.step % self.interval == 0 and self.step <= self.end:
            c = self.config
            target = cubic_sparsity(self.step, 0, self.end, c.initial_sparsity, c.final_sparsity)
            self.masks = self._prune(model, target)
        elif self.masks:
            apply_masks(self._targets(model), self.masks)

    def checkpoint_state(self) -> dict[str, Any]:
        return {"step": self.step, "history": [list(h) for h in self.history], "masks": self.masks}

    def restore_state(self, state: dict[str, Any], model: nn.Module) -> None:
        self.step = int(state["step"])
        self.history = [(int(step), float(s)) for step, s in state["history"]]
        self.masks = dict(state["masks"])

    def finish(self, model: nn.Module) -> None:
        """Make sure the final sparsity is reached, whatever the step arithmetic left."""
        if not self.history or self.history[-1][1] < self.config.final_sparsity:
            self.masks = self._prune(model, self.config.final_sparsity)


def prune_gradual(model: nn.Module, config: GradualPruneConfig, data: Split | None = None,
                  eval_data: Split | None = None, progress: bool | None = None,
                  checkpoint: CheckpointSpec | None = None, resume: bool = False, data_parallel: int = 1,
                  **_: Any) -> dict[str, Any]:
    """Prune ``model`` in place on the cubic schedule; ``checkpoint``/``resume`` and ``data_parallel``
    as in :func:`nnopt.train` (the schedule's position and masks are part of the checkpoint)."""
    if data is None:
        raise ConfigError("gradual pruning fine-tunes the model: pass training data (data=...)")
    targets = prune_targets(model, config.layers)
    steps_per_epoch = math.ceil(len(data) / config.batch_size)
    pruner = GradualPruner(model, targets, config, total_steps=config.epochs * steps_per_epoch)
    if checkpoint is not None:
        checkpoint = checkpoint.with_identity({"gradual pruning config": config.to_dict()})
    history = train(model, data, config.train_config(), eval_data=eval_data, callbacks=[pruner], progress=progress,
                    checkpoint=checkpoint, resume=resume, data_parallel=data_parallel)
    pruner.finish(model)
    return {
        "allocation": config.allocation,
        "schedule": [{"step": step, "sparsity": round(s, 6)} for step, s in pruner.history],
        "loss": history.loss,
        **layer_stats(targets),
    }


register_technique(Technique(GradualPruneConfig, "prune", prune_gradual, needs_data=always("fine-tuning"),
                             data_for=train_split))  # values only: nothing to replay
