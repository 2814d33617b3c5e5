"""GPTQ-layout export: an independent unpacker recovers our dequantized weights exactly.

The export rounds our fp32 scales to fp16 (GPTQ stores fp16 scales), so the comparison is against
``fxkernels.dequantize`` with ``scale.half().float()``: the equality is then exact, bit for bit.
"""

import json
import os

import pytest
import torch

from fxkernels import QuantLinear, QuantSpec, dequantize, replace_linears, save_quantized
from fxkernels.export_gptq import GPTQExportError, export_gptq

from . import gptq_reference_unpack as ref
from .conftest import tiny_llama

CASES = [
    ("w4-g32-asym", QuantSpec(4, "group", 32), "gptq"),
    ("w4-g32-sym", QuantSpec(4, "group", 32, symmetric=True), "gptq"),
    ("w4-channel-asym", QuantSpec(4, "channel"), "gptq"),
    ("w4-channel-sym", QuantSpec(4, "channel", symmetric=True), "gptq"),
    ("w4-tensor-asym", QuantSpec(4, "tensor"), "gptq"),
    ("w8-channel-asym", QuantSpec(8, "channel"), "gptq"),
    ("w8-g64-sym", QuantSpec(8, "group", 64, symmetric=True), "gptq"),
    ("w2-g32-asym-v2", QuantSpec(2, "group", 32), "gptq_v2"),
    ("w4-g32-asym-v2", QuantSpec(4, "group", 32), "gptq_v2"),
]


def _quantized(spec, skip=("lm_head",), **kw):
    model = tiny_llama(**kw)
    replace_linears(model, spec, skip=skip)
    return model


def _expected(layer: QuantLinear) -> torch.Tensor:
    return dequantize(layer.qweight, layer.scale.half().float(), layer.zero, layer.spec, layer.in_features)


def _force_v1_representable(model):
    """RTN asym may give zero == 0 (row with min >= 0), which v1 cannot store; nudge it for the v1 cases."""
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.zero.clamp_(min=1)


@pytest.mark.parametrize("label,spec,fmt", CASES, ids=[c[0] for c in CASES])
def test_reference_unpacker_recovers_dequantized_weights(tmp_path, label, spec, fmt):
    model = _quantized(spec)
    if fmt == "gptq":
        _force_v1_representable(model)
    ckpt = save_quantized(model, str(tmp_path / "ckpt"))
    out = export_gptq(ckpt, str(tmp_path / "gptq"), checkpoint_format=fmt)
    weights = ref.read_gptq_dir(out)
    qlayers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert set(weights) == set(qlayers) and len(weights) == 14
    for name, layer in qlayers.items():
        assert torch.equal(weights[name], _expected(layer)), name
    qc = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["bits"] == spec.bits and qc["desc_act"] is False
    assert qc["group_size"] == (spec.group_size if spec.granularity == "group" else -1)
    assert qc["sym"] is spec.symmetric and qc["checkpoint_format"] == fmt
    assert json.load(open(os.path.join(out, "quantize_config.json"))) == qc


