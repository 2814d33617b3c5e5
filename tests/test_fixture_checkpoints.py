"""Checkpoints written by an earlier release still load and compute what they computed then.

tests/fixtures/format_v2/ was written by the format-version-2 writer (see
tests/fixtures/make_checkpoints.py); ``expected.json`` beside each checkpoint holds the inputs,
the outputs of the model that was saved, and per-layer sums of its dequantized weights.
"""

import json
import os

import pytest
import torch

from fxkernels import QuantLinear, load_quantized
from fxkernels.checkpoint import read_quant_config
from fxkernels.conv import ChannelClippedReLU, QuantConv2d, load_quantized_cnn

from .fixtures.make_checkpoints import cnn_skeleton, linear_skeleton

V2 = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "format_v2")


def _expected(name: str) -> dict:
    with open(os.path.join(V2, name, "expected.json")) as f:
        return json.load(f)


def _check(model: torch.nn.Module, exp: dict, dtype=torch.float32) -> None:
    # Dequantized weights are exact functions of the stored codes: equal to double rounding.
    sums = {n: float(m.dequantized_weight().double().sum()) for n, m in model.named_modules()
            if hasattr(m, "dequantized_weight")}
    assert sums.keys() == exp["weight_sums"].keys()
    for name, want in exp["weight_sums"].items():
        assert sums[name] == pytest.approx(want, rel=1e-9, abs=1e-9), name
    x = torch.tensor(exp["input"], dtype=dtype)
    with torch.no_grad():
        y = model(x)
    y = (y.logits if hasattr(y, "logits") else y).float()
    want = torch.tensor(exp["output"])
    # Kernels differ from the writer's in fp32 summation order only (and, through that, at most a
    # rare int8 activation code at a rounding boundary).
    tol = 2e-3 * float(want.abs().max())
    assert y.shape == want.shape and float((y - want).abs().max()) <= tol


def test_format_v2_linear_checkpoint_loads():
    assert read_quant_config(os.path.join(V2, "linear"))["format_version"] == 2
    model = load_quantized(os.path.join(V2, "linear"), model=linear_skeleton())
    kinds = [type(m) for m in model]
    assert kinds[0] is QuantLinear and kinds[2] is QuantLinear and kinds[4] is QuantLinear
    assert model[0].spec.granularity == "group" and model[0].spec.group_size == 32 and model[0].bias is not None
    assert model[2].spec.act_mode == "static" and model[2].act_scale is not None
    assert model[4].input_rotation == 32 and model[4].bias is None
    _check(model, _expected("linear"))


def test_format_v2_cnn_checkpoint_loads():
    model = load_quantized_cnn(os.path.join(V2, "cnn"), cnn_skeleton())
    assert isinstance(model[0], QuantConv2d) and isinstance(model[2], QuantConv2d) and model[2].groups == 8
    assert isinstance(model[1], ChannelClippedReLU) and model[1].upper[0] == 2.0
    assert model[4].spec.act_mode == "static" and isinstance(model[7], QuantLinear)
    _check(model, _expected("cnn"))


def test_format_v2_hf_checkpoint_loads():
    pytest.importorskip("transformers")
    exp = _expected("llama")
    model = load_quantized(os.path.join(V2, "llama"))
    assert model.model.layers[0].mlp.down_proj.spec.act_bits == 8
    _check(model, exp, dtype=torch.long)


def test_format_v2_hf_checkpoint_loads_with_from_pretrained():
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(V2, "llama"))
    assert isinstance(model.model.layers[0].self_attn.q_proj, QuantLinear)
    _check(model, _expected("llama"), dtype=torch.long)
