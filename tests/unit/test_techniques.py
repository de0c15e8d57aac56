"""The technique registry and the compressed-layer protocol: one entry adds a technique everywhere,
one class adds a layer type everywhere."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

import nnopt
from nnopt.config import Config
from nnopt.errors import ConfigError, ModelFormatError
from nnopt.layers.protocol import CompressedLayer, KernelCost, linear_macs, own_bytes
from nnopt.lineage import AppliedPass, get_lineage
from nnopt.recipe import apply_recipe, check_data, parse_recipe, recipe_to_yaml, step_kinds
from nnopt.select import replace_layer
from nnopt.techniques import (
    Technique,
    always,
    config_named,
    kinds,
    register_technique,
    technique_for,
    technique_named,
    train_split,
    unregister_technique,
)

# ------------------------------------------------------------------------- a toy technique and layer


class SignLinear(nn.Module):
    """A toy compressed layer: w = sign(w) · mean|w| per row, stored as int8 signs (-1, 0, 1)."""

    keras_layer = "Dense"

    def __init__(self, source: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = source.in_features, source.out_features
        self.register_buffer("weight_sign", torch.sign(source.weight.detach()).to(torch.int8))
        self.register_buffer("row_scale", source.weight.detach().abs().mean(dim=1))
        self.bias = None if source.bias is None else nn.Parameter(source.bias.detach().clone())

    @property
    def weight_storage(self) -> str:
        return "sign (2-bit)"

    def weight_codes(self) -> torch.Tensor:
        return self.weight_sign

    def stored_codes(self) -> dict[str, int]:
        return {"weight_sign": 2}

    def dense_weight(self) -> torch.Tensor:
        return self.weight_sign.to(torch.float32) * self.row_scale.unsqueeze(1)

    def macs(self, output: torch.Tensor) -> int:
        return linear_macs(self.in_features, output)

    def kernel_cost(self, inputs: Sequence[torch.Tensor], output: torch.Tensor) -> KernelCost:
        return KernelCost("sign", "fp32", self.macs(output), own_bytes(self))

    def check_loaded(self) -> None:
        if self.weight_sign.numel() and int(self.weight_sign.abs().max()) > 1:
            raise ModelFormatError("SignLinear: signs must lie in -1..1")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dense_weight(), self.bias)


@dataclasses.dataclass(frozen=True)
class SignConfig(Config):
    """Binarize the hidden Linear layers (a toy; ``finetune`` only marks the data need)."""

    kind = "toy-sign"
    finetune: bool = False


def _hidden_linears(model: nn.Module) -> list[str]:
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    return names[:-1]  # not the classifier


def apply_sign(model: nn.Module, config: SignConfig, **context: Any) -> dict[str, Any]:
    names = _hidden_linears(model)
    for name in names:
        replace_layer(model, name, SignLinear(model.get_submodule(name)))
    return {"layers": names}


def replay_sign(model: nn.Module, applied: AppliedPass) -> None:
    for name in applied.details["layers"]:
        replace_layer(model, name, SignLinear(model.get_submodule(name)))


@pytest.fixture
def toy_technique():
    """The whole of adding a technique: its module (above) plus this one registry entry."""
    register_technique(Technique(SignConfig, "quantize", apply_sign, replay_sign,
                                 needs_data=lambda c: "fine-tuning" if c.finetune else None, data_for=train_split))
    yield
    unregister_technique(SignConfig)


def test_a_new_technique_is_one_registry_entry(toy_technique, tmp_path, digits):
    model = nnopt.create_model("simplenet", seed=0)
    # the verb finds it by type, and records it under its kind
    signed = nnopt.quantize(model, SignConfig())
    assert isinstance(signed.features[0], SignLinear) and isinstance(model.features[0], nn.Linear)
    assert get_lineage(signed).applied[-1].name == "toy-sign"
    # recipes parse, print and apply it; its data needs are read from the same entry
    assert "toy-sign" in step_kinds()
    recipe = parse_recipe({"steps": [{"kind": "prune-magnitude", "sparsity": 0.5}, {"kind": "toy-sign"}]})
    assert parse_recipe(yaml.safe_load(recipe_to_yaml(recipe))) == recipe
    check_data(recipe, has_data=False)  # needs nothing
    with pytest.raises(ConfigError, match=r"steps\[0\] \(kind toy-sign\) needs data for fine-tuning"):
        check_data(parse_recipe({"steps": [{"kind": "toy-sign", "finetune": True}]}), has_data=False)
    from_recipe = apply_recipe(model, recipe, data=digits)
    assert [p.name for p in get_lineage(from_recipe).applied] == ["prune-magnitude", "toy-sign"]
    # save (packed: its 2-bit codes are stored in 2 bits), reload through its replay, same outputs
    saved = nnopt.save_model(from_recipe, tmp_path / "m", weights_format="packed")
    packing = {t["name"]: t for t in json.loads((saved.path / "nnopt.json").read_text())["packing"]}
    assert packing["features.0.weight_sign"]["value_bits"] == 2
    again = nnopt.load_model(saved.path)
    x = digits.test.x[:16]
    assert torch.equal(again(x), from_recipe(x))
    # profile and energy read it through the protocol: storage, MACs, its kernel
    layer = {r.name: r for r in nnopt.profile_model(again).layers}["features.0"]
    assert layer.dtype == "sign (2-bit)" and layer.macs == 64 * 64
    signs = again.features[0]
    assert layer.nonzeros == int(torch.count_nonzero(signs.dense_weight())) + int(torch.count_nonzero(signs.bias))
    energy = {r.name: r for r in nnopt.estimate_energy(again).layers}["features.0"]
    assert energy.kernel == "sign" and energy.macs == 64 * 64


def test_the_toy_layer_exports_to_keras_through_the_protocol(toy_technique, monkeypatch):
    monkeypatch.setenv("KERAS_BACKEND", "torch")  # before Keras is first imported
    pytest.importorskip("keras")
    from nnopt.models.keras_export import to_keras

    signed = nnopt.quantize(nnopt.create_model("simplenet", seed=0), SignConfig())
    km = to_keras(signed)
    dense = km.get_layer("features_0").get_weights()[0]
    assert torch.allclose(torch.from_numpy(dense).T, signed.features[0].dense_weight(), atol=0)


def test_a_load_check_of_the_new_layer_runs(toy_technique, tmp_path):
    signed = nnopt.quantize(nnopt.create_model("simplenet", seed=0), SignConfig())
    signed.features[0].weight_sign[0, 0] = 3
    saved = nnopt.save_model(signed, tmp_path / "bad")
    with pytest.raises(ModelFormatError, match="signs must lie in -1..1"):
        nnopt.load_model(saved.path)


def test_registrations_are_checked():
    with pytest.raises(ValueError, match="already registered"):
        register_technique(Technique(nnopt.ThresholdPruneConfig, "prune", apply_sign))

    @dataclasses.dataclass(frozen=True)
    class Clash(Config):
        kind = "int8-dynamic"

    with pytest.raises(ValueError, match="'int8-dynamic' is already registered"):
        register_technique(Technique(Clash, "quantize", apply_sign))
    with pytest.raises(ValueError, match="verb must be one of"):
        register_technique(Technique(SignConfig, "compress", apply_sign))
    with pytest.raises(ConfigError, match="SignConfig is not a quantization config"):
        nnopt.quantize(nnopt.create_model("simplenet"), SignConfig())
    with pytest.raises(ConfigError, match="ThresholdPruneConfig is not a quantization config"):
        nnopt.quantize(nnopt.create_model("simplenet"), nnopt.ThresholdPruneConfig())


def test_one_name_per_technique_and_presets_for_the_cli():
    # kind = pass name = recipe kind = CLI name, for every built-in technique
    for kind in kinds():
        technique = technique_named(kind)
        assert technique.kind == kind == technique.config_type.kind
    assert technique_for(nnopt.QATConfig()).verb == "quantize"
    assert config_named("int4-weight", group_size=32) == nnopt.WeightQuantConfig(bits=4, per_channel=True,
                                                                                group_size=32)
    assert config_named("int8-static", calibration_samples=64) == nnopt.StaticQuantConfig(calibration_samples=64)
    with pytest.raises(ConfigError, match="int4-weight fixes bits=4; use quantize-weights to choose it"):
        config_named("int4-weight", bits=8)
    with pytest.raises(ConfigError, match="unknown kind 'int9'; known kinds: cluster, "):
        config_named("int9")
    # a CLI preset is not a recipe kind
    with pytest.raises(ConfigError, match="unknown kind 'int8-weight'"):
        parse_recipe({"steps": [{"kind": "int8-weight"}]})


def test_data_needs_come_from_the_registry():
    assert technique_for(nnopt.StaticQuantConfig()).needs_data(nnopt.StaticQuantConfig()) == "calibration"
    assert technique_for(nnopt.DynamicQuantConfig()).needs_data(nnopt.DynamicQuantConfig()) is None
    structured = nnopt.StructuredPruneConfig(ratio=0.5, importance="l1", finetune_epochs=1)
    assert technique_for(structured).needs_data(structured) == "fine-tuning"
    needs_gradients = r"structured pruning with importance 'gradient' \(gradients\) needs data=\.\.\."
    with pytest.raises(ConfigError, match=needs_gradients):
        nnopt.prune(nnopt.create_model("simplenet"), nnopt.StructuredPruneConfig(ratio=0.5))
    assert always("calibration")(None) == "calibration"


def test_models_saved_with_the_old_pass_names_still_load(tmp_path, digits):
    """Before issue 17, int8 and QAT passes were recorded as quantize-int8-dynamic/static and quantize-qat."""
    model = nnopt.quantize(nnopt.create_model("simplenet", seed=0), nnopt.StaticQuantConfig(calibration_samples=32),
                           data=digits.train)
    saved = nnopt.save_model(model, tmp_path / "m")
    meta_path = saved.path / "nnopt.json"
    meta = json.loads(meta_path.read_text())
    assert meta["applied"][-1]["name"] == "int8-static"
    meta["applied"][-1]["name"] = "quantize-int8-static"
    meta_path.write_text(json.dumps(meta))
    again = nnopt.load_model(saved.path)
    assert type(again.features[0]).__name__ == "Int8StaticLinear"
    assert torch.equal(again(digits.test.x[:8]), model(digits.test.x[:8]))
    meta["applied"][-1]["name"] = "int4-weight"  # a CLI preset was never a pass name
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ModelFormatError, match="records pass 'int4-weight', which this nnopt does not know"):
        nnopt.load_model(saved.path)


# ----------------------------------------------------------------------------------- the protocol


def _every_layer_type() -> list[nn.Module]:
    from nnopt.layers.clustered import ClusteredConv2d, ClusteredLinear
    from nnopt.layers.int8 import Int8DynamicLinear, Int8Embedding, Int8StaticConv2d, Int8StaticLinear
    from nnopt.layers.sparse import SparseLinear
    from nnopt.layers.weight_only import QuantizedConv2d, QuantizedLinear

    linear, conv = nn.Linear(32, 16), nn.Conv2d(4, 8, 3)
    return [
        Int8DynamicLinear(linear), Int8StaticLinear(linear), Int8StaticConv2d(conv), Int8Embedding(nn.Embedding(10, 6)),
        QuantizedLinear(linear, 8, (16, 1)), QuantizedLinear(linear, 4, (16, 1), packed=True),
        QuantizedConv2d(conv, 8, (8, 1, 1, 1)), ClusteredLinear(linear, 4), ClusteredConv2d(conv, 4),
        SparseLinear.from_linear(linear),
    ]


@pytest.mark.parametrize("layer", _every_layer_type(), ids=lambda m: type(m).__name__ + str(getattr(m, "packed", "")))
def test_every_nnopt_layer_implements_the_protocol(layer):
    assert isinstance(layer, CompressedLayer)
    codes = layer.weight_codes()
    dense = layer.dense_weight()
    assert dense.is_floating_point()
    assert codes is None or (codes.shape == dense.shape and not codes.is_floating_point())
    state = layer.state_dict()
    assert all(key in state and not state[key].is_floating_point() for key in layer.stored_codes())
    layer.check_loaded()


def test_int8_models_now_save_in_the_packed_format(tmp_path, digits):
    """The packed writer used to read a `.bits` attribute that int8 layers lack; the protocol says 8."""
    model = nnopt.quantize(nnopt.create_model("simplenet", seed=0), nnopt.DynamicQuantConfig())
    saved = nnopt.save_model(model, tmp_path / "m", weights_format="packed")
    again = nnopt.load_model(saved.path)
    assert torch.equal(again(digits.test.x[:8]), model(digits.test.x[:8]))


def test_the_cli_scheme_names_are_registry_names():
    """nnopt quantize lists its schemes without importing torch; each must be a kind or preset here."""
    from nnopt.cli.quantize import SCHEMES_HELP
    from nnopt.pipeline.quantize_run import SCHEMES

    assert SCHEMES_HELP == SCHEMES
    assert all(technique_named(scheme).verb == "quantize" for scheme in SCHEMES)
