"""End-to-end decode of SmolLM2-135M at batch 1 (2 threads): fp32 Hugging Face model vs the same
model with QuantLinear (W4 per-channel asym, lm_head INT8 per-channel) on the best CPU kernels,
with each block's layers called separately, with q/k/v and gate/up fused
(:func:`fxkernels.fuse_projections`, bit-identical outputs), and through the compiled
static-cache engine (:class:`fxkernels.Generator`). The side-by-side table against llama.cpp is
``flexround bench decode``.

    .venv/bin/pytest bench/test_bench_decode.py --benchmark-columns=median,ops

The readable table: `.venv/bin/python bench/test_bench_decode.py`.
"""

import copy
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fxkernels import QuantSpec, fuse_projections, replace_linears
from fxkernels.generation import Generator
from quantizer.decode_bench import compare_tokens_per_second, dequantized_reference, greedy_decode

PROMPT = "The history of Azerbaijan"
NEW_TOKENS = 32
W4_LM8 = dict(spec=QuantSpec(4, "channel"), overrides={"lm_head": QuantSpec(8, "channel")})


def load_models():
    from quantizer.models import load_smollm2

    torch.set_num_threads(2)
    fp, tok = load_smollm2(log=lambda *a: None)
    q = replace_linears(copy.deepcopy(fp), W4_LM8["spec"], skip=(), overrides=W4_LM8["overrides"])
    fused = copy.deepcopy(q)
    fuse_projections(fused)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    return fp, q, fused, ids


def engine_decode(gen, ids, new_tokens):
    out = gen.generate(ids, new_tokens)
    return out.tokens[0], out.decode_seconds


@pytest.fixture(scope="module")
def models():
    pytest.importorskip("transformers")
    try:
        return load_models()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.mark.parametrize("which", ["fp32", "w4_lm8", "w4_lm8_fused"])
def test_decode(benchmark, models, which):
    fp, q, fused, ids = models
    model = {"fp32": fp, "w4_lm8": q, "w4_lm8_fused": fused}[which]
    greedy_decode(model, ids, 4)
    benchmark.extra_info["new_tokens"] = NEW_TOKENS
    benchmark.pedantic(greedy_decode, args=(model, ids, NEW_TOKENS), rounds=3, iterations=1)


def test_decode_engine(benchmark, models):
    _, _, fused, ids = models
    gen = Generator(fused)
    gen.generate(ids, NEW_TOKENS)  # compiles
    benchmark.extra_info["new_tokens"] = NEW_TOKENS
    benchmark.pedantic(engine_decode, args=(gen, ids, NEW_TOKENS), rounds=3, iterations=1)


def test_same_greedy_tokens_as_dequantized_reference(models):
    _, q, fused, ids = models
    want, _ = greedy_decode(dequantized_reference(q), ids, 16)
    assert torch.equal(greedy_decode(q, ids, 16)[0], want)
    assert torch.equal(greedy_decode(fused, ids, 16)[0], want)


if __name__ == "__main__":
    fp, q, fused, ids = load_models()
    want = greedy_decode(dequantized_reference(q), ids, 16)[0]
    same = all(torch.equal(greedy_decode(m, ids, 16)[0], want) for m in (q, fused))
    rates = compare_tokens_per_second({"fp32": fp, "w4_lm8": q, "fused": fused}, ids, NEW_TOKENS)
    r_fp = rates["fp32"]
    print(f"| model (SmolLM2-135M, batch 1, {torch.get_num_threads()} threads) | tokens/s | vs fp32 |")
    print("|---|---:|---:|")
    print(f"| fp32 Hugging Face eager | {r_fp:.1f} | 1.00x |")
    print(f"| W4 per-channel + lm_head INT8 (QuantLinear) | {rates['w4_lm8']:.1f} | {rates['w4_lm8'] / r_fp:.2f}x |")
    print(f"| same, q/k/v and gate/up fused (fuse_projections) | {rates['fused']:.1f} | {rates['fused'] / r_fp:.2f}x |")
    print(f"first 16 greedy tokens identical to the dequantized reference model (both W4 rows): {same}")
