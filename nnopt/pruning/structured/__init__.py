"""Structured pruning: remove whole channels, neurons and attention heads; the result is a
smaller dense model that ordinary kernels run faster.

Three separate parts (DESIGN.md): :mod:`.groups` finds which channels are coupled,
:mod:`.importance` scores each channel, :mod:`.surgery` cuts each layer type. This module holds
the config and the pass: allocation (uniform or global), iterative rounds of prune → fine-tune,
and optional knowledge distillation from the unpruned model during recovery.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nnopt.config import Config
from nnopt.data import Split, as_split, call_model
from nnopt.energy.device_energy import cpu_active_power
from nnopt.errors import ConfigError, SelectionError, UnsupportedModelError
from nnopt.lineage import AppliedPass
from nnopt.metrics.speed import example_batch
from nnopt.pruning.structured.energy import (
    channel_energy_j,
    check_cpu,
    energy_floors,
    energy_record,
    measured_channel_energy,
    per_joule,
)
from nnopt.pruning.structured.groups import ChannelGroup, channel_groups, is_bert_encoder
from nnopt.pruning.structured.importance import (
    IMPORTANCE,
    NEEDS_GRADIENTS,
    Gradients,
    ImportanceInputs,
    accumulate_gradients,
    check_importance,
    register_importance,
    score,
)
from nnopt.pruning.structured.mac_target import solve_ratio, total_macs
from nnopt.pruning.structured.rounding import AUTO, auto_multiple, check_multiple, rounded_keep
from nnopt.pruning.structured.surgery import mask_channels, remove_channels, resize_layers
from nnopt.pruning.structured.transformer_blocks import is_transformer, prepare_transformer, replay_prepare, sync_heads
from nnopt.select import select_layers, validate_patterns
from nnopt.techniques import Technique, register_technique, train_split
from nnopt.training.distill import DistillationLoss

STRUCTURED_PASS = "prune-structured"
ALLOCATIONS = ("uniform", "global", "energy")

__all__ = [
    "IMPORTANCE", "NEEDS_GRADIENTS", "STRUCTURED_PASS", "ChannelGroup", "DistillationLoss", "Gradients",
    "StructuredPruneConfig", "channel_energy_j", "channel_groups", "distillation_loss", "mask_channels",
    "prune_structured", "register_importance", "remove_channels", "replay_structured", "structured_data_needs",
]


@dataclasses.dataclass(frozen=True)
class StructuredPruneConfig(Config):
    """Remove ``ratio`` of the channels (neurons) of every prunable group, ranked by ``importance``.

    ``allocation``: ``uniform`` (the same ratio in every group), ``global`` (one ranking across
    groups, scores normalized by each group's mean, ``ratio`` of all channels overall; every group
    keeps at least ``min_channels``) or ``energy`` (the global ranking of importance lost per
    joule saved, after Yang, Chen & Sze, CVPR 2017: channels of energy-hungry layers go first at equal
    importance; a layer's energy is estimated as this CPU's active power × the part of its kernel's measured
    time on a batch of ``data`` that shrinks with its width (:mod:`.energy`; the times are in the pass's
    details); every group keeps at least ``min_channels`` and 1/8 of its original width).
    ``head_ratio``: share of attention heads removed per layer of a transformer encoder (its FFN
    neurons follow ``ratio``). ``batches``: mini-batches whose
    gradients the ``gradient`` and ``taylor`` criteria accumulate. ``rounds`` > 1 prunes
    step by step, fine-tuning ``finetune_epochs`` after each round (needs ``data``); ``distill``
    in (0, 1] mixes in knowledge distillation from the unpruned model at ``temperature``.
    ``layers`` limits pruning to groups whose producing layer matches.
    ``channel_multiple``: kept channel counts of every group rounded to a multiple of it (1: as the ratio
    says), or ``"auto"``: the multiple (1, 8 or 16) whose widths run fastest per MAC in a convolution
    timed on this CPU (:mod:`.rounding`; what was measured is in the pass's details).
    ``target_mac_reduction``: ask for a MACs reduction (e.g. 2.0 = half the MACs per sample, counted by
    :func:`nnopt.metrics.profile.count_macs`) instead of a ratio: the ratio is solved by bisection
    (:mod:`.mac_target`), never short of the target with ``rounds=1``; ``ratio`` is then ignored.
    ``lr`` (recovery) defaults to 1e-3 for classifiers and 1e-4 for sentence encoders (1e-3 measured
    worse than no recovery on MiniLM: cosine 0.821 → 0.715; 1e-4 lifts it to 0.860).
    """

    kind = "prune-structured"
    ratio: float = 0.5
    head_ratio: float = 0.0
    importance: str = "gradient"
    allocation: str = "uniform"
    batches: int = 8
    batch_size: int = 32
    rounds: int = 1
    finetune_epochs: int = 0
    lr: float | None = None
    distill: float = 0.0
    temperature: float = 4.0
    min_channels: int = 1
    seed: int = 0
    layers: tuple[str, ...] = ()
    channel_multiple: int | str = 1
    target_mac_reduction: float | None = None

    def validate(self) -> None:
        for field, value in (("ratio", self.ratio), ("head_ratio", self.head_ratio)):
            if not (isinstance(value, int | float) and math.isfinite(value) and 0.0 <= value < 1.0):
                raise ConfigError(f"StructuredPruneConfig.{field} must lie in [0, 1), got {value!r}")
        check_importance(self.importance)
        if self.allocation not in ALLOCATIONS:
            raise ConfigError(f"StructuredPruneConfig.allocation must be one of {ALLOCATIONS}, got {self.allocation!r}")
        for field in ("batches", "batch_size", "rounds", "min_channels"):
            if getattr(self, field) < 1:
                raise ConfigError(f"StructuredPruneConfig.{field} must be >= 1, got {getattr(self, field)}")
        if self.finetune_epochs < 0:
            raise ConfigError(f"StructuredPruneConfig.finetune_epochs must be >= 0, got {self.finetune_epochs}")
        if not 0.0 <= self.distill <= 1.0:
            raise ConfigError(f"StructuredPruneConfig.distill must lie in [0, 1], got {self.distill}")
        if not (self.temperature > 0 and (self.lr is None or self.lr > 0)):
            raise ConfigError("StructuredPruneConfig.temperature and lr must be > 0")
        validate_patterns(self.layers)
        check_multiple(self.channel_multiple)
        target = self.target_mac_reduction
        if target is not None and not (isinstance(target, int | float) and math.isfinite(target) and target > 1.0):
            raise ConfigError(f"StructuredPruneConfig.target_mac_reduction must be a number > 1 (e.g. 2.0 for half "
                              f"the MACs), got {target!r}")


# --------------------------------------------------------------------------- the pass


def structured_data_needs(config: StructuredPruneConfig) -> str | None:
    """Why ``config`` cannot run without data: gradient-based importance, recovery fine-tuning (None: it can)."""
    reasons = [f"importance {config.importance!r} (gradients)"] if config.importance in NEEDS_GRADIENTS else []
    reasons += ["fine-tuning"] if config.finetune_epochs > 0 else []
    return " and ".join(reasons) or None


def prune_structured(model: nn.Module, config: StructuredPruneConfig, **context: Any) -> dict[str, Any]:
    """Prune ``model`` in place; returns the record (new layer shapes, group sizes, criterion)."""
    if config.allocation == "energy":  # refused before any work: time ranks energy on the CPU only
        check_cpu(model)
    data = context.get("data")
    example = context.get("example")
    if example is None:
        example = _example_input(model, data)
    # Without labels, recovery distils from the unpruned model whatever ``distill`` says (nothing else to learn from).
    unlabelled = isinstance(data, Split) and data.y is None
    teacher = context.get("teacher") or copy.deepcopy(model).eval() if config.distill > 0 or (
        config.finetune_epochs and unlabelled) else None
    prepared = prepare_transformer(model)  # swaps attention layers for cuttable twins with equal outputs
    if context.get("data_parallel", 1) > 1 and config.finetune_epochs > 0 and not isinstance(data, Split):
        raise ConfigError("data-parallel recovery needs labelled data (a Split); a sentence encoder's "
                          "distillation runs in one process: use data_parallel=1")
    reason = structured_data_needs(config)
    if reason and data is None:
        raise ConfigError(f"structured pruning with {reason} needs data=...")
    groups = _selected(model, channel_groups(model, example), config.layers)
    original = {g.name: g.size for g in groups}
    shapes: dict[str, dict[str, Any]] = {}
    history = []
    extra: dict[str, Any] = {}
    timing, power = None, None
    if config.allocation == "energy":  # one batch to time the layers on, and the power that makes it joules
        timing, power = _timing_batch(model, data, example, config), cpu_active_power(torch.get_num_threads())
        extra["energy_allocation"] = energy_record(power, timing[1])
    for round_index in range(1, config.rounds + 1):
        if round_index > 1:  # the first round cuts the model as traced above
            groups = _selected(model, channel_groups(model, example), config.layers)
        gradients = None
        if config.importance in NEEDS_GRADIENTS:
            # per-batch Taylor terms cost a pass over every group's weights: only when taylor reads them
            taylor_groups = groups if config.importance == "taylor" else ()
            gradients = accumulate_gradients(model, _batches(data, config), _task_loss, config.batches, taylor_groups)
        scores = {g.name: score(config.importance, ImportanceInputs(model, g, gradients, config.seed)) for g in groups}
        energy, timed = None, None
        if timing is not None:  # measured once per round, on the layers as this round finds them
            energy, timed = measured_channel_energy(model, groups, timing[0], power)
        solved = None
        if round_index == 1:  # rounding and the MAC target are settled once, on the first round's scores
            config, settled, solved = _settle(model, groups, scores, original, config, example, energy)
            extra.update(settled)
        if solved is None or config.rounds > 1:  # several rounds: the solved ratio, spread over them
            removed = _allocate(model, groups, scores, original, config, round_index / config.rounds, energy)
        else:
            removed = solved
        shapes.update(remove_channels(model, groups, removed))
        sync_heads(model)
        entry: dict[str, Any] = {"round": round_index, "removed": sum(int(r.numel()) for r in removed.values())}
        if timed is not None:
            entry.update(timed)  # layer_ms, floor_ms, scalable_ms, fallback
        if config.finetune_epochs > 0:
            entry["finetune_loss"] = _recover(model, teacher, data, config, context.get("data_parallel", 1))
        history.append(entry)
    model.eval()
    final = {g.name: g.size for g in _selected(model, channel_groups(model, example), config.layers)}
    if "mac_target" in extra:  # what the rounds actually gave (later rounds re-rank the channels)
        after = total_macs(model, _input_shape(model, example))
        extra["mac_target"]["macs_after"] = after
        extra["mac_target"]["achieved"] = round(extra["mac_target"]["macs_before"] / max(after, 1), 4)
    return {
        **extra,
        "shapes": shapes,
        "groups": {name: {"before": original[name], "after": final.get(name, original[name])} for name in original},
        "importance": config.importance,
        "rounds": history,
        **({"transformer": prepared} if any(prepared.values()) else {}),
    }


def _settle(
    model: nn.Module, groups: list[ChannelGroup], scores: dict[str, torch.Tensor], original: dict[str, int],
    config: StructuredPruneConfig, example: Any, energy: dict[str, float] | None = None,
) -> tuple[StructuredPruneConfig, dict[str, Any], dict[str, torch.Tensor] | None]:
    """The config with a numeric ``channel_multiple`` and the ``ratio`` that meets ``target_mac_reduction``;
    the record of what was measured and solved; the channels that meet the target (None without one)."""
    extra: dict[str, Any] = {}
    target = config.target_mac_reduction
    if config.channel_multiple == AUTO:
        # the width to time: what the ratio keeps (for a MAC target, MACs ~ (1 - ratio)^2 as a first guess)
        guess = config.ratio if target is None else 1 - float(target) ** -0.5
        chosen = auto_multiple(model, groups, example, guess)
        config = dataclasses.replace(config, channel_multiple=int(chosen["multiple"]))
        extra["channel_multiple"] = {"value": config.channel_multiple, "auto": chosen}
    elif config.channel_multiple != 1:
        extra["channel_multiple"] = {"value": config.channel_multiple}
    if target is not None:
        def allocate(ratio: float) -> dict[str, torch.Tensor]:
            return _allocate(model, groups, scores, original, dataclasses.replace(config, ratio=ratio), 1.0, energy)

        def cut(twin: nn.Module, twin_groups: list[ChannelGroup], removed: dict[str, torch.Tensor]) -> None:
            remove_channels(twin, twin_groups, removed)
            sync_heads(twin)

        removed, record = solve_ratio(model, groups, float(target), _input_shape(model, example), allocate, cut)
        extra["mac_target"] = record
        return dataclasses.replace(config, ratio=record["ratio"]), extra, removed
    return config, extra, None


def _input_shape(model: nn.Module, example: Any) -> tuple[int, ...] | None:
    """One sample's shape for counting MACs: the model's ``input_shape``, else the traced example's."""
    shape = getattr(model, "input_shape", None)
    if shape is None and isinstance(example, torch.Tensor):
        return tuple(example.shape[1:])
    return None if shape is None else tuple(shape)


def replay_structured(model: nn.Module, applied: AppliedPass) -> None:
    replay_prepare(model, applied.details.get("transformer", {}))
    resize_layers(model, applied.details.get("shapes", {}))
    sync_heads(model)


def _example_input(model: nn.Module, data: Any) -> Any:
    """Two rows of the model's input, for tracing: from ``data`` (a Split, an input tensor of any shape
    and dtype, or an (inputs, labels) pair), else zeros of the model's ``input_shape``."""
    if is_bert_encoder(model) or is_transformer(model):
        return None
    inputs = data.x if isinstance(data, Split) else data
    if isinstance(inputs, list) and inputs and isinstance(inputs[0], tuple):  # a list of (x, y) batches
        inputs = inputs[0]
    if isinstance(inputs, tuple | list) and inputs and isinstance(inputs[0], torch.Tensor):
        inputs = inputs[0]
    if isinstance(inputs, torch.Tensor) and inputs.dim() >= 1:
        return inputs[:2]
    if inputs is not None:  # tuples or dicts of inputs: channel_groups names what it needs
        return inputs
    shape = getattr(model, "input_shape", None)
    if shape is None:
        raise ConfigError("structured pruning needs data=... or a model with an input_shape to trace it")
    return torch.zeros(2, *shape)


def _timing_batch(model: nn.Module, data: Any, example: Any, config: StructuredPruneConfig) -> tuple[Any, str]:
    """The batch the energy allocation times each layer on, and what it is: the first mini-batch of ``data``,
    else ``batch_size`` standard-normal rows of the model's input (its own example inputs), else the traced
    example."""
    if data is not None:
        batch = next(iter(_batches(data, config)), None)
        if isinstance(batch, tuple) and len(batch) == 2:
            batch = batch[0]  # (inputs, labels)
        if batch is not None:
            return batch, f"one mini-batch (up to {config.batch_size} rows) of the pruning data"
    try:
        return example_batch(model, config.batch_size), f"{config.batch_size} random rows of the model's input"
    except (UnsupportedModelError, ConfigError):
        if example is None:
            raise ConfigError("the energy allocation times the layers on a batch: pass data=... "
                              "or use a model with an input_shape") from None
        return example, "the example input the model was traced with"


def _selected(model: nn.Module, groups: list[ChannelGroup], patterns: tuple[str, ...]) -> list[ChannelGroup]:
    prunable = [g for g in groups if g.prunable]
    if patterns:
        names = {name for name, _ in select_layers(model, patterns)}
        prunable = [g for g in prunable if any(m.role == "out" and m.module in names for m in g.members)]
    if not prunable:
        reasons = sorted({g.frozen for g in groups if g.frozen})
        raise SelectionError(
            "no prunable channel group" + (" among the selected layers" if patterns else "")
            + (f"; frozen because: {'; '.join(reasons[:5])}" if reasons else "")
        )
    return prunable


def _allocate(
    model: nn.Module, groups: list[ChannelGroup], scores: dict[str, torch.Tensor], original: dict[str, int],
    config: StructuredPruneConfig, progress: float, energy: dict[str, float] | None = None,
) -> dict[str, torch.Tensor]:
    """Channels to remove per group this round, so that the cumulative share reaches the target
    (``energy``: joules one channel of each group costs, for the energy allocation)."""
    removed: dict[str, torch.Tensor] = {}
    targets = {}
    for g in groups:
        ratio = (config.head_ratio if g.kind == "head" else config.ratio) * progress
        keep = max(config.min_channels, original[g.name] - round(ratio * original[g.name]))
        targets[g.name] = max(0, g.size - keep)
    global_groups = [g for g in groups if g.kind != "head"] if config.allocation in ("global", "energy") else []
    for g in groups:
        if g in global_groups:
            continue
        count = _rounded_count(g, targets[g.name], original, config)
        removed[g.name] = torch.argsort(scores[g.name], stable=True)[:count].sort().values
    if global_groups:
        # one ranking across groups: importance relative to its group's mean (÷ energy per channel)
        ranking = {g.name: scores[g.name] / scores[g.name].mean().clamp(min=1e-30) for g in global_groups}
        if config.allocation == "energy":
            if energy is None:
                raise ConfigError("the energy allocation needs each group's energy per channel (none was measured)")
            ranking = per_joule(global_groups, ranking, energy)
        # the cumulative target over all global groups, less what earlier rounds already removed
        total_original = sum(original[g.name] for g in global_groups)
        done = sum(original[g.name] - g.size for g in global_groups)
        total = max(0, round(config.ratio * progress * total_original) - done)
        floors = energy_floors(original, config.min_channels) if config.allocation == "energy" else {}
        chosen = _allocate_global(global_groups, ranking, total, config, floors)
        for g in global_groups:  # the global counts, rounded; the group's lowest-ranked channels go
            count = _rounded_count(g, int(chosen[g.name].numel()), original, config)
            removed[g.name] = (chosen[g.name] if count == chosen[g.name].numel()
                               else torch.argsort(ranking[g.name], stable=True)[:count].sort().values)
    return removed


def _rounded_count(group: ChannelGroup, count: int, original: dict[str, int], config: StructuredPruneConfig) -> int:
    """Channels to remove from ``group`` so that what stays is a multiple of ``channel_multiple``
    (attention heads are not rounded)."""
    multiple = config.channel_multiple
    if not isinstance(multiple, int) or multiple <= 1 or group.kind == "head":
        return count
    keep = rounded_keep(group.size - count, original[group.name], multiple, config.min_channels)
    return max(0, group.size - keep)


def _allocate_global(
    groups: list[ChannelGroup], ranking: dict[str, torch.Tensor], total: int, config: StructuredPruneConfig,
    floors: dict[str, int] | None = None,
) -> dict[str, torch.Tensor]:
    """The ``total`` lowest-ranked channels across ``groups``, each group keeping at least its floor
    (``floors``, else ``min_channels``)."""
    floors = floors or {}
    entries = []
    for g in groups:
        entries += [(float(v), g.name, c) for c, v in enumerate(ranking[g.name])]
    entries.sort(key=lambda e: e[0])
    left = {g.name: g.size for g in groups}
    chosen: dict[str, list[int]] = {g.name: [] for g in groups}
    for _, name, channel in entries:
        if total <= 0:
            break
        if left[name] > floors.get(name, config.min_channels):
            chosen[name].append(channel)
            left[name] -= 1
            total -= 1
    return {name: torch.tensor(sorted(channels), dtype=torch.int64) for name, channels in chosen.items()}


# --------------------------------------------------------------------------- losses and recovery


def _batches(data: Any, config: StructuredPruneConfig) -> Iterable[Any]:
    """Mini-batches for gradients and recovery: ``(x, y)`` pairs of a Split (``y`` None when unlabelled),
    the inputs dict of token batches (sentence encoders), or the user's data converted to a Split."""
    if isinstance(data, dict) or (isinstance(data, list) and data and isinstance(data[0], dict | tuple)):
        return [data] if isinstance(data, dict) else data  # ready batches: token dicts, or (x, y) pairs
    split = data if isinstance(data, Split) else as_split(data)
    generator = torch.Generator().manual_seed(config.seed)
    batches = split.batches(config.batch_size, shuffle=True, generator=generator)
    if split.y is None and isinstance(split.x, dict):
        return [x for x, _ in batches]  # unlabelled named inputs: the encoder's own loss
    return batches


def _task_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """Cross-entropy for (x, y) batches; without labels, cross-entropy against the model's own top-1
    predictions (gradients of its confidence in what it predicts); for token batches of a sentence encoder,
    the unsupervised SimCSE loss: two dropout views of each sentence should match each other."""
    if isinstance(batch, tuple | list) and len(batch) == 2:
        model.eval()  # importance of the trained network as it runs (BatchNorm statistics fixed)
        x, y = batch
        logits = call_model(model, x)
        return F.cross_entropy(logits, logits.detach().argmax(-1) if y is None else y)
    if isinstance(batch, dict):
        model.train()  # dropout makes the two views differ
        first, second = model(**batch), model(**batch)  # (n, dim) each
        similarity = first @ second.t() / 0.05
        return F.cross_entropy(similarity, torch.arange(similarity.shape[0]))
    raise ConfigError(f"structured pruning cannot compute a loss on batches of type {type(batch).__name__}")


def _recover(
    model: nn.Module, teacher: nn.Module | None, data: Any, config: StructuredPruneConfig, data_parallel: int = 1
) -> float:
    """Fine-tune after a round: cross-entropy (mixed with distillation if asked; in ``data_parallel``
    processes if > 1); without labels, distillation from the unpruned model (``teacher``) only: KL of the
    softened logits, or for sentence encoders and named inputs, cosine to its embeddings."""
    tokens = isinstance(data, dict) or (isinstance(data, list) and bool(data) and isinstance(data[0], dict))
    split = None if tokens else (data if isinstance(data, Split) else as_split(data))
    if split is not None and split.y is not None:
        from nnopt.training import TrainConfig, train

        loss = None if teacher is None else distillation_loss(teacher, config.distill, config.temperature)
        history = train(
            model, split, TrainConfig(epochs=config.finetune_epochs, batch_size=config.batch_size, lr=config.lr or 1e-3,
                                      seed=config.seed), loss=loss, progress=False, data_parallel=data_parallel,
        )
        return float(history.loss[-1])
    if teacher is None:
        raise ConfigError("recovery without labels distils from the unpruned model: set distill > 0 "
                          "(nnopt.prune does so when the data has no labels)")
    if split is not None and not isinstance(split.x, dict):
        from nnopt.training import TrainConfig, train

        history = train(model, split, TrainConfig(epochs=config.finetune_epochs, batch_size=config.batch_size,
                                                  lr=config.lr or 1e-3, seed=config.seed,
                                                  temperature=config.temperature),
                        progress=False, data_parallel=data_parallel, teacher=teacher)
        return float(history.loss[-1])
    return _distill_encoder(model, teacher, list(_batches(data, config)), config)


def distillation_loss(teacher: nn.Module, weight: float, temperature: float) -> DistillationLoss:
    """The recovery loss of structured pruning; see :class:`DistillationLoss`."""
    return DistillationLoss(teacher, weight, temperature)


def _distill_encoder(
    model: nn.Module, teacher: nn.Module, batches: list[Any], config: StructuredPruneConfig
) -> float:
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr or 1e-4)
    torch.manual_seed(config.seed)
    last = 0.0
    model.train()
    for _ in range(config.finetune_epochs):
        for batch in batches:
            with torch.no_grad():
                target = teacher(**batch)
            loss = (1 - F.cosine_similarity(model(**batch), target, dim=-1)).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            last = float(loss.detach())
    model.eval()
    return last


# Layers change shape: replay re-creates them on load.
register_technique(Technique(StructuredPruneConfig, "prune", prune_structured, replay_structured,
                             needs_data=structured_data_needs, data_for=train_split))
