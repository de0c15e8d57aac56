"""GPTQ data-parallel over 2 processes (torchrun, gloo, CPU) equals one process on every window.

The test starts ``python -m torch.distributed.run --standalone --nproc-per-node 2`` on this file, whose
``__main__`` part (:func:`_worker`) runs the distributed calls on a tiny random Llama; the test compares
their outputs with one process's. Run as a script outside torchrun it does nothing useful.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nnopt.errors import ConfigError, OutputError
from nnopt.llm import distributed
from nnopt.llm.distributed import (
    distributed_context,
    hessian_all_reduce,
    quantize_checkpoint_gptq_distributed,
    quantize_checkpoint_layerwise_distributed,
    shard_tokens,
)
from nnopt.llm.gptq import GPTQConfig, gptq_codes
from nnopt.llm.layerwise import CalibrationConfig, InputStats, quantize_checkpoint_gptq
from nnopt.llm.synthetic import LlamaShape, write_synthetic_llama
from nnopt.quantization.weights import WeightQuantConfig

# hidden 96 and intermediate 160: groups of 64 leave partial last groups
SHAPE = LlamaShape(96, 160, 2, 4, 2, 128, "float32", max_position_embeddings=64)
# 4 windows in batches of 2: each of 2 ranks holds exactly one of the one-process run's batches, so its
# Hessian sums are that run's partial sums and the all-reduce adds them as that run does: bit for bit.
EXACT = dict(tokens=torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0)),
             calibration=CalibrationConfig(windows=4, window=32, batch=2),
             config=WeightQuantConfig(bits=4, group_size=64))
# 6 windows in batches of 2: a rank holds 3 (a batch of 2 and one of 1), so the float32 forward passes run
# on other batch shapes and the float64 sums add in another order: equal up to rounding, not bit for bit.
GENERAL = dict(tokens=torch.randint(0, 128, (6, 32), generator=torch.Generator().manual_seed(1)),
               calibration=CalibrationConfig(windows=6, window=32, batch=2),
               config=WeightQuantConfig(bits=4, group_size=64, symmetric=False))


def _gptq_algorithm(config):
    def algorithm(name, weight, h):
        return gptq_codes(weight, h, config, GPTQConfig())
    return algorithm


def _worker(src: Path, root: Path) -> None:
    """What each torchrun process runs: the distributed calls, and a JSON record for the test."""
    record: dict = {}
    with distributed_context() as context:
        rank = context.rank
        record["context"] = [context.rank, context.world_size, context.local_rank]
        for name, case in (("exact", EXACT), ("general", GENERAL)):
            result = quantize_checkpoint_gptq_distributed(src, root / name, case["config"],
                                                          calibration=case["calibration"],
                                                          tokens=case["tokens"], context=context)
            record[name] = {k: result[k] for k in ("calibration_windows", "rank_windows", "world_size",
                                                   "calibrated_layers")}
        # a plain per-matrix algorithm, its solves shared out or run by every rank on every matrix
        for name, split in (("exact-plain", True), ("exact-unsplit", False)):
            quantize_checkpoint_layerwise_distributed(
                src, root / name, EXACT["config"], _gptq_algorithm(EXACT["config"]), method="nnopt-gptq",
                settings={"gptq": {"damp": 0.01, "block": 128, "act_order": False}},
                calibration=EXACT["calibration"], tokens=EXACT["tokens"], context=context, split_solves=split)
        # the reducer alone: sums, maxima, counts
        g = torch.Generator().manual_seed(10 + rank)
        stats = {"a": InputStats(torch.randn(3, 3, generator=g, dtype=torch.float64),
                                 torch.rand(3, generator=g), 5 + rank),
                 "b": InputStats(torch.randn(2, 2, generator=g, dtype=torch.float64),
                                 torch.rand(2, generator=g), 7)}
        record["stats_in"] = {k: [v.hessian.tolist(), v.absmax.tolist(), v.tokens] for k, v in stats.items()}
        hessian_all_reduce(stats)
        record["stats_out"] = {k: [v.hessian.tolist(), v.absmax.tolist(), v.tokens] for k, v in stats.items()}
        # ranks at different layers: refused on every rank
        try:
            hessian_all_reduce({f"model.layers.{rank}.mlp.down_proj.weight": stats["a"]})
            record["mismatch"] = "accepted"
        except ConfigError as exc:
            record["mismatch"] = str(exc)
        # rank 0's refusal (the output exists) reaches every rank instead of leaving them waiting
        try:
            quantize_checkpoint_gptq_distributed(src, root / "exact", EXACT["config"], tokens=EXACT["tokens"],
                                                 calibration=EXACT["calibration"], context=context)
            record["exists"] = "accepted"
        except OutputError as exc:
            record["exists"] = str(exc)
    (root / f"rank{rank}.json").write_text(json.dumps(record))


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    # imported here: this file also runs as a torchrun script, where tests/ is not on sys.path
    from checkpoint_files import checkpoint_tensors

    return checkpoint_tensors(path)


def _codes_differ(a: Path, b: Path) -> tuple[int, int]:
    """(differing, total) packed code words across both outputs' quantized weights."""
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    packed = [n for n in ta if n.endswith("weight_packed")]
    assert packed
    return (sum(int((ta[n] != tb[n]).sum()) for n in packed), sum(ta[n].numel() for n in packed))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llm") / "tiny"
    write_synthetic_llama(path, SHAPE, seed=3, shard_bytes=60_000)
    return path


