"""fuse_projections: sibling QuantLinears that read one input share one kernel call, with outputs
bit-identical to the separate layers, an unchanged state_dict/checkpoint, and a fall-back to
separate calls whenever the contract (same input, unchanged buffers) is broken."""

import copy

import pytest
import torch
from torch import nn

import fxkernels
from fxkernels import QuantLinear, QuantSpec, fuse_projections, unfuse_projections
from fxkernels.fusion import FusedGroup

from .conftest import tiny_llama


class Block(nn.Module):
    """Attention-like q/k/v on one input and a gated MLP on another, like a decoder block."""

    def __init__(self, k=48, heads=(48, 16, 16), ff=32, bias=False):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(k, n, bias=bias) for n in heads)
        self.gate_proj, self.up_proj = nn.Linear(k, ff, bias=bias), nn.Linear(k, ff, bias=bias)
        self.down_proj = nn.Linear(ff, k, bias=bias)

    def forward(self, x):
        q, kk, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        h = x + q[..., :x.shape[-1]] * kk.sum(-1, keepdim=True) + v.mean(-1, keepdim=True)
        return self.down_proj(torch.nn.functional.silu(self.gate_proj(h)) * self.up_proj(h))


def quantized_block(spec, seed=0, **kw):
    torch.manual_seed(seed)
    return fxkernels.replace_linears(Block(**kw), spec, skip=())


def fusion_of(layer):
    return layer._fusion


SPECS = [QuantSpec(4, "channel"), QuantSpec(8, "group", group_size=16), QuantSpec(4, "group", group_size=8),
         QuantSpec(4, "channel", act_bits=8), QuantSpec(3, "channel")]


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 48), (2, 5, 48), (3, 48)])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_block_is_bit_identical(spec, shape, bias):
    ref = quantized_block(spec, bias=bias)
    fused = copy.deepcopy(ref)
    assert fuse_projections(fused) == 2
    x = torch.randn(*shape)
    with torch.inference_mode():
        for _ in range(2):  # the second pass reuses the plans and the fused repack
            want, got = ref(x), fused(x)
            assert torch.equal(got, want)
            assert got.shape == want.shape
    assert fusion_of(fused.q_proj) is fusion_of(fused.v_proj) is not None
    assert fusion_of(fused.gate_proj) is fusion_of(fused.up_proj) is not fusion_of(fused.q_proj)
    assert fusion_of(fused.down_proj) is None


def test_sibling_outputs_are_contiguous_for_several_rows():
    block = quantized_block(QuantSpec(4, "channel"))
    fuse_projections(block)
    x = torch.randn(2, 3, 48)
    ys = [block.q_proj(x), block.k_proj(x), block.v_proj(x)]
    assert all(y.is_contiguous() for y in ys)
    assert [y.shape[-1] for y in ys] == [48, 16, 16]


def test_state_dict_and_checkpoint_are_unchanged(tmp_path):
    ref = quantized_block(QuantSpec(4, "channel"), bias=True)
    fused = copy.deepcopy(ref)
    fuse_projections(fused)
    a, b = ref.state_dict(), fused.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    fxkernels.save_quantized(fused, str(tmp_path / "ck"))
    loaded = fxkernels.load_quantized(str(tmp_path / "ck"), Block(bias=True))
    x = torch.randn(4, 48)
    assert torch.equal(loaded(x), ref(x))
    # the fused storage is not a second copy: each sibling's buffers are row views of it
    g = fusion_of(fused.q_proj)
    assert fused.k_proj.qweight.untyped_storage().data_ptr() == g.layer.qweight.untyped_storage().data_ptr()


def test_in_place_write_to_a_sibling_reaches_the_fused_call():
    ref = quantized_block(QuantSpec(4, "channel"), seed=0)
    other = quantized_block(QuantSpec(4, "channel"), seed=1)
    fused = copy.deepcopy(ref)
    fuse_projections(fused)
    x = torch.randn(1, 48)
    fused(x)  # builds the plans and the fused repack
    fused.load_state_dict(other.state_dict())  # copies in place into the row views
    assert fusion_of(fused.k_proj) is not None
    assert torch.equal(fused(x), other(x))


