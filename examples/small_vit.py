"""A small ViT-style encoder (patch embedding, nn.MultiheadAttention, GELU MLP, LayerNorm), written in plain
PyTorch, through nnopt: half of the attention heads and MLP neurons removed (each nn.MultiheadAttention
becomes nnopt's SplitMultiheadAttention, with equal outputs, so heads can be cut), recovered by
distillation on unlabelled images, then int8 weights; measured, saved and reloaded.

    python examples/small_vit.py [--samples 800] [--epochs 3] [--out out/small-vit]
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from generated_data import images  # noqa: E402
from user_model_report import summarize, train_briefly  # noqa: E402
from user_models import TinyViT  # noqa: E402

import nnopt  # noqa: E402


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=800)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=1.0, help="timing per model")
    parser.add_argument("--out", default="out/small-vit")
    args = parser.parse_args(argv)

    data = nnopt.as_dataset(images(args.samples, seed=0, size=args.size))
    factory = functools.partial(TinyViT, image=args.size, patch=4, dim=args.dim, heads=4, mlp=2 * args.dim)
    model = factory()
    accuracy = train_briefly(model, data, args.epochs)

    config = nnopt.StructuredPruneConfig(ratio=0.5, head_ratio=0.5, importance="l1", finetune_epochs=1)
    pruned = nnopt.prune(model, config, data=data.train.x)  # heads and MLP neurons; distils without labels
    quantized = nnopt.quantize(pruned, nnopt.WeightQuantConfig(bits=8))  # int8 codes, fp32 compute
    results = summarize(model, quantized, data.test.x, factory, args.out, seconds=args.seconds)
    results["accuracy_original"] = accuracy
    results["accuracy_optimized"] = nnopt.accuracy(quantized, data.test)
    return results


if __name__ == "__main__":
    main()
