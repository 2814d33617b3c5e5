"""The README's main job: quantize SmolLM2-135M, compare quality, reload, generate, time decode."""

from __future__ import annotations

import copy
import os
import time

import torch


def _row(name, ppl, ref, extra=""):
    return f"| {name:<34} | {ppl:>10.2f} | {ppl / ref:>6.3f}x | {extra} |"


def run_demo(out_dir: str = "out/demo", quick: bool = False) -> int:
    import fxkernels
    from fxkernels import QuantSpec, load_quantized, replace_linears, save_quantized

    from .cli import generate_text
    from .evaluate import perplexity
    from .models import load_smollm2

    windows = 4 if quick else 12
    t0 = time.time()
    print("== flexround demo: SmolLM2-135M-Instruct (LLaMA architecture), all linears except lm_head ==")
    model, tok = load_smollm2()
    print(f"loaded in {time.time() - t0:.0f} s; perplexity protocol: {windows} windows x 512 tokens of held-out Wikipedia")

    rows = []
    ppl_fp = perplexity(model, tok, windows=windows)
    rows.append(_row("fp32", ppl_fp, ppl_fp, "reference"))
    settings = [("RTN W8 per-tensor asym", QuantSpec(8, "tensor")),
                ("RTN W4 per-channel asym", QuantSpec(4, "channel"))]
    quantized = {}
    for name, spec in settings:
        t = time.time()
        qm = replace_linears(copy.deepcopy(model), spec, skip=("lm_head",))
        qsecs = time.time() - t
        ppl = perplexity(qm, tok, windows=windows)
        rows.append(_row(name, ppl, ppl_fp, f"quantized in {qsecs:.1f} s"))
        quantized[name] = qm
        print(rows[-1])

    # Round trip through the on-disk format, then generate with the reloaded 4-bit model.
    ckpt = os.path.join(out_dir, "smollm2-rtn-w4")
    save_quantized(quantized["RTN W4 per-channel asym"], ckpt, tokenizer=tok)
    reloaded = load_quantized(ckpt)
    size_mb = os.path.getsize(os.path.join(ckpt, "model.safetensors")) / 1e6
    prompt = "The capital of France is"
    text_fp, _, tps_fp = generate_text(model, tok, prompt, 24)
    text_q, _, tps_q = generate_text(reloaded, tok, prompt, 24)

    print("\n| model                              | perplexity | vs fp32 | note |")
    print("|------------------------------------|-----------:|--------:|------|")
    for r in rows:
        print(r)
    print(f"\ncheckpoint: {ckpt} ({size_mb:.0f} MB safetensors incl. fp32 embeddings)")
    print(f"fp32      : {prompt}{text_fp!s}")
    print(f"W4 (disk) : {prompt}{text_q!s}")
    print(f"greedy decode, 24 tokens, {torch.get_num_threads()} threads: fp32 {tps_fp:.1f} tok/s, "
          f"W4 {tps_q:.1f} tok/s ({tps_q / tps_fp:.2f}x)")
    kernels = sorted({r['name'] for r in fxkernels.available_kernels() if r['usable'] and r['op'] == 'dequant_linear'})
    print(f"usable dequant_linear kernels here: {', '.join(kernels)}")
    print(f"total {time.time() - t0:.0f} s")
    return 0
