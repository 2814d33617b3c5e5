"""The layer-kind registry: entries name their kind, every loader builds modules through it."""

import json
import os

import pytest
import torch
from torch import nn

import fxkernels
from fxkernels import QuantLinear, QuantSpec, load_quantized, save_quantized
from fxkernels.checkpoint import CheckpointError, checkpoint_layers
from fxkernels.conv import ChannelClippedReLU, QuantConv2d, load_quantized_cnn, replace_convs
from fxkernels.layers import (LayerKind, install_layers, layer_entries, layer_entry, layer_from_entry, layer_kinds,
                              register_layer_kind, upgrade_entries)

from .fixtures.make_checkpoints import cnn_skeleton

V2 = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "format_v2")


def _cnn():
    torch.manual_seed(0)
    net = cnn_skeleton()
    replace_convs(net, QuantSpec(4, "channel"), overrides={"0": QuantSpec(8, "tensor")})
    net[1] = ChannelClippedReLU(8, upper=3.0)
    net[7] = QuantLinear.from_linear(net[7], QuantSpec(8, "channel"))
    return net


def test_builtin_kinds_and_entries():
    assert {"linear", "conv2d", "channel_clipped_relu"} <= set(layer_kinds())
    entries = layer_entries(_cnn())
    assert {n: e["kind"] for n, e in entries.items()} == {"0": "conv2d", "1": "channel_clipped_relu", "2": "conv2d",
                                                          "4": "conv2d", "7": "linear"}
    assert entries["2"]["groups"] == 8 and entries["1"] == {"kind": "channel_clipped_relu", "channels": 8}
    with pytest.raises(ValueError, match="Conv2d is not a registered layer kind"):
        layer_entry(nn.Conv2d(3, 3, 1))


def test_cnn_saves_and_loads_through_the_generic_functions(tmp_path):
    net = _cnn()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        want = net(x)
    path = save_quantized(net, str(tmp_path / "ck"))
    with open(os.path.join(path, "quant_config.json")) as f:
        cfg = json.load(f)
    assert cfg["format_version"] == fxkernels.FORMAT_VERSION == 3
    assert "conv_layers" not in cfg and "clip_layers" not in cfg
    assert cfg["layers"]["4"]["kind"] == "conv2d" and cfg["layers"]["7"]["kind"] == "linear"
    for load in (lambda: load_quantized(path, model=cnn_skeleton()), lambda: load_quantized_cnn(path, cnn_skeleton())):
        back = load()
        assert isinstance(back[4], QuantConv2d) and isinstance(back[1], ChannelClippedReLU)
        assert float(back[1].upper[0]) == 3.0
        with torch.no_grad():
            assert torch.equal(back(x), want)


def test_linear_only_checkpoint_is_not_a_cnn(tmp_path):
    model = nn.Sequential(QuantLinear.from_linear(nn.Linear(16, 8), QuantSpec(4, "channel")))
    path = save_quantized(model, str(tmp_path / "ck"))
    assert {e["kind"] for e in checkpoint_layers(path).values()} == {"linear"}
    with pytest.raises(CheckpointError, match="holds no conv2d layers"):
        load_quantized_cnn(path, nn.Sequential(nn.Linear(16, 8)))


def test_a_model_with_only_clip_layers_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no quantized layers"):
        save_quantized(nn.Sequential(ChannelClippedReLU(4)), str(tmp_path / "ck"))


def test_version_2_tables_become_kinded_entries():
    with open(os.path.join(V2, "cnn", "quant_config.json")) as f:
        raw = json.load(f)
    assert "kind" not in raw["layers"]["7"]
    entries = upgrade_entries(raw)
    assert {n: e["kind"] for n, e in entries.items()} == {"0": "conv2d", "1": "channel_clipped_relu", "2": "conv2d",
                                                          "4": "conv2d", "7": "linear"}
    assert entries["1"]["channels"] == 8 and "kind" not in raw["layers"]["7"]  # the input is left alone
    assert checkpoint_layers(os.path.join(V2, "cnn")) == entries


def test_unknown_kind_is_refused_naming_the_known_ones():
    with pytest.raises(CheckpointError, match=r"kind='lstm' is unknown.*'conv2d'.*'linear'.*upgrade flexround"):
        layer_from_entry({"kind": "lstm"})


def test_entries_without_kind_are_linear_and_resume_files_round_trip():
    layer = QuantLinear.from_linear(nn.Linear(32, 8), QuantSpec(4, "group", 16), input_rotation=16)
    entry = layer_entry(layer)
    assert entry["kind"] == "linear"
    old = {k: v for k, v in entry.items() if k != "kind"}  # what layer.entry() wrote before the registry
    for e in (entry, old):
        rebuilt = layer_from_entry(e)
        assert type(rebuilt) is QuantLinear and rebuilt.input_rotation == 16 and rebuilt.spec == layer.spec
        rebuilt.load_state_dict(layer.state_dict())
        x = torch.randn(3, 32)
        assert torch.equal(rebuilt(x), layer(x))


