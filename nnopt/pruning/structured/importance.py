"""Channel importance: one score per channel of a coupled group; the lowest go first.

Criteria, registered by name (add your own with :func:`register_importance`):
- ``gradient`` — the mission's rule, I_i = Σ_j |∂L/∂w_ij|: absolute gradients of each channel's
  incoming weights (the rows it owns), summed over ``batches`` mini-batches;
- ``taylor`` — first-order Taylor estimate of the loss change when the channel is removed,
  |Σ w·∂L/∂w| over every weight the channel touches (Molchanov et al., 2017);
- ``l1`` / ``l2`` — magnitude of every weight the channel touches;
- ``random`` — a seeded control, for showing that a criterion is better than chance.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from nnopt.errors import ConfigError
from nnopt.pruning.structured.groups import NORM_LAYERS, ROLES, ChannelGroup, Member, weight_dim


@dataclasses.dataclass
class Gradients:
    """Accumulated gradients per parameter name: Σ_batches |g| and Σ_batches g; and, per group,
    the Taylor scores Σ_batches |Σ_channel w·g| (absolute value per batch, so that opposite
    gradients of different batches do not cancel)."""

    abs_sum: dict[str, torch.Tensor]
    sum: dict[str, torch.Tensor]
    batches: int
    taylor: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class ImportanceInputs:
    model: nn.Module
    group: ChannelGroup
    gradients: Gradients | None
    seed: int = 0


ImportanceFn = Callable[[ImportanceInputs], torch.Tensor]
IMPORTANCE: dict[str, ImportanceFn] = {}
NEEDS_GRADIENTS: set[str] = set()


def register_importance(name: str, fn: ImportanceFn, needs_gradients: bool = False) -> None:
    """Add a criterion: ``fn(inputs) -> (group.size,)`` scores, higher = more important."""
    if name in IMPORTANCE:
        raise ValueError(f"importance {name!r} is already registered")
    IMPORTANCE[name] = fn
    if needs_gradients:
        NEEDS_GRADIENTS.add(name)


def check_importance(name: str) -> None:
    if name not in IMPORTANCE:
        raise ConfigError(f"unknown importance {name!r}; known: {', '.join(sorted(IMPORTANCE))}")


def score(name: str, inputs: ImportanceInputs) -> torch.Tensor:
    check_importance(name)
    scores = IMPORTANCE[name](inputs).detach().to(torch.float64).flatten()
    if scores.numel() != inputs.group.size or not bool(torch.isfinite(scores).all()):
        raise ConfigError(f"importance {name!r} gave {scores.numel()} scores (or non-finite ones) "
                          f"for {inputs.group.size} channels of {inputs.group.name}")
    return scores


# --------------------------------------------------------------------------- per-channel views

ALL_ROLES = ROLES
OWN_ROLES = ("out", "depthwise")  # the weights that compute a channel (its rows and bias)


def _params(module: nn.Module, member: Member) -> Iterator[tuple[str, torch.Tensor, int]]:
    """(parameter attribute, tensor, dimension of the channel) that ``member`` touches."""
    if isinstance(module, NORM_LAYERS):
        if module.affine:
            yield "weight", module.weight, 0
            yield "bias", module.bias, 0
        return
    yield "weight", module.weight, weight_dim(module, member.role)
    if member.role in OWN_ROLES and module.bias is not None:
        yield "bias", module.bias, 0


def per_channel(tensor: torch.Tensor, member: Member, size: int, dim: int) -> torch.Tensor:
    """(size, k): the k values of ``tensor`` that belong to each of the group's channels."""
    picked = tensor.index_select(dim, member.positions(torch.arange(size)))
    picked = picked.movedim(dim, 0)  # (size · inner, …)
    return picked.reshape(size, -1)


def _reduce(
    inputs: ImportanceInputs, value: Callable[[str, torch.Tensor], torch.Tensor], roles: Iterable[str]
) -> torch.Tensor:
    group, model = inputs.group, inputs.model
    total = torch.zeros(group.size, dtype=torch.float64)
    for member in group.members:
        if member.role not in roles:
            continue
        module = model.get_submodule(member.module)
        for attr, tensor, dim in _params(module, member):
            values = value(f"{member.module}.{attr}", tensor.detach())
            total += per_channel(values, member, group.size, dim).to(torch.float64).sum(dim=1)
    return total


