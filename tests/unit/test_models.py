import pytest
import torch

import nnopt
from nnopt.errors import ConfigError
from nnopt.lineage import get_lineage
from nnopt.models import build_from_lineage

LENET300_PARAMS = 64 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10


@pytest.mark.parametrize(("name", "params"), [("simplenet", 6570), ("lenet300", LENET300_PARAMS)])
def test_mlps_have_the_published_shapes(name, params):
    model = nnopt.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == params
    assert model(torch.zeros(3, 64)).shape == (3, 10)


def test_simplenet_softmax_output_gives_probabilities():
    model = nnopt.create_model("simplenet", seed=0)
    probs = model.predict_proba(torch.randn(5, 64))
    torch.testing.assert_close(probs.sum(-1), torch.ones(5))
    assert (probs >= 0).all()


def test_resnet_accepts_flat_rows_and_images():
    model = nnopt.create_model("resnet8", seed=0).eval()
    x = torch.randn(4, 64)
    torch.testing.assert_close(model(x), model(x.view(4, 1, 8, 8)))
    assert model(x).shape == (4, 10)


@pytest.mark.parametrize("name", ["simplenet", "lenet300", "resnet8"])
def test_rebuilt_from_config_has_the_same_structure(name):
    model = nnopt.create_model(name, seed=1)
    twin = build_from_lineage(get_lineage(model))
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in twin.state_dict().items()}
    twin.load_state_dict(model.state_dict())
    x = torch.randn(2, 64)
    torch.testing.assert_close(model.eval()(x), twin.eval()(x))


def test_seeded_models_are_reproducible():
    a, b = nnopt.create_model("simplenet", seed=3), nnopt.create_model("simplenet", seed=3)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_unknown_architecture_and_bad_config():
    with pytest.raises(ConfigError, match="unknown architecture 'vgg'"):
        nnopt.create_model("vgg")
    with pytest.raises(ConfigError, match="hidden"):
        nnopt.create_model("simplenet", hidden=(0,))
    with pytest.raises(ConfigError, match="depth"):
        nnopt.create_model("simplenet", depth=3)
