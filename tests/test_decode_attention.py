"""fxk_cpu::decode_attention (csrc/cpu/attention.cpp): one query token's attention over a static
KV cache, against the engine's own torch formulation and float64, on both instruction sets."""

import types

import pytest
import torch

from fxkernels.backends import cpu
from fxkernels.generation import step

# batch, query heads, kv heads, cache slots, head dim, this step's slot, window, softcap
CASES = [
    (1, 9, 3, 256, 64, 5, None, None),      # SmolLM2's heads, early in the cache
    (8, 9, 3, 256, 64, 130, None, None),    # batched, past the first 128 slots
    (2, 4, 1, 128, 256, 127, None, None),   # Gemma 3's 256-wide heads, the last slot
    (3, 8, 2, 128, 72, 60, 16, None),       # a sliding window; D not a multiple of 16
    (2, 14, 2, 64, 64, 63, None, 50.0),     # 7 heads per kv head (two head blocks), soft-capping
    (1, 7, 7, 32, 24, 0, None, None),       # the first slot: one key
    (2, 16, 2, 64, 128, 33, 8, 30.0),       # window and soft-capping together
    (1, 6, 2, 40, 20, 17, None, None),      # D not a multiple of 8: the portable loops
]


def _layer(h, hkv, d, window, softcap):
    return types.SimpleNamespace(kv_heads=hkv, heads=h, scaling=d ** -0.5, softcap=softcap, window=window)


@pytest.mark.parametrize("isa", ["auto", "avx2", "scalar"])  # auto: AVX-512 loops where the CPU has them
@pytest.mark.parametrize("b,h,hkv,length,d,slot,window,softcap", CASES)
def test_matches_torch_and_float64(b, h, hkv, length, d, slot, window, softcap, isa):
    gen = torch.Generator().manual_seed(b * 100 + length + slot)
    q = torch.randn(b, h, 1, d, generator=gen)
    k = torch.randn(b, hkv, length, d, generator=gen)
    v = torch.randn(b, hkv, length, d, generator=gen)
    valid = torch.rand(b, length, generator=gen) > 0.3  # left padding and holes
    slots = torch.tensor([slot])
    mask = step.attention_mask(valid, slots, window)
    layer = _layer(h, hkv, d, window, softcap)
    exact = step._decode_attention(layer, q.double(), k.double(), v.double(), mask)
    torch_fp32 = step._decode_attention(layer, q, k, v, mask)
    with cpu.isa(isa):
        out = torch.ops.fxk_cpu.decode_attention(q, k, v, mask, slots, window or 0, layer.scaling, softcap)
    assert out.shape == q.shape and out.dtype == torch.float32
    err = (out.double() - exact).abs().max().item()
    # fp32 accumulation over <= 256 slots and D <= 256: the torch formulation's own error is ~5e-7
    assert err < 2e-6, (err, (torch_fp32.double() - exact).abs().max().item())


@pytest.mark.parametrize("window", [None, 8])
def test_reads_no_slot_it_may_not_attend_to(window):
    """Slots after this step's (the rest of the static cache) and before the window are never read:
    NaN there changes nothing."""
    b, h, hkv, length, d, slot = 2, 6, 2, 64, 32, 20
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(b, h, 1, d, generator=gen)
    k = torch.randn(b, hkv, length, d, generator=gen)
    v = torch.randn(b, hkv, length, d, generator=gen)
    slots = torch.tensor([slot])
    mask = step.attention_mask(torch.ones(b, length, dtype=torch.bool), slots, window)
    args = (mask, slots, window or 0, d ** -0.5, None)
    clean = torch.ops.fxk_cpu.decode_attention(q, k, v, *args)
    lo = slot - window + 1 if window else 0
    for cache in (k, v):
        cache[:, :, slot + 1:] = float("nan")
        cache[:, :, :lo] = float("nan")
    dirty = torch.ops.fxk_cpu.decode_attention(q, k, v, *args)
    assert torch.equal(clean, dirty)


def test_bad_arguments_are_named():
    q, k = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 8, 16)
    mask = torch.ones(1, 1, 1, 8, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="slot 8 outside the cache of 8 slots"):
        torch.ops.fxk_cpu.decode_attention(q, k, k, mask, torch.tensor([8]), 0, 0.25, None)
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.fxk_cpu.decode_attention(q.double(), k, k, mask, torch.tensor([1]), 0, 0.25, None)
    with pytest.raises(RuntimeError, match="does not match the cache"):
        torch.ops.fxk_cpu.decode_attention(torch.randn(1, 3, 1, 16), k, k, mask, torch.tensor([1]), 0, 0.25, None)
