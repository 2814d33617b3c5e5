"""save_quantized / load_quantized: bit-identical round trips and clear errors for bad files."""

import json
import os

import pytest
import torch
from torch import nn

import fxkernels
from fxkernels import QuantLinear, QuantSpec, load_quantized, replace_linears, save_quantized
from fxkernels.checkpoint import CheckpointError

from .conftest import tiny_llama


@pytest.fixture
def saved_llama(tmp_path):
    model = tiny_llama()
    replace_linears(model, QuantSpec(4, "group", 16), overrides={"*.down_proj": QuantSpec(8, "tensor", act_bits=8)})
    path = save_quantized(model, str(tmp_path / "ckpt"))
    return model, path


def test_hf_round_trip_is_bit_identical(saved_llama):
    model, path = saved_llama
    loaded = load_quantized(path)
    ids = torch.randint(0, 128, (2, 9))
    assert torch.equal(model(ids).logits, loaded(ids).logits)
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            other = loaded.get_submodule(name)
            assert isinstance(other, QuantLinear) and other.spec == m.spec
            assert torch.equal(other.qweight, m.qweight) and other.qweight.dtype == m.qweight.dtype
    assert not any(p.device.type == "meta" for p in loaded.parameters())
    assert not any(b.device.type == "meta" for b in loaded.buffers())


def test_checkpoint_files_are_safetensors_and_json(saved_llama):
    _, path = saved_llama
    assert sorted(f for f in os.listdir(path) if not f.startswith("tokenizer")) == \
        ["config.json", "model.safetensors", "quant_config.json"]
    cfg = json.load(open(os.path.join(path, "quant_config.json")))
    assert cfg["quant_method"] == "flexround" and cfg["format_version"] == fxkernels.FORMAT_VERSION
    assert cfg["layers"]["model.layers.0.mlp.down_proj"]["spec"]["act_bits"] == 8
    hf = json.load(open(os.path.join(path, "config.json")))
    assert hf["quantization_config"]["quant_method"] == "flexround"


def test_plain_module_needs_a_skeleton(tmp_path):
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    replace_linears(model, QuantSpec(8, "channel"), skip=())
    path = save_quantized(model, str(tmp_path / "seq"))
    with pytest.raises(CheckpointError, match="no config.json.*pass model="):
        load_quantized(path)
    skeleton = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).to("meta")
    loaded = load_quantized(path, model=skeleton)
    x = torch.randn(4, 16)
    assert torch.equal(model(x), loaded(x))


def test_save_is_atomic_and_overwrites(tmp_path):
    model = nn.Sequential(nn.Linear(16, 8))
    replace_linears(model, QuantSpec(4, "channel"), skip=())
    path = str(tmp_path / "ck")
    save_quantized(model, path)
    save_quantized(model, path)  # overwrite in place
    assert sorted(os.listdir(tmp_path)) == ["ck"]  # no temp dirs left behind


def test_save_refuses_float_model(tmp_path):
    with pytest.raises(ValueError, match="no QuantLinear layers"):
        save_quantized(nn.Linear(4, 4), str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()


def _rewrite_config(path, **changes):
    p = os.path.join(path, "quant_config.json")
    cfg = json.load(open(p))
    cfg.update(changes)
    json.dump(cfg, open(p, "w"))


def test_newer_format_version_is_refused(saved_llama):
    _, path = saved_llama
    _rewrite_config(path, format_version=fxkernels.FORMAT_VERSION + 1)
    with pytest.raises(CheckpointError, match=rf"format_version={fxkernels.FORMAT_VERSION + 1} .*upgrade"):
        load_quantized(path)


def test_other_tools_config_is_refused(saved_llama):
    _, path = saved_llama
    _rewrite_config(path, quant_method="gptq")
    with pytest.raises(CheckpointError, match="quant_method='gptq'"):
        load_quantized(path)


def test_truncated_weights_are_reported(saved_llama):
    _, path = saved_llama
    f = os.path.join(path, "model.safetensors")
    data = open(f, "rb").read()
    open(f, "wb").write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_quantized(path)


def test_corrupt_json_is_reported(saved_llama):
    _, path = saved_llama
    open(os.path.join(path, "quant_config.json"), "w").write("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_quantized(path)


def test_mismatched_architecture_is_reported(tmp_path):
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    replace_linears(model, QuantSpec(8, "channel"), skip=())
    path = save_quantized(model, str(tmp_path / "seq"))
    with pytest.raises(CheckpointError, match=r"layer '0' is 16->64 in the model but 16->32"):
        load_quantized(path, model=nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 8)))
    with pytest.raises(CheckpointError, match="layer '2' of the checkpoint is not in the model"):
        load_quantized(path, model=nn.Sequential(nn.Linear(16, 32)))


def test_missing_directory_is_reported(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_quantized(str(tmp_path / "nope"))
    with pytest.raises(CheckpointError, match="quant_config.json is missing"):
        load_quantized(str(tmp_path))
