"""fxk_cpu::decode_layer (csrc/cpu/decode_layer.cpp): the whole pre-norm decoder layer for one token
per row in one parallel region, against the decode step's own formulation of the same layer
(fxkernels.generation.step.layer_forward), on tiny random LLaMA, Mistral (sliding window) and Qwen2
(q/k/v biases) models with INT4/INT8 per-channel and grouped weights."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fxkernels import QuantSpec, replace_linears  # noqa: E402
from fxkernels.backends import cpu  # noqa: E402
from fxkernels.generation import Generator, fused_layer, step  # noqa: E402

pytestmark = pytest.mark.skipif(
    fused_layer.DECODE_LAYER is None or cpu.active_isa() not in cpu.LIMB_ISAS,
    reason="needs the CPU extension's decode_layer and AVX-512 VNNI (the limb-layout kernels)")

VOCAB = 128


def _model(family, spec, seed=0):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, head_dim=16)
    cfg = {"llama": lambda: transformers.LlamaConfig(**common),
           "mistral": lambda: transformers.MistralConfig(**common, sliding_window=5),
           "qwen2": lambda: transformers.Qwen2Config(**common)}[family]()
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():  # large random norms and biases: logits far apart
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.3)
    replace_linears(model, spec, skip=("lm_head",))
    model.generation_config.eos_token_id = None  # generate() would stop at it (the engine runs on)
    return model


def _decoder(model, length=32, batch=1):
    d = Generator(model, compile=False).decoder
    d.allocate(batch, length)
    d.prepare()
    return d


def _inputs(d, layer, slot, seed=1):
    """Hidden states, random past keys/values in the slots before ``slot``, and the step's tensors;
    row b is left-padded by b + 1 slots (its own mask and rotary position)."""
    g = torch.Generator().manual_seed(seed)
    batch = layer.k_cache.shape[0]
    h = torch.randn(batch, 1, d.hidden, generator=g)
    layer.k_cache.normal_(generator=g)
    layer.v_cache.normal_(generator=g)
    slots = torch.tensor([slot])
    valid = torch.ones(batch, d.length, dtype=torch.bool)
    for b in range(batch):
        valid[b, :b + 1] = False
    mask = step.attention_mask(valid, slots, layer.window)
    cos_t, sin_t = d.rope_tables[layer.rope_kind]
    pos = torch.tensor([[max(0, slot - b - 1)] for b in range(batch)])
    return h, slots, mask, cos_t[pos].unsqueeze(1), sin_t[pos].unsqueeze(1)


def _both(layer, h, slots, mask, cos, sin):
    """(operator output, step formulation output), each with its own copy of the caches."""
    k0, v0 = layer.k_cache.clone(), layer.v_cache.clone()
    fused = step.layer_forward(layer, h, slots, mask, cos, sin)
    caches = layer.k_cache.clone(), layer.v_cache.clone()
    args, layer.fused_args = layer.fused_args, None
    layer.k_cache.copy_(k0)
    layer.v_cache.copy_(v0)
    try:
        ref = step.layer_forward(layer, h, slots, mask, cos, sin)
    finally:
        layer.fused_args = args
    return fused, ref, caches, (layer.k_cache, layer.v_cache)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("spec", [QuantSpec(4, "channel"), QuantSpec(8, "channel"), QuantSpec(4, "group", 32)],
                         ids=["w4", "w8", "w4g32"])
@pytest.mark.parametrize("slot", [2, 11, 31])
@pytest.mark.parametrize("batch", [1, 3])  # 3 rows x 4 limbs: the AMX tiles where the CPU has them
def test_layer_matches_step_formulation(family, spec, slot, batch):
    d = _decoder(_model(family, spec), batch=batch)
    assert all(layer.fused_args is not None for layer in d.layers)
    for layer in d.layers:
        h, slots, mask, cos, sin = _inputs(d, layer, slot)
        with torch.no_grad():
            fused, ref, (kf, vf), (kr, vr) = _both(layer, h, slots, mask, cos, sin)
        torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(kf, kr, rtol=1e-6, atol=1e-6)  # the token's keys (rotary) at its slot
        assert torch.equal(vf, vr)  # values are copied as the projection gave them
        assert not torch.equal(fused, h)


@pytest.mark.parametrize("batch", [3, 8])  # 6 and 16 digit rows: one and two tile pairs per broadcast
def test_two_activation_digits_pinned_and_matching_step_formulation(batch):
    """Layers prepared under set_activation_digits(2) pin that digit count in the operator's
    arguments, and the operator agrees with the step's own layer run under the same setting."""
    with cpu.activation_digits(2):
        d = _decoder(_model("llama", QuantSpec(4, "channel")), batch=batch)
        for layer in d.layers:
            assert [int(p[5]) for p in layer.fused_args[4:12:2]] == [2, 2, 2, 2]
            h, slots, mask, cos, sin = _inputs(d, layer, 7)
            with torch.no_grad():
                fused, ref, (kf, vf), (kr, vr) = _both(layer, h, slots, mask, cos, sin)
            torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)
            assert torch.equal(vf, vr)


@pytest.mark.parametrize("batch", [1, 3])
def test_thread_count_does_not_change_the_result(batch):
    d = _decoder(_model("llama", QuantSpec(4, "channel")), batch=batch)
    layer = d.layers[0]
    h, slots, mask, cos, sin = _inputs(d, layer, 9)
    k0, v0 = layer.k_cache.clone(), layer.v_cache.clone()
    outs = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            layer.k_cache.copy_(k0)
            layer.v_cache.copy_(v0)
            with torch.no_grad():
                outs.append(fused_layer.run(layer, layer.fused_args, h, slots, mask, cos, sin))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_non_finite_input_gives_nan_in_its_row_only():
    d = _decoder(_model("llama", QuantSpec(4, "channel")), batch=2)
    layer = d.layers[0]
    h, slots, mask, cos, sin = _inputs(d, layer, 5)
    h[1, 0, 3] = float("nan")
    with torch.no_grad():
        out = fused_layer.run(layer, layer.fused_args, h, slots, mask, cos, sin)
    assert torch.isnan(out[1]).all() and torch.isfinite(out[0]).all()


