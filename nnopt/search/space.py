"""The search space: which knobs an objective turns, on which units of a model, at which levels, and the
recipe steps that realize a setting of each knob.

A *knob* is one technique set per unit: ``sparsity`` (magnitude pruning of one layer), ``bits``
(weight-only codes of one layer), ``structured`` (share of a coupled channel group removed) and
``int8`` (int8 GEMMs for one layer, or one transformer block of an encoder). Knobs are registered
in :data:`KNOBS`; objectives name theirs in :data:`OBJECTIVE_KNOBS`. Levels run from the least to
the most aggressive.
"""

from __future__ import annotations

import dataclasses
import re
import statistics
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from nnopt.config import Config
from nnopt.errors import ConfigError

OBJECTIVES = ("size", "latency", "energy")
OBJECTIVE_KNOBS: dict[str, tuple[str, ...]] = {
    "size": ("sparsity", "bits"),
    "latency": ("structured", "int8"),
    "energy": ("structured", "int8"),
}
# int8 GEMMs pay for their quantize/rescale passes only on wide layers (README: slower than fp32 at
# 16-300 features, 2.8x faster on MiniLM's 384-1536); for latency they are tried only there.
WIDE_FEATURES = 256
DISTILL = 0.5  # weight of distillation in structured recovery (README: nnopt prune --structured --distill)
RAMP_SHARE = 0.6  # of the fine-tuning epochs spent reaching the target sparsity (GradualPruneConfig's default)
SPACE_VERSION = 2  # part of a checkpoint's fingerprint: plans change when the space does (2: energy is power × time)


@dataclasses.dataclass(frozen=True)
class Unit:
    """What one knob setting applies to: a layer, a channel group or a transformer block."""

    name: str
    patterns: tuple[str, ...]  # layer selection (nnopt.select) of the layers it covers


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    """How plans become recipes: fine-tuning after pruning and which int8 flavour is used."""

    finetune_epochs: int = 20
    stages: int = 5  # sparsity is reached in this many prune → fine-tune rounds (cubic fractions)
    fold: bool = False  # fold BatchNorm into the convolution before it (exact)
    attention_dtype: str = "float32"


StepsFn = Callable[[Mapping[str, float], "SearchSpace", BuildOptions], list[Config]]


@dataclasses.dataclass(frozen=True)
class Knob:
    """One technique: its levels (least to most aggressive), the units of a model it applies to, and
    the steps that realize ``{unit: level}``."""

    name: str
    levels: tuple[float, ...]
    units: Callable[[nn.Module, Any], tuple[Unit, ...]]
    steps: StepsFn
    order: int  # where its steps go in a recipe: pruning before fine-tuning, quantization last


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """The knobs, units and levels of one search over one model, plus the facts recipes need."""

    objective: str
    knobs: tuple[Knob, ...]
    units: dict[str, tuple[Unit, ...]]
    has_batchnorm: bool
    encoder: bool
    weights_format: str
    int8: str = "dynamic"  # "dynamic" (activation ranges per call) or "static" (calibrated on the fit split)

    def unit(self, knob: str, name: str) -> Unit:
        for unit in self.units[knob]:
            if unit.name == name:
                return unit
        raise KeyError(f"{knob} unit {name!r}")

    def knob(self, name: str) -> Knob:
        return next(k for k in self.knobs if k.name == name)

    def describe(self) -> dict[str, Any]:
        return {"objective": self.objective, "version": SPACE_VERSION,
                "knobs": {k.name: {"levels": list(k.levels), "units": [u.name for u in self.units[k.name]]}
                          for k in self.knobs}}


# ----------------------------------------------------------------------------------------- units


def _layers(model: nn.Module, _: Any) -> tuple[Unit, ...]:
    """Every Linear, Conv1d and Conv2d, in model order (the classifier too: its sensitivity decides)."""
    return tuple(Unit(name, (name,)) for name, m in model.named_modules()
                 if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)))


_BLOCK = re.compile(r"^(.*\.layer\.\d+)\.")


