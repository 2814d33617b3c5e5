"""QuantLinear against float64 math, replace_linears, and a Hugging Face model end to end."""

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fxkernels import QuantLinear, QuantSpec, replace_linears, use_backend

from .conftest import tiny_llama

specs = st.builds(
    lambda bits, gran, sym: QuantSpec(bits=bits, granularity=gran, group_size=16 if gran == "group" else None,
                                      symmetric=sym),
    st.integers(2, 8), st.sampled_from(["tensor", "channel", "group"]), st.booleans())


def fp32_rounding_bound(x, w, b=None):
    """|error| allowed for an fp32 matmul: K ulps of the magnitude sum (a loose first-principles bound)."""
    k = x.shape[-1]
    mag = x.double().abs() @ w.double().abs().t()
    if b is not None:
        mag = mag + b.double().abs()
    return mag * k * torch.finfo(torch.float32).eps + 1e-30


@settings(max_examples=40, deadline=None)
@given(spec=specs, m=st.integers(1, 5), seed=st.integers(0, 1000), bias=st.booleans())
def test_forward_matches_float64_dequant(spec, m, seed, bias):
    torch.manual_seed(seed)
    lin = nn.Linear(48, 24, bias=bias)
    q = QuantLinear.from_linear(lin, spec)
    x = torch.randn(m, 3, 48)
    w = q.dequantized_weight()
    ref = x.double() @ w.double().t() + (lin.bias.double() if bias else 0)
    err = (q(x).double() - ref).abs()
    assert q(x).shape == (m, 3, 24)
    assert (err <= fp32_rounding_bound(x, w, lin.bias if bias else None)).all()


def test_from_codes_keeps_learned_codes_exactly():
    spec = QuantSpec(4, "group", 16)
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (8, 32), generator=g)
    scale = torch.rand(8, 2, generator=g) + 0.1
    zero = torch.randint(0, 16, (8, 2), generator=g)
    layer = QuantLinear.from_codes(codes, scale, zero, spec)
    expect = (codes - zero.repeat_interleave(16, 1)).float() * scale.repeat_interleave(16, 1)
    assert torch.equal(layer.dequantized_weight(), expect)


@pytest.mark.parametrize("bad, match", [
    (dict(scale=-torch.ones(8)), "non-positive"),
    (dict(zero=torch.full((8,), 16)), r"zero spans \[16, 16\]; expected \[0, 15\]"),
    (dict(scale=torch.ones(4)), r"expected \(8,\)"),
])
def test_from_codes_rejects_bad_grids(bad, match):
    args = dict(codes=torch.zeros(8, 16, dtype=torch.int32), scale=torch.ones(8),
                zero=torch.zeros(8, dtype=torch.int32), spec=QuantSpec(4, "channel"))
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        QuantLinear.from_codes(**args)


def test_static_activation_spec_needs_a_grid():
    spec = QuantSpec(8, "tensor", act_bits=8, act_mode="static")
    with pytest.raises(ValueError, match="needs act_scale and act_zero"):
        QuantLinear.from_linear(nn.Linear(16, 8), spec)
    layer = QuantLinear.from_linear(nn.Linear(16, 8), spec, act_scale=torch.tensor([0.05]), act_zero=torch.tensor([3]))
    assert layer.act_scale.item() == pytest.approx(0.05) and layer.act_zero.item() == 3


def test_w8a8_layer_matches_quantized_activation_math():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    spec = QuantSpec(8, "channel", act_bits=8, act_mode="static")
    sa, za = torch.tensor([0.02]), torch.tensor([-5], dtype=torch.int32)
    layer = QuantLinear.from_linear(lin, spec, act_scale=sa, act_zero=za)
    x = torch.randn(7, 64)
    xq = torch.clamp(torch.round(x * (1 / sa)) + za, -128, 127)
    xdq = (xq - za).double() * sa.double()
    ref = xdq @ layer.dequantized_weight().double().t() + lin.bias.double()
    assert torch.allclose(layer(x).double(), ref, rtol=1e-5, atol=1e-5)


def test_input_shape_error_names_the_shape():
    layer = QuantLinear.from_linear(nn.Linear(16, 8), QuantSpec(4, "channel"))
    with pytest.raises(ValueError, match=r"input shape \(2, 15\); expected \[..., 16\]"):
        layer(torch.randn(2, 15))


def test_replace_linears_skips_and_overrides():
    model = tiny_llama()
    replace_linears(model, QuantSpec(4, "channel"), skip=("lm_head", "*.o_proj"),
                    overrides={"down_proj": QuantSpec(8, "tensor")})
    kinds = {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, (nn.Linear, QuantLinear))}
    assert kinds["lm_head"] == "Linear"
    assert kinds["model.layers.0.self_attn.o_proj"] == "Linear"
    assert kinds["model.layers.1.self_attn.q_proj"] == "QuantLinear"
    assert model.get_submodule("model.layers.0.mlp.down_proj").spec.bits == 8
    assert model.get_submodule("model.layers.0.mlp.up_proj").spec.bits == 4


def test_hf_model_generates_with_quantlinear():
    model = tiny_llama()
    ids = torch.randint(0, 128, (1, 6))
    fp_out = model(ids).logits
    replace_linears(model, QuantSpec(8, "channel"))
    q_out = model(ids).logits
    assert (q_out - fp_out).abs().max() < 0.05 * fp_out.abs().max()
    gen = model.generate(ids, max_new_tokens=5, do_sample=False, min_new_tokens=5, pad_token_id=0)
    assert gen.shape == (1, 11)


