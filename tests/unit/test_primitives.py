import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from nnopt.layers import primitives as P

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


# -- Reference implementation in NumPy (float64), written independently of the code under test --

F32_MAX = float(np.finfo(np.float32).max)


def ref_qrange(bits, symmetric):
    half = 2 ** (bits - 1)
    return (-(half - 1), half - 1) if symmetric else (-half, half - 1)


def ref_qparams_1d(values, bits, symmetric):
    """(S as float32, z) for one slice, by the textbook formulas."""
    qmin, qmax = ref_qrange(bits, symmetric)
    v = np.asarray(values, dtype=np.float64)
    lo, hi = min(float(v.min()), 0.0), max(float(v.max()), 0.0)
    if symmetric:
        m = max(-lo, hi)
        s = min(qmax / m, F32_MAX) if m > 0 else 1.0
        return np.float32(s), 0
    span = hi - lo
    s = min((qmax - qmin) / span, F32_MAX) if span > 0 else 1.0
    return np.float32(s), int(qmin - np.round(lo * s))


def ref_quantize(values, s, z, bits, symmetric):
    qmin, qmax = ref_qrange(bits, symmetric)
    return np.clip(np.round(np.asarray(values, dtype=np.float64) * np.float64(s)) + z, qmin, qmax).astype(np.int64)


def ref_codes(w, bits, symmetric, mode, group_size=1):
    """Codes and per-element S, z for a 2-D ``w``: mode is 'tensor', 'channel' (rows) or 'group'."""
    rows, cols = w.shape
    codes = np.zeros(w.shape, dtype=np.int64)
    s_full = np.zeros(w.shape, dtype=np.float32)
    z_full = np.zeros(w.shape, dtype=np.int64)
    if mode == "tensor":
        blocks = [(slice(None), slice(None))]
    elif mode == "channel":
        blocks = [(r, slice(None)) for r in range(rows)]
    else:
        blocks = [(r, slice(g, g + group_size)) for r in range(rows) for g in range(0, cols, group_size)]
    for block in blocks:
        s, z = ref_qparams_1d(w[block], bits, symmetric)
        codes[block] = ref_quantize(w[block], s, z, bits, symmetric)
        s_full[block], z_full[block] = s, z
    return codes, s_full, z_full


matrices = arrays(np.float32, st.tuples(st.integers(1, 6), st.sampled_from([1, 2, 4, 6, 8, 12])), elements=finite)


