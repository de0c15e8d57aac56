"""Recipes: parsing with named errors, YAML round trips, the shipped examples, and apply_recipe."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import yaml

import nnopt
from nnopt.errors import ConfigError
from nnopt.lineage import get_lineage
from nnopt.recipe import (
    Recipe,
    apply_recipe,
    check_data,
    data_needs,
    load_recipe,
    parse_recipe,
    recipe_to_dict,
    recipe_to_yaml,
    step_kind,
    step_kinds,
)

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
CLASSIC = {
    "name": "classic",
    "weights_format": "packed",
    "steps": [{"kind": "prune-threshold", "threshold": 0.01}, {"kind": "quantize-weights", "bits": 8}],
}


def _error(data, where="R.yaml") -> str:
    with pytest.raises(ConfigError) as info:
        parse_recipe(data, where)
    return str(info.value)


# ------------------------------------------------------------------------------------- shipped files


def test_the_example_recipes_are_all_there():
    names = {p.stem for p in RECIPES.glob("*.yaml")}
    assert {"classic", "deep-compression", "latency", "energy-first"} <= names


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_parses_and_round_trips(path):
    recipe = load_recipe(path)
    assert recipe.name == path.stem and recipe.description
    assert parse_recipe(yaml.safe_load(recipe_to_yaml(recipe))) == recipe


def test_classic_file_is_the_missions_example():
    recipe = load_recipe(RECIPES / "classic.yaml")
    assert recipe.steps == (nnopt.ThresholdPruneConfig(threshold=0.01), nnopt.WeightQuantConfig(bits=8))
    assert recipe.weights_format == "packed"


def test_shipped_recipes_say_which_steps_need_data():
    assert data_needs(load_recipe(RECIPES / "classic.yaml")) == ()
    needs = data_needs(load_recipe(RECIPES / "deep-compression.yaml"))
    assert needs[0].startswith("steps[0] (kind prune-gradual)") and "fine-tuning" in needs[0]


# ------------------------------------------------------------------------------------- parsing


def test_yaml_gives_the_same_objects_as_python():
    recipe = parse_recipe(CLASSIC)
    assert recipe == Recipe(
        steps=(nnopt.ThresholdPruneConfig(threshold=0.01), nnopt.WeightQuantConfig(bits=8)),
        name="classic", weights_format="packed",
    )
    assert parse_recipe({"steps": [{"kind": "prune-nm", "layers": ["features.0"]}]}).steps[0].layers == ("features.0",)


def test_every_kind_round_trips_with_non_default_values():
    needs_a_value = {"mixed-precision": {"max_bytes_ratio": 0.3}}
    steps = tuple(step_kind(kind).config_type(**needs_a_value.get(kind, {})) for kind in step_kinds())
    recipe = Recipe(steps=steps, name="all", description="every kind: ünïcode too")
    assert {s.kind for s in recipe.steps} == set(step_kinds())
    assert parse_recipe(yaml.safe_load(recipe_to_yaml(recipe))) == recipe
    tricky = Recipe(steps=(
        nnopt.GradualPruneConfig(final_sparsity=0.95, lr=1e-5, layers=("re:^features\\.",)),
        nnopt.MixedPrecisionConfig(bits_options=(8, 4, 2), max_bytes_ratio=0.2),
        nnopt.WeightQuantConfig(bits=4, group_size=32, per_channel=True),
    ), weights_format="packed")
    text = recipe_to_yaml(tricky)
    assert "version" not in text
    assert parse_recipe(yaml.safe_load(text)) == tricky
    assert recipe_to_dict(tricky)["steps"][1]["bits_options"] == [8, 4, 2]


def test_unknown_key_is_named_with_its_place_and_the_allowed_keys():
    data = {"steps": [{"kind": "prune-threshold"}, {"kind": "prune-nm"},
                      {"kind": "quantize-weights", "bits": 8, "bitz": 4}]}
    message = _error(data)
    assert message.startswith("R.yaml: steps[2] (kind quantize-weights): unknown key 'bitz'; allowed: bits, ")
    assert "group_size" in message and "version" not in message


def test_unknown_kind_lists_the_known_ones():
    message = _error({"steps": [{"kind": "prune-magic", "amount": 1}]})
    assert message.startswith("R.yaml: steps[0]: unknown kind 'prune-magic'; known kinds: ")
    for kind in ("prune-threshold", "quantize-weights", "int8-static", "fold-batchnorm", "train"):
        assert kind in message
    assert "missing key 'kind'" in _error({"steps": [{"bits": 8}]})


def test_wrong_type_names_the_field_the_type_and_the_value():
    message = _error({"steps": [{"kind": "quantize-weights", "bits": "eight"}]})
    assert message == "R.yaml: steps[0] (kind quantize-weights): WeightQuantConfig.bits: expected int, got str 'eight'"
    assert "expected bool" in _error({"steps": [{"kind": "quantize-weights", "symmetric": "maybe"}]})
    # Range checks of the config come through with the same place.
    assert _error({"steps": [{"kind": "quantize-weights", "bits": 12}]}).startswith(
        "R.yaml: steps[0] (kind quantize-weights): ")


def test_yaml_exponent_without_a_dot_gets_a_hint():
    text = "steps:\n  - kind: prune-threshold\n    threshold: 1e-3\n"
    message = _error(yaml.safe_load(text))
    assert "threshold" in message and "'1e-3'" in message and "write 0.001" in message
    assert parse_recipe(yaml.safe_load(text.replace("1e-3", "1.0e-3"))).steps[0].threshold == 0.001


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"steps": [{"kind": "prune-threshold"}], "stepz": 1},
         "R.yaml: unknown key 'stepz'; allowed: description, name"),
        ({"steps": []}, "R.yaml: steps is empty"),
        ({"name": "x"}, "R.yaml: missing key 'steps'"),
        ({"steps": {"kind": "prune-threshold"}}, "R.yaml: steps: expected a list of mappings, got dict"),
        ({"steps": ["prune-threshold"]}, "R.yaml: steps[0]: expected a mapping with a 'kind', got str"),
        ({"steps": [{"kind": "prune-threshold"}], "weights_format": "zip"}, "weights_format must be one of"),
        ({"steps": [{"kind": "prune-threshold"}], "name": 3}, "R.yaml: name: expected str, got int 3"),
        ({"steps": [{"kind": "prune-threshold", "version": 7}]}, "steps[0] (kind prune-threshold): version 7"),
        (None, "R.yaml: expected a mapping with a 'steps' list, got nothing"),
        (["prune-threshold"], "R.yaml: expected a mapping"),
    ],
    ids=["top-level-key", "empty", "no-steps", "steps-not-list", "step-not-mapping", "format", "name-type",
         "version", "empty-file", "list"],
)
def test_structural_errors_are_named(data, message):
    assert message in _error(data)


def test_load_recipe_reports_yaml_syntax_errors_with_the_line(tmp_path):
    path = tmp_path / "R.yaml"
    path.write_text("name: bad\nsteps:\n  - kind: prune-threshold\n    threshold: [0.01\n")
    with pytest.raises(ConfigError, match=r"R\.yaml: line 5, column 1: invalid YAML"):
        load_recipe(path)
    path.write_text("steps:\n  - kind: prune-threshold\n   bad: indent\n")
    with pytest.raises(ConfigError, match=r"line 3, column \d+: invalid YAML"):
        load_recipe(path)
    with pytest.raises(ConfigError, match="no such recipe file"):
        load_recipe(tmp_path / "missing.yaml")
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_recipe(path)


def test_load_recipe_names_the_file_in_content_errors(tmp_path):
    path = tmp_path / "R.yaml"
    path.write_text("steps:\n  - kind: quantize-weights\n    bitz: 4\n")
    with pytest.raises(ConfigError, match=r"R\.yaml: steps\[0\] \(kind quantize-weights\): unknown key 'bitz'"):
        load_recipe(path)


def test_load_recipe_never_builds_python_objects(tmp_path):
    path = tmp_path / "R.yaml"
    path.write_text("steps: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_recipe(path)


# ------------------------------------------------------------------------------------- Recipe objects


def test_recipe_validates_on_construction():
    assert Recipe(steps=[nnopt.ThresholdPruneConfig()]).steps == (nnopt.ThresholdPruneConfig(),)
    with pytest.raises(ConfigError, match="empty"):
        Recipe(steps=())
    with pytest.raises(ConfigError, match=r"Recipe.steps\[0\]: ClassicConfig is not a recipe step"):
        from nnopt.pipeline.classic import ClassicConfig

        Recipe(steps=(ClassicConfig(),))
    with pytest.raises(ConfigError, match="weights_format"):
        Recipe(steps=(nnopt.ThresholdPruneConfig(),), weights_format="zip")
    with pytest.raises(dataclasses.FrozenInstanceError):
        Recipe(steps=(nnopt.ThresholdPruneConfig(),)).name = "x"  # type: ignore[misc]


def test_a_kind_registers_once():
    from nnopt.techniques import Technique, register_technique

    with pytest.raises(ValueError, match="already registered"):
        register_technique(Technique(nnopt.ThresholdPruneConfig, "prune", lambda model, config, **_: {}))


# ------------------------------------------------------------------------------------- applying


def test_missing_data_is_an_error_naming_the_step_before_any_work():
    recipe = parse_recipe({"steps": [{"kind": "prune-threshold"}, {"kind": "int8-static"},
                                     {"kind": "train", "epochs": 1}]})
    model = nnopt.create_model("simplenet", seed=0)
    with pytest.raises(ConfigError, match=r"^steps\[1\] \(kind int8-static\) needs data for calibration "
                       r"\(and 1 more step\)"):
        apply_recipe(model, recipe)
    assert not get_lineage(model).applied
    with pytest.raises(ConfigError, match=r"^R\.yaml: steps\[1\].*: add --data digits$"):
        check_data(recipe, False, hint="add --data digits", where="R.yaml")
    check_data(recipe, True)  # fine with data
    optional = parse_recipe({"steps": [{"kind": "int8-dynamic"}, {"kind": "prune-structured", "importance": "l1"},
                                       {"kind": "cluster"}, {"kind": "fold-batchnorm"}]})
    assert data_needs(optional) == ()
    needy = parse_recipe({"steps": [{"kind": "int8-dynamic", "smoothing": 0.5},
                                    {"kind": "prune-structured", "importance": "gradient"},
                                    {"kind": "cluster", "finetune_epochs": 1}]})
    assert len(data_needs(needy)) == 3


def test_apply_recipe_runs_the_steps_in_order_on_a_copy_and_reloads_without_pickle(tmp_path):
    model = nnopt.create_model("simplenet", seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    recipe = parse_recipe({"steps": [{"kind": "prune-magnitude", "sparsity": 0.5},
                                     {"kind": "quantize-weights", "bits": 4, "per_channel": True}]})
    result = apply_recipe(model, recipe)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # input untouched
    assert [p.name for p in get_lineage(result).applied] == ["prune-magnitude", "quantize-weights"]
    assert not result.training
    layer = result.features[0]
    assert layer.bits == 4
    codes = layer.dense_weight()
    assert float((codes == 0).float().mean()) >= 0.5  # the pruned half stays zero through quantization
    saved = nnopt.save_model(result, tmp_path / "m", weights_format="packed")
    names = {p.name for p in saved.path.iterdir()}
    assert "model.nnpk" in names and {p.suffix for p in saved.path.iterdir()} <= {".json", ".nnpk"}
    again = nnopt.load_model(saved.path)
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.allclose(again(x), result(x))


def test_apply_recipe_feeds_the_training_split_to_steps_that_need_data(digits):
    model = nnopt.create_model("simplenet", seed=0)
    recipe = parse_recipe({"steps": [
        {"kind": "prune-magnitude", "sparsity": 0.6},
        {"kind": "train", "epochs": 1, "lr": 0.003},
        {"kind": "int8-static", "calibration_samples": 64},
    ]})
    result = apply_recipe(model, recipe, data=digits, progress=False)
    assert [p.name for p in get_lineage(result).applied] == ["prune-magnitude", "int8-static"]
    assert type(result.features[0]).__name__ == "Int8StaticLinear"
    # Fine-tuning kept the pruned weights at zero, and trained the untrained net to a useful accuracy.
    assert float((result.features[0].weight_q == 0).float().mean()) >= 0.6
    assert nnopt.accuracy(result, digits.test) > 0.7
    with pytest.raises(ConfigError, match="Dataset"):
        apply_recipe(model, recipe, data=digits.train)
