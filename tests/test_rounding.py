"""The learnable roundings: exact export (THE INVARIANT), RTN at step 0, gradients, bad input."""

import itertools

import pytest
import torch

from fxkernels.format import QuantSpec, dequantize, pack, quantize_rtn, unpack
from quantizer.rounding import (AdaRoundQuantizer, FlexRoundQuantizer, RTNQuantizer, SignRoundQuantizer,
                                make_quantizer, method_names, round_ste)

SPECS = [QuantSpec(bits=b, granularity=g, group_size=16 if g == "group" else None, symmetric=s)
         for b, g, s in itertools.product((3, 4, 8), ("tensor", "channel", "group"), (False, True))]
METHODS = method_names()


# Tiny ops: thread hand-offs cost more than the work (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def _weight(n=24, k=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[3, 5] = 0.4  # an outlier so that per-tensor grids differ from per-channel ones
    return w


@torch.no_grad()
def _perturb(q, seed=1):
    """Move every learnable parameter as learning would (deterministic random steps)."""
    g = torch.Generator().manual_seed(seed)
    for p in q.parameters():
        p.add_(torch.randn(p.shape, generator=g) * 0.2)
    if hasattr(q, "project"):
        q.project()


def _exported_dequant(q):
    codes, scale, zero = q.export()
    spec = q.spec
    qw = pack(codes, spec)
    assert torch.equal(unpack(qw, spec, codes.shape[1]), codes)
    return dequantize(qw, scale, zero, spec, codes.shape[1])


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("method", METHODS)
def test_last_fake_weight_equals_dequant_of_export(method, spec):
    q = make_quantizer(method, _weight(), spec)
    _perturb(q)
    q.hard = True
    fake = q()
    assert torch.equal(fake, _exported_dequant(q)), f"{method} {spec}"
    codes, scale, zero = q.export()
    assert codes.dtype == torch.int32 and int(codes.min()) >= 0 and int(codes.max()) <= spec.qmax
    assert tuple(scale.shape) == spec.scale_shape(24, 64) and zero.dtype == torch.int32
    if spec.symmetric:
        assert (zero == 2 ** (spec.bits - 1)).all()


@pytest.mark.parametrize("init", ["minmax", "mse"])
@pytest.mark.parametrize("spec", SPECS[::3], ids=str)
def test_flexround_and_adaround_start_at_rtn(spec, init):
    w = _weight()
    q_rtn, s, z = quantize_rtn(w, spec, mse=(init == "mse"))
    rtn = dequantize(pack(q_rtn, spec), s, z, spec, w.shape[1])
    for cls in (FlexRoundQuantizer, AdaRoundQuantizer, RTNQuantizer):
        q = cls(w, spec, init=init)
        q.hard = True
        assert torch.equal(q(), rtn), cls.__name__


def test_signround_starts_at_minmax_rtn_and_projects():
    spec = QuantSpec(bits=4, granularity="channel")
    w = _weight()
    q_rtn, s, z = quantize_rtn(w, spec)
    q = SignRoundQuantizer(w, spec)
    torch.testing.assert_close(q(), dequantize(pack(q_rtn, spec), s, z, spec, 64), rtol=0, atol=1e-7)
    with torch.no_grad():
        q.V.fill_(3.0)
        q.alpha.fill_(0.1)
    q.project()
    assert float(q.V.detach().max()) == 0.5 and float(q.alpha.detach().min()) == q.clip_min


def test_flexround_learning_changes_codes_and_s1():
    """Gradients reach every FlexRound parameter and a few steps change the rounding."""
    spec = QuantSpec(bits=4, granularity="channel")
    w = _weight()
    q = FlexRoundQuantizer(w, spec)
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(2))
    target = x @ w.t()
    opt = torch.optim.Adam(q.parameters(), lr=1e-2)
    codes0 = q.export()[0]
    losses = []
    for _ in range(30):
        loss = (x @ q().t() - target).pow(2).mean()
        losses.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        for name in ("log_s1", "log_S2", "log_s3"):
            assert getattr(q, name).grad is not None and getattr(q, name).grad.abs().sum() > 0, name
        opt.step()
    assert losses[-1] < losses[0]
    assert not torch.equal(q.export()[0], codes0)


@pytest.mark.parametrize("spec", [QuantSpec(bits=4, granularity="tensor"),
                                  QuantSpec(bits=3, granularity="channel", symmetric=True),
                                  QuantSpec(bits=4, granularity="group", group_size=16)], ids=str)
