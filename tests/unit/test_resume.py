"""Checkpoint and resume: interrupted, then resumed training ends bit-identical to an uninterrupted run."""

from __future__ import annotations

import copy
import dataclasses
import json
import random

import numpy as np
import pytest
import torch

import nnopt
from nnopt import checkpoint as ckpt
from nnopt.checkpoint import Checkpointer, CheckpointSpec
from nnopt.data import Split
from nnopt.errors import ConfigError, OutputError, ResumeError
from nnopt.io.manifest import verify_directory
from nnopt.pruning.schedule import GradualPruneConfig, GradualPruner, prune_gradual
from nnopt.quantization.qat import QATConfig, quantize_qat

GRADUAL = GradualPruneConfig(final_sparsity=0.8, epochs=4, prune_steps=4, ramp_fraction=0.75, seed=3)
QAT = QATConfig(epochs=3, lr=1e-3, calibration_samples=64, validation_fraction=0.2, seed=3)


@pytest.fixture(autouse=True)
def deterministic():
    threads, was = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(was)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(160, 64, generator=g)
    return Split(x, (x[:, :10].argmax(1)))  # a learnable rule, so training really moves the weights


@pytest.fixture(scope="module")
def model():
    return nnopt.create_model("simplenet", seed=0)


def _interrupt_after_epoch(monkeypatch, epoch):
    """Raise KeyboardInterrupt right after the checkpoint of ``epoch`` is written."""
    real = Checkpointer.end_epoch

    def end_epoch(self, done, step, history):
        real(self, done, step, history)
        if done == epoch:
            raise KeyboardInterrupt

    monkeypatch.setattr(Checkpointer, "end_epoch", end_epoch)


def _interrupt_at_step(monkeypatch, cls, step):
    """Raise KeyboardInterrupt in the middle of an epoch, from a callback's after_step."""
    real = cls.after_step
    count = {"n": 0}

    def after_step(self, model):
        count["n"] += 1
        if count["n"] == step:
            raise KeyboardInterrupt
        real(self, model)

    monkeypatch.setattr(cls, "after_step", after_step)


def _bits(model):
    return {k: v.detach().contiguous().view(-1).view(torch.uint8).clone() for k, v in model.state_dict().items()}


def _assert_bit_identical(a, b):
    bits_a, bits_b = _bits(a), _bits(b)
    assert bits_a.keys() == bits_b.keys()
    differ = [k for k in bits_a if not torch.equal(bits_a[k], bits_b[k])]
    assert not differ, differ


def _gradual(model, data, spec=None, resume=False, config=GRADUAL):
    target = copy.deepcopy(model)
    details = prune_gradual(target, config, data=data, checkpoint=spec, resume=resume)
    return target, details


@pytest.mark.parametrize(("after_epoch", "mid_epoch", "saved"),
                         [(1, None, 1), (3, None, 3), (4, None, 4), (None, 3, 2)],
                         ids=["after epoch 1", "after epoch 3", "after the last epoch", "mid epoch 3"])
def test_gradual_pruning_resumes_bit_identical(model, data, tmp_path, monkeypatch, after_epoch, mid_epoch, saved):
    reference, details = _gradual(model, data)
    assert not torch.equal(reference.features[0].weight, model.features[0].weight)
    spec = CheckpointSpec(tmp_path / "ckpt", every=2 if mid_epoch else 1)
    with monkeypatch.context() as patch:
        if mid_epoch:
            _interrupt_at_step(patch, GradualPruner, step=5 * (mid_epoch - 1) + 3)  # 5 steps per epoch
        else:
            _interrupt_after_epoch(patch, after_epoch)
        with pytest.raises(KeyboardInterrupt):
            _gradual(model, data, spec)
    assert ckpt.checkpoint_progress(spec.directory) == (saved, 4)
    resumed, resumed_details = _gradual(model, data, spec, resume=True)
    _assert_bit_identical(resumed, reference)
    assert resumed_details == details  # schedule (steps and sparsities) and per-epoch losses too
    assert not spec.directory.exists()  # removed on success


def _qat(model, data, spec=None, resume=False, config=QAT):
    target = copy.deepcopy(model)
    details = quantize_qat(target, config, data=data, checkpoint=spec, resume=resume)
    return target, details


@pytest.mark.parametrize("epoch", [1, 2])  # before and after the observers freeze (after epoch 2)
def test_qat_resumes_bit_identical(model, data, tmp_path, monkeypatch, epoch):
    reference, details = _qat(model, data)
    spec = CheckpointSpec(tmp_path / "ckpt")
    with monkeypatch.context() as patch:
        _interrupt_after_epoch(patch, epoch)
        with pytest.raises(KeyboardInterrupt):
            _qat(model, data, spec)
    state = json.loads((spec.directory / ckpt.STATE_FILE).read_text())
    assert state["epoch"] == epoch
    resumed, resumed_details = _qat(model, data, spec, resume=True)
    _assert_bit_identical(resumed, reference)  # int8 codes, scales and observed input ranges
    assert resumed_details == details and details["training"]["epochs"] == 3
    assert not spec.directory.exists()


