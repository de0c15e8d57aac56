"""What the examples of user models report: fidelity to the original, MACs, measured latency side by side,
file size, and a save/reload through the user's own factory that must give equal outputs."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import nnopt
from nnopt.metrics.speed import compare_calls


def summarize(original: nn.Module, optimized: nn.Module, test_inputs: torch.Tensor, factory: Callable[[], nn.Module],
              out: str | Path, batch: int = 32, seconds: float = 1.0) -> dict[str, float]:
    """Figures of ``optimized`` against ``original`` on ``test_inputs`` (held out from training and
    calibration); ``optimized`` is saved to ``out`` and reloaded with ``factory`` (nothing imported)."""
    shape = tuple(test_inputs.shape[1:])
    fidelity = nnopt.fidelity(optimized, original, test_inputs)
    timing_inputs = test_inputs[:batch]
    with torch.inference_mode():
        timings = compare_calls({"original": functools.partial(original.eval(), timing_inputs),
                                 "optimized": functools.partial(optimized.eval(), timing_inputs)},
                                batch, warmup=3, min_calls=10, min_seconds=seconds)
    saved = nnopt.save_model(optimized, out, overwrite=True, factory=factory)
    reloaded = nnopt.load_model(out, factory=factory)
    with torch.inference_mode():
        equal = bool(torch.equal(reloaded(test_inputs[:8]), optimized(test_inputs[:8])))
    results = {
        "agreement": fidelity.agreement, "cosine_mean": fidelity.cosine_mean,
        "macs_original": nnopt.profile_model(original, shape).macs,
        "macs_optimized": nnopt.profile_model(optimized, shape).macs,
        "ms_original": timings["original"].median_ms, "ms_optimized": timings["optimized"].median_ms,
        "speedup": timings["original"].median_ms / timings["optimized"].median_ms,
        "file_bytes": saved.file_bytes, "compression_ratio": saved.compression_ratio,
        "reloaded_equal": float(equal),
    }
    print(f"top-1 agreement with the original {results['agreement']:.3f}, output cosine {results['cosine_mean']:.4f}")
    print(f"MACs per sample (analytic) {results['macs_original']:,} -> {results['macs_optimized']:,}")
    print(f"batch {batch}, {torch.get_num_threads()} threads (measured, median): {results['ms_original']:.2f} ms -> "
          f"{results['ms_optimized']:.2f} ms ({results['speedup']:.2f}x)")
    print(f"saved {saved.path}: {saved.file_bytes:,} bytes ({saved.compression_ratio:.1f}x smaller than dense fp32); "
          f"reloaded with your factory: outputs {'equal' if equal else 'DIFFER'}")
    return results


def train_briefly(model: nn.Module, data: nnopt.data.Dataset, epochs: int) -> float:
    """Train ``model`` on the labelled training split (Adam, cross-entropy); its held-out accuracy."""
    torch.manual_seed(0)
    nnopt.train(model, data.train, nnopt.TrainConfig(epochs=epochs, batch_size=32), progress=False)
    model.eval()
    accuracy = nnopt.accuracy(model, data.test)
    print(f"{type(model).__name__} trained: held-out accuracy {accuracy:.3f}")
    return accuracy