def test_replaced_buffer_dissolves_the_group():
    block = quantized_block(QuantSpec(4, "channel"))
    donor = quantized_block(QuantSpec(4, "channel"), seed=3)
    fuse_projections(block)
    x = torch.randn(1, 48)
    block(x)
    block.k_proj.qweight = donor.k_proj.qweight.clone()  # assignment, not an in-place write
    want = torch.nn.functional.linear(x, block.k_proj.dequantized_weight())
    got = block.k_proj(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert fusion_of(block.q_proj) is None and fusion_of(block.k_proj) is None
    assert fusion_of(block.gate_proj) is not None  # other groups are untouched


def test_siblings_on_different_inputs_fall_back_to_separate_calls():
    """Cross-attention: q reads the decoder state, k/v the encoder output."""
    ref = quantized_block(QuantSpec(4, "channel"))
    fused = copy.deepcopy(ref)
    fuse_projections(fused)
    xq, xkv = torch.randn(1, 48), torch.randn(1, 48)
    for _ in range(2):
        assert torch.equal(fused.q_proj(xq), ref.q_proj(xq))
        assert torch.equal(fused.k_proj(xkv), ref.k_proj(xkv))
        assert torch.equal(fused.v_proj(xkv), ref.v_proj(xkv))
    assert fusion_of(fused.q_proj) is None


def test_repeated_call_of_one_sibling_recomputes():
    ref = quantized_block(QuantSpec(4, "channel"))
    fused = copy.deepcopy(ref)
    fuse_projections(fused)
    x = torch.randn(1, 48)
    for _ in range(3):  # the same input three times: each call gets a fresh, correct result
        assert torch.equal(fused.q_proj(x), ref.q_proj(x))
    assert torch.equal(fused.v_proj(x), ref.v_proj(x))


def test_the_group_does_not_keep_the_input_alive():
    block = quantized_block(QuantSpec(4, "channel"))
    fuse_projections(block)
    x = torch.randn(1, 48)
    block.q_proj(x), block.k_proj(x), block.v_proj(x)
    g = fusion_of(block.q_proj)
    assert g.state is None


def test_deep_copy_keeps_the_fusion_and_the_results():
    ref = quantized_block(QuantSpec(4, "channel"))
    fused = copy.deepcopy(ref)
    fuse_projections(fused)
    twin = copy.deepcopy(fused)
    x = torch.randn(2, 48)
    assert torch.equal(twin(x), ref(x))
    assert fusion_of(twin.q_proj) is not None and fusion_of(twin.q_proj) is not fusion_of(fused.q_proj)
    base = fusion_of(twin.q_proj).layer.qweight
    assert twin.q_proj.qweight.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()


def test_unfuse_restores_separate_calls():
    ref = quantized_block(QuantSpec(4, "channel"))
    fused = copy.deepcopy(ref)
    fuse_projections(fused)
    assert unfuse_projections(fused) == 2
    assert all(m._fusion is None for m in fused.modules() if isinstance(m, QuantLinear))
    x = torch.randn(2, 48)
    assert torch.equal(fused(x), ref(x))
    assert fuse_projections(fused) == 2  # and can be fused again


def test_per_tensor_layers_are_not_fused():
    """Their scales differ between siblings; one fused per-tensor grid cannot hold them."""
    assert fuse_projections(quantized_block(QuantSpec(4, "tensor"))) == 0


def test_mixed_specs_are_not_fused():
    torch.manual_seed(0)
    block = fxkernels.replace_linears(Block(), QuantSpec(4, "channel"), skip=(),
                                      overrides={"v_proj": QuantSpec(8, "channel")})
    assert fuse_projections(block) == 1  # only gate/up
    assert fusion_of(block.q_proj) is None


def test_float_siblings_are_not_fused():
    assert fuse_projections(Block()) == 0


def test_already_fused_layers_are_not_fused_twice():
    block = quantized_block(QuantSpec(4, "channel"))
    assert fuse_projections(block) == 2
    assert fuse_projections(block) == 0


@pytest.mark.parametrize("groups", [[("q_proj",)], [("q_proj", "")], [("q_proj", 3)]])
def test_bad_groups_are_refused(groups):
    with pytest.raises(ValueError, match="groups entry"):
        fuse_projections(quantized_block(QuantSpec(4, "channel")), groups)


def test_custom_groups():
    block = quantized_block(QuantSpec(4, "channel"))
    assert fuse_projections(block, [("k_proj", "v_proj")]) == 1
    assert fusion_of(block.q_proj) is None and isinstance(fusion_of(block.k_proj), FusedGroup)


def test_hugging_face_llama_logits_and_tokens_are_identical():
    model = tiny_llama(layers=2, hidden=64)
    fxkernels.replace_linears(model, QuantSpec(4, "channel"), skip=("lm_head",))
    fused = copy.deepcopy(model)
    assert fuse_projections(fused) == 4  # 2 layers x (q/k/v, gate/up)
    ids = torch.randint(0, 128, (1, 7))
    with torch.inference_mode():
        assert torch.equal(fused(ids).logits, model(ids).logits)
        a = model.generate(ids, max_new_tokens=6, do_sample=False)
        b = fused.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(a, b)
