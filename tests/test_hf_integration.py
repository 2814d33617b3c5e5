"""transformers.AutoModelForCausalLM.from_pretrained on flexround checkpoints (quant_method 'flexround')."""

import json
import os
import subprocess
import sys

import pytest
import torch

import fxkernels
from fxkernels import QuantLinear, QuantSpec, load_quantized, replace_linears, save_quantized

from .conftest import tiny_llama

transformers = pytest.importorskip("transformers")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_tokenizer():
    """A 128-word word-level tokenizer matching tiny_llama's vocabulary (no hub access needed)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "</s>": 1, **{f"w{i}": i for i in range(2, 128)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")


@pytest.fixture
def saved(tmp_path):
    model = tiny_llama()
    model.config.attention_bias = False
    replace_linears(model, QuantSpec(4, "group", 16),
                    overrides={"*.down_proj": QuantSpec(8, "tensor", act_bits=8),
                               "*.o_proj": QuantSpec(3, "channel", symmetric=True)})
    path = save_quantized(model, str(tmp_path / "ckpt"), tokenizer=tiny_tokenizer())
    return model, path


def _qlayers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def test_from_pretrained_equals_load_quantized(saved):
    model, path = saved
    hf = transformers.AutoModelForCausalLM.from_pretrained(path)
    ours = load_quantized(path)
    assert set(_qlayers(hf)) == set(_qlayers(ours)) and len(_qlayers(hf)) == 14
    for name, layer in _qlayers(hf).items():
        other = ours.get_submodule(name)
        assert layer.spec == other.spec
        for buf in ("qweight", "scale", "zero"):
            a, b = getattr(layer, buf), getattr(other, buf)
            assert a.dtype == b.dtype and torch.equal(a, b), (name, buf)
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()  # tie kept
    ids = torch.randint(0, 128, (2, 11))
    with torch.no_grad():
        logits = hf(ids).logits
    assert torch.equal(logits, ours(ids).logits)
    assert torch.equal(logits, model(ids).logits)
    assert hf.is_quantized and hf.config.quantization_config.quant_method == "flexround"


def test_generate_and_tokenizer(saved):
    _, path = saved
    tok = transformers.AutoTokenizer.from_pretrained(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path)
    ours = load_quantized(path)
    ids = tok("w5 w9 w17 w3", return_tensors="pt").input_ids
    assert ids.tolist() == [[5, 9, 17, 3]]
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=tok.eos_token_id)
    out = hf.generate(ids, **kw)
    assert out.shape == (1, 10) and torch.equal(out, ours.generate(ids, **kw))
    assert isinstance(tok.decode(out[0, 4:]), str)


def test_fp32_bias_survives_a_half_dtype_request(tmp_path):
    model = tiny_llama()
    model.config.attention_bias = True
    model = transformers.LlamaForCausalLM(model.config).eval()
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.bias.normal_()
    replace_linears(model, QuantSpec(4, "channel"))
    path = save_quantized(model, str(tmp_path / "b"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    q = hf.model.layers[0].self_attn.q_proj
    assert q.bias.dtype == torch.float32 and q.scale.dtype == torch.float32 and q.qweight.dtype == torch.uint8
    assert torch.equal(q.bias, model.model.layers[0].self_attn.q_proj.bias)


def test_save_pretrained_round_trip_embeds_the_layer_list(saved, tmp_path):
    _, path = saved
    hf = transformers.AutoModelForCausalLM.from_pretrained(path)
    hf.save_pretrained(str(tmp_path / "resaved"))
    qc = json.load(open(tmp_path / "resaved" / "config.json"))["quantization_config"]
    assert qc["quant_method"] == "flexround" and "model.layers.0.mlp.down_proj" in qc["layers"]
    again = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "resaved"))
    ids = torch.randint(0, 128, (1, 7))
    assert torch.equal(again(ids).logits, hf(ids).logits)


def test_registration_is_lazy_and_works_after_a_late_transformers_import(saved):
    """`import fxkernels` must not import transformers; importing it later still registers."""
    _, path = saved
    code = ("import sys, fxkernels\n"
            "assert 'transformers' not in sys.modules, 'fxkernels imported transformers'\n"
            "import transformers, torch\n"
            f"m = transformers.AutoModelForCausalLM.from_pretrained({path!r})\n"
            "from fxkernels import QuantLinear\n"
            "assert isinstance(m.model.layers[1].mlp.up_proj, QuantLinear)\n"
            "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]


def test_register_is_idempotent():
    from fxkernels import hf
    from transformers.quantizers import auto

    assert hf.register() and hf.register()
    assert auto.AUTO_QUANTIZER_MAPPING["flexround"].__name__ == "FlexRoundHfQuantizer"


# -- clear errors -------------------------------------------------------------------------------
def _config_cls():
    from fxkernels.hf import _build_classes

    return _build_classes()[0]


def test_config_from_another_tool_is_refused(saved):
    _, path = saved
    FlexRoundConfig = _config_cls()
    with pytest.raises(ValueError, match="quant_method='gptq'; expected 'flexround'.*own loader"):
        FlexRoundConfig(quant_method="gptq", bits=4)
    with pytest.raises(ValueError, match="format_version=7.*upgrade flexround"):
        FlexRoundConfig(format_version=7)


def test_gptq_checkpoint_with_flexround_config_is_refused(saved, tmp_path):
    from fxkernels.export_gptq import export_gptq

    model = tiny_llama()
    replace_linears(model, QuantSpec(4, "group", 32, symmetric=True))
    gptq = export_gptq(model, str(tmp_path / "gptq"))
    FlexRoundConfig = _config_cls()
    with pytest.raises((ValueError, ImportError), match="GPTQ|GPTQConfig|optimum"):
        transformers.AutoModelForCausalLM.from_pretrained(gptq, quantization_config=FlexRoundConfig())
    with pytest.raises(ValueError, match="not a flexround one|quant_config.json is missing"):
        load_quantized(gptq)


def test_float_model_with_flexround_config_is_refused(tmp_path):
    model = tiny_llama()
    model.save_pretrained(str(tmp_path / "float"))
    FlexRoundConfig = _config_cls()
    with pytest.raises(ValueError, match="does not quantize while loading.*flexround quantize"):
        transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "float"),
                                                          quantization_config=FlexRoundConfig())


def test_missing_quant_config_json_points_to_the_fix(saved):
    _, path = saved
    os.remove(os.path.join(path, "quant_config.json"))
    with pytest.raises(ValueError, match="quant_config.json is missing.*fxkernels.load_quantized"):
        transformers.AutoModelForCausalLM.from_pretrained(path)


def test_newer_format_version_in_config_json_is_refused(saved):
    _, path = saved
    p = os.path.join(path, "config.json")
    cfg = json.load(open(p))
    cfg["quantization_config"]["format_version"] = fxkernels.FORMAT_VERSION + 1
    json.dump(cfg, open(p, "w"))
    with pytest.raises(ValueError, match="upgrade flexround"):
        transformers.AutoModelForCausalLM.from_pretrained(path)


def test_from_pretrained_keeps_input_rotations(tmp_path):
    model = tiny_llama()
    model.config.attention_bias = False
    replace_linears(model, QuantSpec(4, "channel"))
    for layer in model.model.layers:  # W8A8 down projections behind an online Hadamard rotation
        lin = torch.nn.Linear(layer.mlp.down_proj.in_features, layer.mlp.down_proj.out_features, bias=False)
        layer.mlp.down_proj = QuantLinear.from_linear(
            lin, QuantSpec(8, "tensor", act_bits=8, act_mode="static"), input_rotation=128,
            act_scale=torch.tensor([0.01]), act_zero=torch.tensor([3], dtype=torch.int32))
    path = save_quantized(model, str(tmp_path / "rot"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(path)
    assert {n: m.input_rotation for n, m in _qlayers(hf).items() if m.input_rotation} == {
        f"model.layers.{i}.mlp.down_proj": 128 for i in range(len(model.model.layers))}
    ids = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, model(ids).logits)