@pytest.fixture(scope="module")
def torchrun(tiny_dir, tmp_path_factory):
    """Runs :func:`_worker` in 2 processes under torchrun; returns the output root and each rank's record."""
    root = tmp_path_factory.mktemp("distributed")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           __file__, str(tiny_dir), str(root)], env=env, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return root, [json.loads((root / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.fixture
def one_thread():
    """The reference runs single-threaded, as each torchrun process does (OMP_NUM_THREADS=1): float32
    kernels may split their sums by thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_two_processes_write_exactly_the_one_process_output(tiny_dir, torchrun, tmp_path, one_thread):
    root, records = torchrun
    reference = tmp_path / "reference"
    quantize_checkpoint_gptq(tiny_dir, reference, EXACT["config"], calibration=EXACT["calibration"],
                             tokens=EXACT["tokens"])
    expected = _tensors(reference)
    for name in ("exact", "exact-plain", "exact-unsplit"):
        got = _tensors(root / name)
        assert got.keys() == expected.keys()
        for tensor, value in expected.items():
            assert torch.equal(got[tensor], value), (name, tensor)
        assert (root / name / "config.json").read_text() == (reference / "config.json").read_text()
    # only rank 0 wrote: the other rank's scratch copy is gone, and nothing else is left beside the outputs
    assert sorted(p.name for p in root.iterdir()) == ["exact", "exact-plain", "exact-unsplit", "general",
                                                      "rank0.json", "rank1.json"]
    for rank, record in enumerate(records):
        assert record["context"] == [rank, 2, rank]
        assert record["exact"] == {"calibration_windows": 4, "rank_windows": 2, "world_size": 2,
                                   "calibrated_layers": 2}


def test_two_processes_match_one_process_up_to_rounding_order(tiny_dir, torchrun, tmp_path, one_thread):
    root, records = torchrun
    reference = tmp_path / "reference"
    quantize_checkpoint_gptq(tiny_dir, reference, GENERAL["config"], calibration=GENERAL["calibration"],
                             tokens=GENERAL["tokens"])
    # Not bit for bit by construction (see GENERAL): a code can flip only where GPTQ's value lies within
    # rounding noise (~1e-7 relative, float32 forward passes) of a rounding boundary, so nearly none may.
    differing, total = _codes_differ(root / "general", reference)
    assert differing <= total // 1000, (differing, total)
    got, expected = _tensors(root / "general"), _tensors(reference)
    for name, value in expected.items():
        if name.endswith("weight_scale"):
            torch.testing.assert_close(got[name], value, rtol=1e-4, atol=0)
    assert [r["general"]["rank_windows"] for r in records] == [3, 3]


def test_the_reducer_sums_hessians_and_counts_and_takes_maxima(torchrun):
    _, records = torchrun
    for record in records:
        for name in ("a", "b"):
            h0, m0, n0 = records[0]["stats_in"][name]
            h1, m1, n1 = records[1]["stats_in"][name]
            h, m, n = record["stats_out"][name]
            f64 = torch.float64
            assert torch.equal(torch.tensor(h, dtype=f64), torch.tensor(h0, dtype=f64) + torch.tensor(h1, dtype=f64))
            assert torch.equal(torch.tensor(m), torch.maximum(torch.tensor(m0), torch.tensor(m1)))
            assert n == n0 + n1
        assert "disagree on the layer" in record["mismatch"]
        assert "exists" in record["exists"]


def test_shard_tokens_cuts_contiguous_balanced_blocks():
    tokens = torch.arange(7 * 3).reshape(7, 3)
    shards = [shard_tokens(tokens, r, 3) for r in range(3)]
    assert [s.shape[0] for s in shards] == [3, 2, 2]
    assert torch.equal(torch.cat(shards), tokens)
    with pytest.raises(ConfigError, match="at least one window"):
        shard_tokens(tokens[:2], 0, 3)
    with pytest.raises(ConfigError, match="not in a world"):
        shard_tokens(tokens, 3, 3)


def test_one_process_is_the_plain_engine(tiny_dir, tmp_path, monkeypatch, one_thread):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    result = quantize_checkpoint_gptq_distributed(tiny_dir, tmp_path / "one", EXACT["config"],
                                                  calibration=EXACT["calibration"], tokens=EXACT["tokens"])
    assert result["world_size"] == 1 and result["rank_windows"] == 4
    quantize_checkpoint_gptq(tiny_dir, tmp_path / "plain", EXACT["config"], calibration=EXACT["calibration"],
                             tokens=EXACT["tokens"])
    one, plain = _tensors(tmp_path / "one"), _tensors(tmp_path / "plain")
    assert one.keys() == plain.keys() and all(torch.equal(one[n], plain[n]) for n in one)


def test_distributed_context_refuses_an_incomplete_torchrun_environment(monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="RANK"):
        with distributed_context():
            pass
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(ConfigError, match="MASTER_ADDR and MASTER_PORT"):
        with distributed_context():
            pass
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ConfigError, match="WORLD_SIZE must be an integer"):
        with distributed_context():
            pass
    monkeypatch.setenv("WORLD_SIZE", "1")
    with distributed_context() as context:
        assert (context.rank, context.world_size, context.is_main) == (0, 1, True)
    assert distributed.DistributedContext().is_main


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), Path(sys.argv[2]))
