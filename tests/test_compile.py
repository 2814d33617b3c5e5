"""QuantLinear under torch.compile: no graph break in any mode (the CPU-side check of what CUDA-graph
capture needs), prepared operator calls equal to eager, and the pin dropped when buffers move."""

import pytest
import torch

from fxkernels import QuantLinear, QuantSpec

transformers = pytest.importorskip("transformers")

SPECS = {
    "w4_channel": (QuantSpec(4, "channel"), {}),
    "w4_group32": (QuantSpec(4, "group", group_size=32), {}),
    "w8_channel": (QuantSpec(8, "channel"), {}),
    "w4a8_dynamic": (QuantSpec(4, "channel", act_bits=8, act_mode="dynamic"), {}),
    "w8a8_static_rotated": (QuantSpec(8, "tensor", act_bits=8, act_mode="static"), {"input_rotation": 32}),
}


def _quantize(module: torch.nn.Module, spec: QuantSpec, extra: dict) -> None:
    for name, child in list(module.named_children()):
        if isinstance(child, torch.nn.Linear):
            kw = dict(extra)
            if spec.act_mode == "static" and spec.act_bits:
                kw.update(act_scale=torch.tensor([0.05]), act_zero=torch.tensor([3], dtype=torch.int32))
            setattr(module, name, QuantLinear.from_linear(child, spec, **kw))
        else:
            _quantize(child, spec, extra)


def _block(spec, extra):
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=16)
    cfg._attn_implementation = "sdpa"  # what from_pretrained sets; a bare layer has none
    torch.manual_seed(0)
    block = LlamaDecoderLayer(cfg, 0).eval()
    _quantize(block, spec, extra)
    h = torch.randn(1, 5, 64)
    cos, sin = LlamaRotaryEmbedding(cfg)(h, torch.arange(5)[None])
    return block, h, (cos, sin)


@pytest.mark.parametrize("prepared", [False, True], ids=["generic_ops", "prepared"])
@pytest.mark.parametrize("name", list(SPECS))
def test_decoder_block_compiles_without_graph_break(name, prepared):
    spec, extra = SPECS[name]
    block, h, rope = _block(spec, extra)
    if prepared:
        for m in block.modules():
            if isinstance(m, QuantLinear):
                m.prepare()
    torch._dynamo.reset()
    with torch.no_grad():
        want = block(h, position_embeddings=rope)
        got = torch.compile(block, fullgraph=True, backend="eager")(h, position_embeddings=rope)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_prepared_inductor_graph_calls_the_cpu_operators():
    layer = QuantLinear.from_linear(torch.nn.Linear(96, 40), QuantSpec(4, "channel")).prepare()
    x = torch.randn(3, 96)
    gm = []

    def capture(graph_module, example_inputs):
        gm.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    with torch.no_grad():
        y = torch.compile(layer, fullgraph=True, backend=capture)(x)
        assert torch.equal(y, layer(x))
    targets = {str(n.target) for n in gm[0].graph.nodes if n.op == "call_function"}
    assert "fxk_cpu.dequant_linear.default" in targets


def test_pin_dropped_when_moved_or_loaded():
    layer = QuantLinear.from_linear(torch.nn.Linear(32, 8), QuantSpec(4, "channel")).prepare()
    assert layer._graph is not None
    layer.to(torch.float32)
    assert layer._graph is None and not layer._kernels
    layer.prepare()
    layer.load_state_dict(layer.state_dict())
    assert layer._graph is None


def test_static_scale_checked_when_prepared_not_per_call():
    spec = QuantSpec(8, "tensor", act_bits=8, act_mode="static")
    layer = QuantLinear.from_linear(torch.nn.Linear(32, 8), spec, act_scale=torch.tensor([0.1]),
                                    act_zero=torch.tensor([0], dtype=torch.int32))
    with torch.no_grad():
        layer.act_scale.fill_(-1.0)
    with pytest.raises(ValueError, match="act_scale"):
        layer.prepare()
