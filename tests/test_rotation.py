"""Online Hadamard input rotation: the transform, QuantLinear with a rotation, checkpoints, the engine."""

import json
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxkernels
from fxkernels import QuantLinear, QuantSpec, load_quantized, reference, save_quantized
from fxkernels.rotation import check_rotation_block, default_rotation_block, hadamard_matrix, hadamard_transform

from .conftest import tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("block,n", [(2, 6), (16, 48), (128, 384), (512, 1536)])
def test_transform_is_the_orthogonal_block_hadamard(block, n):
    x = torch.randn(3, 5, n, dtype=torch.float64)
    h = hadamard_matrix(block, n)
    torch.testing.assert_close(hadamard_transform(x, block), x @ h.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(h @ h.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(hadamard_transform(hadamard_transform(x, block), block), x, rtol=0, atol=1e-12)
    # a spike is spread over its whole block: the reason for rotating outlier tokens
    spike = torch.zeros(n, dtype=torch.float64)
    spike[1] = 100.0
    assert float(hadamard_transform(spike, block).abs().max()) == pytest.approx(100.0 / block ** 0.5)


def test_block_sizes_are_checked():
    assert default_rotation_block(1536) == 512 and default_rotation_block(11008) == 256
    assert default_rotation_block(96) == 32 and default_rotation_block(27) == 0
    for bad in (0, 3, 24, True, 2.0):
        with pytest.raises(ValueError, match="expected a power of two"):
            check_rotation_block(bad, 64)
    with pytest.raises(ValueError, match="block=128 does not divide in_features=96"):
        check_rotation_block(128, 96)
    with pytest.raises(ValueError, match="input_rotation: block=3"):
        QuantLinear(64, 8, QuantSpec(8, "tensor"), input_rotation=3)


@pytest.mark.parametrize("spec", [QuantSpec(8, "tensor", act_bits=8, act_mode="static"), QuantSpec(4, "channel"),
                                  QuantSpec(8, "channel", act_bits=8)])
def test_rotated_layer_computes_the_unrotated_linear(spec):
    torch.manual_seed(0)
    lin = nn.Linear(128, 24)
    x = torch.randn(4, 7, 128)
    x[0, 0, 5] = 300.0  # a token outlier in one channel, as an attention sink's down_proj input
    static = spec.act_mode == "static"
    kw = {}
    if static:
        xr = hadamard_transform(x, 64)
        kw = dict(act_scale=torch.tensor([float(xr.abs().max()) / 127]), act_zero=torch.tensor([0], dtype=torch.int32))
    q = QuantLinear.from_linear(lin, spec, input_rotation=64, **kw)
    assert q.input_rotation == 64 and "input_rotation=64" in repr(q)
    # stored codes quantize W H^T; float_weight() undoes the rotation
    w = lin.weight.detach()
    assert (q.float_weight() - w).norm() < 0.15 * w.norm()  # 4-bit rounding error at most
    assert (q.dequantized_weight() - w).norm() > 0.5 * w.norm()
    y = q(x)
    # the reference math on the rotated input
    xr = hadamard_transform(x.reshape(-1, 128), 64)
    if spec.act_bits:
        xq, sa, za = reference.quantize_act(xr, q.act_scale if static else None, q.act_zero if static else None)
        xr = (xq.float() - za.float()[:, None]) * sa[:, None]
    want = F.linear(xr.double(), q.dequantized_weight().double(), lin.bias.detach().double()).float().reshape(4, 7, 24)
    torch.testing.assert_close(y, want, rtol=0, atol=1e-4 * float(want.abs().max()))
    if not spec.act_bits:  # weight-only: exactly the float layer with float_weight()
        torch.testing.assert_close(y, F.linear(x, q.float_weight(), lin.bias), rtol=0, atol=1e-4)


def test_rotation_lowers_static_int8_error_on_token_outliers():
    torch.manual_seed(0)
    lin = nn.Linear(256, 64)
    x = torch.randn(64, 256)
    x[0, 7] = 400.0  # one sink token, one channel
    with torch.no_grad():
        ref = lin(x)
    errs = {}
    for rot in (0, 256):
        xr = hadamard_transform(x, rot) if rot else x
        grid = dict(act_scale=torch.tensor([float(xr.abs().max()) / 127]),
                    act_zero=torch.tensor([0], dtype=torch.int32))
        spec = QuantSpec(8, "tensor", act_bits=8, act_mode="static")
        q = QuantLinear.from_linear(lin, spec, input_rotation=rot, **grid)
        errs[rot] = float((q(x) - ref)[1:].pow(2).mean())  # the ordinary tokens
    assert errs[256] < 0.05 * errs[0]


def test_checkpoint_keeps_the_rotation_and_gptq_export_refuses_it(tmp_path):
    from fxkernels.export_gptq import GPTQExportError, export_gptq

    model = tiny_llama()
    ids = torch.randint(0, 128, (1, 12))
    for layer in model.model.layers:
        layer.mlp.down_proj = QuantLinear.from_linear(layer.mlp.down_proj, QuantSpec(4, "channel"), input_rotation=128)
    with torch.no_grad():
        want = model(ids).logits
    path = save_quantized(model, str(tmp_path / "ckpt"))
    cfg = json.load(open(os.path.join(path, "quant_config.json")))
    assert cfg["format_version"] == fxkernels.FORMAT_VERSION == 3
    assert cfg["layers"]["model.layers.0.mlp.down_proj"]["input_rotation"] == 128
    assert cfg["layers"]["model.layers.0.mlp.down_proj"]["kind"] == "linear"
    loaded = load_quantized(path)
    assert loaded.model.layers[1].mlp.down_proj.input_rotation == 128
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, want)
    with pytest.raises(GPTQExportError, match="down_proj.*input_rotation=128"):
        export_gptq(model, str(tmp_path / "g"))
    from quantizer.inspect_ckpt import inspect_checkpoint
    acts = {r["name"]: r["act"] for r in inspect_checkpoint(path)["layers"]}
    assert acts == {f"model.layers.{i}.mlp.down_proj": "-, Hadamard 128" for i in range(2)}


def test_version_1_checkpoints_still_load(tmp_path):
    from fxkernels import replace_linears

    model = replace_linears(tiny_llama(), QuantSpec(4, "channel"))
    path = save_quantized(model, str(tmp_path / "v1"))
    p = os.path.join(path, "quant_config.json")
    cfg = json.load(open(p))
    cfg["format_version"] = 1
    for entry in cfg["layers"].values():  # version 1 had no kinds (and no rotations)
        del entry["kind"]
    json.dump(cfg, open(p, "w"))
    ids = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        assert torch.equal(load_quantized(path)(ids).logits, model(ids).logits)


def test_engine_rotates_down_projections_for_w8a8_only():
    from quantizer.api import quantize
    from quantizer.config import QuantizeConfig

    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    base = dict(method="flexround", weight=QuantSpec(8, "tensor"), iters=3, nsamples=4, seqlen=16, batch_size=2,
                progress=False)
    rotated, logs = {}, {}
    for name, kw in {"w8a8": dict(act_bits=8), "w8a8_none": dict(act_bits=8, rotate=()),
                     "w8": dict(), "w8_forced": dict(rotate=("down_proj",))}.items():
        m = tiny_llama()
        logs[name] = []
        quantize(m, ids, QuantizeConfig(**base, **kw), log=logs[name].append)
        rotated[name] = {n: mod.input_rotation for n, mod in m.named_modules()
                         if isinstance(mod, QuantLinear) and mod.input_rotation}
    down = {"model.layers.0.mlp.down_proj": 128, "model.layers.1.mlp.down_proj": 128}
    assert len(rotated["w8a8"]) == 14 and {n: b for n, b in rotated["w8a8"].items() if b == 128} == down
    assert all(b == 64 for n, b in rotated["w8a8"].items() if n not in down)  # hidden size 64
    assert rotated["w8a8_none"] == {} and rotated["w8"] == {}
    assert rotated["w8_forced"] == down
    assert "block 1/2: Hadamard-rotated the inputs of 7 linears (blocks 64, 128)" in logs["w8a8"]
    assert not any("Hadamard" in line for line in logs["w8a8_none"])
    with pytest.raises(ValueError, match=r"rotate=\(1,\); expected None"):
        QuantizeConfig(rotate=[1])
    with pytest.raises(ValueError, match="rotate matches .*q_proj.*in_features=72 has no power-of-two factor"):
        # a hidden size with no power-of-two factor >= 16 cannot be rotated on request
        m = tiny_llama(hidden=72)
        quantize(m, ids, QuantizeConfig(**{**base, "rotate": ("q_proj",)}), log=lambda s: None)
