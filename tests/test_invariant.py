"""What was learned is what runs: exported QuantLinear == the fake-quant layer of the last step."""

import itertools

import pytest
import torch

from fxkernels import reference
from fxkernels.format import QuantSpec
from quantizer.act_quant import ActQuantizer, fake_quant, search_range
from quantizer.layers import FrozenLayer, LinearQuant
from quantizer.rounding import method_names

CASES = list(itertools.product(method_names(),
                               (QuantSpec(bits=4, granularity="channel"),
                                QuantSpec(bits=3, granularity="tensor"),
                                QuantSpec(bits=4, granularity="group", group_size=32, symmetric=True),
                                QuantSpec(bits=8, granularity="tensor")),
                               (None, 8)))


# Tiny ops: thread hand-offs cost more than the work (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def _layer(method, spec, act_bits, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(48, 64, generator=g) * 0.05
    bias = torch.randn(48, generator=g) * 0.1
    x = torch.randn(5, 7, 64, generator=g)
    x[..., 3] *= 20  # an outlier channel, as in LLM activations
    aq = None
    if act_bits:
        aq = ActQuantizer()
        aq.init_from(x)
    linear = torch.nn.Linear(64, 48)
    with torch.no_grad():
        linear.weight.copy_(w)
        linear.bias.copy_(bias)
    wrapper = LinearQuant(linear, method, spec, aq=aq)
    with torch.no_grad():  # pretend learning moved every parameter
        for p in wrapper.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
        if hasattr(wrapper.wq, "project"):
            wrapper.wq.project()
    wrapper.wq.hard = True
    layer_spec = spec if not act_bits else QuantSpec(**{**spec.to_dict(), "act_bits": 8, "act_mode": "static"})
    return wrapper, layer_spec, x


@pytest.mark.parametrize("method,spec,act_bits", CASES, ids=lambda v: str(v))
def test_exported_module_matches_fake_quant_layer(method, spec, act_bits):
    wrapper, layer_spec, x = _layer(method, spec, act_bits)
    with torch.no_grad():
        fake_w = wrapper.wq()
        y_fake = wrapper(x)
    q = wrapper.export()
    assert q.spec == layer_spec
    assert torch.equal(q.dequantized_weight(), fake_w)          # bit-exact weights
    frozen = FrozenLayer(q)
    assert torch.equal(frozen(x), y_fake)                       # the engine's propagation layer
    y_q = q(x)
    # Same math, other summation order (and an exact integer GEMM for A8): fp32 rounding only.
    scale = y_fake.abs().max()
    torch.testing.assert_close(y_q, y_fake, rtol=0, atol=float(scale) * 2e-6 * 64 ** 0.5)


def test_activation_codes_match_kernel_rule_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 96, generator=g) * 3
    aq = ActQuantizer()
    aq.init_from(x)
    with torch.no_grad():
        aq.log_scale.add_(0.0123)
        aq.zero.add_(0.4)  # rounds: the exported zero is the integer used in forward
    s, z = aq.export()
    assert z.dtype == torch.int32 and -128 <= int(z) <= 127
    xq, _, _ = reference.quantize_act(x, s, z)
    expected = (xq.float() - z.float()) * s
    assert torch.equal(aq(x).detach(), expected)


def test_activation_range_search_never_worse_than_minmax_and_lsq_gets_gradients():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4096, generator=g) ** 5  # heavy tails
    s, z = search_range(x)
    s_mm = (x.max() - x.min()) / 255
    assert float(s) <= float(s_mm) * (1 + 1e-6)
    err = (fake_quant(x, s, z) - x).pow(2).mean()
    lo = torch.clamp(x.min(), max=0)
    z_mm = torch.round(-128 - lo / s_mm)
    assert float(err) <= float((fake_quant(x, s_mm, z_mm) - x).pow(2).mean())
    aq = ActQuantizer()
    aq.init_from(x)
    aq(x * 1.3).pow(2).sum().backward()
    assert aq.log_scale.grad is not None and float(aq.log_scale.grad.abs()) > 0
    assert aq.zero.grad is not None
