"""Passes that fine-tune (gradual pruning, structured recovery, QAT) in DDP processes: ``data_parallel=2``.

Each pass is run twice from the same trained model, in one process and in two, and must give the
same weights within floating-point tolerance (the two differ only in summation order) and the same
record of what it did (the pruner's schedule and masks, QAT's chosen epoch), which comes back from
rank 0's callbacks. Each two-process run spawns fresh interpreters (a few seconds each).
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import nnopt
from nnopt.errors import ConfigError
from nnopt.lineage import get_lineage
from nnopt.pruning import GradualPruneConfig, StructuredPruneConfig
from nnopt.quantization import QATConfig
from nnopt.training import TrainConfig


def _gloo_or_skip() -> None:
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("the gloo backend of torch.distributed is not available in this torch build")


@pytest.fixture(scope="module")
def trained(digits):
    model = nnopt.create_model("simplenet", seed=0)
    nnopt.train(model, digits.train, TrainConfig(epochs=2, seed=0), progress=False)
    return model


def _assert_same_weights(one: torch.nn.Module, two: torch.nn.Module, moved_from: torch.nn.Module) -> None:
    # 1e-5: Adam steps of ~1e-3 per batch make a wrong batch order, shard weighting or a skipped
    # callback show up at 1e-4 and above; summation order alone stays near 1e-7.
    for name, value in one.state_dict().items():
        torch.testing.assert_close(two.state_dict()[name], value, atol=1e-5, rtol=1e-5, msg=name)
    start = moved_from.state_dict()
    assert max(float((v.float() - start[k].float()).abs().max()) for k, v in one.state_dict().items()
               if k in start and v.shape == start[k].shape) > 1e-3, "training did not move the weights"


def test_gradual_pruning_in_two_processes_matches_one(trained, digits):
    _gloo_or_skip()
    data = digits.train.subset(400)
    config = GradualPruneConfig(final_sparsity=0.8, epochs=2, batch_size=25, prune_steps=4)
    one = nnopt.prune(trained, config, data=data, progress=False)
    two = nnopt.prune(trained, config, data=data, data_parallel=2)
    _assert_same_weights(one, two, trained)
    # the schedule the pruner ran comes back from rank 0, and the masks hold in the result
    assert get_lineage(two).applied[-1].details["schedule"] == get_lineage(one).applied[-1].details["schedule"]
    for name, module in one.named_modules():
        if isinstance(module, torch.nn.Linear):
            assert torch.equal(module.weight == 0, two.get_submodule(name).weight == 0), name
    assert float((two.get_submodule("features.0").weight == 0).float().mean()) == pytest.approx(0.8, abs=0.02)


def test_structured_recovery_with_distillation_in_two_processes_matches_one(trained, digits):
    _gloo_or_skip()
    data = digits.train.subset(400)
    config = StructuredPruneConfig(ratio=0.5, importance="l1", finetune_epochs=2, distill=0.5, batch_size=25)
    one = nnopt.prune(trained, config, data=data)
    two = nnopt.prune(trained, config, data=data, data_parallel=2)
    assert two.features[0].out_features == one.features[0].out_features == 32
    _assert_same_weights(one, two, nnopt.prune(trained, dataclasses.replace(config, finetune_epochs=0), data=data))


def test_qat_in_two_processes_matches_one(trained, digits):
    _gloo_or_skip()
    # 417 rows: 41 held out for validation, 376 trained on in global batches of 25, the last of one
    # row, so one process gets an empty shard; observers update for 2 of 3 epochs (the default).
    data = digits.train.subset(417)
    config = QATConfig(epochs=3, batch_size=25)
    one = nnopt.quantize(trained, config, data=data, progress=False)
    two = nnopt.quantize(trained, config, data=data, data_parallel=2, progress=False)
    first, second = get_lineage(one).applied[-1].details, get_lineage(two).applied[-1].details
    assert second["training"]["kept_epoch"] == first["training"]["kept_epoch"]  # best-on-validation came back
    assert second["training"]["loss"] == pytest.approx(first["training"]["loss"], rel=1e-5)
    # the observed input ranges are the global batch's, as in one process
    for name, layer in first["layers"].items():
        assert second["layers"][name]["input_range"] == pytest.approx(layer["input_range"], rel=1e-5), name
    x = digits.test.x
    torch.testing.assert_close(two(x), one(x), atol=1e-4, rtol=1e-4)


def test_data_parallel_refusals(trained, digits):
    with pytest.raises(ConfigError, match="data_parallel must be an integer >= 1"):
        nnopt.train(trained, digits.train, TrainConfig(epochs=1), data_parallel=0)
    with pytest.raises(ConfigError, match="does not checkpoint"):
        from nnopt.checkpoint import CheckpointSpec

        nnopt.train(trained, digits.train, TrainConfig(epochs=1), data_parallel=2,
                    checkpoint=CheckpointSpec("unused-dir"))
    with pytest.raises(ConfigError, match="picklable loss"):
        nnopt.train(trained, digits.train, TrainConfig(epochs=1), data_parallel=2,
                    loss=lambda logits, x, y: logits.sum())


def test_a_recipe_trains_data_parallel_like_one_process(trained, digits):
    _gloo_or_skip()
    from nnopt.recipe import apply_recipe, parse_recipe

    recipe = parse_recipe({"steps": [
        {"kind": "prune-gradual", "final_sparsity": 0.7, "epochs": 2, "batch_size": 25, "prune_steps": 2},
        {"kind": "train", "epochs": 1, "batch_size": 25},
    ]})
    dataset = dataclasses.replace(digits, train=digits.train.subset(300))
    one = apply_recipe(trained, recipe, data=dataset)
    two = apply_recipe(trained, recipe, data=dataset, data_parallel=2)
    _assert_same_weights(one, two, trained)


def test_a_recipe_step_without_data_parallel_support_is_refused(trained, digits, monkeypatch):
    from nnopt import recipe as recipes
    from nnopt import techniques

    parsed = recipes.parse_recipe({"steps": [{"kind": "train", "epochs": 1}]})
    old = techniques.technique_for(parsed.steps[0])
    # a technique whose apply takes no data_parallel (the built-in ones all take it)
    monkeypatch.setitem(techniques._BY_TYPE, type(parsed.steps[0]),
                        dataclasses.replace(old, apply=lambda model, config, data, progress: {}))
    with pytest.raises(ConfigError, match="'train' does not run data-parallel"):
        recipes.apply_recipe(trained, parsed, data=digits, data_parallel=2)


class WeightPenalty:
    """A loss that reads the model it trains (module level, so that it can travel to the processes)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def __call__(self, logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        penalty = sum((p**2).sum() for p in self.model.parameters())
        return torch.nn.functional.cross_entropy(logits, y) + 1e-3 * penalty


def test_a_loss_that_reads_the_model_reads_the_one_being_trained(trained, digits):
    _gloo_or_skip()
    data = digits.train.subset(300)
    config = TrainConfig(epochs=2, batch_size=25)
    one, two = copy.deepcopy(trained), copy.deepcopy(trained)
    nnopt.train(one, data, config, loss=WeightPenalty(one), progress=False)
    nnopt.train(two, data, config, loss=WeightPenalty(two), data_parallel=2)
    _assert_same_weights(one, two, trained)


class _NumpyState:
    def after_step(self, model: torch.nn.Module) -> None:
        return None

    def checkpoint_state(self) -> dict:
        import numpy as np

        return {"value": np.float64(1.0)}  # not something weights_only loading accepts

    def restore_state(self, state: dict, model: torch.nn.Module) -> None:
        raise AssertionError("never reached")


def test_a_callback_state_that_cannot_come_back_is_named(trained, digits):
    _gloo_or_skip()
    model = copy.deepcopy(trained)
    with pytest.raises(ConfigError, match=r"callback's state \(_NumpyState\) could not come back"):
        nnopt.train(model, digits.train.subset(100), TrainConfig(epochs=1), callbacks=[_NumpyState()],
                    data_parallel=2)
    assert any((a != b).any() for a, b in zip(model.state_dict().values(), trained.state_dict().values()))


def test_a_script_without_a_main_guard_is_told_what_to_do(tmp_path):
    _gloo_or_skip()
    import subprocess
    import sys

    script = tmp_path / "train_me.py"
    script.write_text("import nnopt\nd = nnopt.load_digits()\nm = nnopt.create_model('simplenet', seed=0)\n"
                      "nnopt.train(m, d.train.subset(64), nnopt.TrainConfig(epochs=1), data_parallel=2)\n"
                      "print('trained')\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode != 0 and "trained" not in done.stdout
    assert 'under `if __name__ == "__main__":`' in done.stderr