@settings(max_examples=60, deadline=None)
@given(
    w=matrices,
    bits=st.integers(2, 8),
    symmetric=st.booleans(),
    mode=st.sampled_from(["tensor", "channel", "group"]),
    data=st.data(),
)
def test_codes_and_scales_match_the_reference(w, bits, symmetric, mode, data):
    t = torch.from_numpy(w)
    if mode == "group":
        group_size = data.draw(st.sampled_from([g for g in (1, 2, 3, 4, 6) if w.shape[1] % g == 0]))
        scale, zero = P.compute_group_qparams(t, bits, symmetric, group_size)
        assert scale.shape == zero.shape == (w.shape[0], w.shape[1] // group_size, 1)
        codes = P.quantize_grouped(t, scale, zero, bits, symmetric, group_size)
        deq = P.dequantize_grouped(codes, scale, zero, group_size)
        s_full = scale.expand(-1, -1, group_size).reshape(w.shape)
        z_full = zero.expand(-1, -1, group_size).reshape(w.shape)
    else:
        group_size = 1
        scale, zero = P.compute_qparams(t, bits, symmetric, channel_axis=0 if mode == "channel" else None)
        codes = P.quantize(t, scale, zero, bits, symmetric)
        deq = P.dequantize(codes, scale, zero)
        s_full, z_full = scale.expand(w.shape), zero.expand(w.shape)
    ref, ref_s, ref_z = ref_codes(w, bits, symmetric, mode, group_size)
    assert codes.shape == t.shape and codes.dtype == torch.int8
    np.testing.assert_array_equal(codes.numpy().astype(np.int64), ref)
    np.testing.assert_array_equal(s_full.numpy(), ref_s)
    np.testing.assert_array_equal(z_full.numpy(), ref_z)
    assert deq.dtype == torch.float32 and deq.shape == t.shape
    ref_deq = ((ref - ref_z) / ref_s.astype(np.float64)).astype(np.float32)
    np.testing.assert_allclose(deq.numpy(), ref_deq, rtol=1e-6, atol=0)
    # Zeros stay exactly zero, and in-range values are within half a step.
    assert bool((deq[t == 0] == 0).all())
    bound = 1 / (2 * s_full.double()) * (1 + 1e-6) + 1e-30
    assert bool(((t.double() - deq.double()).abs() <= bound).all())


@pytest.mark.parametrize("mode", ["tensor", "channel", "group"])
def test_exact_ties_round_half_to_even_like_the_reference(mode):
    # With max |w| = 127 and 8 bits, S = 1, so w · S lands exactly on .5 ties.
    w = np.array([[127.0, 0.5, 1.5, 2.5, -0.5, -2.5, 3.5, -127.0]] * 2, dtype=np.float32)
    t = torch.from_numpy(w)
    if mode == "group":
        scale, zero = P.compute_group_qparams(t, 8, True, 4)
        codes = P.quantize_grouped(t, scale, zero, 8, True, 4)
    else:
        scale, zero = P.compute_qparams(t, 8, True, channel_axis=0 if mode == "channel" else None)
        codes = P.quantize(t, scale, zero, 8, True)
    ref, _, _ = ref_codes(w, 8, True, mode, 4)
    np.testing.assert_array_equal(codes.numpy(), ref)
    assert codes[0].tolist() == [127, 0, 2, 2, 0, -2, 4, -127]


def test_grouped_qparams_broadcast_against_the_grouped_view():
    k = torch.arange(12, dtype=torch.float32)
    # (2, 3, 4), groups of 2 along the last dim, each group (-(k + 1), k + 2) straddles 0.
    w = torch.stack((-(k + 1), k + 2), dim=-1).reshape(2, 3, 4)
    scale, zero = P.compute_group_qparams(w, bits=4, symmetric=False, group_size=2)
    assert scale.shape == (2, 3, 2, 1)
    codes = P.quantize_grouped(w, scale, zero, bits=4, symmetric=False)  # group_size inferred from scale
    torch.testing.assert_close(codes, P.quantize_grouped(w, scale, zero, 4, False, 2))
    # Each group of two distinct values maps onto the ends of the 4-bit range.
    grouped = codes.reshape(2, 3, 2, 2)
    assert bool((grouped.amax(-1) - grouped.amin(-1) == 15).all())
    torch.testing.assert_close(P.dequantize_grouped(codes, scale, zero, 2), w, atol=0.5 / scale.min().item(), rtol=0)


@pytest.mark.parametrize("group_size", [0, -2, 2.0, True])
def test_group_size_must_be_a_positive_integer(group_size):
    with pytest.raises(ValueError, match="group_size"):
        P.compute_group_qparams(torch.ones(2, 8), 4, True, group_size)
    with pytest.raises(ValueError, match="group_size"):
        P.quantize_grouped(torch.ones(2, 8), torch.ones(2, 1, 1), 0, 4, True, group_size)


def test_partial_last_group_has_its_own_scale_and_group_size_cannot_be_inferred_for_it():
    # 8 = 3 + 3 + 2: the last group's range is its own two values (7 and -8), not padding's zeros.
    w = torch.tensor([[1.0, 2, 3, 0.5, 0.25, 0.125, 7, -8]])
    scale, zero = P.compute_group_qparams(w, 4, True, 3)
    assert scale.shape == (1, 3, 1)
    torch.testing.assert_close(scale.reshape(-1), torch.tensor([7 / 3, 7 / 0.5, 7 / 8]))
    codes = P.quantize_grouped(w, scale, zero, 4, True, 3)
    assert codes.tolist() == [[2, 5, 7, 7, 4, 2, 6, -7]]
    torch.testing.assert_close(P.dequantize_grouped(codes, scale, zero, 3)[0, -2:], torch.tensor([6 * 8 / 7, -8.0]))
    with pytest.raises(ValueError, match="cannot infer group_size"):
        P.quantize_grouped(w, scale, zero, 4, True)


def test_qparams_from_range_is_the_formula_compute_qparams_uses():
    w = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    for symmetric in (True, False):
        for bits in (2, 4, 8):
            s1, z1 = P.compute_qparams(w, bits, symmetric, channel_axis=0)
            s2, z2 = P.qparams_from_range(w.amin(1, keepdim=True), w.amax(1, keepdim=True), bits, symmetric)
            assert torch.equal(s1, s2) and torch.equal(z1, z2)
    # The range always includes 0; an empty range gets S = 1; z is an int32 inside the code range.
    s, z = P.qparams_from_range(torch.tensor(2.0), torch.tensor(4.0), 8, symmetric=False)
    assert s.item() == pytest.approx(255 / 4) and z.item() == -128 and z.dtype == torch.int32
    s, z = P.qparams_from_range(0.0, 0.0, 8, symmetric=True)
    assert s.item() == 1.0 and z.item() == 0
    with pytest.raises(ValueError, match="lo > hi"):
        P.qparams_from_range(1.0, -1.0)
    with pytest.raises(ValueError, match="finite"):
        P.qparams_from_range(float("nan"), 1.0)


def test_tiny_ranges_keep_scales_finite():
    w = torch.tensor([0.0, 1e-44, -1e-44])
    for symmetric in (True, False):
        scale, zero = P.compute_qparams(w, 8, symmetric)
        assert bool(torch.isfinite(scale).all()) and float(scale.min()) > 0
        assert P.fake_quantize(torch.zeros(1), scale, zero, 8, symmetric).item() == 0.0


def test_fake_quantize_is_dequantize_of_quantize():
    x = torch.randn(4, 9, generator=torch.Generator().manual_seed(1))
    scale, zero = P.compute_qparams(x, 5, symmetric=False)
    out = P.fake_quantize(x, scale, zero, 5, symmetric=False)
    assert out.dtype == torch.float32
    assert torch.equal(out, P.dequantize(P.quantize(x, scale, zero, 5, symmetric=False), scale, zero))
    assert not torch.equal(out, x)


def test_sqnr_db():
    ref = torch.tensor([1.0, 1.0])
    assert P.sqnr_db(ref, ref.clone()) == float("inf")
    assert P.sqnr_db(ref, torch.tensor([1.0, 0.0])) == pytest.approx(10 * np.log10(2))
    assert P.sqnr_db(ref, ref * 1.1) == pytest.approx(20.0)  # noise is 1% of the signal power
    with pytest.raises(ValueError, match="equal shapes"):
        P.sqnr_db(ref, torch.ones(3))


def test_int8_per_channel_linear_reaches_35_db_and_int4_per_tensor_does_not():
    weight = torch.randn(256, 512, generator=torch.Generator().manual_seed(0))  # (out_features, in_features)
    scale, zero = P.compute_qparams(weight, 8, symmetric=True, channel_axis=0)
    int8 = P.sqnr_db(weight, P.fake_quantize(weight, scale, zero, 8))
    scale4, zero4 = P.compute_qparams(weight, 4, symmetric=True)
    int4 = P.sqnr_db(weight, P.fake_quantize(weight, scale4, zero4, 4))
    assert int8 >= 35.0
    assert int4 < int8 - 20  # ~6 dB per bit, and one range for all rows
    # The layer's outputs keep the same quality.
    x = torch.randn(64, 512, generator=torch.Generator().manual_seed(1))
    assert P.sqnr_db(x @ weight.T, x @ P.fake_quantize(weight, scale, zero, 8).T) >= 35.0


def test_check_quant_bits_allows_2_to_8():
    for ok in range(2, 9):
        P.check_quant_bits(ok)
    with pytest.raises(ValueError, match=r"bits must be an integer in 2\.\.8, got 9"):
        P.check_quant_bits(9)
    for bad in (1, 16, 8.0, True, "8"):
        with pytest.raises(ValueError):
            P.check_quant_bits(bad)
    P.check_bits(16)  # storage primitives still go to 16


# -- int4 packing --


@settings(max_examples=60, deadline=None)
@given(
    codes=arrays(
        np.int8,
        st.tuples(st.integers(0, 3), st.integers(1, 5)).map(lambda s: (*s[:-1], 2 * s[-1])) | st.just((6,)),
        elements=st.integers(-8, 7),
    )
)
def test_int4_pack_unpack_is_exact(codes):
    t = torch.from_numpy(codes)
    packed = P.pack_int4(t)
    assert packed.dtype == torch.uint8 and packed.shape == (*t.shape[:-1], t.shape[-1] // 2)
    # Layout: even index in the low nibble, two's complement.
    as_u = codes.astype(np.int16) & 0xF
    np.testing.assert_array_equal(packed.numpy(), (as_u[..., 0::2] | (as_u[..., 1::2] << 4)).astype(np.uint8))
    unpacked = P.unpack_int4(packed)
    assert unpacked.dtype == torch.int8
    assert torch.equal(unpacked, t)


def test_int4_packing_rejects_bad_input():
    with pytest.raises(ValueError, match="even last dimension, got 3"):
        P.pack_int4(torch.zeros(2, 3, dtype=torch.int8))
    for bad in (8, -9):
        with pytest.raises(ValueError, match="-8..7"):
            P.pack_int4(torch.tensor([0, bad], dtype=torch.int8))
    with pytest.raises(ValueError, match="uint8"):
        P.unpack_int4(torch.zeros(2, dtype=torch.int8))


def test_int4_codes_from_quantize_round_trip_through_packing():
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(2))
    scale, zero = P.compute_group_qparams(w, 4, symmetric=False, group_size=16)
    codes = P.quantize_grouped(w, scale, zero, 4, symmetric=False, group_size=16)
    restored = P.dequantize_grouped(P.unpack_int4(P.pack_int4(codes)), scale, zero, 16)
    assert torch.equal(restored, P.dequantize_grouped(codes, scale, zero, 16))
