"""``nnopt.auto(model, data, AutoConfig(...))``: the search as a Python verb on an in-memory model."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
import torch

import nnopt
from nnopt.errors import ConfigError
from nnopt.search import AutoConfig, AutoResult, dominates, validation_split

# A tiny search (seconds): two cost targets, a few levels, two fine-tuning epochs.
TINY = AutoConfig(objective="size", max_drop=0.02, finetune_epochs=2, stages=2, targets=(0.25, 0.1),
                  latency_seconds=0.02, screen_seconds=0.01, levels={"sparsity": (0.5, 0.8), "bits": (8, 4)})


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Tiny models train fastest on one thread, above all on a shared machine; and a recipe replays exactly
    only with the thread count it ran with (float sums are ordered by it)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def run(digits, tmp_path_factory):
    """SimpleNet trained on the fit part of the training split (the search's validation rows are unseen by
    it), then one search; records the input's state before and its modes after, and where files went."""
    with one_thread():
        model = nnopt.create_model("simplenet", seed=0)
        nnopt.train(model, validation_split(digits.train)[0], nnopt.TrainConfig(epochs=15, seed=0), progress=False)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        model.train()  # the search evaluates in eval mode; the caller's mode must come back
        scratch = tmp_path_factory.mktemp("scratch")
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(tempfile, "tempdir", str(scratch))  # where the trials' temporary directory goes
            patch.chdir(scratch)
            result = nnopt.auto(model, digits, TINY, progress=False)
    return SimpleNamespace(result=result, model=model, before=before, scratch=scratch,
                           modes=[m.training for m in model.modules()])


def _accuracy(model, split):
    with torch.inference_mode():
        return float((model.eval()(split.x).argmax(-1) == split.y).double().mean())


def test_chosen_model_is_within_the_budget_on_the_test_split(run, digits):
    result = run.result
    assert isinstance(result, AutoResult) and result.chosen and result.exit_code == 0
    drop = _accuracy(run.model, digits.test) - _accuracy(result.model, digits.test)
    assert drop <= TINY.max_drop
    assert result.test["accuracy"] == pytest.approx(_accuracy(result.model, digits.test))
    assert result.report["result"]["test_meets_budget"] and result.message.startswith("Chosen:")
    assert "nnopt auto" in str(result)  # the table the CLI prints


def test_recipe_rebuilds_the_chosen_model_with_apply_recipe(run, digits):
    result = run.result
    with one_thread():
        rebuilt = nnopt.apply_recipe(run.model, result.recipe, data=digits, progress=False)
    with torch.inference_mode():
        assert torch.equal(rebuilt.eval()(digits.test.x), result.model.eval()(digits.test.x))


def test_front_is_non_empty_non_dominated_and_holds_the_chosen_plan(run):
    result = run.result
    points = [(p.quality, p.objective_value) for p in result.front]
    assert points and not any(dominates(q, p) for p in points for q in points)
    chosen = [p for p in result.front if p.chosen]
    assert len(chosen) == 1 and chosen[0].recipe == result.recipe and chosen[0].meets_budget
    assert all(p.figures["bytes"] == p.objective_value for p in result.front)  # size: bytes of the file written
    assert [p.name for p in result.front] == [f["name"] for f in result.report["front"]]


def test_input_model_is_left_as_it_was_and_nothing_is_left_on_disk(run):
    before, after = run.before, run.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(run.modes)  # still in training mode, as it was given
    assert run.result.model is not run.model
    assert not any(run.scratch.iterdir())  # the temporary trials are gone; nothing was written to the working dir


def test_bad_config_and_arguments_name_the_field(digits, tmp_path):
    model = nnopt.create_model("simplenet", seed=0)  # every refusal comes before any work
    with pytest.raises(ConfigError, match=r"AutoConfig\.max_drop must be a fraction in \[0, 1\].*got 2"):
        AutoConfig(max_drop=2)
    with pytest.raises(ConfigError, match="AutoConfig.workers"):
        AutoConfig(workers=0)
    with pytest.raises(ConfigError, match="config must be an AutoConfig"):
        nnopt.auto(model, digits, {"max_drop": 0.01})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="data must be an nnopt.data.Dataset"):
        nnopt.auto(model, [[0.0] * 64], TINY)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="data='sentences' is for sentence encoders"):
        nnopt.auto(model, "sentences", TINY)
    with pytest.raises(ConfigError, match="resume=True needs the checkpoint_dir"):
        nnopt.auto(model, digits, TINY, resume=True)
    with pytest.raises(nnopt.NnoptError, match="resume=True: no checkpoint"):
        nnopt.auto(model, digits, TINY, checkpoint_dir=tmp_path / "ckpt", resume=True)
    assert not (tmp_path / "ckpt").exists()


def test_an_interruption_while_writing_the_output_keeps_the_checkpoint(digits, tmp_path, monkeypatch):
    """nnopt auto removes its checkpoint only once OUT is complete: Ctrl-C while writing, then --resume."""
    from nnopt.pipeline import auto_run
    from nnopt.search import checkpoint_dir

    with one_thread():
        model = nnopt.create_model("simplenet", seed=0)
        nnopt.train(model, digits.train, nnopt.TrainConfig(epochs=3, seed=0), progress=False)
        source = nnopt.save_model(model, tmp_path / "in").path
        out = tmp_path / "out"

        def interrupted(*args, **kwargs):
            raise KeyboardInterrupt

        with monkeypatch.context() as patch:
            patch.setattr(auto_run, "_write", interrupted)
            with pytest.raises(KeyboardInterrupt):
                auto_run.run_auto(source, "digits", TINY, out, progress=False)
        assert checkpoint_dir(out).is_dir() and not out.exists()
        done = auto_run.run_auto(source, "digits", TINY, out, resume=True, progress=False)
    assert done.exit_code in (0, 3)
    assert (out / "report.json").is_file() and not checkpoint_dir(out).exists()


def test_a_checkpoint_directory_left_before_the_first_trial_can_be_resumed(tmp_path):
    from nnopt.search.checkpoint import Checkpoint

    work = tmp_path / "work"
    (work / "input").mkdir(parents=True)  # what a call interrupted before its first save leaves
    with pytest.raises(nnopt.NnoptError, match="add resume=True"):
        Checkpoint.at(work, {"model": "x"}, resume=False)
    fresh = Checkpoint.at(work, {"model": "x"}, resume=True)
    assert not fresh.resumed and fresh.state["trials"] == {}
    with pytest.raises(nnopt.NnoptError, match="no checkpoint at"):
        Checkpoint.at(tmp_path / "none", {"model": "x"}, resume=True)


def test_auto_on_a_loaded_user_module_and_unlabelled_tensors(tmp_path, monkeypatch):
    from pathlib import Path

    from nnopt.lineage import recorded_input

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "examples"))
    import user_models

    torch.manual_seed(0)
    nnopt.save_model(user_models.TimeSeriesCNN(width=8), tmp_path / "m", factory_kwargs={"width": 8})
    model = nnopt.load_model(tmp_path / "m", trust_import=True)
    x = torch.randn(160, 3, 32)  # inputs only: the metric is top-1 agreement with the input model
    with one_thread():
        result = nnopt.auto(model, x, TINY, trust_import=True)  # trial models are loaded: they import it too
    assert result.report["metric"] == "agreement" and result.front
    assert recorded_input(model) is None  # the sample shape went on a copy, not on the caller's model
