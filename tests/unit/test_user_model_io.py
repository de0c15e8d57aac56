"""Any nn.Module saves and reloads: user-written models (examples/user_models.py) after each technique,
rebuilt by a factory or, only when allowed, by importing the path their record names (issue 18, point 2)."""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from torch import nn

import nnopt
from nnopt.cli.options import add_trust_import_argument, model_loading
from nnopt.errors import ConfigError, ModelFormatError, NnoptError, UnsafeFileError
from nnopt.io.sources import open_model
from nnopt.lineage import USER_MODULE, get_lineage, has_lineage
from nnopt.loading import load_model

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"

# Tiny shapes: each test runs in well under a few seconds on two busy cores.
SPECS = {
    "TimeSeriesCNN": ({"width": 4, "classes": 3}, (2, 3, 16)),
    "MobileNetSE": ({"width": 8, "classes": 3}, (1, 3, 32, 32)),
    "TinyViT": ({"image": 8, "patch": 4, "dim": 16, "depth": 1, "heads": 2, "mlp": 16, "classes": 3}, (2, 3, 8, 8)),
    "LSTMClassifier": ({"vocab": 20, "embed": 8, "hidden": 8, "classes": 3}, (2, 5)),
}
TECHNIQUES = {
    "prune-threshold": ("prune", nnopt.ThresholdPruneConfig(threshold=0.05)),
    "prune-magnitude": ("prune", nnopt.MagnitudePruneConfig(sparsity=0.5)),
    "prune-nm": ("prune", nnopt.NMPruneConfig(n=2, m=4)),
    "int8-weight": ("quantize", nnopt.WeightQuantConfig(bits=8)),
    "int4-weight": ("quantize", nnopt.WeightQuantConfig(bits=4)),
    "int8-dynamic": ("quantize", nnopt.DynamicQuantConfig()),
    "fold-batchnorm": ("simplify", nnopt.FoldBatchNormConfig()),
    "prune-structured": ("prune", nnopt.StructuredPruneConfig(ratio=0.5, importance="l1")),
}
# Structured pruning of MobileNetSE takes ~10 s here; its round trip is the same code path as the others'.
SLOW = {("MobileNetSE", "prune-structured")}
CASES = [(name, technique) for name in sorted(SPECS) for technique in sorted(TECHNIQUES)
         if (name, technique) not in SLOW]


