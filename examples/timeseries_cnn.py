"""A 1-D CNN for time series, written in plain PyTorch, through nnopt: structured pruning that removes half
its channels, recovered by distillation from the original on unlabelled signals, BatchNorm folded, then
measured against the original and saved/reloaded with your own class as the factory.

    python examples/timeseries_cnn.py [--samples 2000] [--length 512] [--epochs 4] [--out out/timeseries-cnn]
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from generated_data import signals  # noqa: E402
from user_model_report import summarize, train_briefly  # noqa: E402
from user_models import TimeSeriesCNN  # noqa: E402

import nnopt  # noqa: E402


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=1.0, help="timing per model")
    parser.add_argument("--out", default="out/timeseries-cnn")
    args = parser.parse_args(argv)

    data = nnopt.as_dataset(signals(args.samples, seed=0, length=args.length))  # (x, y): labelled
    factory = functools.partial(TimeSeriesCNN, width=args.width)
    model = factory()
    accuracy = train_briefly(model, data, args.epochs)

    inputs_only = data.train.x  # compressing someone else's model: no labels needed
    config = nnopt.StructuredPruneConfig(ratio=0.5, importance="l1", finetune_epochs=2)
    pruned = nnopt.prune(model, config, data=inputs_only)  # without labels: distils from the original
    folded = nnopt.simplify(pruned, nnopt.FoldBatchNormConfig())  # exact: BatchNorm into the convolution
    results = summarize(model, folded, data.test.x, factory, args.out, seconds=args.seconds)
    results["accuracy_original"] = accuracy
    results["accuracy_optimized"] = nnopt.accuracy(folded, data.test)
    return results


if __name__ == "__main__":
    main()
