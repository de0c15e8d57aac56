"""The classic example in PyTorch: train SimpleNet on digits, prune with θ, quantize, evaluate.

    python examples/classic_simplenet.py --epochs 20 --threshold 0.01 --bits 8 --out simplenet-pq
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import nnopt


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--threshold", type=float, default=0.01)
    parser.add_argument("--bits", type=int, default=8)
    parser.add_argument("--out", default=None, help="save the pruned+quantized model here")
    args = parser.parse_args(argv)

    data = nnopt.load_digits()
    model = nnopt.create_model("simplenet", seed=0)  # Dense 64 ReLU → Dense 32 ReLU → Dense 10
    nnopt.train(model, data.train, nnopt.TrainConfig(epochs=args.epochs))  # Adam + cross-entropy

    pruned = nnopt.prune(model, nnopt.ThresholdPruneConfig(threshold=args.threshold))  # |w| < θ → 0
    quantized = nnopt.quantize(pruned, nnopt.WeightQuantConfig(bits=args.bits))  # w_q = round(w·S)

    results = {
        "baseline_accuracy": nnopt.accuracy(model, data.test),
        "pruned_accuracy": nnopt.accuracy(pruned, data.test),
        "quantized_accuracy": nnopt.accuracy(quantized, data.test),
    }
    for name, value in results.items():
        print(f"{name:>20}: {value:.4f}")
    print(nnopt.profile_model(quantized))
    if args.out:
        saved = nnopt.save_model(quantized, args.out, overwrite=True)
        print(f"saved {saved.path} ({saved.file_bytes:,} bytes of weights)")
    return results


if __name__ == "__main__":
    main()
