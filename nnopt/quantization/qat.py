"""Quantization-aware training (QAT): fine-tune through simulated int8, then convert to real int8.

The recipe (Jacob et al. 2018, "Quantization and Training of Neural Networks for Efficient
Integer-Arithmetic-Only Inference"):

1. every selected Linear/Conv2d becomes a fake-quant twin whose forward computes with
   ``dequantize(quantize(·))`` of its weight (symmetric int8 per output channel, the scheme of
   the static int8 layers) and of its input (asymmetric int8 per tensor);
2. input ranges start from a min–max calibration on a few training batches (the PTQ ranges),
   then follow an exponential moving average of each batch's min/max while training, and are
   frozen for the last epoch(s) so the network settles on the ranges it will be deployed with;
3. rounding has zero gradient almost everywhere, so gradients pass through a straight-through
   estimator (STE): identity inside the clipping range, zero outside it (clipped values do not
   move the loss);
4. the fine-tuned twins are converted into :class:`~nnopt.layers.int8.Int8StaticLinear` /
   :class:`~nnopt.layers.int8.Int8StaticConv2d` with the trained weights and the observed
   ranges: the same codes the fake-quant forward simulated, now computed with an int8 GEMM.

Pruned weights stay exactly zero: symmetric quantization maps 0 to code 0, and fine-tuning keeps
a :class:`~nnopt.pruning.masks.MaskKeeper` over the zeros present when training starts.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from nnopt.config import Config
from nnopt.data import Split
from nnopt.errors import ConfigError
from nnopt.layers import primitives as P
from nnopt.pruning.masks import MaskKeeper
from nnopt.quantization.observers import MinMaxObserver
from nnopt.quantization.ptq import STATIC_TYPES, _targets, calibration_inputs, observe_inputs, replay_static
from nnopt.select import replace_layer, validate_patterns
from nnopt.techniques import Technique, always, register_technique, train_split
from nnopt.training import TrainConfig, TrainHistory, train
from nnopt.training.distill import recovery_teacher

if TYPE_CHECKING:
    from nnopt.checkpoint import CheckpointSpec

PASS_NAME = "qat"
BITS = 8  # the int8 kernels fix the width


@dataclasses.dataclass(frozen=True)
class QATConfig(Config):
    """Fine-tune with simulated int8 for ``epochs`` (Adam at ``lr``), then convert to static int8.

    ``layers`` selects Linear, Conv1d and Conv2d layers (empty: all of them; convolutions of any groups, e.g.
    depthwise); other weighted layers stay float and are recorded as ``skipped`` with the reason.
    Input ranges start from a min–max calibration on the first ``calibration_samples`` training rows, then follow an EMA
    of each batch's min/max with ``observer_momentum`` (``new = m · old + (1 − m) · batch``).
    ``freeze_observers_epoch``: ranges update during the first that many epochs and stay fixed
    afterwards (0: the calibrated ranges throughout; None or ≥ ``epochs``: never frozen).
    The default freezes them for the last of the 3 default epochs.
    ``validation_fraction`` of the training rows is held out; the weights and ranges with the
    lowest loss there (the calibrated start included) are the ones converted, so QAT never
    returns a model that validates worse than the PTQ model it started from (0: keep the last).
    """

    kind = "qat"
    epochs: int = 3
    lr: float = 1e-5  # 1% of the training rate: QAT refines a converged model, it does not retrain it
    batch_size: int = 32
    layers: tuple[str, ...] = ()
    observer_momentum: float = 0.9
    freeze_observers_epoch: int | None = 2
    calibration_samples: int = 256
    validation_fraction: float = 0.1
    seed: int = 0

    def validate(self) -> None:
        if not (math.isfinite(self.validation_fraction) and 0.0 <= self.validation_fraction < 0.5):
            raise ConfigError(f"QATConfig.validation_fraction must be in [0, 0.5), got {self.validation_fraction}")
        if self.epochs < 0:
            raise ConfigError(f"QATConfig.epochs must be >= 0, got {self.epochs}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"QATConfig.lr must be a finite number > 0, got {self.lr}")
        if self.batch_size < 1:
            raise ConfigError(f"QATConfig.batch_size must be >= 1, got {self.batch_size}")
        try:
            validate_patterns(self.layers)
        except ConfigError as exc:
            raise ConfigError(f"QATConfig.layers: {exc}") from None
        if not (math.isfinite(self.observer_momentum) and 0.0 <= self.observer_momentum < 1.0):
            raise ConfigError(f"QATConfig.observer_momentum must be in [0, 1), got {self.observer_momentum}")
        if self.freeze_observers_epoch is not None and self.freeze_observers_epoch < 0:
            raise ConfigError(
                f"QATConfig.freeze_observers_epoch must be >= 0 or None, got {self.freeze_observers_epoch}"
            )
        if self.calibration_samples < 1:
            raise ConfigError(f"QATConfig.calibration_samples must be >= 1, got {self.calibration_samples}")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"QATConfig.seed must be in 0..2**32-1, got {self.seed}")

    def train_config(self) -> TrainConfig:
        return TrainConfig(epochs=self.epochs, lr=self.lr, batch_size=self.batch_size, seed=self.seed)


# --------------------------------------------------------------------------- the estimator


class FakeQuantizeSTE(torch.autograd.Function):
    """``dequantize(quantize(x))`` forward; straight-through backward inside the clipping range.

    Inside the range the codes represent (``round(x · S) + z`` within ``q_min..q_max``) the
    gradient passes unchanged: rounding is treated as the identity. Outside it is zero, since
    there the output is a constant (the clamped end code).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, symmetric: bool
    ) -> torch.Tensor:
        qmin, qmax = P.qrange(bits, symmetric)
        # The unclamped codes, computed as P.quantize does (float64), so that the mask marks exactly
        # the values the clamp changes; bounds like (q_max − z) / S would be off by an ulp of S.
        codes = torch.round(x.detach().to(torch.float64) * scale.to(torch.float64)) + zero
        ctx.save_for_backward((codes >= qmin) & (codes <= qmax))
        return P.fake_quantize(x, scale, zero, bits, symmetric).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None, None


