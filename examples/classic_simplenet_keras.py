"""The classic Keras workflow, then nnopt: train in Keras, prune and quantize the same model.

Keras 3 runs on its torch backend here, so the Keras model is itself a ``torch.nn.Module`` and
``nnopt.prune`` / ``nnopt.quantize`` accept it directly (they convert it with
``nnopt.from_keras`` and check the conversion numerically).

    python examples/classic_simplenet_keras.py --epochs 10 --out out/simplenet-keras-q8
"""

from __future__ import annotations

import os

# Must be set before Keras is imported for the first time: the backend is chosen at import.
os.environ["KERAS_BACKEND"] = "torch"

import argparse  # noqa: E402

import keras  # noqa: E402
import torch  # noqa: E402

import nnopt  # noqa: E402
from nnopt.lineage import get_lineage  # noqa: E402


class SimpleNet(keras.Model):
    """64 -> 64 -> 32 -> 10, the textbook digits classifier."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden1 = keras.layers.Dense(64, activation="relu")
        self.hidden2 = keras.layers.Dense(32, activation="relu")
        self.classifier = keras.layers.Dense(10, activation="softmax")

    def call(self, x):
        return self.classifier(self.hidden2(self.hidden1(x)))


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--out", help="save the pruned + quantized model to this directory")
    parser.add_argument("--verbose", action="store_true", help="show Keras training progress")
    args = parser.parse_args(argv)

    keras.utils.set_random_seed(0)
    dataset = nnopt.load_digits()
    x_train, y_train = dataset.train.x.numpy(), dataset.train.y.numpy()
    x_test, y_test = dataset.test.x.numpy(), dataset.test.y.numpy()

    # --- classic Keras ---
    model = SimpleNet()
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x_train, y_train, epochs=args.epochs, batch_size=32, verbose=int(args.verbose))
    _, keras_acc = model.evaluate(x_test, y_test, verbose=0)
    print(f"isinstance(model, torch.nn.Module): {isinstance(model, torch.nn.Module)}")

    # --- nnopt: the verbs take the Keras model as it is ---
    pruned = nnopt.prune(model, nnopt.ThresholdPruneConfig(threshold=0.01))
    quantized = nnopt.quantize(pruned, nnopt.WeightQuantConfig(bits=8))
    sparsity = float(get_lineage(pruned).applied[-1].details["sparsity"])

    results = {
        "keras_accuracy": float(keras_acc),
        "pruned_accuracy": nnopt.accuracy(pruned, dataset.test),
        "quantized_accuracy": nnopt.accuracy(quantized, dataset.test),
        "sparsity": sparsity,
    }
    print(f"\n{'model':<22}{'test accuracy':>14}")
    print(f"{'keras':<22}{results['keras_accuracy']:>14.4f}")
    print(f"{'pruned (θ=0.01)':<22}{results['pruned_accuracy']:>14.4f}")
    print(f"{'pruned + int8':<22}{results['quantized_accuracy']:>14.4f}")
    print(f"weight sparsity after pruning: {sparsity:.2%}")

    if args.out:
        saved = nnopt.save_model(quantized, args.out, overwrite=True)
        print(f"saved {saved.path} ({saved.file_bytes:,} bytes of weights)")
    return results


if __name__ == "__main__":
    main()
