"""Shared fixtures: a trained SimpleNet and the digits data set, built once per session."""

from __future__ import annotations

import pytest
import torch

import nnopt


@pytest.fixture(scope="session")
def digits():
    return nnopt.load_digits()


@pytest.fixture(scope="session")
def trained_simplenet(digits):
    torch.manual_seed(0)
    model = nnopt.create_model("simplenet", seed=0)
    nnopt.train(model, digits.train, nnopt.TrainConfig(epochs=15, seed=0), progress=False)
    return model