def fake_quantize_ste(
    x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | int = 0, bits: int = BITS, symmetric: bool = True
) -> torch.Tensor:
    """Fake-quantize ``x`` with ``(S, z)`` (broadcast against it) through :class:`FakeQuantizeSTE`."""
    zero_t = torch.as_tensor(zero, dtype=torch.int32)
    return FakeQuantizeSTE.apply(x, scale, zero_t, bits, symmetric)


# --------------------------------------------------------------------------- fake-quant layers


def _batch_range(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) of ``x`` as float32 scalars; over every process's shard when training data-parallel
    (a process whose shard is empty contributes nothing)."""
    if x.numel():
        lo, hi = x.amin().to(torch.float32), x.amax().to(torch.float32)
    else:
        lo, hi = torch.tensor(float("inf"), device=x.device), torch.tensor(float("-inf"), device=x.device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    return lo, hi


class _FakeQuant(nn.Module):
    """Shared by the fake-quant twins: the input range observer and both fake quantizers.

    ``input_lo``/``input_hi`` hold the input range; in training mode each forward first moves
    them toward the batch's min/max (unless ``observing`` is off), then quantizes with them. Under
    data-parallel training the min/max are taken over the whole global batch (all-reduced across
    the processes), so every process keeps the range one process would.
    """

    weight: torch.Tensor
    input_lo: torch.Tensor
    input_hi: torch.Tensor

    def _init_observer(self, lo: float, hi: float, momentum: float) -> None:
        self.register_buffer("input_lo", torch.tensor(lo, dtype=torch.float32))
        self.register_buffer("input_hi", torch.tensor(hi, dtype=torch.float32))
        self.momentum = momentum
        self.observing = True

    def input_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(S, z)`` of the input: asymmetric int8 over the current range (widened to hold 0)."""
        return P.qparams_from_range(self.input_lo, self.input_hi, BITS, symmetric=False)

    def fake_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.observing:
            with torch.no_grad():
                lo, hi = _batch_range(x.detach())
                m = self.momentum
                self.input_lo.mul_(m).add_((1 - m) * lo)
                self.input_hi.mul_(m).add_((1 - m) * hi)
        scale, zero = self.input_qparams()
        return fake_quantize_ste(x, scale, zero, BITS, symmetric=False)

    def fake_weight(self) -> torch.Tensor:
        # Per output channel, from the current weights: the scheme Int8Static*.set_weight stores.
        scale, _ = P.compute_qparams(self.weight, BITS, symmetric=True, channel_axis=0)
        return fake_quantize_ste(self.weight, scale, 0, BITS, symmetric=True)


