"""The checkpoint's weight layout: bit-exact pack/unpack, RTN grids, QuantSpec validation."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxkernels.format import (QuantSpec, dequantize, expand_per_weight, pack, quantize_rtn, unpack)

specs = st.builds(
    lambda bits, gran, gs, sym: QuantSpec(bits=bits, granularity=gran, group_size=gs if gran == "group" else None,
                                          symmetric=sym),
    st.integers(2, 8), st.sampled_from(["tensor", "channel", "group"]), st.sampled_from([2, 4, 8, 16]), st.booleans())


@settings(max_examples=150, deadline=None)
@given(spec=specs, n=st.integers(1, 9), kmul=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_unpack_inverts_pack(spec, n, kmul, seed):
    k = kmul * (spec.group_size or 2)
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, spec.qmax + 1, (n, k), generator=g)
    stored = pack(q, spec)
    assert stored.dtype == (torch.uint8 if spec.bits <= 4 else torch.int8)
    assert tuple(stored.shape) == spec.packed_shape(n, k)
    assert torch.equal(unpack(stored, spec, k), q.to(torch.int32))


def test_nibble_order_is_low_then_high():
    spec = QuantSpec(4, "channel")
    stored = pack(torch.tensor([[1, 2, 15, 0]]), spec)
    assert stored.tolist() == [[0x21, 0x0F]]


def test_int8_storage_is_offset_by_128():
    stored = pack(torch.tensor([[0, 128, 255]]), QuantSpec(8, "channel"))
    assert stored.tolist() == [[-128, 0, 127]]


@settings(max_examples=60, deadline=None)
@given(spec=specs, seed=st.integers(0, 2**16), mse=st.booleans())
def test_rtn_error_is_at_most_half_a_step(spec, seed, mse):
    g = torch.Generator().manual_seed(seed)
    n, k = 6, 4 * (spec.group_size or 4)
    w = torch.randn(n, k, generator=g)
    q, scale, zero = quantize_rtn(w, spec, mse=mse)
    assert q.min() >= 0 and q.max() <= spec.qmax
    assert tuple(scale.shape) == spec.scale_shape(n, k)
    if spec.symmetric:
        assert (zero == 2 ** (spec.bits - 1)).all()
    wq = dequantize(pack(q, spec), scale, zero, spec, k)
    step = expand_per_weight(scale, spec, n, k)
    err = (wq - w).abs()
    if not mse:  # min-max grids cover every weight: error <= step/2 (plus fp32 slack)
        assert (err <= step * 0.5 * (1 + 1e-5) + 1e-7).all()
    else:  # clipping may cut the extremes but must not increase the total error
        q0, s0, z0 = quantize_rtn(w, spec, mse=False)
        base = (dequantize(pack(q0, spec), s0, z0, spec, k) - w).abs().pow(2.4).sum()
        assert err.pow(2.4).sum() <= base * (1 + 1e-5)


def test_rtn_zero_point_is_exact_for_zero_weight():
    # An asymmetric grid must represent 0 exactly (padding, ReLU outputs, pruned weights).
    w = torch.tensor([[0.0, 0.3, 1.7, -0.2, 0.0, 2.5]])
    spec = QuantSpec(4, "channel")
    q, s, z = quantize_rtn(w, spec)
    wq = dequantize(pack(q, spec), s, z, spec, 6)
    assert wq[0, 0].item() == 0.0 and wq[0, 4].item() == 0.0


@pytest.mark.parametrize("kwargs, match", [
    (dict(bits=1), "bits=1"), (dict(bits=9), "bits=9"), (dict(bits=4.0), "bits=4.0"),
    (dict(granularity="row"), "granularity='row'"),
    (dict(granularity="group", group_size=None), "group_size=None"),
    (dict(granularity="group", group_size=7), "group_size=7"),
    (dict(act_bits=4), "act_bits=4"), (dict(act_mode="sometimes"), "act_mode='sometimes'"),
])
def test_spec_rejects_bad_fields(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantSpec(**kwargs)


def test_spec_round_trips_through_dict():
    s = QuantSpec(3, "group", 64, True, 8, "static")
    assert QuantSpec.from_dict(s.to_dict()) == s
    with pytest.raises(ValueError, match="unknown fields"):
        QuantSpec.from_dict({**s.to_dict(), "bogus": 1})


def test_shape_constraints_are_explained():
    with pytest.raises(ValueError, match="in_features=33.*even"):
        quantize_rtn(torch.randn(4, 33), QuantSpec(4, "channel"))
    with pytest.raises(ValueError, match="in_features=48 is not divisible by group_size=32"):
        quantize_rtn(torch.randn(4, 48), QuantSpec(8, "group", 32))
    q, _, _ = quantize_rtn(torch.randn(4, 33), QuantSpec(8, "channel"))  # 8-bit: any K
    assert q.shape == (4, 33)


def test_nan_inf_weights_rejected():
    w = torch.randn(4, 8)
    w[1, 2] = float("nan")
    with pytest.raises(ValueError, match="1 NaN/Inf"):
        quantize_rtn(w, QuantSpec(4, "channel"))
    w[1, 2] = float("inf")
    with pytest.raises(ValueError, match="NaN/Inf"):
        quantize_rtn(w, QuantSpec(4, "channel"))


def test_pack_rejects_out_of_range_and_float_codes():
    with pytest.raises(ValueError, match=r"codes span \[0, 16\]; expected \[0, 15\]"):
        pack(torch.tensor([[0, 16]]), QuantSpec(4, "channel"))
    with pytest.raises(ValueError, match="dtype torch.float32"):
        pack(torch.zeros(2, 2), QuantSpec(4, "channel"))
    with pytest.raises(ValueError, match="expected torch.uint8"):
        unpack(torch.zeros(2, 2, dtype=torch.int8), QuantSpec(4, "channel"))
