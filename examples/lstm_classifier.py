"""An LSTM text classifier (Embedding → LSTM → Linear), written in plain PyTorch, through nnopt: half of
every weight matrix pruned (embedding, input and recurrent weights), then dynamic int8 (int8 embedding
rows and LSTM weights); measured, saved and reloaded with your class.

    python examples/lstm_classifier.py [--samples 2000] [--epochs 3] [--out out/lstm-classifier]
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from generated_data import token_ids  # noqa: E402
from user_model_report import summarize, train_briefly  # noqa: E402
from user_models import LSTMClassifier  # noqa: E402

import nnopt  # noqa: E402


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--vocab", type=int, default=5000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=1.0, help="timing per model")
    parser.add_argument("--out", default="out/lstm-classifier")
    args = parser.parse_args(argv)

    data = nnopt.as_dataset(token_ids(args.samples, seed=0, vocab=args.vocab))  # int64 ids (n, 64), labels
    factory = functools.partial(LSTMClassifier, vocab=args.vocab)
    model = factory()
    accuracy = train_briefly(model, data, args.epochs)

    pruned = nnopt.prune(model, nnopt.MagnitudePruneConfig(sparsity=0.5))  # embedding, LSTM weights
    quantized = nnopt.quantize(pruned, nnopt.DynamicQuantConfig())
    results = summarize(model, quantized, data.test.x, factory, args.out, seconds=args.seconds)
    results["accuracy_original"] = accuracy
    results["accuracy_optimized"] = nnopt.accuracy(quantized, data.test)
    return results


if __name__ == "__main__":
    main()
