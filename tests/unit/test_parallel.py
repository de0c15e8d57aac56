"""nnopt.parallel: thread sweeps, multi-process inference, and DDP training equal to one process.

The multi-process tests spawn fresh interpreters (about 2-5 s each to import torch), so they
share pools and runs where they can.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import nnopt
from nnopt.errors import ConfigError
from nnopt.parallel.threads import thread_sweep
from nnopt.parallel.workers import InferencePool, parallel_predict, throughput_vs_workers
from nnopt.training.ddp import ddp_train


def _gloo_or_skip() -> None:
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this torch build")
    if not dist.is_gloo_available():
        pytest.skip("the gloo backend of torch.distributed is not available in this torch build")


# --- DDP ---------------------------------------------------------------------------------------


def test_ddp_two_processes_match_one_process(digits):
    _gloo_or_skip()
    # 301 rows, global batch 25 (odd): shards are 13 + 12 rows, and the last global batch has a
    # single row, so rank 1 gets an empty shard. The loss weighting must make all of them exact.
    data = digits.train.subset(301)
    config = nnopt.TrainConfig(epochs=2, batch_size=25, lr=1e-3, seed=3)
    single = nnopt.create_model("simplenet", seed=0)
    initial = {k: v.clone() for k, v in single.state_dict().items()}
    single_history = nnopt.train(single, data, config, progress=False)

    parallel = nnopt.create_model("simplenet", seed=0)
    history = ddp_train(parallel, data, config, world_size=2)

    assert history.world_size == 2 and history.backend == "gloo" and history.epochs == 2
    assert not parallel.training
    # Tolerance: the two runs differ only in summation order (per-shard GEMM partial sums, then
    # an all-reduce), float32 rounding of ~1e-7 relative per step; Adam's steps are at most ~lr
    # (1e-3) each, so a wrong batch order or shard weighting shows up at 1e-4..1e-3, far above 1e-5.
    for name, value in single.state_dict().items():
        torch.testing.assert_close(parallel.state_dict()[name], value, atol=1e-5, rtol=1e-5, msg=name)
    # ...and training really moved the weights, so the comparison is not trivially true.
    assert max(float((single.state_dict()[k] - v).abs().max()) for k, v in initial.items()) > 1e-2
    assert history.loss == pytest.approx(single_history.loss, rel=1e-5)
    assert history.train_accuracy == pytest.approx(single_history.train_accuracy)


@pytest.mark.parametrize("world_size", [0, -1, 1.5, True])
def test_ddp_rejects_bad_world_size(digits, world_size):
    with pytest.raises(ConfigError, match="world_size"):
        ddp_train(nnopt.create_model("simplenet", seed=0), digits.train, world_size=world_size)


def test_ddp_module_has_a_command_line():
    result = subprocess.run(
        [sys.executable, "-m", "nnopt.training.ddp", "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0
    assert "torchrun" in result.stdout and "--arch" in result.stdout and "--out" in result.stdout


# --- multi-process inference -------------------------------------------------------------------


def test_parallel_predict_matches_one_process():
    model = nnopt.create_model("resnet8", seed=0).eval()  # BatchNorm in eval mode: rows independent
    x = torch.randn(1001, 64, generator=torch.Generator().manual_seed(0))  # odd: unequal chunks
    with torch.inference_mode():
        expected = model(x)
    with InferencePool(model, workers=2, batch_size=96) as pool:
        out = pool.predict(x)
        one_row = pool.predict(x[:1])  # fewer rows than workers: only one chunk is sent
        with pytest.raises(RuntimeError, match="worker failed"):
            pool.predict(torch.randn(4, 7))  # wrong feature count: the worker's error comes back
        again = pool.predict(x[:10])  # ...and the pool is still usable
    # Same kernels on the same rows; only the batch grouping differs, so rounding-level differences.
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(one_row, expected[:1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again, expected[:10], atol=1e-5, rtol=1e-5)
    assert out.shape == (1001, 10) and not out.is_shared()
    assert not next(model.parameters()).is_shared()  # the caller's model stayed in private memory


@pytest.mark.parametrize(
    "kwargs, field",
    [({"workers": 0}, "workers"), ({"batch_size": 0}, "batch_size"), ({"threads_per_worker": 0}, "threads_per_worker")],
)
def test_parallel_predict_rejects_bad_settings(kwargs, field):
    settings = {"workers": 2, "batch_size": 8, **kwargs}
    with pytest.raises(ConfigError, match=field):
        parallel_predict(nnopt.create_model("simplenet", seed=0), torch.randn(4, 64), **settings)


def test_throughput_vs_workers_reports_rows_per_second():
    model = nnopt.create_model("simplenet", seed=0)
    sweep = throughput_vs_workers(model, torch.randn(512, 64), workers=(1,), batch_size=128, repeats=2)
    result = sweep.at(1)
    assert result.rows_per_s > 0 and result.startup_s > 0 and result.speedup == 1.0
    assert sweep.in_process_rows_per_s > 0 and sweep.rows == 512
    assert set(sweep.to_dict()) >= {"rows", "batch_size", "in_process_rows_per_s", "results", "method"}
    with pytest.raises(ConfigError, match="workers"):
        throughput_vs_workers(model, torch.randn(8, 64), workers=(1, 0))


# --- thread sweep ------------------------------------------------------------------------------


def test_thread_sweep_fields_and_restores_threads():
    model = nnopt.create_model("simplenet", seed=0)
    model.train()
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sweep = thread_sweep(model, torch.randn(64, 64), threads=(1, 2), warmup=1, min_calls=3, min_seconds=0.05)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(saved)
    assert model.training  # mode restored
    assert [t.threads for t in sweep.timings] == [1, 2] and sweep.batch == 64
    one, two = sweep.at(1), sweep.at(2)
    assert one.speedup == 1.0 and one.efficiency == 1.0
    assert two.speedup == pytest.approx(one.median_ms / two.median_ms)
    assert two.efficiency == pytest.approx(two.speedup / 2)
    assert two.rows_per_s == pytest.approx(64 / (two.median_ms / 1e3))
    assert one.calls >= 3 and one.p10_ms <= one.median_ms <= one.p90_ms
    assert sweep.to_dict()["timings"][1]["threads"] == 2
    assert "efficiency" in str(sweep)


@pytest.mark.parametrize("threads", [(0,), (1, -2), (), 2])
def test_thread_sweep_rejects_bad_thread_counts(threads):
    with pytest.raises(ConfigError, match="threads"):
        thread_sweep(lambda x: x, torch.randn(2, 2), threads=threads)
