"""A MobileNetV2-style image CNN (inverted residuals with depthwise convolutions and squeeze-and-excitation),
written in plain PyTorch, through nnopt: structured pruning cuts the expanded channels of every block
(the 1×1 expansion, the depthwise convolution, the SE gate and the projection's inputs together),
recovered by distillation on unlabelled images, BatchNorm folded; measured, saved and reloaded.

    python examples/depthwise_cnn.py [--samples 800] [--size 96] [--epochs 2] [--out out/depthwise-cnn]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from generated_data import images  # noqa: E402
from user_model_report import summarize, train_briefly  # noqa: E402
from user_models import MobileNetSE  # noqa: E402

import nnopt  # noqa: E402


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=800)
    parser.add_argument("--size", type=int, default=96, help="image side in pixels (224 for ImageNet-sized work)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=1.0, help="timing per model")
    parser.add_argument("--out", default="out/depthwise-cnn")
    args = parser.parse_args(argv)

    data = nnopt.as_dataset(images(args.samples, seed=0, size=args.size))
    model = MobileNetSE(classes=10)
    accuracy = train_briefly(model, data, args.epochs)

    config = nnopt.StructuredPruneConfig(ratio=0.5, importance="l1", finetune_epochs=1)
    pruned = nnopt.prune(model, config, data=data.train.x)  # images only: recovery distils from the original
    folded = nnopt.simplify(pruned, nnopt.FoldBatchNormConfig())
    results = summarize(model, folded, data.test.x, MobileNetSE, args.out, seconds=args.seconds)
    results["accuracy_original"] = accuracy
    results["accuracy_optimized"] = nnopt.accuracy(folded, data.test)
    return results


if __name__ == "__main__":
    main()
