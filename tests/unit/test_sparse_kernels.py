import copy

import pytest
import torch
from torch import nn

import nnopt
import nnopt.sparse  # registers the pass's replay, which loading a sparsified model needs
from nnopt.errors import ConfigError, ModelFormatError, SelectionError, UnsupportedModelError
from nnopt.sparse import SparseKernelConfig, SparseLinear, sparsify

FAST = {"min_seconds": 0.0}  # compare_latency still times >= 20 calls per candidate


def sparse_linear(in_features: int, out_features: int, sparsity: float, seed: int = 0, bias: bool = True) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        w = layer.weight.view(-1)
        w[w.abs().argsort()[: round(sparsity * w.numel())]] = 0  # exactly that fraction of zeros
    return layer


def assert_matches(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.shape == ref.shape and out.dtype == ref.dtype
    if ref.numel():
        assert (out - ref).abs().max() <= 1e-5 * max(1.0, float(ref.abs().max()))


@pytest.fixture(scope="module")
def pruned_lenet():
    model = nnopt.create_model("lenet300", seed=0)
    return nnopt.prune(model, nnopt.ThresholdPruneConfig(threshold=0.05))


@pytest.mark.parametrize("batch", [1, 64])
@pytest.mark.parametrize("bias", [True, False])
def test_sparse_linear_equals_dense(batch, bias):
    dense = sparse_linear(256, 192, 0.95, bias=bias)
    assert float((dense.weight == 0).float().mean()) == pytest.approx(0.95, abs=1e-4)
    sparse = SparseLinear.from_linear(dense)
    x = torch.randn(batch, 256)
    with torch.no_grad():
        assert_matches(sparse(x), dense(x))
    with torch.inference_mode():
        out = sparse(x)
        assert_matches(out, dense(x))
        assert out.is_contiguous()


def test_sparse_linear_other_shapes_and_autograd():
    dense = sparse_linear(40, 30, 0.9)
    sparse = SparseLinear.from_linear(dense)
    for shape in [(40,), (2, 3, 40), (0, 40)]:
        x = torch.randn(*shape)
        with torch.no_grad():
            assert_matches(sparse(x), dense(x))
    x = torch.randn(5, 40, requires_grad=True)
    sparse(x).sum().backward()
    expected = dense.weight.detach().sum(0).expand(5, 40)
    torch.testing.assert_close(x.grad, expected)


def test_only_sparse_storage_and_copies_work():
    dense = sparse_linear(64, 32, 0.95)
    sparse = SparseLinear.from_linear(dense)
    nonzeros = int((dense.weight != 0).sum())
    assert sparse.weight_values.numel() == nonzeros == sparse.nonzeros
    assert sparse.weight_col_indices.dtype == torch.int32 and sparse.weight.layout == torch.sparse_csr
    assert not any(t.numel() == 64 * 32 for t in (*sparse.buffers(), *sparse.parameters()))
    copied = copy.deepcopy(sparse)  # torch cannot deep-copy a CSR tensor; the module must still copy
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert_matches(copied(x), dense(x))
        assert_matches(sparse.double()(x.double()), dense.double()(x.double()))


def test_state_dict_is_exactly_linears():
    dense = sparse_linear(48, 24, 0.95)
    sparse = SparseLinear.from_linear(dense)
    mine, theirs = sparse.state_dict(), dense.state_dict()
    assert list(mine) == list(theirs) == ["weight", "bias"]
    for key in theirs:
        assert mine[key].layout == torch.strided and not mine[key].is_sparse
        assert mine[key].shape == theirs[key].shape and mine[key].dtype == theirs[key].dtype == torch.float32
        assert torch.equal(mine[key], theirs[key])
    no_bias = SparseLinear.from_linear(sparse_linear(8, 4, 0.5, bias=False))
    assert list(no_bias.state_dict()) == ["weight"]


def test_load_state_dict_converts_dense_to_sparse():
    source = sparse_linear(48, 24, 0.9, seed=1)
    target = SparseLinear(48, 24)
    target.load_state_dict(source.state_dict())
    assert target.weight_values.numel() == int((source.weight != 0).sum())
    x = torch.randn(4, 48)
    with torch.no_grad():
        assert_matches(target(x), source(x))
    # A plain Linear accepts a SparseLinear's state_dict too: the format is the standard one.
    back = nn.Linear(48, 24)
    back.load_state_dict(target.state_dict())
    assert torch.equal(back.weight, source.weight)
    with pytest.raises(RuntimeError, match="size mismatch"):
        target.load_state_dict(nn.Linear(48, 23).state_dict())
    with pytest.raises(RuntimeError, match="Missing key"):
        target.load_state_dict({"bias": torch.zeros(24)})
    with pytest.raises(RuntimeError, match="Unexpected key"):
        target.load_state_dict({**source.state_dict(), "extra": torch.zeros(1)})


def test_forced_sparse_round_trips_through_save_and_load(pruned_lenet, tmp_path):
    fast = sparsify(pruned_lenet, SparseKernelConfig(min_speedup=0.0, **FAST))
    names = ["features.0", "features.2", "classifier"]
    assert all(isinstance(fast.get_submodule(n), SparseLinear) for n in names)
    assert all(type(pruned_lenet.get_submodule(n)) is nn.Linear for n in names)  # the input is untouched
    x = torch.randn(16, 64)
    with torch.no_grad():
        assert_matches(fast(x), pruned_lenet(x))
    nnopt.save_model(fast, tmp_path / "m")
    loaded = nnopt.load_model(tmp_path / "m")
    assert all(isinstance(loaded.get_submodule(n), SparseLinear) for n in names)
    with torch.no_grad():
        assert torch.equal(loaded(x), fast(x))
        assert torch.equal(loaded(x[:1]), fast(x[:1]))
    for key, value in fast.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
        assert torch.equal(value, pruned_lenet.state_dict()[key])


def test_details_record_measurements(pruned_lenet):
    from nnopt.lineage import get_lineage

    fast = sparsify(pruned_lenet, SparseKernelConfig(min_speedup=0.0, batch_size=4, **FAST))
    applied = get_lineage(fast).applied[-1]
    assert applied.name == nnopt.sparse.PASS_NAME and applied.config["batch_size"] == 4
    details = applied.details
    assert details["batch_size"] == 4 and details["threads"] == torch.get_num_threads()
    assert details["method"].startswith("measured:")
    layer = details["layers"]["features.2"]
    assert layer["kernel"] == "csr"
    assert layer["dense_ms"] > 0 and layer["sparse_ms"] > 0 and layer["speedup"] > 0
    assert layer["speedup"] == pytest.approx(layer["dense_ms"] / layer["sparse_ms"])
    weight = pruned_lenet.features[2].weight
    assert layer["density"] == pytest.approx(float((weight != 0).float().mean()))


def test_unreachable_speedup_replaces_nothing(pruned_lenet, tmp_path):
    kept = sparsify(pruned_lenet, SparseKernelConfig(min_speedup=1e9, **FAST))
    assert not any(isinstance(m, SparseLinear) for m in kept.modules())
    from nnopt.lineage import get_lineage

    layers = get_lineage(kept).applied[-1].details["layers"]
    assert {entry["kernel"] for entry in layers.values()} == {"dense"}
    nnopt.save_model(kept, tmp_path / "m")
    assert not any(isinstance(m, SparseLinear) for m in nnopt.load_model(tmp_path / "m").modules())


def test_layer_selection_and_refusals(pruned_lenet):
    only = sparsify(pruned_lenet, SparseKernelConfig(min_speedup=0.0, layers=("classifier",), **FAST))
    assert isinstance(only.classifier, SparseLinear) and type(only.features[0]) is nn.Linear
    with pytest.raises(UnsupportedModelError, match="ReLU"):
        sparsify(pruned_lenet, SparseKernelConfig(layers=("features.1",), **FAST))
    with pytest.raises(SelectionError):
        sparsify(pruned_lenet, SparseKernelConfig(layers=("nope",), **FAST))
    with pytest.raises(ConfigError, match="not a sparse kernel config"):
        sparsify(pruned_lenet, nnopt.ThresholdPruneConfig())


@pytest.mark.parametrize("values", [
    {"batch_size": 0}, {"batch_size": -3}, {"min_speedup": -0.1}, {"min_speedup": float("nan")},
    {"min_speedup": float("inf")}, {"min_seconds": -1.0}, {"min_seconds": float("inf")},
    {"batch_size": 1.5}, {"layers": ("",)}, {"layers": ("re:(",)},
])
def test_bad_config_values_raise(values):
    with pytest.raises(ConfigError):
        SparseKernelConfig(**values)


def test_config_round_trips_and_rejects_unknown_keys():
    config = SparseKernelConfig(batch_size=64, min_speedup=1.5, layers=("re:^features",))
    assert SparseKernelConfig.from_dict(config.to_dict()) == config
    assert config.to_dict()["kind"] == "sparse-kernels"
    with pytest.raises(ConfigError, match="threads"):
        SparseKernelConfig.from_dict({"threads": 2})


def test_replay_rejects_bad_records(pruned_lenet):
    from nnopt.lineage import AppliedPass
    from nnopt.sparse.kernels import replay

    config = SparseKernelConfig().to_dict()
    model = copy.deepcopy(pruned_lenet)
    with pytest.raises(ModelFormatError, match="kernel"):
        replay(model, AppliedPass(nnopt.sparse.PASS_NAME, config, {"layers": {"classifier": {"kernel": "bsr"}}}))
    with pytest.raises(ModelFormatError, match="not Linear"):
        replay(model, AppliedPass(nnopt.sparse.PASS_NAME, config, {"layers": {"features.1": {"kernel": "csr"}}}))
    replay(model, AppliedPass(nnopt.sparse.PASS_NAME, config, {"layers": {"classifier": {"kernel": "csr"}}}))
    assert isinstance(model.classifier, SparseLinear)
