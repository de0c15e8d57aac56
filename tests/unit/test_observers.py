import numpy as np
import pytest
import torch

from nnopt.errors import ConfigError
from nnopt.layers import primitives as P
from nnopt.quantization import observers as O


def batches(data: torch.Tensor, n: int) -> list[torch.Tensor]:
    return list(torch.chunk(data, n))


def quant_mse(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, symmetric: bool) -> float:
    return float(((x.double() - P.fake_quantize(x, scale, zero, bits, symmetric).double()) ** 2).mean())


def np_qparams(lo: np.ndarray, hi: np.ndarray, bits: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Reference (S, z) from a range, in NumPy."""
    lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        m = np.maximum(-lo, hi)
        return np.where(m > 0, qmax / np.where(m > 0, m, 1), 1.0).astype(np.float32), np.zeros_like(lo, dtype=np.int64)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    span = hi - lo
    s = np.where(span > 0, (qmax - qmin) / np.where(span > 0, span, 1), 1.0)
    return s.astype(np.float32), (qmin - np.round(lo * s)).astype(np.int64)


@pytest.mark.parametrize("symmetric", [True, False])
def test_minmax_matches_the_reference_over_batches(symmetric):
    g = torch.Generator().manual_seed(0)
    parts = [torch.randn(7, 5, generator=g) * (i + 1) + i for i in range(4)]  # ranges differ per batch
    obs = O.make_observer("minmax")
    for part in parts:
        obs.update(part)
    everything = torch.cat(parts).numpy().astype(np.float64)
    assert obs.count == everything.size
    lo, hi = obs.clip_range(symmetric=symmetric)
    assert lo.item() == everything.min() and hi.item() == everything.max()
    scale, zero = obs.qparams(bits=6, symmetric=symmetric)
    ref_s, ref_z = np_qparams(everything.min(), everything.max(), 6, symmetric)
    assert scale.item() == ref_s.item() and zero.item() == ref_z.item()


def test_minmax_per_channel_broadcasts_against_the_batches():
    g = torch.Generator().manual_seed(1)
    parts = [torch.randn(9, 4, generator=g) * torch.tensor([1.0, 2.0, 4.0, 8.0]) for _ in range(3)]  # (batch, C)
    obs = O.MinMaxObserver(channel_axis=-1)
    for part in parts:
        obs.update(part)
    scale, zero = obs.qparams(bits=8, symmetric=False)
    assert scale.shape == zero.shape == (1, 4)
    everything = torch.cat(parts).numpy().astype(np.float64)
    ref_s, ref_z = np_qparams(everything.min(0, keepdims=True), everything.max(0, keepdims=True), 8, False)
    np.testing.assert_array_equal(scale.numpy(), ref_s)
    np.testing.assert_array_equal(zero.numpy(), ref_z)
    with pytest.raises(ValueError, match="channel shape"):
        obs.update(torch.ones(2, 5))
    with pytest.raises(ValueError, match="out of range"):
        O.MinMaxObserver(channel_axis=3).update(torch.ones(2, 5))


def test_percentile_clips_a_single_outlier():
    g = torch.Generator().manual_seed(2)
    data = torch.randn(200_000, generator=g)
    data[12345] = 1000.0
    minmax, pct = O.MinMaxObserver(), O.PercentileObserver()
    for part in batches(data, 8):
        minmax.update(part)
        pct.update(part)
    assert pct.count == minmax.count == data.numel()
    pct_scale, _ = pct.qparams(bits=8)
    mm_scale, _ = minmax.qparams(bits=8)
    assert pct_scale.item() > 50 * mm_scale.item()  # a range of ~4 instead of 1000
    _, hi = pct.clip_range()
    assert 3.0 < hi.item() < 5.0  # the 99.99th percentile of |N(0, 1)| is ~3.9
    # The bulk of the data (all but the outlier) is represented far better.
    bulk = data[data.abs() < 100]
    assert quant_mse(bulk, pct_scale, 0, 8, True) < 1e-3 * quant_mse(bulk, mm_scale, 0, 8, True)


def test_percentile_is_exact_while_the_sample_holds_everything():
    g = torch.Generator().manual_seed(3)
    data = torch.randn(5000, generator=g).exp() - 0.5  # skewed, so both tails differ
    obs = O.make_observer("percentile", percentile=99.0)
    for part in batches(data, 5):
        obs.update(part)
    values = data.numpy().astype(np.float64)
    lo, hi = obs.clip_range(symmetric=False)
    assert lo.item() == pytest.approx(np.percentile(values, 1.0), rel=1e-12)
    assert hi.item() == pytest.approx(np.percentile(values, 99.0), rel=1e-12)
    lo, hi = obs.clip_range(symmetric=True)
    assert hi.item() == pytest.approx(np.percentile(np.abs(values), 99.0), rel=1e-12) and lo.item() == -hi.item()


def test_reservoir_memory_is_bounded_and_the_sample_uniform():
    obs = O.PercentileObserver(sample_size=4000, seed=5)
    obs.update(torch.zeros(10_000))
    obs.update(torch.ones(30_000))
    for _ in range(4):
        obs.update(torch.full((5_000,), 2.0))
    sample = obs.reservoir.values
    assert sample.numel() == 4000 and obs.count == 60_000
    # Every value seen had the same chance to be kept: 1/6 zeros, 1/2 ones, 1/3 twos.
    for value, share in ((0.0, 1 / 6), (1.0, 1 / 2), (2.0, 1 / 3)):
        assert abs(float((sample == value).double().mean()) - share) < 0.03


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dist", ["laplace", "student-t"])
def test_mse_error_is_at_most_minmax_error_on_heavy_tails(bits, symmetric, dist):
    rng = np.random.default_rng(4)
    values = rng.laplace(size=20_000) if dist == "laplace" else rng.standard_t(df=3, size=20_000)
    data = torch.from_numpy(values.astype(np.float32))
    minmax, mse = O.make_observer("minmax"), O.make_observer("mse")
    for part in batches(data, 4):
        minmax.update(part)
        mse.update(part)
    err_mse = quant_mse(data, *mse.qparams(bits, symmetric), bits, symmetric)
    err_minmax = quant_mse(data, *minmax.qparams(bits, symmetric), bits, symmetric)
    assert err_mse <= err_minmax
    if bits == 4:  # at 4 bits clipping the tails pays off clearly
        assert err_mse < 0.7 * err_minmax


def test_bad_inputs_raise_clear_errors():
    for name in O.OBSERVERS:
        obs = O.make_observer(name)
        with pytest.raises(ValueError, match="observer saw no data: the calibration set is empty"):
            obs.qparams()
        with pytest.raises(ValueError, match="empty tensor"):
            obs.update(torch.empty(0, 3))
        for bad in (float("nan"), float("inf"), -float("inf")):
            with pytest.raises(ValueError, match="1 non-finite"):
                obs.update(torch.tensor([1.0, bad, 2.0]))
        assert obs.count == 0  # rejected batches are not counted
        obs.update(torch.tensor([1.0, -2.0]))
        with pytest.raises(ValueError, match=r"bits must be an integer in 2\.\.8, got 9"):
            obs.qparams(bits=9)
        assert obs.count == 2


def test_make_observer_rejects_unknown_names_and_options():
    with pytest.raises(ConfigError, match="unknown observer 'histogram'.*minmax, percentile, mse"):
        O.make_observer("histogram")
    with pytest.raises(ConfigError, match="'channel_axis'.*allowed: percentile, sample_size, seed"):
        O.make_observer("percentile", channel_axis=0)
    with pytest.raises(ConfigError, match="percentile"):
        O.make_observer("percentile", percentile=101)
    with pytest.raises(ConfigError, match="sample_size"):
        O.make_observer("mse", sample_size=0)
    assert isinstance(O.make_observer("minmax", channel_axis=1), O.MinMaxObserver)
