import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import nnopt
from nnopt.errors import ConfigError, ModelFormatError, UnsupportedModelError
from nnopt.layers.clustered import ClusteredConv2d, ClusteredLinear
from nnopt.quantization.clustering import ClusterConfig, assign, cluster_weight, kmeans_1d

LAYERS = ("features.0", "features.2", "classifier")


@pytest.fixture(scope="module")
def clustered(trained_simplenet):
    return nnopt.quantize(trained_simplenet, ClusterConfig(bits=4))


@pytest.mark.parametrize("init", ["linear", "kmeans++"])
def test_kmeans_finds_three_well_separated_clusters(init):
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([-5.0, 1.0, 7.0])
    sizes = (300, 500, 200)
    x = torch.cat([c + 0.1 * torch.randn(n, generator=g) for c, n in zip(centers, sizes)])
    x = x[torch.randperm(x.numel(), generator=g)]
    centroids, idx = kmeans_1d(x, 3, init=init, seed=1)
    torch.testing.assert_close(centroids, centers, atol=0.03, rtol=0)
    assert torch.bincount(idx, minlength=3).tolist() == list(sizes)
    # A Lloyd fixed point: every centroid is the mean of the values assigned to it.
    for j in range(3):
        torch.testing.assert_close(centroids[j], x[idx == j].mean(), atol=1e-5, rtol=0)


def test_assignment_equals_brute_force_nearest_centroid():
    g = torch.Generator().manual_seed(0)
    values = torch.randn(37, 53, generator=g)
    centroids = torch.randn(16, generator=g)  # unsorted on purpose
    brute = (values.unsqueeze(-1) - centroids).abs().argmin(-1)  # (37, 53)
    assert torch.equal(assign(values, centroids), brute)
    codebook, idx = kmeans_1d(values, 8, iterations=5)
    assert torch.equal(idx, (values.unsqueeze(-1) - codebook).abs().argmin(-1))


def test_cluster_weight_reserves_a_zero_centroid_only_when_there_are_zeros():
    w = torch.randn(20, 30, generator=torch.Generator().manual_seed(0))
    codebook, idx, zero = cluster_weight(w, bits=3)
    assert not zero and idx.dtype == torch.uint8 and idx.shape == w.shape and codebook.shape == (8,)
    w[w.abs() < 0.5] = 0
    codebook, idx, zero = cluster_weight(w, bits=3)
    assert zero and codebook[0] == 0
    assert torch.equal(idx == 0, w == 0)  # zeros, and only zeros, use the zero centroid
    assert torch.equal(codebook[idx.long()] == 0, w == 0)


def test_four_bits_keep_accuracy_with_at_most_sixteen_values(trained_simplenet, clustered, digits):
    for name in LAYERS:
        layer = clustered.get_submodule(name)
        assert isinstance(layer, ClusteredLinear)
        assert layer.weight_indices.dtype == torch.uint8 and layer.codebook.shape == (16,)
        assert layer.dense_weight().unique().numel() <= 16
    base, acc = nnopt.accuracy(trained_simplenet, digits.test), nnopt.accuracy(clustered, digits.test)
    assert acc >= base - 0.01, (base, acc)
    details = clustered._nnopt_lineage.applied[-1].details["layers"]
    assert details["classifier"]["shape"] == [10, 32] and details["classifier"]["clusters"] == 16
    assert 0 < details["classifier"]["mse"] < 1e-3


def test_pruned_zeros_stay_exactly_zero_through_finetuning(trained_simplenet, digits):
    pruned = nnopt.prune(trained_simplenet, nnopt.ThresholdPruneConfig(threshold=0.05))
    q = nnopt.quantize(pruned, ClusterConfig(bits=3, finetune_epochs=1), data=digits.train, progress=False)
    for name in ("features.0", "features.2"):  # threshold pruning leaves the classifier alone
        zeros = pruned.get_submodule(name).weight == 0
        assert zeros.any()
        layer = q.get_submodule(name)
        assert layer.zero_centroid and layer.codebook[0].item() == 0.0
        assert torch.equal(layer.dense_weight() == 0, zeros)


def test_finetuning_moves_centroids_without_losing_accuracy(trained_simplenet, clustered, digits):
    tuned = nnopt.quantize(
        trained_simplenet, ClusterConfig(bits=4, finetune_epochs=2), data=digits.train, progress=False
    )
    for name in LAYERS:
        before, after = clustered.get_submodule(name), tuned.get_submodule(name)
        assert torch.equal(before.weight_indices, after.weight_indices)  # same clusters, new centroids
        assert not torch.equal(before.codebook, after.codebook)
    assert nnopt.accuracy(tuned, digits.test) >= nnopt.accuracy(clustered, digits.test) - 0.005
    details = tuned._nnopt_lineage.applied[-1].details
    assert len(details["finetune"]["loss"]) == 2 and "mse_after_finetune" in details["layers"]["classifier"]