def l1(inputs: ImportanceInputs) -> torch.Tensor:
    return _reduce(inputs, lambda _name, w: w.abs(), ALL_ROLES)


def l2(inputs: ImportanceInputs) -> torch.Tensor:
    return _reduce(inputs, lambda _name, w: w.square(), ALL_ROLES).sqrt()


def _gradient_of(inputs: ImportanceInputs, table: str) -> Callable[[str, torch.Tensor], torch.Tensor]:
    if inputs.gradients is None:
        raise ConfigError("this importance needs gradients: pass data= to structured pruning")
    found = getattr(inputs.gradients, table)

    def lookup(name: str, weight: torch.Tensor) -> torch.Tensor:
        return found.get(name, torch.zeros_like(weight))

    return lookup


def gradient(inputs: ImportanceInputs) -> torch.Tensor:
    """I_i = Σ_j |∂L/∂w_ij| over channel i's incoming weights (and bias), summed over batches."""
    return _reduce(inputs, _gradient_of(inputs, "abs_sum"), OWN_ROLES)


def taylor(inputs: ImportanceInputs) -> torch.Tensor:
    """|Σ w · ∂L/∂w| over every weight the channel touches (the first-order loss change when the
    channel goes), per batch, summed over batches."""
    grads = _gradient_of(inputs, "sum")
    per_batch = inputs.gradients.taylor.get(inputs.group.name) if inputs.gradients else None
    if per_batch is not None:
        return per_batch
    return _reduce(inputs, lambda name, w: w * grads(name, w), ALL_ROLES).abs()


def _taylor_terms(model: nn.Module, group: ChannelGroup) -> torch.Tensor:
    """|Σ w·g| per channel of ``group`` for the gradients now in ``.grad``."""
    inputs = ImportanceInputs(model, group, None)

    def product(name: str, weight: torch.Tensor) -> torch.Tensor:
        grad = model.get_parameter(name).grad
        return torch.zeros_like(weight) if grad is None else weight * grad

    return _reduce(inputs, product, ALL_ROLES).abs()


def random_scores(inputs: ImportanceInputs) -> torch.Tensor:
    digest = hashlib.sha256(f"{inputs.seed}:{inputs.group.name}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    return torch.rand(inputs.group.size, generator=generator, dtype=torch.float64)


register_importance("gradient", gradient, needs_gradients=True)
register_importance("taylor", taylor, needs_gradients=True)
register_importance("l1", l1)
register_importance("l2", l2)
register_importance("random", random_scores)


# --------------------------------------------------------------------------- gradient accumulation


def accumulate_gradients(
    model: nn.Module, batches: Iterable[Any], loss_fn: Callable[[nn.Module, Any], torch.Tensor], limit: int,
    groups: Iterable[ChannelGroup] = (),
) -> Gradients:
    """Σ|g| and Σg of every parameter over up to ``limit`` batches of ``loss_fn(model, batch)``,
    and the per-batch Taylor scores of ``groups``.

    The model's own ``requires_grad`` flags and gradients are restored afterwards.
    """
    groups = list(groups)
    taylor_sum = {g.name: torch.zeros(g.size, dtype=torch.float64) for g in groups}
    params = dict(model.named_parameters())
    saved_flags = {name: p.requires_grad for name, p in params.items()}
    saved_grads = {name: p.grad for name, p in params.items()}
    abs_sum = {name: torch.zeros_like(p) for name, p in params.items()}
    plain_sum = {name: torch.zeros_like(p) for name, p in params.items()}
    seen = 0
    was_training = model.training
    try:
        for p in params.values():
            p.requires_grad_(True)
        for batch in batches:
            if seen >= limit:
                break
            model.zero_grad(set_to_none=True)
            loss = loss_fn(model, batch)
            loss.backward()
            for name, p in params.items():
                if p.grad is not None:
                    abs_sum[name] += p.grad.abs()
                    plain_sum[name] += p.grad
            with torch.no_grad():
                for group in groups:
                    taylor_sum[group.name] += _taylor_terms(model, group)
            seen += 1
    finally:
        for name, p in params.items():
            p.requires_grad_(saved_flags[name])
            p.grad = saved_grads[name]
        model.train(was_training)
    if seen == 0:
        raise ConfigError("gradient importance saw no batches: is the data empty?")
    return Gradients(abs_sum, plain_sum, seen, taylor_sum)