class NoisyCallback:
    """Draws from Python's, NumPy's and torch's global generators after every step."""

    def after_step(self, model):
        with torch.no_grad():
            scale = 1e-4 * (random.random() + float(np.random.rand()) + float(torch.rand(())))
            model.classifier.bias.add_(scale)


def test_every_random_generator_is_restored(model, data, tmp_path, monkeypatch):
    config = nnopt.TrainConfig(epochs=3, seed=5)

    def run(spec=None, resume=False):
        random.seed(1)
        np.random.seed(1)
        target = copy.deepcopy(model)
        history = nnopt.train(target, data, config, callbacks=[NoisyCallback()], checkpoint=spec, resume=resume,
                              progress=False)
        return target, history

    reference, history = run()
    spec = CheckpointSpec(tmp_path / "ckpt")
    with monkeypatch.context() as patch:
        _interrupt_after_epoch(patch, 1)
        with pytest.raises(KeyboardInterrupt):
            run(spec)
    random.seed(99)  # whatever happened in between, the resumed run continues from the saved states
    np.random.seed(99)
    torch.manual_seed(99)
    resumed, resumed_history = run(spec, resume=True)
    _assert_bit_identical(resumed, reference)
    assert resumed_history.loss == history.loss and resumed_history.train_accuracy == history.train_accuracy


def _interrupted_gradual(model, data, tmp_path, monkeypatch, config=GRADUAL):
    spec = CheckpointSpec(tmp_path / "ckpt")
    with monkeypatch.context() as patch:
        _interrupt_after_epoch(patch, 1)
        with pytest.raises(KeyboardInterrupt):
            _gradual(model, data, spec, config=config)
    return spec


def test_a_different_run_cannot_resume_and_the_error_says_what_differs(model, data, tmp_path, monkeypatch):
    spec = _interrupted_gradual(model, data, tmp_path, monkeypatch)
    other = dataclasses.replace(GRADUAL, final_sparsity=0.5)
    with pytest.raises(ResumeError, match=r"gradual pruning config differs"):
        _gradual(model, data, spec, resume=True, config=other)
    for other_data in (Split(data.x[:150], data.y[:150]), Split(data.x, data.y.flip(0))):  # fewer rows; other labels
        with pytest.raises(ResumeError, match=r"belongs to a different run: training data differs"):
            _gradual(model, other_data, spec, resume=True)
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.classifier.bias.add_(1.0)
    with pytest.raises(ResumeError, match=r"model at the start differs"):
        _gradual(changed, data, spec, resume=True)
    with pytest.raises(ResumeError, match=r"input model differs"):
        _gradual(model, data, spec.with_identity({"input model": "another"}), resume=True)
    _gradual(model, data, spec, resume=True)  # the checkpoint is untouched by the refusals
    assert not spec.directory.exists()


def test_resume_needs_a_checkpoint_and_a_fresh_start_refuses_one(model, data, tmp_path, monkeypatch):
    spec = CheckpointSpec(tmp_path / "ckpt")
    with pytest.raises(ResumeError, match="no checkpoint at"):
        _gradual(model, data, spec, resume=True)
    with pytest.raises(ConfigError, match="needs checkpoint"):
        nnopt.train(copy.deepcopy(model), data, nnopt.TrainConfig(epochs=1), resume=True)
    _interrupted_gradual(model, data, tmp_path, monkeypatch)
    with pytest.raises(ResumeError, match="--resume"):
        _gradual(model, data, spec)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "mine.txt").write_text("keep")
    with pytest.raises(OutputError, match="not an nnopt checkpoint"):
        _gradual(model, data, CheckpointSpec(tmp_path / "foreign"))
    assert (tmp_path / "foreign" / "mine.txt").read_text() == "keep"


@pytest.mark.parametrize("victim", [ckpt.STATE_FILE, ckpt.TENSORS_FILE])
def test_a_damaged_checkpoint_is_refused_naming_the_file(model, data, tmp_path, monkeypatch, victim):
    spec = _interrupted_gradual(model, data, tmp_path, monkeypatch)
    raw = bytearray((spec.directory / victim).read_bytes())
    raw[len(raw) // 2] ^= 0x01
    (spec.directory / victim).write_bytes(bytes(raw))
    with pytest.raises(ResumeError, match=rf"damaged \({victim}"):
        _gradual(model, data, spec, resume=True)


def test_checkpoints_are_written_every_n_epochs_and_kept_when_asked(model, data, tmp_path, monkeypatch):
    written = []
    real = Checkpointer.end_epoch

    def spy(self, done, step, history):
        real(self, done, step, history)
        written.append(ckpt.checkpoint_progress(self.spec.directory))

    monkeypatch.setattr(Checkpointer, "end_epoch", spy)
    spec = CheckpointSpec(tmp_path / "ckpt", every=3, remove_on_success=False)
    nnopt.train(copy.deepcopy(model), data, nnopt.TrainConfig(epochs=7), checkpoint=spec, progress=False)
    assert written == [None, None, (3, 7), (3, 7), (3, 7), (6, 7), (7, 7)]  # every 3rd, and the last
    assert ckpt.is_checkpoint(spec.directory) and verify_directory(spec.directory).ok
    with pytest.raises(ConfigError, match="every"):
        CheckpointSpec(tmp_path / "x", every=0)
