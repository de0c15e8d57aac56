"""``--data-parallel N`` on the commands that fine-tune: the run happens in DDP processes and its
result matches the one-process run; bad combinations are refused before anything is written."""

from __future__ import annotations

import pytest
import torch

import nnopt
from nnopt.cli import main


@pytest.fixture(scope="module")
def simplenet(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    nnopt.save_model(nnopt.create_model("simplenet", seed=0), root / "simplenet")
    return root / "simplenet"


def test_gradual_pruning_on_two_processes_matches_one(simplenet, tmp_path, capsys):
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("the gloo backend of torch.distributed is not available in this torch build")
    command = ["prune", str(simplenet), "--sparsity", "0.8", "--schedule", "gradual", "--epochs", "2",
               "--data", "digits", "--kernel-batch", "0", "--format", "safetensors"]
    assert main([*command, "-o", str(tmp_path / "one"), "--checkpoint-every", "0"]) == 0
    assert main([*command, "-o", str(tmp_path / "two"), "--data-parallel", "2"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert not (tmp_path / "two.ckpt").exists()  # data-parallel runs do not checkpoint
    one, two = nnopt.load_model(tmp_path / "one"), nnopt.load_model(tmp_path / "two")
    for name, value in one.state_dict().items():
        torch.testing.assert_close(two.state_dict()[name], value, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize(
    ("command", "message"),
    [
        (["prune", "{m}", "--sparsity", "0.5", "--data-parallel", "2"], "applies to runs that fine-tune"),
        (["prune", "{m}", "--structured", "--ratio", "0.5", "--data-parallel", "2"], "applies to runs that fine-tune"),
        (["prune", "{m}", "--sparsity", "0.5", "--schedule", "gradual", "--data", "digits", "--data-parallel", "2",
          "--resume"], "do not checkpoint"),
        (["prune", "{m}", "--sparsity", "0.5", "--epochs", "1", "--data", "digits", "--data-parallel", "0"],
         "data_parallel must be an integer >= 1"),
        (["quantize", "{m}", "--scheme", "int8-dynamic", "--data-parallel", "2"], "applies to runs that fine-tune"),
        (["quantize", "{m}", "--scheme", "qat", "--data", "digits", "--data-parallel", "2", "--checkpoint-dir", "x"],
         "do not checkpoint"),
    ],
)
def test_bad_data_parallel_options(simplenet, tmp_path, expect_error, command, message):
    expect_error([part.format(m=simplenet) for part in command] + ["-o", str(tmp_path / "out")], message)
    assert list(tmp_path.iterdir()) == []


def test_optimize_refuses_a_bad_process_count(simplenet, tmp_path, expect_error):
    from pathlib import Path

    recipe = Path(__file__).resolve().parents[2] / "recipes" / "classic.yaml"
    expect_error(["optimize", str(simplenet), "--recipe", str(recipe), "--data-parallel", "0",
                  "-o", str(tmp_path / "out")], "data_parallel must be an integer >= 1")
    assert list(tmp_path.iterdir()) == []
