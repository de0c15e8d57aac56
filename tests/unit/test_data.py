import numpy as np
import pytest
import torch

import nnopt
from nnopt.errors import ConfigError


def test_digits_split_sizes_and_stratification(digits):
    assert (len(digits.train), len(digits.test)) == (1437, 360)
    assert digits.describe() == {"name": "digits", "train": 1437, "test": 360}
    train_share = np.bincount(digits.train.y.numpy()) / len(digits.train)
    test_share = np.bincount(digits.test.y.numpy()) / len(digits.test)
    assert np.abs(train_share - test_share).max() < 0.01


def test_normalized_with_train_statistics(digits):
    assert abs(float(digits.train.x.mean())) < 1e-4
    assert abs(float(digits.train.x.std()) - 1) < 1e-2
    assert digits.train.x.dtype == torch.float32 and digits.train.y.dtype == torch.int64


def test_split_is_deterministic_and_seed_dependent(digits):
    again = nnopt.load_digits()
    assert torch.equal(again.test.x, digits.test.x)
    other = nnopt.load_digits(seed=1)
    assert not torch.equal(other.test.y, digits.test.y)


def test_calibration_subset_comes_from_train_and_is_stratified(digits):
    calib = digits.calibration(100)
    assert len(calib) == 100
    train_rows = {tuple(r) for r in digits.train.x.numpy().round(5)}
    assert all(tuple(r) in train_rows for r in calib.x.numpy().round(5))
    assert len(np.unique(calib.y.numpy())) == 10


def test_batches_cover_every_row_once(digits):
    seen = torch.cat([y for _, y in digits.test.batches(64, shuffle=True, generator=torch.Generator().manual_seed(0))])
    assert sorted(seen.tolist()) == sorted(digits.test.y.tolist())


def test_bad_arguments():
    with pytest.raises(ConfigError):
        nnopt.load_digits(test_size=1.5)
    with pytest.raises(ConfigError, match="unknown data set"):
        nnopt.load_dataset("imagenet")
