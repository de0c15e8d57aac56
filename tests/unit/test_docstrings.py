"""Every example in nnopt's docstrings runs (those marked ``+SKIP`` say why they cannot here)."""

from __future__ import annotations

import copy
import doctest
import importlib
import pkgutil

import pytest
import torch

import nnopt


def _modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages(nnopt.__path__, "nnopt.") if not m.name.endswith("__main__"))


def _docstring_tests() -> list[doctest.DocTest]:
    finder = doctest.DocTestFinder(exclude_empty=True)
    tests = []
    for name in _modules():
        module = importlib.import_module(name)
        tests += [t for t in finder.find(module) if t.examples and t.name.startswith(name)]
    return tests


@pytest.fixture(scope="module")
def shared_names(digits) -> dict:
    """The names the examples use without defining: nnopt's public names (as after ``from nnopt import *``),
    a trained SimpleNet ``model``, the digits ``dataset`` and a ``pruned`` copy."""
    model = nnopt.create_model("simplenet", seed=0)
    nnopt.train(model, digits.train, nnopt.TrainConfig(epochs=2), progress=False)
    public = {name: getattr(nnopt, name) for name in dir(nnopt) if not name.startswith("_")}
    return {**public, "nnopt": nnopt, "torch": torch, "model": model.eval(), "dataset": digits,
            "pruned": nnopt.prune(model, nnopt.MagnitudePruneConfig(sparsity=0.8))}


@pytest.mark.parametrize("test", _docstring_tests(), ids=lambda t: t.name)
def test_docstring_example_runs(test: doctest.DocTest, shared_names, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # each example gets its own copies of the model and data: an example that trains them changes no other
    test.globs = {**shared_names, **copy.deepcopy({k: shared_names[k] for k in ("model", "pruned")}), **test.globs}
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    runner.run(test, out=lambda text: pytest.fail(text, pytrace=False))
    assert runner.failures == 0
