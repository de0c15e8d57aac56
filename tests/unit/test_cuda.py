"""CUDA paths: int8 kernels, structured models, bench rows and the NVML counter on a GPU.

CI has no GPU, so every test here skips without CUDA; they run on a lent GPU machine
(see docs/gpu.md for the figures measured there).
"""

from __future__ import annotations

import copy

import pytest
import torch

import nnopt

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


def _cpu_and_cuda(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    return model.eval(), copy.deepcopy(model).to("cuda").eval()


@pytest.mark.parametrize("batch", [1, 32])
def test_int8_dynamic_matches_cpu(trained_simplenet, digits, batch):
    """Same int8 codes and exact int32 sums on both devices: only the float epilogue may differ."""
    quantized = nnopt.quantize(trained_simplenet, nnopt.DynamicQuantConfig())
    cpu, gpu = _cpu_and_cuda(quantized)
    x = digits.test.x[:batch]
    with torch.inference_mode():
        expected, got = cpu(x), gpu(x.cuda()).cpu()
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), (got - expected).abs().max()


def test_int8_matmul_exact_for_any_shape():
    from nnopt.layers.kernels import int8_matmul

    g = torch.Generator().manual_seed(0)
    for m, k, n in [(1, 64, 10), (17, 64, 64), (128, 384, 1536), (5, 33, 7)]:
        x = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
        w = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
        expected = x.long() @ w.long().t()
        got = int8_matmul(x.cuda(), w.cuda()).cpu()
        assert got.dtype == torch.int32 and torch.equal(got.long(), expected)


def test_structured_pruned_model_runs_on_cuda(digits):
    model = nnopt.create_model("resnet8", seed=0)
    pruned = nnopt.prune(model, nnopt.StructuredPruneConfig(ratio=0.5, importance="l1", finetune_epochs=0))
    cpu, gpu = _cpu_and_cuda(pruned)
    x = digits.test.x[:32]
    with torch.inference_mode():
        assert torch.allclose(gpu(x.cuda()).cpu(), cpu(x), atol=1e-4)


def test_bench_on_cuda(trained_simplenet, tmp_path):
    from nnopt.pipeline.bench import BenchOptions, run_bench

    nnopt.save_model(trained_simplenet, tmp_path / "m")
    result = run_bench(tmp_path / "m", BenchOptions(device="cuda", batches=(1, 32), threads=(1,), seconds=0.2))
    report = result.to_dict()
    assert report["env"]["device"] == "cuda"
    assert all(r["latency_ms_median"] > 0 for r in report["rows"])


def test_nvml_counter_measures_gpu_work():
    from nnopt.energy.counters import available_counters

    counters = available_counters("cuda")
    if not counters:
        pytest.skip("this GPU or driver exposes no NVML total-energy counter")
    a = torch.randn(4096, 4096, device="cuda")

    def work() -> None:
        for _ in range(10):
            a @ a
        torch.cuda.synchronize()

    measured = nnopt.measure_energy(work, counter=counters[0], runs=2, window_periods=5, device="cuda")
    assert measured.median_j is not None and measured.median_j > 0, measured.summary()
