"""QuantConv2d: exact format layout, conv == F.conv2d on the dequantized weight, checkpoints."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxkernels.conv import QuantConv2d, load_quantized_cnn, replace_convs, save_quantized_cnn
from fxkernels.format import QuantSpec, dequantize, quantize_rtn, unpack

GEOMETRIES = [
    # (cin, cout, k, stride, padding, groups, dilation)
    (16, 24, 1, 1, 0, 1, 1),    # pointwise: GEMM over pixels
    (16, 24, 1, 2, 0, 1, 1),    # strided pointwise
    (3, 8, 3, 2, 1, 1, 1),      # stem conv: im2col, K = 27 (odd)
    (8, 6, 3, 1, 2, 1, 2),      # dilated 3x3
    (12, 12, 3, 1, 1, 12, 1),   # depthwise, K = 9 (odd: padded nibble storage)
    (12, 12, 3, 2, 1, 12, 1),   # strided depthwise
    (8, 4, 3, 1, 1, 2, 1),      # grouped
]


def _conv(cin, cout, k, stride, padding, groups, dilation, seed=0):
    torch.manual_seed(seed)
    conv = nn.Conv2d(cin, cout, k, stride, padding, dilation, groups, bias=True)
    with torch.no_grad():
        # Per-channel magnitudes spread over 10x, as after batch-norm folding.
        conv.weight.mul_(torch.logspace(-0.5, 0.5, cout).reshape(-1, 1, 1, 1))
    return conv


@pytest.mark.parametrize("geom", GEOMETRIES)
@pytest.mark.parametrize("bits,gran", [(4, "tensor"), (8, "tensor"), (3, "channel")])
def test_quantconv_matches_conv2d_on_dequantized_weight(geom, bits, gran):
    conv = _conv(*geom)
    spec = QuantSpec(bits=bits, granularity=gran)
    q = QuantConv2d.from_conv(conv, spec)
    w = q.dequantized_weight().reshape(q.weight_shape)
    x = torch.randn(2, geom[0], 11, 9)
    ref = F.conv2d(x, w, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    y = q(x)
    assert y.shape == ref.shape
    # Same products, different summation order (GEMM vs direct conv): fp32 rounding only.
    tol = 1e-5 * ref.abs().max().item() + 1e-6
    assert (y - ref).abs().max().item() <= tol
    # The quantized weight is really quantized (not the float one) and close to it.
    err = (w - conv.weight).abs().max().item()
    assert 0 < err <= float(q.scale.max())


@pytest.mark.parametrize("geom", [GEOMETRIES[0], GEOMETRIES[2], GEOMETRIES[4]])
def test_quantconv_int8_activations(geom):
    conv = _conv(*geom)
    spec = QuantSpec(bits=4, granularity="tensor", act_bits=8, act_mode="static")
    x = torch.randn(2, geom[0], 10, 10)
    act_scale = torch.tensor([float(x.abs().max()) / 127])
    act_zero = torch.tensor([0], dtype=torch.int32)
    q = QuantConv2d.from_conv(conv, spec, act_scale=act_scale, act_zero=act_zero)
    # Reference: the kernels' activation rule, dequantized, then F.conv2d in float64.
    xq = torch.clamp(torch.round(x * (1.0 / act_scale)) + act_zero, -128, 127)
    xd = ((xq - act_zero) * act_scale).double()
    w = q.dequantized_weight().reshape(q.weight_shape).double()
    ref = F.conv2d(xd, w, conv.bias.double(), conv.stride, conv.padding, conv.dilation, conv.groups).float()
    y = q(x)
    assert (y - ref).abs().max().item() <= 1e-5 * ref.abs().max().item() + 1e-6
    # Without the activation grid the output differs: the int8 path is really taken.
    q_wo = QuantConv2d.from_conv(conv, QuantSpec(bits=4, granularity="tensor"))
    assert (q_wo(x) - y).abs().max().item() > 1e-4


def test_odd_k_padding_is_the_zero_point_and_roundtrips():
    conv = _conv(12, 12, 3, 1, 1, 12, 1)
    spec = QuantSpec(bits=4, granularity="tensor")
    q = QuantConv2d.from_conv(conv, spec)
    assert q.in_features == 9 and tuple(q.qweight.shape) == (12, 5)
    full = unpack(q.qweight, spec)  # all 10 nibbles
    assert torch.equal(full[:, 9], q.zero.expand(12))
    codes, scale, zero = quantize_rtn(torch.cat([conv.weight.reshape(12, 9), torch.zeros(12, 1)], 1), spec)
    assert torch.equal(unpack(q.qweight, spec, 9), codes[:, :9])
    assert torch.equal(q.dequantized_weight(), dequantize(q.qweight, scale, zero, spec, 9))


def test_from_codes_rejects_bad_input():
    spec = QuantSpec(bits=4, granularity="tensor")
    codes = torch.randint(0, 16, (8, 16), dtype=torch.int32)
    ok = dict(scale=torch.tensor([0.1]), zero=torch.tensor([8], dtype=torch.int32), spec=spec, in_channels=16,
              kernel_size=1)
    QuantConv2d.from_codes(codes, **ok)
    with pytest.raises(ValueError, match="columns"):
        QuantConv2d.from_codes(codes, **{**ok, "in_channels": 8})
    with pytest.raises(ValueError, match="scale"):
        QuantConv2d.from_codes(codes, **{**ok, "scale": torch.tensor([0.0])})
    with pytest.raises(ValueError, match="zero"):
        QuantConv2d.from_codes(codes, **{**ok, "zero": torch.tensor([99], dtype=torch.int32)})
    with pytest.raises(ValueError, match="stride"):
        QuantConv2d.from_codes(codes, **ok, stride=0)
    with pytest.raises(ValueError, match="groups"):
        QuantConv2d(16, 8, 1, spec, groups=3)
    with pytest.raises(ValueError, match="act_scale"):
        QuantConv2d.from_codes(codes, **{**ok, "spec": QuantSpec(bits=4, granularity="tensor", act_bits=8,
                                                                  act_mode="static")})
    q = QuantConv2d.from_codes(codes, **ok)
    with pytest.raises(ValueError, match=r"expected \[B, 16, H, W\]"):
        q(torch.randn(1, 8, 4, 4))


def test_save_load_cnn_roundtrip(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU6(), nn.Conv2d(8, 8, 3, 1, 1, groups=8), nn.ReLU6(),
                        nn.Conv2d(8, 16, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))
    skeleton = __import__("copy").deepcopy(net)
    from fxkernels.nn import QuantLinear
    replace_convs(net, QuantSpec(bits=4, granularity="tensor"),
                  overrides={"0": QuantSpec(bits=8, granularity="tensor")})
    net[7] = QuantLinear.from_linear(net[7], QuantSpec(bits=8, granularity="tensor"))
    x = torch.randn(2, 3, 16, 16)
    y = net(x)
    save_quantized_cnn(net, str(tmp_path / "ck"))
    loaded = load_quantized_cnn(str(tmp_path / "ck"), skeleton)
    assert isinstance(loaded[2], QuantConv2d) and loaded[2].groups == 8 and loaded[0].spec.bits == 8
    assert torch.equal(loaded(x), y)
    # A skeleton of another architecture is refused with the layer's name.
    from fxkernels.checkpoint import CheckpointError
    with pytest.raises(CheckpointError, match=r"layer '0' is \(3, 8, \(3, 3\), \(1, 1\).* in the model but "
                                              r"\(3, 8, \(3, 3\), \(2, 2\)"):
        load_quantized_cnn(str(tmp_path / "ck"), nn.Sequential(nn.Conv2d(3, 8, 3)))
    with pytest.raises(CheckpointError, match="layer '2' of the checkpoint is not in the model"):
        load_quantized_cnn(str(tmp_path / "ck"), nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1)))
    with pytest.raises(CheckpointError, match="layer '0' is a Linear in the model; .* kind 'conv2d'"):
        load_quantized_cnn(str(tmp_path / "ck"), nn.Sequential(nn.Linear(3, 8)))


def test_quantconv_runs_under_inference_mode():
    """Derived tensors made under ``torch.inference_mode`` keep no version counter (regression)."""
    conv = _conv(*GEOMETRIES[0])
    q = QuantConv2d.from_conv(conv, QuantSpec(bits=4, granularity="tensor"))
    x = torch.randn(2, GEOMETRIES[0][0], 6, 6)
    want = q(x)
    q2 = QuantConv2d.from_conv(conv, QuantSpec(bits=4, granularity="tensor"))
    with torch.inference_mode():
        assert torch.equal(q2(x), want)
        assert torch.equal(q2(x), want)