def test_flexround_fused_gradient_matches_autograd(spec):
    """The hand-written backward equals autograd through the composed straight-through ops."""
    w = _weight()
    q = FlexRoundQuantizer(w, spec)
    _perturb(q, seed=5)
    g_out = torch.randn(w.shape, generator=torch.Generator().manual_seed(3))
    (q() * g_out).sum().backward()
    fused = {n: p.grad.clone() for n, p in q.named_parameters()}
    for p in q.parameters():
        p.grad = None
    # Reference: the formula of the paper written with autograd ops.
    gv = q.grid
    s1 = gv.s3(q.s1_init * q.log_s1.exp())
    div = s1 * gv.w3((q.log_S2 + q.log_s3).exp())
    z = gv.s3(q.zero)
    w_hat = (torch.clamp(round_ste(gv.w3(q.weight) / div) + z, 0, spec.qmax) - z) * s1
    (w_hat.reshape(w.shape) * g_out).sum().backward()
    for n, p in q.named_parameters():
        torch.testing.assert_close(fused[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("spec", [QuantSpec(bits=3, granularity="channel"),
                                  QuantSpec(bits=4, granularity="group", group_size=16)], ids=str)
def test_flexround_learned_zero_gradient_and_export(spec):
    """learn_zero: the zero point's gradient equals autograd through the clamp, only clamped weights
    give it one, and after a shift the export still reproduces the hard forward bit for bit."""
    w = _weight()
    q = FlexRoundQuantizer(w, spec, learn_zero=True)
    _perturb(q, seed=5)
    with torch.no_grad():
        q.log_s1.add_(0.4)  # a narrower grid: some weights now fall outside it and are clamped
    g_out = torch.randn(w.shape, generator=torch.Generator().manual_seed(3))
    (q() * g_out).sum().backward()
    fused = q.zero_shift.grad.clone()
    q.zero_shift.grad = None
    gv = q.grid
    s1 = gv.s3(q.s1_init * q.log_s1.exp())
    div = s1 * gv.w3((q.log_S2 + q.log_s3).exp())
    z = gv.s3(round_ste(q.zero + q.zero_shift).clamp(0, spec.qmax))
    w_hat = (torch.clamp(round_ste(gv.w3(q.weight) / div.detach()) + z, 0, spec.qmax) - z) * s1.detach()
    (w_hat.reshape(w.shape) * g_out).sum().backward()
    torch.testing.assert_close(fused, q.zero_shift.grad, rtol=1e-4, atol=1e-6)
    assert fused.abs().sum() > 0
    with torch.no_grad():
        q.zero_shift.add_(torch.linspace(-1.4, 1.4, q.zero_shift.numel()).reshape(q.zero_shift.shape))
    q.hard = True
    assert torch.equal(q(), _exported_dequant(q))
    zero = q.export()[2]
    assert not torch.equal(zero, q.zero.to(torch.int32)) and int(zero.min()) >= 0 and int(zero.max()) <= spec.qmax
    assert "zero_shift" not in dict(FlexRoundQuantizer(w, spec).named_parameters())  # off by default


def test_flexround_conv_weight_with_s4():
    conv = torch.nn.Conv2d(6, 8, 3, bias=False)
    torch.manual_seed(0)
    spec = QuantSpec(bits=4, granularity="channel")
    q = FlexRoundQuantizer(conv.weight.detach(), spec)
    assert q.log_s4 is not None and q.log_s4.shape == (6,)
    x = torch.randn(2, 6, 7, 7)
    target = conv(x).detach()
    out = torch.nn.functional.conv2d(x, q())
    loss = (out - target).pow(2).mean()
    loss.backward()
    assert q.log_s4.grad is not None and q.log_s4.grad.abs().sum() > 0
    _perturb(q)
    fake = q()
    assert fake.shape == conv.weight.shape
    assert torch.equal(fake.reshape(8, -1), _exported_dequant(q))


def test_adaround_regularizer_and_beta_schedule():
    q = AdaRoundQuantizer(_weight(), QuantSpec(bits=4), warmup=0.2)
    assert q.regularizer(0.1) is None  # warm-up
    assert q.beta(0.2) == pytest.approx(20.0) and q.beta(1.0) == pytest.approx(2.0)
    r_mid = q.regularizer(0.5)
    with torch.no_grad():
        q.V.copy_(torch.where(q.V >= 0, 10.0, -10.0))  # fully decided: h in {0, 1}
    assert float(q.regularizer(0.5).detach()) < 1e-6 < float(r_mid.detach())


def test_bad_input_errors():
    spec = QuantSpec(bits=4)
    w = _weight()
    with pytest.raises(ValueError, match="method='gptq'"):
        make_quantizer("gptq", w, spec)
    with pytest.raises(ValueError, match=r"options=\['beta_start'\].*method='flexround'"):
        make_quantizer("flexround", w, spec, {"beta_start": 3})
    with pytest.raises(TypeError, match="QuantSpec"):
        FlexRoundQuantizer(w, {"bits": 4})
    bad = w.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        FlexRoundQuantizer(bad, spec)
    with pytest.raises(ValueError, match="init='best'"):
        FlexRoundQuantizer(w, spec, init="best")
    with pytest.raises(ValueError, match="warmup=1.5"):
        AdaRoundQuantizer(w, spec, warmup=1.5)
    with pytest.raises(ValueError, match="group_size=16"):
        FlexRoundQuantizer(torch.randn(4, 24), QuantSpec(bits=4, granularity="group", group_size=16))
    with pytest.raises(ValueError, match="shape"):
        FlexRoundQuantizer(torch.randn(4), spec)
