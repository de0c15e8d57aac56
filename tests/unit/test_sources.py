"""Model sources: torch factories (safetensors, refused and weights-only pickles), conversion into
nnopt's sequential architecture, Hugging Face encoder directories, and dispatch by ``open_model``."""

from __future__ import annotations

import json
import os
import pathlib
import pickle
import sys
import uuid

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import nnopt
from nnopt.errors import (
    ConfigError,
    ModelFormatError,
    NnoptError,
    UnsafeFileError,
    UnsupportedModelError,
)
from nnopt.io.sources import LOADERS, open_model
from nnopt.io.torch_factory import load_torch_factory, to_nnopt
from nnopt.lineage import get_lineage

NETS = '''
import torch
from torch import nn


def mlp(hidden=16):
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Dropout(0.5), nn.Linear(hidden, 3), nn.Softmax(dim=-1))


def nested():
    torch.manual_seed(2)
    return nn.Sequential(nn.Sequential(nn.Linear(6, 6), nn.Tanh()), nn.Sequential(nn.Linear(6, 2), nn.Sigmoid()))


class Doubler(nn.Sequential):
    def forward(self, x):
        return super().forward(x) * 2


def doubler():
    return Doubler(nn.Linear(4, 4))


def recurrent():
    return nn.Sequential(nn.Linear(4, 4), nn.LSTM(4, 4))


def not_a_module():
    return 42


def broken():
    raise RuntimeError("factory exploded")
'''


@pytest.fixture
def nets(tmp_path, monkeypatch):
    """A uniquely named user module on sys.path; returns its name."""
    name = f"user_nets_{uuid.uuid4().hex[:8]}"
    code_dir = tmp_path / "code"
    code_dir.mkdir()
    (code_dir / f"{name}.py").write_text(NETS)
    monkeypatch.syspath_prepend(str(code_dir))
    yield name
    sys.modules.pop(name, None)


def _reference(nets, factory="mlp"):
    import importlib

    return getattr(importlib.import_module(nets), factory)().eval()


# --- torch factories -------------------------------------------------------------------------------


def test_factory_with_safetensors_weights_loads_them(nets, tmp_path):
    trained = _reference(nets)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(torch.randn_like(p))  # weights that differ from the factory's own initialization
    save_file(trained.state_dict(), tmp_path / "w.safetensors")
    model = load_torch_factory(f"{nets}:mlp", tmp_path / "w.safetensors")
    x = torch.randn(5, 8)
    with torch.no_grad():
        assert torch.equal(model(x), trained(x))
        assert not torch.equal(model(x), _reference(nets)(x))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda sd: sd.pop("3.bias"), "lacks tensor '3.bias'"),
        (lambda sd: sd.update(extra=torch.zeros(1)), "holds tensor 'extra'"),
        (lambda sd: sd.update({"0.weight": torch.zeros(16, 9)}), r"tensor '0.weight' is torch.float32 \(16, 9\)"),
        (lambda sd: sd.update({"0.bias": torch.zeros(16, dtype=torch.float64)}), "tensor '0.bias' is torch.float64"),
    ],
)
def test_factory_weights_must_match_exactly(nets, tmp_path, edit, message):
    state = dict(_reference(nets).state_dict())
    edit(state)
    save_file(state, tmp_path / "w.safetensors")
    with pytest.raises(ModelFormatError, match=message):
        load_torch_factory(f"{nets}:mlp", tmp_path / "w.safetensors")


@pytest.mark.parametrize("bad", ["nope", "a.b", ":f", "m:", "m:f:g", "1m:f", "m:f()", "m;import os:f", "../m:f"])
def test_factory_spec_syntax_is_checked_before_importing(bad):
    with pytest.raises(ConfigError, match="package.module:function"):
        load_torch_factory(bad, None)


def test_factory_errors_are_named(nets):
    with pytest.raises(ConfigError, match="no module named"):
        load_torch_factory("surely_not_installed_pkg_x:make", None)
    with pytest.raises(ConfigError, match="no attribute"):
        load_torch_factory(f"{nets}:missing", None)
    with pytest.raises(UnsupportedModelError, match="returned int"):
        load_torch_factory(f"{nets}:not_a_module", None)
    with pytest.raises(ModelFormatError, match="factory exploded"):
        load_torch_factory(f"{nets}:broken", None)


def test_factory_kwargs_are_passed(nets):
    model = load_torch_factory(f"{nets}:mlp", None, kwargs={"hidden": 5})
    assert model[0].out_features == 5


def test_pickled_weights_need_the_flag_and_then_load_weights_only(nets, tmp_path):
    reference = _reference(nets)
    path = tmp_path / "w.pt"
    torch.save(reference.state_dict(), path)
    with pytest.raises(UnsafeFileError, match="--allow-pickle"):
        load_torch_factory(f"{nets}:mlp", path)
    model = load_torch_factory(f"{nets}:mlp", path, allow_pickle=True)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor)


