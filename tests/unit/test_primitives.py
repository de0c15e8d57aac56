import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from nnopt.quantization import primitives as P

finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)


@settings(max_examples=200, deadline=None)
@given(
    w=arrays(np.float32, st.tuples(st.integers(1, 8), st.integers(1, 8)), elements=finite),
    bits=st.integers(2, 16),
    per_channel=st.booleans(),
)
def test_symmetric_rounding_error_is_at_most_half_a_step(w, bits, per_channel):
    w = torch.from_numpy(w)
    scale, zero = P.compute_qparams(w, bits, symmetric=True, channel_axis=0 if per_channel else None)
    codes = P.quantize(w, scale, zero, bits)
    qmin, qmax = P.qrange(bits)
    assert codes.dtype == P.storage_dtype(bits)
    assert int(codes.min()) >= qmin and int(codes.max()) <= qmax
    error = (w - P.dequantize(codes, scale, zero)).abs()
    # |w − w_q/S| ≤ 1/(2S), plus float32 round-off of the division.
    bound = 1 / (2 * scale) + 1e-6 * w.abs().amax() + 1e-12
    assert bool((error <= bound).all())


@settings(max_examples=100, deadline=None)
@given(w=arrays(np.float32, st.integers(1, 50), elements=finite), bits=st.integers(2, 8))
def test_asymmetric_keeps_zero_exact_and_bounds_error(w, bits):
    w = torch.from_numpy(w)
    scale, zero = P.compute_qparams(w, bits, symmetric=False)
    codes = P.quantize(w, scale, zero, bits, symmetric=False)
    assert P.dequantize(P.quantize(torch.zeros(1), scale, zero, bits, symmetric=False), scale, zero).item() == 0.0
    error = (w - P.dequantize(codes, scale, zero)).abs()
    assert bool((error <= 1 / (2 * scale) + 1e-6 * w.abs().max() + 1e-12).all())


def test_classic_rule_matches_hand_computation():
    w = torch.tensor([-1.0, -0.5, 0.0, 0.25, 1.0])
    scale, zero = P.compute_qparams(w, bits=8)
    assert scale.item() == pytest.approx(127.0)
    assert P.quantize(w, scale, zero).tolist() == [-127, -64, 0, 32, 127]  # round(w·127), half to even


def test_per_channel_scales_follow_each_row():
    w = torch.tensor([[1.0, -2.0], [0.1, 0.05], [0.0, 0.0]])
    scale, _ = P.compute_qparams(w, bits=8, channel_axis=0)
    assert scale.shape == (3, 1)
    torch.testing.assert_close(scale.flatten(), torch.tensor([127 / 2, 127 / 0.1, 1.0]))


def test_ranges_and_dtypes():
    assert P.qrange(8) == (-127, 127)
    assert P.qrange(4, symmetric=False) == (-8, 7)
    assert P.storage_dtype(8) == torch.int8 and P.storage_dtype(9) == torch.int16
    for bad in (1, 17, 8.0, True):
        with pytest.raises(ValueError):
            P.check_bits(bad)