def test_buffers_stay_fp32_under_another_default_dtype():
    """transformers builds models under the load dtype as torch's default."""
    spec = QuantSpec(8, "tensor", act_bits=8, act_mode="static")
    model = nn.Sequential(nn.Linear(16, 8), nn.Conv2d(4, 4, 1))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        install_layers(model, {"0": {"kind": "linear", "in_features": 16, "out_features": 8, "bias": True,
                                     "spec": spec.to_dict()},
                               "1": {"kind": "conv2d", **QuantConv2d.from_conv(nn.Conv2d(4, 4, 1).float(), spec,
                                                                               act_scale=torch.tensor([0.1]),
                                                                               act_zero=torch.tensor([0])).entry()}})
    finally:
        torch.set_default_dtype(previous)
    for layer in model:
        assert layer.bias.dtype == torch.float32 and layer.act_scale.dtype == torch.float32
        assert layer.scale.dtype == torch.float32 and layer.zero.dtype == torch.int32


def test_install_checks_type_and_shape():
    entry = {"kind": "linear", "in_features": 16, "out_features": 8, "bias": False,
             "spec": QuantSpec(4, "channel").to_dict()}
    with pytest.raises(CheckpointError, match=r"layer '0' is 16->4 in the model but 16->8 in the checkpoint"):
        install_layers(nn.Sequential(nn.Linear(16, 4)), {"0": entry})
    with pytest.raises(CheckpointError, match=r"layer '0' is a Conv2d in the model; .* kind 'linear', which "
                                              r"replaces Linear"):
        install_layers(nn.Sequential(nn.Conv2d(16, 8, 1)), {"0": entry})
    with pytest.raises(CheckpointError, match=r"layer 'x' of the checkpoint is not in the model"):
        install_layers(nn.Sequential(nn.Linear(16, 8)), {"x": entry})
    model = install_layers(nn.Sequential(nn.Linear(16, 8, device="meta")), {"0": entry})
    assert type(model[0]) is QuantLinear and model[0].qweight.device.type == "meta"  # the float layer's device


class _Scale(nn.Module):
    """A toy quantized kind: one int8 code per channel times a scale."""

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("code", torch.zeros(channels, dtype=torch.int8))
        self.register_buffer("step", torch.ones(1))

    def forward(self, x):
        return x * (self.code.float() * self.step)


def test_a_new_kind_is_one_registration(tmp_path):
    register_layer_kind(LayerKind("toy_scale", _Scale, (nn.Identity,), build=lambda e, d: _Scale(e["channels"]).to(d),
                                  describe=lambda m: {"channels": m.code.numel()}, mismatch=lambda old, e: None,
                                  weight_shape=lambda e: (e["channels"], 1)))
    try:
        model = nn.Sequential(_Scale(4))
        model[0].code.copy_(torch.tensor([1, -2, 3, 4], dtype=torch.int8))
        model[0].step.fill_(0.5)
        path = save_quantized(model, str(tmp_path / "ck"))
        back = load_quantized(path, model=nn.Sequential(nn.Identity()))
        assert type(back[0]) is _Scale
        assert torch.equal(back(torch.ones(1, 4)), torch.tensor([[0.5, -1.0, 1.5, 2.0]]))
        with pytest.raises(ValueError, match="_Scale is already registered as kind 'toy_scale'"):
            register_layer_kind(LayerKind("other", _Scale, (), build=None, describe=None, mismatch=None))
    finally:
        from fxkernels import layers
        layers._KINDS.pop("toy_scale", None)


def test_inspect_lists_every_quantized_kind():
    from quantizer.inspect_ckpt import inspect_checkpoint

    info = inspect_checkpoint(os.path.join(V2, "cnn"))
    rows = {r["name"]: r for r in info["layers"]}
    assert set(rows) == {"0", "2", "4", "7"}  # the clip layer "1" holds no quantized weight
    assert (rows["2"]["kind"], rows["2"]["out_features"], rows["2"]["in_features"]) == ("conv2d", 8, 9)
    assert rows["4"]["act"] == "A8 static" and rows["7"]["kind"] == "linear"
    assert info["totals"]["float_tensors"] == 1  # the clip layer's upper bounds


def test_malformed_entry_is_refused_with_its_type(tmp_path):
    model = nn.Sequential(QuantLinear.from_linear(nn.Linear(16, 8), QuantSpec(4, "channel")))
    path = save_quantized(model, str(tmp_path / "ck"))
    cfg_path = os.path.join(path, "quant_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["layers"]["0"] = [16, 8]
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    with pytest.raises(CheckpointError, match="layer '0': layer entry is a list; expected a JSON object"):
        load_quantized(path, model=nn.Sequential(nn.Linear(16, 8)))