class _Canary:
    """Unpickling this writes a file: what a malicious checkpoint does."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.write_text, (self.path, "pwned"))


def test_canary_pickle_never_runs_even_with_the_flag(nets, tmp_path):
    live = tmp_path / "proof"
    pickle.loads(pickle.dumps(_Canary(live)))  # the payload is live: a plain unpickler runs it
    assert live.exists()
    canary = tmp_path / "canary"
    state = dict(_reference(nets).state_dict())
    for suffix in (".pt", ".bin"):
        path = tmp_path / f"evil{suffix}"
        torch.save({**state, "payload": _Canary(canary)}, path)
        with pytest.raises(UnsafeFileError, match="other than tensors"):
            load_torch_factory(f"{nets}:mlp", path, allow_pickle=True)
        assert not canary.exists()


# --- conversion into nnopt's sequential architecture ----------------------------------------------


def test_converted_factory_model_saves_and_reloads_without_the_user_module(nets, tmp_path):
    module = load_torch_factory(f"{nets}:mlp", None)
    model = to_nnopt(module, source=f"{nets}:mlp")
    assert get_lineage(model).architecture == "sequential"
    assert model.config.layers == ("linear:8:16", "relu", "linear:16:3") and model.config.output == "softmax"
    nnopt.save_model(model, tmp_path / "m")
    # The user's code is gone: loading must not need it.
    sys.modules.pop(nets)
    sys.path.remove(str(tmp_path / "code"))  # the nets fixture put it there (monkeypatch restores it)
    loaded = nnopt.load_model(tmp_path / "m")
    assert nets not in sys.modules
    x = torch.randn(7, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded.predict_proba(x), module(x), rtol=0, atol=1e-6)


def test_nested_sequentials_are_flattened(nets):
    module = load_torch_factory(f"{nets}:nested", None)
    model = to_nnopt(module)
    assert model.config.layers == ("linear:6:6", "tanh", "linear:6:2", "sigmoid")
    x = torch.randn(3, 6)
    with torch.no_grad():
        assert torch.allclose(model(x), module(x), atol=1e-6)


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        ("recurrent", r"module '1' \(LSTM\)"),
        ("doubler", "could not be converted faithfully"),
    ],
)
def test_modules_that_are_not_plain_chains_are_refused(nets, factory, message):
    with pytest.raises(UnsupportedModelError, match=message):
        to_nnopt(load_torch_factory(f"{nets}:{factory}", None))


def _sequential_knows(spec: str) -> bool:
    from nnopt.models.sequential import SequentialConfig

    try:
        SequentialConfig(input_shape=(1,), layers=(spec,))
    except ConfigError:
        return False
    return True


def test_conv_chain_converts_where_the_sequential_architecture_has_conv_layers():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(1, 4, (3, 2), padding=(1, 0)), nn.BatchNorm2d(4, eps=1e-3), nn.ReLU(),
                           nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    with torch.no_grad():
        module[1].running_mean.uniform_(-1, 1)
        module[1].running_var.uniform_(0.5, 2)
    if not _sequential_knows("conv2d:1:4:3:2:1:1:1:0"):
        with pytest.raises(UnsupportedModelError, match=r"module '0' \(Conv2d\) has no equivalent"):
            to_nnopt(module, input_shape=(1, 8, 8))
        return
    with pytest.raises(UnsupportedModelError, match="input shape is unknown"):
        to_nnopt(module)
    model = to_nnopt(module, input_shape=(1, 8, 8))
    assert model.config.layers[:2] == ("conv2d:1:4:3:2:1:1:1:0", "batchnorm2d:4:0.001")
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():  # inference: BatchNorm reads its running statistics on both sides
        torch.testing.assert_close(model.eval()(x), module.eval()(x), atol=1e-6, rtol=1e-6)


def test_a_custom_module_is_refused_by_name():
    class Custom(nn.Module):
        def forward(self, x):
            return x

    with pytest.raises(UnsupportedModelError, match="Custom"):
        to_nnopt(Custom())


# --- Hugging Face encoder directories ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    config = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=32)
    torch.manual_seed(0)
    bert = transformers.BertModel(config).eval()
    path = tmp_path_factory.mktemp("hf") / "tiny-bert"
    bert.save_pretrained(path, safe_serialization=True)
    return path, bert


def _mean_pooled(bert, ids, mask):
    hidden = bert(input_ids=ids, attention_mask=mask).last_hidden_state
    summed = (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
    return torch.nn.functional.normalize(summed, dim=1)


def test_hf_encoder_directory_loads_offline_and_round_trips(tiny_bert, tmp_path):
    path, bert = tiny_bert
    model = open_model(path)
    assert get_lineage(model).architecture == "bert-encoder"
    ids = torch.randint(1, 64, (3, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        expected = _mean_pooled(bert, ids, mask)
        torch.testing.assert_close(model(ids, mask), expected, atol=1e-5, rtol=1e-5)
    nnopt.save_model(model, tmp_path / "nn")
    reloaded = nnopt.load_model(tmp_path / "nn")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids, mask), expected, atol=1e-5, rtol=1e-5)


def test_hf_pickle_weights_need_the_flag(tiny_bert, tmp_path):
    path, bert = tiny_bert
    pickled = tmp_path / "pickled-bert"
    pickled.mkdir()
    (pickled / "config.json").write_bytes((path / "config.json").read_bytes())
    torch.save(bert.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(UnsafeFileError, match="--allow-pickle"):
        open_model(pickled)
    model = open_model(pickled, allow_pickle=True)
    assert get_lineage(model).architecture == "bert-encoder"


@pytest.mark.parametrize(
    ("edit", "error", "message"),
    [
        ({"model_type": "gpt2"}, UnsupportedModelError, "model_type 'gpt2'"),
        ({"vocab_size": 10**6}, ModelFormatError, "describes .* parameters but the weights file holds"),
        ({"hidden_size": "16"}, ModelFormatError, "hidden_size"),
        ({"hidden_act": "os.system"}, ModelFormatError, "hidden_act"),
    ],
)
def test_hostile_hf_config_is_refused_before_building(tiny_bert, tmp_path, edit, error, message):
    path, _ = tiny_bert
    bad = tmp_path / "bad-bert"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes())
    config = json.loads((path / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, **edit}))
    with pytest.raises(error, match=message):
        open_model(bad)


# --- dispatch -------------------------------------------------------------------------------------


def test_open_model_dispatches_by_kind(nets, tmp_path):
    saved = tmp_path / "saved"
    nnopt.save_model(nnopt.create_model("simplenet", seed=0), saved)
    assert get_lineage(open_model(saved)).architecture == "simplenet"
    assert isinstance(open_model(f"{nets}:mlp"), nn.Sequential)


@pytest.mark.parametrize(
    ("name", "content", "error", "message"),
    [
        ("model.h5", b"\x89HDF\r\n\x1a\n" + bytes(8), UnsafeFileError, "HDF5"),
        ("model.pkl", pickle.dumps({"a": 1}), UnsafeFileError, "pickle"),
        ("model.pt", b"PK\x03\x04" + bytes(8), UnsafeFileError, "torch.save"),
        ("weights.safetensors", b"", ModelFormatError, "weights only"),
        ("notes.txt", b"hello", ModelFormatError, "nnopt reads: an nnopt model directory.*package.module:factory"),
    ],
)
def test_open_model_refuses_what_it_cannot_or_must_not_read(tmp_path, name, content, error, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(error, match=message):
        open_model(path)


def test_weights_only_apply_to_factories(tmp_path):
    saved = tmp_path / "saved"
    nnopt.save_model(nnopt.create_model("simplenet", seed=0), saved)
    with pytest.raises(ConfigError, match="--weights"):
        open_model(saved, weights=tmp_path / "w.safetensors")


def test_every_loader_raises_only_nnopt_errors_on_garbage(tmp_path):
    assert set(LOADERS) == {"nnopt-dir", "safetensors", "packed", "keras", "onnx", "hf-dir"}
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"\x08" + bytes(7) + b"{\xff" + os.urandom(200))
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    fake_nnopt = tmp_path / "fake"
    fake_nnopt.mkdir()
    (fake_nnopt / "nnopt.json").write_bytes(os.urandom(100))
    for name, load in LOADERS.items():
        for path in (garbage, empty_dir, fake_nnopt, tmp_path / "missing"):
            with pytest.raises(NnoptError):
                load(path)
            assert load.__name__ == f"_load_{name.replace('-', '_')}"  # each entry is the loader it names


def test_hf_directory_converts_to_nnopt_and_onnx(tiny_bert, tmp_path):
    pytest.importorskip("onnxruntime")
    from nnopt.pipeline.convert_run import run_convert

    path, bert = tiny_bert
    result = run_convert(str(path), tmp_path / "nn")
    assert result.source_kind == "hf-dir" and result.params == sum(
        t.numel() for k, t in bert.state_dict().items() if not k.startswith("pooler."))
    onnx_result = run_convert(str(tmp_path / "nn"), tmp_path / "bert.onnx")
    assert onnx_result.bytes_written == (tmp_path / "bert.onnx").stat().st_size
    ids = torch.randint(1, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        expected = _mean_pooled(bert, ids, mask)
    got = nnopt.OnnxRunner(tmp_path / "bert.onnx")(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