@pytest.fixture
def user_models(monkeypatch):
    """examples/user_models.py, importable as ``user_models`` (as an installed package would be)."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    return importlib.import_module("user_models")


def _model(user_models, name: str) -> tuple[nn.Module, dict, torch.Tensor]:
    kwargs, shape = SPECS[name]
    torch.manual_seed(0)
    model = getattr(user_models, name)(**kwargs)
    for module in model.modules():  # running statistics that differ from a fresh build's
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    generator = torch.Generator().manual_seed(1)
    if name == "LSTMClassifier":
        x = torch.randint(0, kwargs["vocab"], shape, generator=generator)
    else:
        x = torch.randn(shape, generator=generator)
    return model.eval(), kwargs, x


def _out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model.eval()(x)


# --- never optimized ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SPECS))
def test_a_never_optimized_user_model_saves_and_reloads(user_models, name, tmp_path):
    model, kwargs, x = _model(user_models, name)
    saved = nnopt.save_model(model, tmp_path / "m", factory_kwargs=kwargs)
    assert not has_lineage(model)  # the user's model is left as it was
    assert saved.meta["architecture"] == USER_MODULE
    assert saved.meta["config"] == {"class": f"user_models:{name}", "factory": f"user_models:{name}", "kwargs": kwargs}
    cls = getattr(user_models, name)
    by_factory = load_model(tmp_path / "m", factory=cls)  # called with the recorded kwargs
    by_import = load_model(tmp_path / "m", trust_import=True)
    assert type(by_import) is cls
    assert torch.equal(_out(by_factory, x), _out(model, x))
    assert torch.equal(_out(by_import, x), _out(model, x))
    assert get_lineage(by_import).config["class"] == f"user_models:{name}"


def test_save_refuses_a_record_that_does_not_rebuild_the_model(user_models, tmp_path):
    model, _, _ = _model(user_models, "TimeSeriesCNN")  # width=4: the class's defaults build width 64
    with pytest.raises(ModelFormatError, match=r"features\.0\.weight.*factory_kwargs"):
        nnopt.save_model(model, tmp_path / "m")
    assert not (tmp_path / "m").exists()
    with pytest.raises(ModelFormatError, match="was not created by nnopt.*factory="):
        nnopt.save_model(nn.Linear(2, 2), tmp_path / "lin")  # Linear() needs arguments
    with pytest.raises(ConfigError, match="JSON"):
        nnopt.save_model(model, tmp_path / "m", factory_kwargs={"width": object()})
    with pytest.raises(ConfigError, match="user modules"):
        nnopt.save_model(nnopt.create_model("simplenet"), tmp_path / "s", factory_kwargs={"x": 1})


def test_a_callable_factory_verifies_the_save_and_loading_then_needs_one(tmp_path):
    linear = nn.Linear(3, 2)
    saved = nnopt.save_model(linear, tmp_path / "lin", factory=lambda: nn.Linear(3, 2))
    assert saved.meta["config"]["factory"] is None  # a lambda cannot be imported later
    with pytest.raises(ModelFormatError, match="factory="):
        load_model(tmp_path / "lin", trust_import=True)
    x = torch.randn(4, 3)
    assert torch.equal(_out(load_model(tmp_path / "lin", factory=lambda: nn.Linear(3, 2)), x), _out(linear, x))


def test_a_class_defined_in_a_function_saves_but_loads_only_with_a_factory(tmp_path):
    class Local(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 8)
            self.out = nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.fc(x).relu())

    model = nnopt.prune(Local(), nnopt.ThresholdPruneConfig(threshold=0.2))
    saved = nnopt.save_model(model, tmp_path / "m")
    assert saved.meta["config"]["factory"] is None and "<locals>" in saved.meta["config"]["class"]
    for trust in (False, True):
        with pytest.raises(ModelFormatError, match=r"inside a function.*factory="):
            load_model(tmp_path / "m", trust_import=trust)
    x = torch.randn(3, 4)
    assert torch.equal(_out(load_model(tmp_path / "m", factory=Local), x), _out(model, x))


# --- after each technique -----------------------------------------------------------------------


@pytest.mark.parametrize(("name", "technique"), CASES)
def test_each_technique_result_saves_and_reloads_with_equal_outputs(user_models, name, technique, tmp_path):
    model, kwargs, x = _model(user_models, name)
    verb, config = TECHNIQUES[technique]
    data = x if config.kind == "prune-structured" else None
    try:
        optimized = getattr(nnopt, verb)(model, config, data=data)
    except NnoptError as exc:  # not supported on this model (yet): a named reason, and nothing else to check
        assert str(exc).strip()
        return
    assert not has_lineage(model)  # the verb worked on a copy
    lineage = get_lineage(optimized)
    assert lineage.architecture == USER_MODULE and lineage.applied[-1].name == config.kind
    # Pruned weights also go through the packed format (not MobileNetSE's: lzma on 0.9 M weights takes seconds).
    packed = verb == "prune" and technique != "prune-structured" and name != "MobileNetSE"
    weights_format = "packed" if packed else "safetensors"
    saved = nnopt.save_model(optimized, tmp_path / "m", factory_kwargs=kwargs, weights_format=weights_format)
    assert [p["name"] for p in saved.meta["applied"]] == [config.kind]
    expected = _out(optimized, x)
    for reloaded in (load_model(tmp_path / "m", trust_import=True),
                     load_model(tmp_path / "m", factory=getattr(user_models, name))):
        assert torch.equal(_out(reloaded, x), expected)


def test_inplace_attaches_the_record_to_the_users_model(user_models):
    model, _, _ = _model(user_models, "TimeSeriesCNN")
    result = nnopt.prune(model, nnopt.ThresholdPruneConfig(threshold=0.05), inplace=True)
    assert result is model and [p.name for p in get_lineage(model).applied] == ["prune-threshold"]


# --- a new process ------------------------------------------------------------------------------

_CHILD = """
import hashlib, sys, torch
torch.set_num_threads(1)
from nnopt.loading import load_model
for path in sys.argv[1:]:
    model = load_model(path, trust_import=True)
    x = torch.load(path + ".input.pt", weights_only=True)
    with torch.inference_mode():
        print(hashlib.sha256(model(x).contiguous().numpy().tobytes()).hexdigest())