def _int8_units(model: nn.Module, task: Any) -> tuple[Unit, ...]:
    """Transformer blocks of an encoder (6 units for MiniLM rather than 36 layers: each probe costs
    seconds there); single Linear layers elsewhere (Conv2d too for static int8)."""
    from nnopt.models.hf_encoder import SentenceEncoder

    if not isinstance(model, SentenceEncoder):
        return _layers(model, task)
    blocks: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        match = _BLOCK.match(name)
        if isinstance(module, nn.Linear) and match:
            blocks.setdefault(match.group(1), []).append(name)
    return tuple(Unit(block, tuple(layers)) for block, layers in blocks.items())


def _channel_groups(model: nn.Module, task: Any) -> tuple[Unit, ...]:
    """Prunable coupled channel groups, named by the layer that produces them."""

    from nnopt.metrics.profile import model_input_shape, probe_input
    from nnopt.pruning.structured import channel_groups

    example = probe_input(model, 2, model_input_shape(model))
    return tuple(Unit(g.name, (g.name,)) for g in channel_groups(model, example) if g.prunable)


# ----------------------------------------------------------------------------------------- steps


def _by_level(assignment: Mapping[str, float], space: SearchSpace, knob: str) -> dict[float, tuple[str, ...]]:
    """Layer patterns grouped by level, so that a recipe has one step per distinct level."""
    grouped: dict[float, list[str]] = {}
    for unit, level in assignment.items():
        grouped.setdefault(level, []).extend(space.unit(knob, unit).patterns)
    return {level: tuple(p) for level, p in sorted(grouped.items())}


def _structured_steps(assignment: Mapping[str, float], space: SearchSpace, options: BuildOptions) -> list[Config]:
    """One step per distinct ratio (uniform inside it: the plan is the allocation across groups), each
    recovering its share of the fine-tuning epochs, half distilled from the model before it.

    Distillation steadies recovery: plain fine-tuning of the digits CNN at lr 1e-3 moved its validation
    accuracy by up to ±2 points from seed to seed (measured)."""
    from nnopt.pruning import StructuredPruneConfig

    grouped = _by_level(assignment, space, "structured")
    epochs = options.finetune_epochs
    steps: list[Config] = []
    for j, (ratio, layers) in enumerate(grouped.items()):
        share = epochs // len(grouped) + (1 if j < epochs % len(grouped) else 0)
        steps.append(StructuredPruneConfig(ratio=float(ratio), importance="gradient", allocation="uniform",
                                           layers=layers, finetune_epochs=share, distill=DISTILL if share else 0.0))
    return steps


def stage_fractions(stages: int) -> tuple[float, ...]:
    """Share of each layer's target sparsity reached after each stage: Zhu & Gupta's cubic ramp."""
    return tuple(round(1 - (1 - j / stages) ** 3, 6) for j in range(1, stages + 1))


def _sparsity_steps(assignment: Mapping[str, float], space: SearchSpace, options: BuildOptions) -> list[Config]:
    """Prune each layer to its own sparsity in stages, fine-tuning between them with zeros held.

    One-shot pruning to 95% costs LeNet-300-100 20 points that centroid fine-tuning does not win
    back (measured: 0.77 → 0.95), while pruning in 3 rounds with fine-tuning keeps it at 0.975.
    """
    from nnopt.pruning import MagnitudePruneConfig
    from nnopt.training import TrainConfig

    epochs = options.finetune_epochs
    # As Zhu & Gupta's schedule: the ramp takes the first RAMP_SHARE of the epochs, the rest recovers.
    ramp = round(epochs * RAMP_SHARE)
    stages = max(1, min(options.stages, ramp)) if ramp else 1
    steps: list[Config] = []
    for j, fraction in enumerate(stage_fractions(stages)):
        for level, layers in _by_level(assignment, space, "sparsity").items():
            steps.append(MagnitudePruneConfig(sparsity=round(level * fraction, 6), allocation="uniform",
                                              layers=layers))
        share = ramp // stages + (1 if j < ramp % stages else 0)
        if j == stages - 1:
            share += epochs - ramp
        if share:
            steps.append(TrainConfig(epochs=share, seed=j))
    return steps


