"""`nnopt prune --schedule gradual` and `nnopt quantize --scheme qat`: Ctrl-C and SIGKILL keep the
last checkpoint and write no output; `--resume` finishes bit-identical to an uninterrupted run.
Also: an input that changes during a run aborts it with nothing written."""

from __future__ import annotations

import importlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

import nnopt
from nnopt.checkpoint import Checkpointer, checkpoint_progress
from nnopt.cli import main
from nnopt.io.manifest import verify_directory


@pytest.fixture(autouse=True)
def single_thread():
    threads, was = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)  # the same as OMP_NUM_THREADS=1 in the subprocess below: same float sums
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(was)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    nnopt.save_model(nnopt.create_model("simplenet", seed=0), root / "simplenet")
    nnopt.save_model(nnopt.create_model("lenet300", seed=0), root / "lenet300")
    return root


def _gradual(model_dir, epochs=3):
    return ["prune", str(model_dir), "--sparsity", "0.8", "--schedule", "gradual", "--epochs", str(epochs),
            "--data", "digits", "--kernel-batch", "0", "--format", "safetensors"]


def _interrupt_after_epoch(monkeypatch, epoch):
    real = Checkpointer.end_epoch

    def end_epoch(self, done, step, history):
        real(self, done, step, history)
        if done == epoch:
            raise KeyboardInterrupt  # what Ctrl-C raises, right after that epoch's checkpoint

    monkeypatch.setattr(Checkpointer, "end_epoch", end_epoch)


def _assert_same_model(a, b):
    assert verify_directory(a).ok and verify_directory(b).ok
    sa, sb = nnopt.load_model(a).state_dict(), nnopt.load_model(b).state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name].view(-1).view(torch.uint8), sb[name].view(-1).view(torch.uint8)), name


def _debris(directory):
    return [p.name for p in directory.iterdir() if p.name.startswith(".")]


def test_ctrl_c_during_gradual_pruning_then_resume(models, tmp_path, monkeypatch, capsys, expect_error):
    args = _gradual(models / "simplenet")
    assert main([*args, "-o", str(tmp_path / "reference")]) == 0
    assert not (tmp_path / "reference.ckpt").exists()  # removed once the output was written
    out, ckpt = tmp_path / "out", tmp_path / "out.ckpt"
    capsys.readouterr()
    with monkeypatch.context() as patch:
        _interrupt_after_epoch(patch, 2)
        assert main([*args, "-o", str(out)]) == 130
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nothing partial was written" in err
    assert f"after epoch 2 of 3 in {ckpt}" in err and "--resume" in err
    assert not out.exists() and checkpoint_progress(ckpt) == (2, 3)
    expect_error([*args, "-o", str(out)], "holds the checkpoint of an interrupted run: continue it with --resume")
    other = [a if a != "0.8" else "0.7" for a in args]
    expect_error([*other, "-o", str(out), "--resume"], "gradual pruning config differs")
    assert main([*args, "-o", str(out), "--resume"]) == 0
    assert not ckpt.exists() and _debris(tmp_path) == []
    _assert_same_model(out, tmp_path / "reference")


def test_ctrl_c_during_qat_then_resume_with_a_chosen_directory(models, tmp_path, monkeypatch, capsys):
    from nnopt.metrics import speed

    # Latency is beside the point here: time as few calls as the timer allows.
    monkeypatch.setattr("nnopt.pipeline.quantize_run.compare_calls",
                        lambda calls, batch, min_seconds: speed.compare_calls(calls, batch, warmup=0, min_calls=1,
                                                                              min_seconds=0.0, rounds=1))
    args = ["quantize", str(models / "simplenet"), "--scheme", "qat", "--epochs", "3", "--data", "digits"]
    assert main([*args, "-o", str(tmp_path / "reference")]) == 0
    out, ckpt = tmp_path / "out", tmp_path / "state" / "qat"
    with monkeypatch.context() as patch:
        _interrupt_after_epoch(patch, 1)
        assert main([*args, "-o", str(out), "--checkpoint-dir", str(ckpt)]) == 130
    assert f"after epoch 1 of 3 in {ckpt}" in capsys.readouterr().err
    assert not out.exists() and checkpoint_progress(ckpt) == (1, 3)
    assert main([*args, "-o", str(out), "--checkpoint-dir", str(ckpt), "--resume"]) == 0
    assert not ckpt.exists()
    _assert_same_model(out, tmp_path / "reference")


