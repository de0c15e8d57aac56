"""The table of docs/your-models.md, cell by cell: every technique on the four user-written models of
examples/user_models.py (small versions) applies, applies while skipping some layers (each named with its
reason in the pass record), or refuses with an nnopt error. A cell that no longer says what happens fails."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch

import nnopt
from nnopt.errors import NnoptError
from nnopt.lineage import get_lineage

ROOT = Path(__file__).resolve().parents[2]
_SPEC = importlib.util.spec_from_file_location("user_models", ROOT / "examples" / "user_models.py")
user_models = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(user_models)

MODELS = {
    "TimeSeriesCNN": (lambda: user_models.TimeSeriesCNN(width=8), lambda: torch.randn(48, 3, 32)),
    "MobileNetSE": (lambda: user_models.MobileNetSE(width=8), lambda: torch.randn(16, 3, 32, 32)),
    "TinyViT": (lambda: user_models.TinyViT(image=16, patch=4, dim=16, depth=1, heads=2, mlp=32),
                lambda: torch.randn(16, 3, 16, 16)),
    "LSTMClassifier": (lambda: user_models.LSTMClassifier(vocab=50, embed=8, hidden=8),
                       lambda: torch.randint(0, 50, (48, 7))),
}
# technique as named in the table → (verb, config, whether it reads data)
TECHNIQUES = {
    "`prune-threshold`": (nnopt.prune, nnopt.ThresholdPruneConfig(threshold=0.05), False),
    "`prune-magnitude`": (nnopt.prune, nnopt.MagnitudePruneConfig(sparsity=0.5), False),
    "`prune-nm` 2:4": (nnopt.prune, nnopt.NMPruneConfig(n=2, m=4), False),
    "`prune-gradual`": (nnopt.prune, nnopt.GradualPruneConfig(final_sparsity=0.5, epochs=1, batch_size=16), True),
    "`prune-structured`": (nnopt.prune, nnopt.StructuredPruneConfig(ratio=0.5, head_ratio=0.5, importance="l1"),
                           True),
    "`fold-batchnorm`": (nnopt.simplify, nnopt.FoldBatchNormConfig(), True),
    "`quantize-weights` int8": (nnopt.quantize, nnopt.WeightQuantConfig(bits=8), False),
    "`quantize-weights` int4": (nnopt.quantize, nnopt.WeightQuantConfig(bits=4), False),
    "`int8-dynamic`": (nnopt.quantize, nnopt.DynamicQuantConfig(), False),
    "`int8-static`": (nnopt.quantize, nnopt.StaticQuantConfig(), True),
    "`cluster`": (nnopt.quantize, nnopt.ClusterConfig(bits=4), False),
    "`qat`": (nnopt.quantize, nnopt.QATConfig(epochs=1, batch_size=16), True),
    "`sparsify`": (nnopt.sparsify, nnopt.SparseKernelConfig(min_seconds=0.01), False),
    "`low-rank`": (nnopt.simplify, nnopt.LowRankConfig(), False),
}


def _table() -> dict[tuple[str, str], str]:
    page = (ROOT / "docs" / "your-models.md").read_text()
    body = page.split("<!-- matrix: start -->")[1].split("<!-- matrix: end -->")[0]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in body.strip().splitlines()]
    header, cells = rows[0], rows[2:]
    return {(row[0], model): cell for row in cells for model, cell in zip(header[1:], row[1:])}


TABLE = _table()


def test_the_table_covers_every_technique_and_model():
    assert {t for t, _ in TABLE} == set(TECHNIQUES) and {m for _, m in TABLE} == set(MODELS)


@pytest.mark.parametrize("technique", list(TECHNIQUES))
def test_each_cell_says_what_happens(technique):
    verb, config, reads_data = TECHNIQUES[technique]
    for model_name, (build, inputs) in MODELS.items():
        cell = TABLE[technique, model_name]
        torch.manual_seed(0)
        model, x = build().eval(), inputs()
        try:
            result = verb(model, config, data=x) if reads_data else verb(model, config)
        except NnoptError as exc:
            assert cell.startswith("refused:"), f"{technique} on {model_name} refused ({exc}); the table says {cell!r}"
            reason = re.sub(r"\s*\(.*\)$", "", cell.removeprefix("refused:").strip())
            assert reason.split(":")[0].lower()[:20] in str(exc).lower(), (cell, str(exc))
            continue
        assert cell.startswith("applies"), f"{technique} on {model_name} applied; the table says {cell!r}"
        skipped = get_lineage(result).applied[-1].details.get("skipped") or {}
        if "skips" in cell:
            assert skipped and all(isinstance(why, str) and why for why in skipped.values()), (cell, skipped)
        elif technique != "`fold-batchnorm`":  # folding lists every BatchNorm it left, with the reason
            assert not skipped, f"{technique} on {model_name} skipped {skipped}; the table says {cell!r}"
        with torch.inference_mode():
            assert result(x[:2]).shape == model(x[:2]).shape