def test_compiled_generation_uses_the_operator_and_keeps_hf_tokens():
    model = _model("qwen2", QuantSpec(4, "channel"))
    ids = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)[0, 5:]
    gen = Generator(copy.deepcopy(model))
    got = gen.generate(ids, max_new_tokens=12).tokens[0]
    assert all(layer.fused_args is not None for layer in gen.decoder.layers)
    assert torch.equal(got, want)


def test_layers_it_cannot_run_keep_the_step_formulation():
    with cpu.isa("avx2"):  # no VNNI: the weight-only layers are not in the limb layout
        d = _decoder(_model("llama", QuantSpec(4, "channel")))
    assert all(layer.fused_args is None for layer in d.layers)
    gemma = transformers.AutoModelForCausalLM.from_config(transformers.GemmaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16)).eval()
    replace_linears(gemma, QuantSpec(4, "channel"), skip=("lm_head",))
    assert all(layer.fused_args is None for layer in _decoder(gemma).layers)  # (1 + w) norms, GELU


def test_bad_arguments_are_named():
    d = _decoder(_model("llama", QuantSpec(4, "channel")))
    layer = d.layers[0]
    h, slots, mask, cos, sin = _inputs(d, layer, 4)
    args = list(layer.fused_args)
    op = torch.ops.fxk_cpu.decode_layer.default
    tail = (cos, sin, layer.k_cache, layer.v_cache, mask, slots, layer.heads, 0, layer.scaling)
    with pytest.raises(RuntimeError, match="dims must hold"):
        op(h, *args[:-1], args[-1][:12], *tail)
    bad_dims = list(args[-1])
    bad_dims[4] += 8  # o_proj's N no longer the hidden size
    with pytest.raises(RuntimeError, match="do not chain"):
        op(h, *args[:-1], bad_dims, *tail)
    with pytest.raises(RuntimeError, match="o_proj is not a weight-only layer in the limb layout"):
        op(h, *args[:6], args[6][:5], *args[7:], *tail)
    with pytest.raises(RuntimeError, match="slot 40 outside the cache of 32 slots"):
        op(h, *args, cos, sin, layer.k_cache, layer.v_cache, mask, torch.tensor([40]), layer.heads, 0, layer.scaling)


def _spiky_mlp_model(intermediate=32768):
    """One LLaMA layer whose MLP has one unit that fires only for hidden states positive in their
    first 32 values: then the down projection's input row is that unit's product and nearly
    nothing else, a row of more than 4096 values that 2 activation digits round coarser than
    bf16 would ("auto" gives it 4)."""
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=intermediate,
                                   num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=256, head_dim=16)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    layer = model.model.layers[0]
    with torch.no_grad():
        layer.post_attention_layernorm.weight.fill_(1.0)
        for proj in (layer.mlp.gate_proj, layer.mlp.up_proj):
            proj.weight.normal_(0, 1e-3)
            proj.weight[5].zero_()
            proj.weight[5, :32] = 1.0
    replace_linears(model, QuantSpec(4, "channel"), skip=("lm_head",))
    return model


def _with_digits(args, digits):
    """The operator's arguments with each linear's digit count replaced (q/k/v, o, gate/up, down)."""
    args = list(args)
    for i, n in zip(range(4, 12, 2), digits):
        args[i] = list(args[i][:5]) + [cpu._DIGIT_TENSORS[n]]
    return tuple(args)


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_auto_digits_give_wide_rows_four_digits_in_the_operator(batch):
    """Under "auto" the operator runs each row of each linear on 2 digits, and again on 4 where 2
    round coarser than bf16 would: here the down projection's input in the rows whose MLP unit
    fires. Those rows equal the operator with the down projection pinned to 4 digits, the others
    the operator pinned to 2, to the bit; and the whole agrees with the step's own formulation
    (the eager layers under "auto") to 2-digit rounding of its slightly different inputs."""
    spiky = torch.tensor([b % 3 != 1 for b in range(batch)])
    with cpu.activation_digits("auto"):
        d = _decoder(_spiky_mlp_model(), batch=batch)
        layer = d.layers[0]
        assert [int(p[5]) for p in layer.fused_args[4:12:2]] == [0, 0, 0, 0]  # kAutoLimbs
        h, slots, mask, cos, sin = _inputs(d, layer, 7)
        noise = torch.rand(batch, 32, generator=torch.Generator().manual_seed(batch))
        h[:, 0, :32] = torch.where(spiky[:, None], 20.0, -20.0) + noise
        with torch.no_grad():
            fused, ref, (kf, vf), (kr, vr) = _both(layer, h, slots, mask, cos, sin)
    torch.testing.assert_close(fused, ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(vf, vr)
    with torch.no_grad():
        two = fused_layer.run(layer, _with_digits(layer.fused_args, (2, 2, 2, 2)), h, slots, mask, cos, sin)
        down_four = fused_layer.run(layer, _with_digits(layer.fused_args, (2, 2, 2, 4)), h, slots, mask, cos, sin)
    for b in range(batch):
        assert torch.equal(fused[b], down_four[b] if spiky[b] else two[b]), b
        assert torch.equal(fused[b], two[b]) != bool(spiky[b]), b  # 4 digits took effect