class FakeQuantLinear(_FakeQuant, nn.Linear):
    """A Linear that trains through int8 simulation. Shares ``source``'s weight and bias Parameters.

    Still an ``nn.Linear``, so callbacks that keep pruned zeros (``MaskKeeper``) find its weight.
    """

    def __init__(self, source: nn.Linear, lo: float, hi: float, momentum: float) -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: it would allocate and randomly init a weight
        self.in_features, self.out_features = source.in_features, source.out_features
        self.weight, self.bias = source.weight, source.bias
        self._init_observer(lo, hi, momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.fake_input(x), self.fake_weight(), self.bias)


class FakeQuantConv2d(_FakeQuant, nn.Conv2d):
    """A Conv2d (any groups, padding mode) that trains through int8 simulation. Shares ``source``'s weight and
    bias Parameters."""

    _CONV_ATTRS = (
        "in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "transposed",
        "output_padding", "groups", "padding_mode", "_reversed_padding_repeated_twice",
    )

    def __init__(self, source: nn.Conv2d, lo: float, hi: float, momentum: float) -> None:
        nn.Module.__init__(self)
        for attr in self._CONV_ATTRS:
            setattr(self, attr, getattr(source, attr))
        self.weight, self.bias = source.weight, source.bias
        self._init_observer(lo, hi, momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.fake_input(x), self.fake_weight(), self.bias)


class FakeQuantConv1d(_FakeQuant, nn.Conv1d):
    """A Conv1d that trains through int8 simulation. Shares ``source``'s weight and bias Parameters."""

    def __init__(self, source: nn.Conv1d, lo: float, hi: float, momentum: float) -> None:
        nn.Module.__init__(self)
        for attr in FakeQuantConv2d._CONV_ATTRS:
            setattr(self, attr, getattr(source, attr))
        self.weight, self.bias = source.weight, source.bias
        self._init_observer(lo, hi, momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.fake_input(x), self.fake_weight(), self.bias)


FAKE_QUANT_TYPES: dict[type[nn.Module], type[_FakeQuant]] = {
    nn.Linear: FakeQuantLinear, nn.Conv1d: FakeQuantConv1d, nn.Conv2d: FakeQuantConv2d,
}
_FLOAT_TYPES = {fake: float_type for float_type, fake in FAKE_QUANT_TYPES.items()}


class _ObserverFreezer:
    """Training callback: stops range updates after ``steps`` optimizer steps (an epoch boundary)."""

    def __init__(self, steps: int) -> None:
        self.steps, self.done = steps, 0

    def after_step(self, model: nn.Module) -> None:
        self.done += 1
        if self.done == self.steps:
            set_observing(model, False)

    def checkpoint_state(self) -> dict[str, Any]:
        return {"done": self.done}

    def restore_state(self, state: dict[str, Any], model: nn.Module) -> None:
        self.done = int(state["done"])
        if self.done >= self.steps:
            set_observing(model, False)


def set_observing(model: nn.Module, enabled: bool) -> None:
    """Turn input range updates of every fake-quant layer in ``model`` on or off."""
    for module in model.modules():
        if isinstance(module, _FakeQuant):
            module.observing = enabled