def test_finetuning_needs_data_and_distils_without_labels(trained_simplenet, digits):
    with pytest.raises(ConfigError, match="finetune_epochs > 0 needs data"):
        nnopt.quantize(trained_simplenet, ClusterConfig(finetune_epochs=1))
    with pytest.raises(ConfigError, match="different sample shapes"):
        nnopt.quantize(trained_simplenet, ClusterConfig(finetune_epochs=1), data=[digits.train.x, torch.zeros(2, 3)])
    # inputs only: the centroids learn to follow the unclustered model's outputs
    clustered = nnopt.quantize(trained_simplenet, ClusterConfig(bits=2))
    tuned = nnopt.quantize(trained_simplenet, ClusterConfig(bits=2, finetune_epochs=2), data=[digits.train.x])
    before = nnopt.fidelity(clustered, trained_simplenet, digits.test.x)
    after = nnopt.fidelity(tuned, trained_simplenet, digits.test.x)
    # the teacher is the unclustered model (a clustered one would teach nothing: outputs would not move)
    assert after.agreement > before.agreement


def test_save_load_round_trip_is_exact_and_smaller(trained_simplenet, digits, tmp_path):
    pruned = nnopt.prune(trained_simplenet, nnopt.ThresholdPruneConfig(threshold=0.05))
    q = nnopt.quantize(pruned, ClusterConfig(bits=4))
    saved = nnopt.save_model(q, tmp_path / "clustered")
    dense = nnopt.save_model(trained_simplenet, tmp_path / "fp32")
    assert saved.file_bytes < dense.file_bytes / 2.5
    loaded = nnopt.load_model(tmp_path / "clustered")
    assert isinstance(loaded.features[0], ClusteredLinear) and loaded.features[0].zero_centroid
    x = digits.test.x
    with torch.no_grad():
        assert torch.equal(loaded(x), q.eval()(x))


def _corrupt_saved(path, edit):
    """Edit the saved tensors and re-record the file's hash, as a tampered (or buggy) writer would."""
    weights = path / "model.safetensors"
    tensors = load_file(weights)
    edit(tensors)
    save_file(tensors, weights, metadata={"format": "nnopt-model"})
    meta = json.loads((path / "nnopt.json").read_text())
    data = weights.read_bytes()
    meta["files"]["model.safetensors"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (path / "nnopt.json").write_text(json.dumps(meta))


def test_indices_beyond_the_codebook_are_rejected_on_load(clustered, tmp_path):
    path = tmp_path / "bad"
    nnopt.save_model(clustered, path)
    _corrupt_saved(path, lambda t: t["classifier.weight_indices"].view(-1).__setitem__(0, 16))
    with pytest.raises(ModelFormatError, match="codebook size 16"):
        nnopt.load_model(path)


def test_check_loaded_rejects_bad_codebooks(trained_simplenet):
    q = nnopt.quantize(trained_simplenet, ClusterConfig(bits=2))
    with torch.no_grad():
        q.classifier.codebook[1] = float("nan")
    with pytest.raises(ModelFormatError, match="NaN"):
        q.classifier.check_loaded()
    pruned = nnopt.quantize(nnopt.prune(trained_simplenet, nnopt.ThresholdPruneConfig(threshold=0.05)),
                            ClusterConfig(bits=2))
    with torch.no_grad():
        pruned.features[0].codebook[0] = 0.1
    with pytest.raises(ModelFormatError, match="zero centroid"):
        pruned.features[0].check_loaded()


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"bits": 1}, "bits"),
        ({"bits": 9}, "bits"),
        ({"bits": True}, "bits"),
        ({"init": "random"}, "init"),
        ({"iterations": 0}, "iterations"),
        ({"finetune_epochs": -1}, "finetune_epochs"),
        ({"lr": 0.0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"seed": -1}, "seed"),
        ({"layers": ("re:(",)}, "layer pattern"),
    ],
)
def test_bad_configs_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        ClusterConfig(**kwargs)


def test_config_round_trips_through_a_dict():
    config = ClusterConfig(bits=3, layers=("classifier",), init="kmeans++", finetune_epochs=1)
    assert ClusterConfig.from_dict(config.to_dict()) == config
    assert config.to_dict()["kind"] == "cluster"


def test_unsupported_layers_are_named(trained_simplenet, clustered):
    with pytest.raises(UnsupportedModelError, match="already clustered"):
        nnopt.quantize(clustered, ClusterConfig())
    with pytest.raises(UnsupportedModelError, match="already quantized"):
        nnopt.quantize(nnopt.quantize(trained_simplenet), ClusterConfig())
    with pytest.raises(UnsupportedModelError, match="ReLU"):
        nnopt.quantize(trained_simplenet, ClusterConfig(layers=("type:ReLU",)))


def test_selected_layers_only_and_conv_layers(digits):
    model = nnopt.create_model("resnet8", seed=0).eval()
    q = nnopt.quantize(model, ClusterConfig(bits=8, layers=("type:Conv2d",)))
    convs = [m for m in q.modules() if isinstance(m, ClusteredConv2d)]
    assert convs and not any(isinstance(m, torch.nn.Conv2d) for m in q.modules())
    assert not any(isinstance(m, ClusteredLinear) for m in q.modules())
    with torch.no_grad():
        torch.testing.assert_close(q(digits.test.x[:8]), model(digits.test.x[:8]), atol=0.05, rtol=0.05)
