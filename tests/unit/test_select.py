import pytest
from torch import nn

import nnopt
from nnopt.errors import SelectionError
from nnopt.select import select_layers


def test_default_types_exact_names_regex_and_types():
    model = nnopt.create_model("simplenet")
    assert [n for n, _ in select_layers(model, (), (nn.Linear,))] == ["features.0", "features.2", "classifier"]
    assert [n for n, _ in select_layers(model, ("classifier",))] == ["classifier"]
    assert [n for n, _ in select_layers(model, ("re:^features\\.",))] == ["features.0", "features.1",
                                                                           "features.2", "features.3"]
    assert [n for n, _ in select_layers(model, ("type:ReLU",))] == ["features.1", "features.3"]


def test_nothing_matched_is_an_error():
    model = nnopt.create_model("simplenet")
    with pytest.raises(SelectionError, match="fc9"):
        select_layers(model, ("fc9",))
    with pytest.raises(SelectionError, match="Conv2d"):
        select_layers(model, (), (nn.Conv2d,))