# --------------------------------------------------------------------------- the pass


def prepare_qat(model: nn.Module, config: QATConfig, data: Any, skipped: dict[str, str] | None = None) -> list[str]:
    """Replace the selected layers of ``model`` (in place) by calibrated fake-quant twins.

    Input ranges come from a min–max pass of the float model over the first
    ``config.calibration_samples`` rows of ``data``: the ranges static PTQ would use.
    Returns the names of the replaced layers; ``skipped`` (when given) receives the layers left in float, with why.
    """
    targets, left = _targets(model, config.layers, tuple(STATIC_TYPES))
    if skipped is not None:
        skipped.update(left)
    for _name, module in targets:
        STATIC_TYPES[type(module)](module)  # fail now, not after training, on what int8 cannot run
    batches = calibration_inputs(data, config.calibration_samples)
    observed = observe_inputs(model, targets, batches, MinMaxObserver)
    for name, module in targets:
        try:
            lo, hi = observed[name].clip_range(BITS, symmetric=False)
        except ValueError as exc:
            raise ConfigError(f"layer {name!r}: {exc}; is it used by forward()?") from None
        fake = FAKE_QUANT_TYPES[type(module)](module, float(lo), float(hi), config.observer_momentum)
        fake.train(module.training)
        replace_layer(model, name, fake)
    return [name for name, _ in targets]


def finetune_qat(
    model: nn.Module, config: QATConfig, data: Split, eval_data: Split | None = None, progress: bool | None = None,
    extra_callbacks: Sequence[Any] = (), checkpoint: CheckpointSpec | None = None, resume: bool = False,
    data_parallel: int = 1, teacher: nn.Module | None = None,
) -> TrainHistory:
    """Train a prepared model (in place) with pruned zeros kept and ranges frozen as configured; without
    labels it distils from ``teacher`` (the model before it was prepared).

    ``checkpoint``/``resume`` as in :func:`nnopt.train`; the observed ranges and whether they are
    frozen yet are part of the checkpoint."""
    # The fake-quant twins are Linear/Conv2d, so the keeper finds (and keeps) every pruned zero.
    callbacks: list[Any] = [MaskKeeper.from_zeros(model), *extra_callbacks]
    freeze = config.freeze_observers_epoch
    set_observing(model, freeze != 0)
    if freeze is not None and 0 < freeze < config.epochs:
        steps_per_epoch = math.ceil(len(data) / config.batch_size)
        callbacks.append(_ObserverFreezer(freeze * steps_per_epoch))
    if checkpoint is not None:
        checkpoint = checkpoint.with_identity({"qat config": config.to_dict()})
    try:
        return train(model, data, config.train_config(), eval_data=eval_data, callbacks=callbacks, progress=progress,
                     checkpoint=checkpoint, resume=resume, data_parallel=data_parallel, teacher=teacher)
    finally:
        set_observing(model, True)


def convert_qat(model: nn.Module) -> dict[str, Any]:
    """Replace every fake-quant layer of ``model`` (in place) by its real int8 static twin.

    The int8 layer stores the codes the fake quantizers simulated: the same per-channel weight
    scales (from the trained weights) and the input ``(S, z)`` of the observed range.
    Returns per layer the shape and input parameters, as static PTQ records them.
    """
    details: dict[str, Any] = {}
    fakes = [(name, m) for name, m in model.named_modules() if isinstance(m, _FakeQuant)]
    for name, fake in fakes:
        qmodule = STATIC_TYPES[_FLOAT_TYPES[type(fake)]](fake)
        qmodule.set_weight(fake.weight.detach())
        scale, zero = fake.input_qparams()
        qmodule.set_input(scale, zero)
        replace_layer(model, name, qmodule)
        details[name] = {
            "shape": list(fake.weight.shape), "input_scale": float(scale), "input_zero_point": int(zero),
            "input_range": [float(fake.input_lo), float(fake.input_hi)],
        }
    return details