def _bits_steps(assignment: Mapping[str, float], space: SearchSpace, options: BuildOptions) -> list[Config]:
    from nnopt.quantization import WeightQuantConfig

    # One scale per tensor: per-channel scales cost 4 bytes per output channel (1.6 KB of LeNet-300-100's ~5 KB).
    return [WeightQuantConfig(bits=int(bits), per_channel=False, layers=layers)
            for bits, layers in _by_level(assignment, space, "bits").items()]


def _int8_steps(assignment: Mapping[str, float], space: SearchSpace, options: BuildOptions) -> list[Config]:
    from nnopt.quantization import DynamicQuantConfig, StaticQuantConfig

    layers = tuple(p for unit in assignment for p in space.unit("int8", unit).patterns)
    if not layers:
        return []
    if space.int8 == "static":
        return [StaticQuantConfig(layers=layers)]
    # No smoothing: it needs calibration sentences, which `nnopt optimize` cannot read, and the plan
    # must stay a recipe that reproduces the model.
    return [DynamicQuantConfig(layers=layers, attention_dtype=options.attention_dtype)]


KNOBS: dict[str, Knob] = {}


def register_knob(knob: Knob) -> None:
    """Add a knob; a duplicate name is an error."""
    if knob.name in KNOBS:
        raise ValueError(f"knob {knob.name!r} is already registered")
    KNOBS[knob.name] = knob


for _knob in (
    Knob("structured", (0.25, 0.5, 0.625, 0.75), _channel_groups, _structured_steps, order=0),
    Knob("sparsity", (0.5, 0.75, 0.9, 0.95, 0.98), _layers, _sparsity_steps, order=1),
    Knob("bits", (8, 6, 4, 3), _layers, _bits_steps, order=3),  # 2-bit codes are ternary: they need QAT
    Knob("int8", (8,), _int8_units, _int8_steps, order=4),
):
    register_knob(_knob)


# ----------------------------------------------------------------------------------------- space


def build_space(model: nn.Module, task: Any, objective: str, levels: Mapping[str, tuple[float, ...]] | None = None,
                weights_format: str | None = None) -> SearchSpace:
    """The knobs ``objective`` turns on ``model``, with the units found in it.

    Sentence encoders get no pruning knobs: without a task to fine-tune on, removing heads or FFN
    neurons costs MiniLM far more fidelity than any budget allows (cosine 0.82 at 25%, README).
    ``levels`` overrides a knob's levels (tests and quick runs).
    """
    from nnopt.models.hf_encoder import SentenceEncoder

    if objective not in OBJECTIVES:
        raise ConfigError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    encoder = isinstance(model, SentenceEncoder)
    names = [n for n in OBJECTIVE_KNOBS[objective] if not (encoder and n in ("structured", "sparsity"))]
    if objective == "latency" and not encoder and not _wide(model):
        names = [n for n in names if n != "int8"]
    knobs, units = [], {}
    for name in names:
        knob = KNOBS[name]
        if levels and name in levels:
            knob = dataclasses.replace(knob, levels=tuple(levels[name]))
        found = knob.units(model, task)
        if found and knob.levels:
            knobs.append(knob)
            units[name] = found
    if not knobs:
        raise ConfigError(f"nothing to search for objective {objective!r} on {type(model).__name__}: none of the "
                          f"knobs {', '.join(OBJECTIVE_KNOBS[objective])} applies to its layers")
    return SearchSpace(
        objective=objective, knobs=tuple(sorted(knobs, key=lambda k: k.order)), units=units,
        has_batchnorm=any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()),
        encoder=encoder, weights_format=weights_format or ("packed" if objective == "size" else "safetensors"),
        # Energy counts int8 MACs: static int8 computes every layer (Conv2d too) with int8 GEMMs.
        int8="static" if objective == "energy" and not encoder else "dynamic",
    )


def _wide(model: nn.Module) -> bool:
    widths = [m.in_features for m in model.modules() if isinstance(m, nn.Linear)]
    return bool(widths) and statistics.median(widths) >= WIDE_FEATURES