def test_sigkill_during_gradual_pruning_then_resume(models, tmp_path):
    args = _gradual(models / "lenet300", epochs=6)
    out, ckpt = tmp_path / "out", tmp_path / "out.ckpt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "nnopt", *args, "-o", str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def kill_at_the_first_checkpoint():
        deadline = time.monotonic() + 120
        while checkpoint_progress(ckpt) is None and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    killer = threading.Thread(target=kill_at_the_first_checkpoint)
    killer.start()
    try:  # the uninterrupted reference, while the subprocess starts
        assert main([*args, "-o", str(tmp_path / "reference")]) == 0
    finally:
        killer.join()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not out.exists()
    killed_at = checkpoint_progress(ckpt)
    assert killed_at is not None and killed_at[0] < 6
    assert main([*args, "-o", str(out), "--resume"]) == 0
    assert not ckpt.exists() and _debris(tmp_path) == []
    _assert_same_model(out, tmp_path / "reference")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--sparsity", "0.5", "--resume"], "apply to --schedule gradual only"),
        (["--structured", "--ratio", "0.5", "--checkpoint-dir", "x"], "apply to --schedule gradual only"),
        (["--sparsity", "0.5", "--schedule", "gradual", "--data", "digits", "--resume"], "no checkpoint at"),
        (["--sparsity", "0.5", "--schedule", "gradual", "--data", "digits", "--checkpoint-every", "0", "--resume"],
         "turns checkpoints off"),
        (["--sparsity", "0.5", "--schedule", "gradual", "--data", "digits", "--checkpoint-every", "-1"],
         "--checkpoint-every must be >= 0"),
    ],
)
def test_bad_checkpoint_options_of_prune(models, tmp_path, extra, message, expect_error):
    expect_error(["prune", str(models / "simplenet"), *extra, "-o", str(tmp_path / "out")], message)
    assert list(tmp_path.iterdir()) == []


def test_bad_checkpoint_options_of_quantize(models, tmp_path, expect_error):
    model = str(models / "simplenet")
    expect_error(["quantize", model, "--scheme", "int8-dynamic", "--resume", "-o", str(tmp_path / "o")],
                 "apply to --scheme qat only")
    qat = ["quantize", model, "--scheme", "qat", "--data", "digits", "-o", str(tmp_path / "o")]
    expect_error([*qat, "--checkpoint-dir", model], "overlaps the input")
    expect_error([*qat, "--checkpoint-dir", str(tmp_path / "o" / "ckpt")], "not in it")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    expect_error([*qat, "--checkpoint-dir", str(tmp_path / "mine")], "not an nnopt checkpoint")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


@pytest.mark.parametrize("command", ["prune", "quantize"])
def test_an_input_changed_during_the_run_aborts_it_with_nothing_written(models, tmp_path, monkeypatch, command,
                                                                         expect_error):
    source = shutil.copytree(models / "simplenet", tmp_path / "in")
    module = "nnopt.pipeline.prune_run" if command == "prune" else "nnopt.pipeline.quantize_run"
    verb = "prune" if command == "prune" else "quantize"
    real = getattr(importlib.import_module(module), verb)

    def meddling(*args, **kwargs):
        result = real(*args, **kwargs)
        data = bytearray((source / "model.safetensors").read_bytes())
        data[-1] ^= 0x01  # someone rewrites the input while the run works on it
        (source / "model.safetensors").write_bytes(bytes(data))
        return result

    monkeypatch.setattr(f"{module}.{verb}", meddling)
    how = ["--sparsity", "0.5", "--kernel-batch", "0"] if command == "prune" else ["--scheme", "int8-weight"]
    expect_error([command, str(source), *how, "-o", str(tmp_path / "out")],
                 f"the input {source} changed during the run (model.safetensors)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # no output, no temporaries
