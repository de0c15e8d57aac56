"""Structured pruning of ImageNet-shaped CNNs (ResNet bottleneck/basic blocks, MobileNetV2 inverted
residuals): coupled groups, removal equal to masking, channel rounding, the MAC target, label-free
recovery on photo crops, save/reload and the CLI flags. Small shapes (32-64 px, width 0.25-0.5)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import nnopt
from nnopt.errors import ConfigError
from nnopt.lineage import get_lineage
from nnopt.models.registry import create_model
from nnopt.photos import offline_photos, random_crops
from nnopt.pruning.structured import StructuredPruneConfig, channel_groups
from nnopt.pruning.structured.rounding import rounded_keep
from nnopt.pruning.structured.surgery import mask_channels, remove_channels


@pytest.fixture(scope="module")
def crops() -> torch.Tensor:
    return random_crops(offline_photos(), 16, size=32, seed=0)


def _net(name: str, size: int = 32, width: float = 0.25) -> nn.Module:
    model = create_model(name, image_size=size, width=width, seed=0).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so that slicing them is really tested
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.2)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(n, generator=generator) * 0.1)
    return model


def _details(model: nn.Module) -> dict:
    return get_lineage(model).applied[-1].details


def _group_of(groups, module: str, role: str = "out"):
    found = [g for g in groups if any(m.module == module and m.role == role for m in g.members)]
    assert len(found) == 1
    return found[0]


@pytest.mark.parametrize("name", ["resnet50", "resnet18", "mobilenet_v2"])
def test_removed_equals_masked(name, crops):
    model = _net(name)
    groups = channel_groups(model, crops[:2])
    removed = {g.name: torch.arange(0, g.size, 3) for g in groups if g.prunable}
    masked, physical = copy.deepcopy(model), copy.deepcopy(model)
    mask_channels(masked, groups, removed)
    remove_channels(physical, groups, removed)
    assert sum(p.numel() for p in physical.parameters()) < sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(physical(crops[:4]), masked(crops[:4]), atol=1e-4, rtol=1e-4)


def test_resnet_groups_couple_the_residual_stream(crops):
    groups = channel_groups(_net("resnet50"), crops[:2])
    inner = _group_of(groups, "layer2.1.conv1")  # bottleneck conv1 -> bn1 -> conv2: private
    assert {(m.module, m.role) for m in inner.members} == {
        ("layer2.1.conv1", "out"), ("layer2.1.bn1", "norm"), ("layer2.1.conv2", "in")}
    stream = _group_of(groups, "layer2.0.downsample.0")  # the stage's residual stream: every conv3 and the shortcut
    assert stream.prunable and {f"layer2.{i}.conv3" for i in range(4)} <= {m.module for m in stream.members}
    assert _group_of(groups, "fc").frozen == "network output"


def test_mobilenet_groups_follow_expand_depthwise_project(crops):
    groups = channel_groups(_net("mobilenet_v2"), crops[:2])
    hidden = _group_of(groups, "features.5.conv.0.0")
    assert {(m.module, m.role) for m in hidden.members} == {
        ("features.5.conv.0.0", "out"), ("features.5.conv.0.1", "norm"), ("features.5.conv.1.0", "depthwise"),
        ("features.5.conv.1.1", "norm"), ("features.5.conv.2", "in")}
    first = _group_of(groups, "features.0.0")  # the block without expansion: stem -> depthwise -> project
    assert first.prunable and ("features.1.conv.0.0", "depthwise") in {(m.module, m.role) for m in first.members}


def test_gradient_pruning_shrinks_bottlenecks_and_basic_blocks(crops):
    config = StructuredPruneConfig(ratio=0.5, importance="gradient", batches=1, batch_size=8)
    r50 = nnopt.prune(_net("resnet50"), config, data=crops)
    assert r50.layer3[2].conv1.out_channels == 32 and r50.layer3[2].conv2.weight.shape[:2] == (32, 32)
    assert r50.layer3[2].conv3.in_channels == 32 and r50.layer3[2].bn2.num_features == 32
    r18 = nnopt.prune(_net("resnet18"), config, data=crops)
    assert r18.layer2[0].conv1.out_channels == 16 and r18.layer2[0].conv2.in_channels == 16
    with torch.no_grad():
        assert r50(crops[:2]).shape == r18(crops[:2]).shape == (2, 1000)


def test_mobilenet_hidden_channels_shrink_through_the_depthwise(crops):
    pruned = nnopt.prune(_net("mobilenet_v2"), StructuredPruneConfig(ratio=0.5, importance="l1"), data=crops)
    block = pruned.features[5].conv
    expand, depthwise, project = block[0][0], block[1][0], block[2]
    assert expand.out_channels == depthwise.in_channels == depthwise.groups == project.in_channels == 24  # of 48
    assert pruned.features[1].conv[0][0].groups == pruned.features[0][0].out_channels == 4  # of 8


@pytest.mark.parametrize("multiple", [8, 16])
def test_channel_multiple_rounds_every_kept_count(multiple, crops):
    config = StructuredPruneConfig(ratio=0.4, importance="l1", channel_multiple=multiple)
    pruned = nnopt.prune(_net("mobilenet_v2", width=0.5), config, data=crops)
    groups = _details(pruned)["groups"]
    assert any(g["after"] < g["before"] for g in groups.values())
    for g in groups.values():
        assert g["after"] % multiple == 0 or g["after"] == g["before"] <= multiple, g
    assert _details(pruned)["channel_multiple"] == {"value": multiple}


def test_rounded_keep():
    assert rounded_keep(37, 64, 8) == 40 and rounded_keep(35, 64, 8) == 32 and rounded_keep(3, 64, 16) == 16
    assert rounded_keep(12, 12, 16) == 12 and rounded_keep(60, 61, 16) == 61 and rounded_keep(5, 64, 1) == 5
    assert rounded_keep(8, 64, 8, min_channels=12) == 16


def test_auto_multiple_is_measured_and_recorded(crops):
    config = StructuredPruneConfig(ratio=0.5, importance="l1", channel_multiple="auto")
    pruned = nnopt.prune(_net("resnet18", size=64), config, data=crops)
    record = _details(pruned)["channel_multiple"]
    chosen, auto = record["value"], record["auto"]
    assert chosen in (1, 8, 16) and auto["multiple"] == chosen and auto["layer"].startswith("layer")
    assert set(auto["ps_per_mac"]) == {"1", "8", "16"} and all(v > 0 for v in auto["ps_per_mac"].values())
    for g in _details(pruned)["groups"].values():
        assert g["after"] % chosen == 0 or g["after"] == g["before"]


@pytest.mark.parametrize("name, width, target, multiple", [("resnet50", 0.25, 2.0, 1), ("mobilenet_v2", 0.5, 1.5, 8)])
def test_mac_target_is_reached_and_the_result_reloads(name, width, target, multiple, crops, tmp_path):
    model = _net(name, width=width)
    config = StructuredPruneConfig(target_mac_reduction=target, importance="l1", channel_multiple=multiple)
    pruned = nnopt.prune(model, config, data=crops).eval()
    achieved = nnopt.profile_model(model).macs / nnopt.profile_model(pruned).macs
    record = _details(pruned)["mac_target"]
    assert target <= achieved <= target * 1.1, achieved
    assert record["achieved"] == pytest.approx(achieved, rel=1e-3) and 0 < record["ratio"] < 0.95
    nnopt.save_model(pruned, tmp_path / "m")
    loaded = nnopt.load_model(tmp_path / "m").eval()
    assert nnopt.profile_model(loaded).macs == nnopt.profile_model(pruned).macs
    with torch.no_grad():
        assert torch.equal(loaded(crops[:4]), pruned(crops[:4]))


def test_mac_target_out_of_reach_is_a_config_error(crops):
    with pytest.raises(ConfigError, match="target_mac_reduction 500.0 is out of reach"):
        nnopt.prune(_net("resnet18"), StructuredPruneConfig(target_mac_reduction=500.0, importance="l1"), data=crops)


@pytest.mark.parametrize("kwargs, message", [
    ({"channel_multiple": 0}, "channel_multiple must be an integer >= 1 or 'auto', got 0"),
    ({"channel_multiple": "fast"}, "channel_multiple must be an integer >= 1 or 'auto', got 'fast'"),
    ({"channel_multiple": True}, "channel_multiple"),
    ({"target_mac_reduction": 1.0}, "target_mac_reduction must be a number > 1"),
    ({"target_mac_reduction": float("inf")}, "target_mac_reduction must be a number > 1"),
    ({"target_mac_reduction": -2.0}, "target_mac_reduction"),
])
def test_bad_rounding_and_target_values(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        StructuredPruneConfig(**kwargs)


def test_new_fields_survive_a_recipe_round_trip():
    config = StructuredPruneConfig(channel_multiple="auto", target_mac_reduction=2.0)
    assert StructuredPruneConfig.from_dict(config.to_dict()) == config
    assert StructuredPruneConfig.from_dict({"channel_multiple": 8}).channel_multiple == 8


def test_label_free_distillation_on_photo_crops(crops):
    model = _net("mobilenet_v2")
    config = StructuredPruneConfig(ratio=0.3, importance="gradient", batches=1, batch_size=8, finetune_epochs=1,
                                   distill=1.0)
    recovered = nnopt.prune(model, config, data=crops)  # unlabelled tensors: KL to the unpruned model only
    loss = _details(recovered)["rounds"][0]["finetune_loss"]
    assert loss >= 0 and loss == loss
    before, after = model.features[2].conv[0][0].weight, recovered.features[2].conv[0][0].weight
    assert after.shape[0] < before.shape[0]
    assert not any(torch.equal(row, kept) for row in before for kept in after)  # every kept row was trained


def test_cli_flags(tmp_path, capsys, monkeypatch):
    import nnopt.pipeline.prune_run as prune_run
    from nnopt.cli import main

    seen = {}
    monkeypatch.setattr(prune_run, "run_structured_prune", lambda path, config, out, **_: seen.update(c=config))
    monkeypatch.setattr("nnopt.cli.prune.print_written", lambda result: 0)
    assert main(["prune", str(tmp_path), "--structured", "--target-mac-reduction", "1.5", "--channel-multiple",
                 "auto", "-o", str(tmp_path / "small")]) == 0
    assert (seen["c"].target_mac_reduction, seen["c"].channel_multiple) == (1.5, "auto")
    assert main(["prune", str(tmp_path), "--structured", "--ratio", "0.3", "--channel-multiple", "16",
                 "-o", str(tmp_path / "small")]) == 0 and seen["c"].channel_multiple == 16
    for args, message in ((["--structured", "--ratio", "0.3", "--target-mac-reduction", "1.5"], "not both"),
                          (["--structured", "--ratio", "0.3", "--channel-multiple", "x"], "must be an integer"),
                          (["--structured", "--target-mac-reduction", "1.0"], "must be a number > 1"),
                          (["--sparsity", "0.5", "--target-mac-reduction", "2"], "apply to --structured")):
        assert main(["prune", str(tmp_path), *args, "-o", str(tmp_path / "x")]) != 0
        assert message in capsys.readouterr().err
