"""Rounding methods come from one registry: each is one class that states its learning policy,
and the configuration, the command lines and both model families read it from there. A method
that exists only inside a test runs through the language-model and the MobileNetV2 engine."""

import pytest
import torch
from torch import nn

from fxkernels import QuantLinear, QuantSpec
from fxkernels.conv import QuantConv2d
from quantizer.api import quantize
from quantizer.config import QuantizeConfig
from quantizer.rounding import WeightQuantizer, make_quantizer, method_class, method_names, register_method
from quantizer.rounding import registry
from quantizer.rounding.base import init_grid, round_ste

from .conftest import tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def own_registry(monkeypatch):
    """Methods registered by the test disappear after it."""
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))


def test_builtin_methods_and_their_policies():
    assert method_names() == ("rtn", "flexround", "adaround", "signround")
    policy = {name: (c.learns, c.takes_init, c.keep_best, c.soft_while_learning, c.regularizer_weight)
              for name, c in ((n, method_class(n)) for n in method_names())}
    assert policy == {"rtn": (False, True, False, False, None), "flexround": (True, True, False, False, None),
                      "adaround": (True, True, False, True, 0.1), "signround": (True, False, True, False, None)}
    # Default steps: FlexRound by weight bits, SignRound 1/iters, AdaRound fixed.
    assert method_class("flexround").default_learning_rate(8, 100) == 1e-3
    assert method_class("signround").default_learning_rate(4, 250) == 1 / 250
    assert QuantizeConfig(method="adaround").learning_rate == 1e-2
    # The optimizer is the method's: Adam for FlexRound, signed SGD for SignRound.
    p = [{"params": [nn.Parameter(torch.zeros(3))], "lr": 0.1}]
    assert isinstance(method_class("flexround").make_optimizer(p, 0.1, 10), torch.optim.Adam)
    assert type(method_class("signround").make_optimizer(p, 0.1, 10)).__name__ == "SignSGD"


def test_unknown_methods_are_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"method='gptq'; expected one of \('rtn', 'flexround'"):
        method_class("gptq")
    with pytest.raises(ValueError, match="method='gptq'"):
        QuantizeConfig(method="gptq")
    with pytest.raises(ValueError, match="method='gptq'"):
        make_quantizer("gptq", torch.zeros(4, 8), QuantSpec(bits=4))


def test_malformed_policies_are_refused(own_registry):
    class NoInit(WeightQuantizer):
        method = "noinit"
        takes_init = True  # but the constructor has no init argument

        @classmethod
        def default_learning_rate(cls, bits, iters):
            return 0.1

    with pytest.raises(ValueError, match="NoInit.takes_init=True"):
        register_method(NoInit)

    class Keep(WeightQuantizer):
        method = "keep"
        keep_best = "yes"

        @classmethod
        def default_learning_rate(cls, bits, iters):
            return 0.1

    with pytest.raises(TypeError, match="Keep.keep_best='yes'"):
        register_method(Keep)

    class NoStep(WeightQuantizer):
        method = "nostep"

    with pytest.raises(ValueError, match="NoStep does not define default_learning_rate"):
        register_method(NoStep)

    class Clash(WeightQuantizer):
        method = "flexround"

    with pytest.raises(ValueError, match="method='flexround' is already registered by FlexRoundQuantizer"):
        register_method(Clash)
    with pytest.raises(TypeError, match="expected a WeightQuantizer subclass"):
        register_method(int)
    assert method_names() == ("rtn", "flexround", "adaround", "signround")


def _register_toy():
    """A whole rounding method in one class: round to nearest after a learned shift of each row's
    codes (at most half a step), by plain SGD, with a penalty pulling the shift to 0 and the best
    iterate kept. Calls to its policy hooks are counted on the class."""

    @register_method
    class RowShiftQuantizer(WeightQuantizer):
        """Row shift: a learned offset of each row's codes (toy method of the tests)"""

        method = "rowshift"
        keep_best = True
        regularizer_weight = 0.5
        calls = {"optimizer": 0, "regularizer": 0}

        def __init__(self, weight, spec, max_shift: float = 0.5):
            super().__init__(weight, spec)
            scale, zero = init_grid(self.weight, spec, "minmax")
            self.register_buffer("scale", scale)
            self.register_buffer("zero", zero.float())
            self.shift = nn.Parameter(torch.zeros(self.grid.n, 1, 1))
            self.max_shift = max_shift

        @classmethod
        def default_learning_rate(cls, bits, iters):
            return 0.05

        @classmethod
        def make_optimizer(cls, param_groups, lr, iters):
            cls.calls["optimizer"] += 1
            return torch.optim.SGD(param_groups, lr=lr)

        def project(self):
            with torch.no_grad():
                self.shift.clamp_(-self.max_shift, self.max_shift)

        def regularizer(self, progress):
            type(self).calls["regularizer"] += 1
            return self.shift.pow(2).mean()

        def scale_zero(self):
            return self.scale, self.zero

        def codes_float(self, scale, zero):
            v = self.grid.w3(self.weight) / self.grid.s3(scale) + self.shift
            return torch.clamp(round_ste(v) + self.grid.s3(zero), 0, self.spec.qmax)

    return RowShiftQuantizer


def test_a_method_defined_in_one_class_runs_through_the_language_model_engine(own_registry):
    toy = _register_toy()
    assert "rowshift" in method_names()
    cfg = QuantizeConfig(method="rowshift", weight=QuantSpec(bits=4, granularity="channel"), iters=6, nsamples=4,
                         seqlen=16, batch_size=2, progress=False, options={"max_shift": 0.25, "reg_weight": 0.2})
    assert cfg.learning_rate == 0.05 and cfg.rounding_options() == {"max_shift": 0.25}
    model = tiny_llama()
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    lines = []
    quantize(model, ids, cfg, log=lines.append)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 14
    assert toy.calls["optimizer"] == 2                    # one optimizer per block, the method's own
    assert toy.calls["regularizer"] == 2 * 7 * 6          # every layer, every step (reg_weight > 0)
    losses = [line for line in lines if ": loss " in line]
    assert len(losses) == 2 and all("block" in line for line in losses)

    # The command line offers it too.
    from quantizer.cli import build_parser
    assert build_parser().parse_args(["quantize", "--model", "m", "--method", "rowshift", "--out", "o"]).method \
        == "rowshift"


def test_a_method_defined_in_one_class_runs_through_the_mobilenet_engine(own_registry):
    from quantizer.vision.reconstruct_cnn import CNNQuantConfig, quantize_mobilenet

    from .test_vision import tiny_net

    toy = _register_toy()
    from quantizer.vision.mobilenetv2 import fold_batchnorm
    net = fold_batchnorm(tiny_net())
    calib = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    cfg = CNNQuantConfig(method="rowshift", iters=2, batch_size=4, eval_samples=4, bias_correction=False,
                         equalize=False)
    deployed, _, stats = quantize_mobilenet(net, calib, cfg, log=lambda m: None)
    assert len(stats) == 18 and toy.calls["optimizer"] == 18
    assert all(s["loss_after"] <= s["loss_before"] for s in stats)
    assert isinstance(deployed.features[5].conv[1][0], QuantConv2d)