def test_layout_shapes_dtypes_and_v1_zero_offset(tmp_path):
    from safetensors.torch import load_file

    model = _quantized(QuantSpec(4, "group", 32, symmetric=True))
    out = export_gptq(model, str(tmp_path / "gptq"))
    t = load_file(os.path.join(out, "model.safetensors"))
    name = "model.layers.0.mlp.down_proj"  # K = 128, N = 64
    assert t[name + ".qweight"].dtype == torch.int32 and t[name + ".qweight"].shape == (128 // 8, 64)
    assert t[name + ".qzeros"].dtype == torch.int32 and t[name + ".qzeros"].shape == (128 // 32, 64 // 8)
    assert t[name + ".scales"].dtype == torch.float16 and t[name + ".scales"].shape == (128 // 32, 64)
    assert torch.equal(t[name + ".g_idx"], torch.arange(128, dtype=torch.int32) // 32)
    # Symmetric 4-bit: zero 8 stored as 7 in every nibble (the classic GPTQ v1 word 0x77777777).
    assert (t[name + ".qzeros"] == 0x77777777).all()
    # Float tensors go through unchanged; the tied lm_head is left to tie_word_embeddings.
    assert torch.equal(t["model.embed_tokens.weight"], model.model.embed_tokens.weight)
    assert t["model.norm.weight"].dtype == torch.float32 and "lm_head.weight" not in t


def test_first_column_lands_in_the_lowest_bits(tmp_path):
    """A hand-built layer: code of column k is k % 16 -> word 0 of each column is 0x76543210."""
    from safetensors.torch import load_file

    model = tiny_llama()
    for n, m in list(model.named_modules()):
        if isinstance(m, torch.nn.Linear) and "layers" in n:
            codes = (torch.arange(m.in_features) % 16).repeat(m.out_features, 1)
            spec = QuantSpec(4, "channel")
            q = QuantLinear.from_codes(codes, torch.full((m.out_features,), 0.5), torch.full((m.out_features,), 3,
                                       dtype=torch.int32), spec)
            parent, _, leaf = n.rpartition(".")
            setattr(model.get_submodule(parent), leaf, q)
    out = export_gptq(model, str(tmp_path / "g"))
    t = load_file(os.path.join(out, "model.safetensors"))
    qw = t["model.layers.0.self_attn.q_proj.qweight"]
    assert (qw[0] == 0x76543210).all()
    assert (qw[1].view(torch.int32) == torch.tensor(0xFEDCBA98 - 2 ** 32, dtype=torch.int32)).all()
    assert (t["model.layers.0.self_attn.q_proj.qzeros"] == 0x22222222).all()  # zero 3 stored as 2 (v1)
    assert (t["model.layers.0.self_attn.q_proj.scales"] == 0.5).all()


def test_exported_directory_runs_as_a_float_model(tmp_path):
    """Rebuilding nn.Linear weights from the GPTQ files gives the quantized model's logits."""
    transformers = pytest.importorskip("transformers")
    model = _quantized(QuantSpec(4, "group", 32))
    _force_v1_representable(model)
    out = export_gptq(model, str(tmp_path / "g"))
    for m in model.modules():  # the same fp16-rounded scales the export wrote
        if isinstance(m, QuantLinear):
            m.scale.copy_(m.scale.half().float())
    cfg = transformers.AutoConfig.from_pretrained(out)
    assert cfg.quantization_config["quant_method"] == "gptq"
    del cfg.quantization_config
    float_model = transformers.LlamaForCausalLM(cfg).eval()
    missing, unexpected = float_model.load_state_dict(ref.float_state_dict(out), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    float_model.tie_weights()
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        a, b = model(ids).logits, float_model(ids).logits
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (a - b).abs().max()


def test_transformers_parses_the_quantization_config(tmp_path):
    transformers = pytest.importorskip("transformers")
    out = export_gptq(_quantized(QuantSpec(4, "group", 32, symmetric=True)), str(tmp_path / "g"))
    qc = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    cfg = transformers.GPTQConfig.from_dict(qc)
    assert cfg.bits == 4 and cfg.group_size == 32 and cfg.sym and cfg.format == "gptq" and not cfg.desc_act


def test_tokenizer_and_extra_files_are_copied(tmp_path):
    model = _quantized(QuantSpec(4, "channel", symmetric=True))
    ckpt = save_quantized(model, str(tmp_path / "ckpt"))
    with open(os.path.join(ckpt, "generation_config.json"), "w") as f:
        f.write('{"do_sample": false}')
    out = export_gptq(ckpt, str(tmp_path / "g"))
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors",
                                       "quantize_config.json"]
    assert not any(n.startswith(".tmp") for n in os.listdir(tmp_path))


def test_partially_quantized_blocks_name_their_float_modules(tmp_path):
    model = _quantized(QuantSpec(4, "group", 32, symmetric=True), skip=("lm_head", "down_proj"))
    out = export_gptq(model, str(tmp_path / "g"))
    qc = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    assert qc["block_name_to_quantize"] == "model.layers"
    assert "mlp.down_proj" not in qc["modules_in_block_to_quantize"][0]
    assert len(qc["modules_in_block_to_quantize"][0]) == 6
    assert list(qc["dynamic"]) == [r"-:model\.layers\.\d+\.mlp\.down_proj$"]


# -- refusals ---------------------------------------------------------------------------------
@pytest.mark.parametrize("spec,match", [
    (QuantSpec(8, "tensor", act_bits=8, act_mode="dynamic"), "weight-only.*--act-bits"),
    (QuantSpec(3, "channel"), "bits=3.*--bits 4"),
    (QuantSpec(6, "channel"), "bits=6"),
    (QuantSpec(4, "group", 16), "group_size=16.*32, 64 or 128"),
])
def test_unsupported_formats_are_refused(tmp_path, spec, match):
    with pytest.raises(GPTQExportError, match=match):
        export_gptq(_quantized(spec), str(tmp_path / "g"))
    assert not (tmp_path / "g").exists()


def test_odd_out_features_is_refused(tmp_path):
    model = tiny_llama()
    # intermediate 132: gate/up have N = 132, not a multiple of 8 (4-bit zero points per int32)
    transformers = pytest.importorskip("transformers")
    cfg = model.config
    cfg.intermediate_size = 132
    model = transformers.LlamaForCausalLM(cfg).eval()
    replace_linears(model, QuantSpec(4, "channel"))
    with pytest.raises(GPTQExportError, match="out_features N=132.*multiple of 8"):
        export_gptq(model, str(tmp_path / "g"))


def test_zero_point_zero_needs_v2(tmp_path):
    model = _quantized(QuantSpec(4, "channel"))
    layer = model.model.layers[1].mlp.up_proj
    layer.zero[3] = 0
    with pytest.raises(GPTQExportError, match="up_proj.*zero point.*equal to 0.*gptq_v2"):
        export_gptq(model, str(tmp_path / "g"))
    out = export_gptq(model, str(tmp_path / "g2"), checkpoint_format="gptq_v2")
    assert torch.equal(ref.read_gptq_dir(out)["model.layers.1.mlp.up_proj"], _expected(layer))


def test_mixed_bits_and_quantized_lm_head_are_refused(tmp_path):
    model = tiny_llama()
    replace_linears(model, QuantSpec(4, "channel"), overrides={"*.down_proj": QuantSpec(8, "channel")})
    with pytest.raises(GPTQExportError, match=r"bits \[4, 8\]"):
        export_gptq(model, str(tmp_path / "g"))
    model = _quantized(QuantSpec(4, "channel"), skip=())
    with pytest.raises(GPTQExportError, match="'lm_head' is outside.*--skip lm_head"):
        export_gptq(model, str(tmp_path / "g"))


def test_bad_sources_are_refused(tmp_path):
    with pytest.raises(GPTQExportError, match="is not a directory"):
        export_gptq(str(tmp_path / "nope"), str(tmp_path / "g"))
    model = _quantized(QuantSpec(4, "channel", symmetric=True))
    gptq = export_gptq(model, str(tmp_path / "g"))
    with pytest.raises(GPTQExportError, match="'gptq' checkpoint, not a flexround one"):
        export_gptq(gptq, str(tmp_path / "g2"))
    with pytest.raises(GPTQExportError, match="checkpoint_format='gptq_v3'"):
        export_gptq(model, str(tmp_path / "g3"), checkpoint_format="gptq_v3")
    with pytest.raises(GPTQExportError, match="no QuantLinear layers"):
        export_gptq(tiny_llama(), str(tmp_path / "g4"))


# -- CLI: flexround export / inspect ------------------------------------------------------------
def test_cli_export_and_inspect(tmp_path, capsys):
    from quantizer.cli import main
    from quantizer.inspect_ckpt import inspect_checkpoint

    model = _quantized(QuantSpec(4, "group", 32, symmetric=True))
    ckpt = save_quantized(model, str(tmp_path / "ckpt"))
    assert main(["inspect", ckpt]) == 0
    text = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj" in text and "group 32" in text and "whole model" in text
    info = inspect_checkpoint(ckpt)
    down = next(r for r in info["layers"] if r["name"] == "model.layers.0.mlp.down_proj")
    # 64x128 int4: 4096 B codes + 64x4 fp32 scales + 64x4 int32 zeros
    assert down["bytes"] == 64 * 128 // 2 + 2 * 64 * 4 * 4 and down["fp16_bytes"] == 64 * 128 * 2
    assert info["totals"]["quantized_layers"] == 14
    assert info["totals"]["model_bytes"] <= info["totals"]["file_bytes"]

    out = str(tmp_path / "gptq")
    assert main(["export", "--format", "gptq", "--model", ckpt, "--out", out]) == 0
    gi = inspect_checkpoint(out)
    assert gi["kind"] == "gptq (gptq)" and len(gi["layers"]) == 14
    g_down = next(r for r in gi["layers"] if r["name"] == "model.layers.0.mlp.down_proj")
    # int32 codes (same 4096 B) + fp16 scales 4x64 + qzeros 4x8 int32 + g_idx 128 int32
    assert g_down["bytes"] == 4096 + 4 * 64 * 2 + 4 * 8 * 4 + 128 * 4
    assert (g_down["in_features"], g_down["out_features"]) == (128, 64)

    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