def test_reference_backend_can_be_forced():
    layer = QuantLinear.from_linear(nn.Linear(16, 8), QuantSpec(4, "channel"))
    x = torch.randn(3, 16)
    with use_backend("reference"):
        y = layer(x)
    assert torch.equal(y, layer(x)) or torch.allclose(y, layer(x), atol=1e-5)


def test_eager_fast_path_and_compiled_graph_agree():
    torch.manual_seed(0)
    for spec, kw in ((QuantSpec(4, "group", 16), {}),
                     (QuantSpec(8, "tensor", act_bits=8, act_mode="static"),
                      dict(act_scale=torch.tensor([0.03]), act_zero=torch.tensor([2], dtype=torch.int32)))):
        layer = QuantLinear.from_linear(nn.Linear(32, 16), spec, **kw)
        x = torch.randn(3, 32)
        eager = layer(x)
        assert layer._kernels, "eager calls should cache their kernel choice"
        compiled = torch.compile(layer, backend="eager", fullgraph=True)
        assert torch.equal(compiled(x), eager)


def test_first_call_in_a_fresh_process_builds_one_plan():
    """The backends load on the first call; the plan key must not change across that load."""
    import subprocess
    import sys

    code = ("import torch\nfrom torch import nn\nfrom fxkernels import QuantLinear, QuantSpec\n"
            "layer = QuantLinear.from_linear(nn.Linear(32, 16), QuantSpec(4, 'channel'))\n"
            "x = torch.randn(1, 32)\nlayer(x); layer(x)\nprint(len(layer._kernels))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1"


def test_kernel_cache_follows_forced_backend():
    layer = QuantLinear.from_linear(nn.Linear(32, 16), QuantSpec(4, "channel"))
    x = torch.randn(2, 32)
    layer(x)
    with use_backend("reference"):
        layer(x)
    chosen = {k.backend for k in layer._kernels.values()}
    assert "reference" in chosen and len(layer._kernels) == 2


def test_kernel_cache_follows_environment(monkeypatch):
    """The eager path caches its kernel choice; FXK_* variables set later still take effect."""
    layer = QuantLinear.from_linear(nn.Linear(32, 16), QuantSpec(4, "channel"))
    x = torch.randn(2, 32)
    layer(x)
    monkeypatch.setenv("FXK_FORCE_BACKEND", "reference")
    layer(x)
    assert {k.backend for k in layer._kernels.values()} >= {"reference"}
    monkeypatch.delenv("FXK_FORCE_BACKEND")
    monkeypatch.setenv("FXK_DISABLED_KERNELS", "cpu,reference")
    with pytest.raises(RuntimeError, match="no kernel can run dequant_linear"):
        layer(x)


@pytest.mark.parametrize("act_bits", [None, 8])
@pytest.mark.parametrize("built_in_inference_mode", [False, True])
def test_runs_under_inference_mode(act_bits, built_in_inference_mode):
    """Inference tensors keep no version counter: the kernel caches must not ask them for one
    (a W4A8 layer built outside and first called inside ``torch.inference_mode`` included)."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 40)
    spec = QuantSpec(4, "channel", act_bits=act_bits)
    x = torch.randn(3, 64)
    want = QuantLinear.from_linear(lin, spec)(x)
    with torch.inference_mode():
        q = QuantLinear.from_linear(lin, spec) if built_in_inference_mode else None
    if q is None:
        q = QuantLinear.from_linear(lin, spec)
    for backend in ("cpu", "reference"):
        with torch.inference_mode(), use_backend(backend):
            assert torch.allclose(q(x), want, atol=1e-5), backend
            assert torch.allclose(q(x), want, atol=1e-5), backend  # second call: cached path


def test_interleaved_decode_rates_and_dequantized_reference():
    from quantizer.decode_bench import compare_tokens_per_second, dequantized_reference, greedy_decode

    model = tiny_llama()
    q = replace_linears(tiny_llama(), QuantSpec(4, "channel"), overrides={"lm_head": QuantSpec(8, "channel")},
                        skip=())
    ids = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(0))
    rates = compare_tokens_per_second({"fp32": model, "w4": q}, ids, new_tokens=4, rounds=3)
    assert set(rates) == {"fp32", "w4"} and all(r > 0 for r in rates.values())
    ref = dequantized_reference(q)
    assert not any(isinstance(m, QuantLinear) for m in ref.modules())
    assert torch.equal(greedy_decode(q, ids, 6)[0], greedy_decode(ref, ids, 6)[0])


def test_plans_for_several_batch_sizes_share_one_repacked_weight():
    """Each M bucket gets its own plan, but all bind the same grids, so the CPU kernels' repacked
    weight (cached per weight and grid tensors) is made once per layer, not once per plan."""
    pytest.importorskip("fxkernels._C")
    from fxkernels.backends import _cache

    layer = QuantLinear.from_linear(torch.nn.Linear(64, 48), QuantSpec(4, "channel"))
    with torch.no_grad():
        for m in (1, 4, 9):
            layer(torch.randn(m, 64))
    assert len(layer._kernels) == 3
    assert len(_cache._cache[id(layer.qweight)][1]) == 1