"""

# One optimization per model kind, as the examples apply them.
_OPTIMIZED = {
    "TimeSeriesCNN": [nnopt.StructuredPruneConfig(ratio=0.5, importance="l1"), nnopt.FoldBatchNormConfig()],
    "MobileNetSE": [nnopt.StructuredPruneConfig(ratio=0.5, importance="l1"), nnopt.StaticQuantConfig()],
    "TinyViT": [nnopt.StructuredPruneConfig(ratio=0.5, head_ratio=0.5, importance="l1"),
                nnopt.WeightQuantConfig(bits=8)],
    "LSTMClassifier": [nnopt.MagnitudePruneConfig(sparsity=0.5), nnopt.DynamicQuantConfig()],
}


def _optimize(model: nn.Module, steps: list, x: torch.Tensor) -> nn.Module:
    for config in steps:
        verb = {"prune-structured": nnopt.prune, "prune-magnitude": nnopt.prune, "fold-batchnorm": nnopt.simplify}
        model = verb.get(config.kind, nnopt.quantize)(model, config, data=x)
    return model


def test_a_new_process_reloads_each_optimized_user_model_with_equal_outputs(user_models, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    expected, paths = [], []
    try:
        for name, steps in _OPTIMIZED.items():
            model, kwargs, x = _model(user_models, name)
            optimized = _optimize(model, steps, x)
            path = tmp_path / name
            nnopt.save_model(optimized, path, factory_kwargs=kwargs)
            torch.save(x, f"{path}.input.pt")
            expected.append(hashlib.sha256(_out(optimized, x).contiguous().numpy().tobytes()).hexdigest())
            paths.append(str(path))
    finally:
        torch.set_num_threads(threads)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(EXAMPLES), str(ROOT)])}
    done = subprocess.run([sys.executable, "-c", _CHILD, *paths], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == expected


# --- hostile and broken records -----------------------------------------------------------------


def _edit_record(path: Path, **config) -> None:
    meta_path = path / "nnopt.json"
    meta = json.loads(meta_path.read_text())
    for key, value in config.items():
        if value is ...:
            meta["config"].pop(key, None)
        else:
            meta["config"][key] = value
    meta_path.write_text(json.dumps(meta))


@pytest.fixture
def saved_cnn(user_models, tmp_path):
    model, kwargs, x = _model(user_models, "TimeSeriesCNN")
    nnopt.save_model(model, tmp_path / "m", factory_kwargs=kwargs)
    return tmp_path / "m", model, x


def test_without_trust_nothing_is_imported_and_the_error_names_both_options(saved_cnn, tmp_path, monkeypatch):
    path, model, x = saved_cnn
    name = f"nnopt_canary_{uuid.uuid4().hex[:8]}"
    marker = tmp_path / "imported"
    (tmp_path / f"{name}.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('x')\nfrom user_models import TimeSeriesCNN\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    _edit_record(path, factory=f"{name}:TimeSeriesCNN")
    for load in (lambda: load_model(path), lambda: open_model(path)):
        with pytest.raises(UnsafeFileError) as info:
            load()
        message = str(info.value)
        assert f"{name}:TimeSeriesCNN" in message and "factory=" in message and "trust_import=True" in message
        assert "--trust-import" in message
    assert name not in sys.modules and not marker.exists()
    reloaded = load_model(path, trust_import=True)  # allowed: imported, and the factory it names rebuilds it
    assert name in sys.modules and marker.exists()
    assert torch.equal(_out(reloaded, x), _out(model, x))
    monkeypatch.delitem(sys.modules, name)


@pytest.mark.parametrize(("factory", "error", "message"), [
    ("os:system", UnsafeFileError, "standard library"),
    ("builtins:eval", UnsafeFileError, "standard library"),
    ("this:s", UnsafeFileError, "standard library"),
    ("x; rm -rf /", ModelFormatError, "never imported"),
    ("__import__", ModelFormatError, "never imported"),
    ("user_models:TimeSeriesCNN\nimport os", ModelFormatError, "never imported"),
    ("os:__dict__", UnsafeFileError, "dunder"),
    ("torch:load", UnsafeFileError, "declare that it returns an nn.Module"),
    ("torch.nn:functional", UnsafeFileError, "module, not an nn.Module class"),
    ("nnopt.errors:NnoptError", UnsafeFileError, "not an nn.Module class"),
    ("surely_absent_pkg_x:Net", ModelFormatError, "no module named 'surely_absent_pkg_x'"),
])
def test_hostile_import_paths_are_refused_even_when_trusted(saved_cnn, factory, error, message):
    path, _, _ = saved_cnn
    _edit_record(path, factory=factory, kwargs={"command": "touch /tmp/nnopt-pwned"})
    was_imported = "this" in sys.modules
    with pytest.raises(error, match=message):
        load_model(path, trust_import=True)
    assert ("this" in sys.modules) == was_imported  # refused before any import


def test_a_factory_must_be_annotated_and_return_a_module(saved_cnn, tmp_path, monkeypatch):
    path, _, _ = saved_cnn
    name = f"nnopt_factories_{uuid.uuid4().hex[:8]}"
    called = tmp_path / "called"
    (tmp_path / f"{name}.py").write_text(
        "import pathlib\nfrom torch import nn\n"
        f"def plain(**kw):\n    pathlib.Path({str(called)!r}).write_text('x')\n    return nn.Linear(1, 1)\n"
        "def liar(**kw) -> nn.Module:\n    return 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    _edit_record(path, factory=f"{name}:plain")
    with pytest.raises(UnsafeFileError, match="declare that it returns an nn.Module"):
        load_model(path, trust_import=True)
    assert not called.exists()  # refused before it was called
    _edit_record(path, factory=f"{name}:liar")
    with pytest.raises(ModelFormatError, match="returned a int, not a torch nn.Module"):
        load_model(path, trust_import=True)
    monkeypatch.delitem(sys.modules, name)


def test_a_record_without_a_factory_or_with_bad_fields_is_named(saved_cnn):
    path, _, _ = saved_cnn
    _edit_record(path, factory=...)
    with pytest.raises(ModelFormatError, match="no 'factory' field.*factory="):
        load_model(path, trust_import=True)
    _edit_record(path, factory=None)
    with pytest.raises(ModelFormatError, match="cannot import.*factory="):
        load_model(path, trust_import=True)
    _edit_record(path, factory="user_models:TimeSeriesCNN", kwargs=["not", "a", "mapping"])
    with pytest.raises(ModelFormatError, match="'kwargs' must be a mapping"):
        load_model(path, trust_import=True)
    _edit_record(path, kwargs={}, **{"class": "os.system('x')"})
    with pytest.raises(ModelFormatError, match="'class' must be package.module:Name"):
        load_model(path, trust_import=True)


def test_a_factory_that_builds_something_else_fails_the_strict_checks(saved_cnn, user_models):
    path, _, _ = saved_cnn
    with pytest.raises(ModelFormatError, match=r"tensor 'features\.\d+\.\w+' is .* the model needs"):
        load_model(path, factory=lambda **kw: user_models.TimeSeriesCNN(width=5))
    with pytest.raises(ConfigError, match="factory applies to user modules"):
        load_model(nnopt.save_model(nnopt.create_model("simplenet"), path.parent / "s").path, factory=nn.Linear)


def test_save_with_a_factory_path_records_it(user_models, tmp_path, monkeypatch):
    name = f"nnopt_nets_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(
        "from torch import nn\nfrom user_models import TimeSeriesCNN\n"
        "def make(width: int = 64) -> nn.Module:\n    return TimeSeriesCNN(width=width, classes=3)\n"
        "def unannotated(width=64):\n    return TimeSeriesCNN(width=width, classes=3)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    model, _, x = _model(user_models, "TimeSeriesCNN")
    with pytest.raises(UnsafeFileError, match="declare that it returns"):
        nnopt.save_model(model, tmp_path / "m", factory=f"{name}:unannotated", factory_kwargs={"width": 4})
    saved = nnopt.save_model(model, tmp_path / "m", factory=f"{name}:make", factory_kwargs={"width": 4})
    assert saved.meta["config"]["factory"] == f"{name}:make" and saved.meta["config"]["kwargs"] == {"width": 4}
    assert torch.equal(_out(load_model(tmp_path / "m", trust_import=True), x), _out(model, x))
    monkeypatch.delitem(sys.modules, name)


# --- the CLI's --trust-import -------------------------------------------------------------------


def test_the_trust_import_flag_scopes_loading(saved_cnn):
    path, model, x = saved_cnn
    parser = argparse.ArgumentParser()
    add_trust_import_argument(parser)
    with model_loading(parser.parse_args([])), pytest.raises(UnsafeFileError, match="--trust-import"):
        load_model(path)
    with model_loading(parser.parse_args(["--trust-import"])):
        assert torch.equal(_out(load_model(path), x), _out(model, x))
        with pytest.raises(UnsafeFileError):
            load_model(path, trust_import=False)  # an explicit answer wins
    with pytest.raises(UnsafeFileError):
        load_model(path)  # the scope ended