def quantize_qat(model: nn.Module, config: QATConfig, **context: Any) -> dict[str, Any]:
    """Prepare, fine-tune on ``context["data"]`` and convert ``model`` in place; returns the details.

    ``context["checkpoint"]`` (a :class:`~nnopt.checkpoint.CheckpointSpec`) and ``context["resume"]``
    make the fine-tuning resumable, as in :func:`nnopt.train`."""
    data = context.get("data")
    if data is None:
        raise ConfigError("QATConfig needs data=... to fine-tune")
    if not isinstance(data, Split):
        raise ConfigError(f"QATConfig needs data= a Split with labels to fine-tune, got {type(data).__name__}")
    if len(data) == 0:
        raise ConfigError("QATConfig: the training data is empty")
    skipped: dict[str, str] = {}
    teacher = recovery_teacher(model, data, context)  # before the fake-quant twins replace any layer
    prepare_qat(model, config, data, skipped)
    train_rows, held_out = _split_validation(data, config)
    keeper = _BestOnValidation(model, held_out) if held_out is not None else None
    history = finetune_qat(model, config, train_rows, eval_data=context.get("eval_data"),
                           progress=context.get("progress"), extra_callbacks=[keeper] if keeper else [],
                           checkpoint=context.get("checkpoint"), resume=bool(context.get("resume")),
                           data_parallel=context.get("data_parallel", 1), teacher=teacher)
    if keeper is not None:
        keeper.restore(model)
    layers = convert_qat(model)
    model.eval()
    training = {"epochs": history.epochs, "loss": history.loss, "train_accuracy": history.train_accuracy}
    if history.eval_accuracy:
        training["eval_accuracy"] = history.eval_accuracy
    if keeper is not None:
        training["validation_loss"] = keeper.losses
        training["kept_epoch"] = keeper.best_epoch  # 0: the calibrated start, k: after epoch k
    result = {"layers": layers, "training": training}
    if skipped:
        result["skipped"] = skipped
    return result


def _split_validation(data: Split, config: QATConfig) -> tuple[Split, Split | None]:
    held = int(len(data) * config.validation_fraction)
    if held == 0 or config.epochs == 0 or data.y is None:  # the held-out choice compares losses on labels
        return data, None
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(config.seed))
    return Split(data.x[order[held:]], data.y[order[held:]]), Split(data.x[order[:held]], data.y[order[:held]])


class _BestOnValidation:
    """Keeps a copy of the state (weights and observed ranges) with the lowest held-out loss."""

    def __init__(self, model: nn.Module, data: Split) -> None:
        self.data = data
        self.losses: list[float] = []
        self.best_epoch = 0
        self.best_state: dict[str, torch.Tensor] = {}
        self._consider(model, epoch=0)

    def after_step(self, model: nn.Module) -> None:
        return None

    def after_epoch(self, model: nn.Module, epoch: int) -> None:
        self._consider(model, epoch + 1)

    def restore(self, model: nn.Module) -> None:
        model.load_state_dict(self.best_state)

    def checkpoint_state(self) -> dict[str, Any]:
        return {"losses": self.losses, "best_epoch": self.best_epoch, "best_state": self.best_state}

    def restore_state(self, state: dict[str, Any], model: nn.Module) -> None:
        self.losses = [float(x) for x in state["losses"]]
        self.best_epoch = int(state["best_epoch"])
        self.best_state = {k: v.clone() for k, v in state["best_state"].items()}

    def _consider(self, model: nn.Module, epoch: int) -> None:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            loss = float(nn.functional.cross_entropy(model(self.data.x), self.data.y))
        model.train(was_training)
        self.losses.append(loss)
        if loss <= min(self.losses):
            self.best_epoch = epoch
            self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}


register_technique(Technique(QATConfig, "quantize", quantize_qat, replay_static, needs_data=always("fine-tuning"),
                             data_for=train_split, legacy_names=("quantize-qat",)))
