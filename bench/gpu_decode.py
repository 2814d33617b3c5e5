"""GPU decode of SmolLM2-135M: the compiled static-cache engine (CUDA graphs) against Hugging Face
fp16 ``generate()``, one prepared command for a machine with one NVIDIA GPU (under 3 minutes):

    PYTHONPATH=. python bench/gpu_decode.py [--new-tokens 128] [--out docs/bench_gpu_decode.md]

Rows (batch 1, greedy, median of 3 interleaved rounds): HF fp16 ``generate()``; the same fp16
model through :class:`fxkernels.Generator` (``torch.compile`` ``mode="reduce-overhead"``: the
decode step captured in a CUDA graph); W4 per-channel (Triton dequant-GEMM) + fp16 ``lm_head``
through ``generate()`` and through the engine. Checks in the same run: the engine's first 64
greedy tokens equal ``generate()``'s on the same model (fp16 and W4). Exit status 1 if a check fails.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fxkernels import QuantSpec, replace_linears
from fxkernels.generation import Generator
from quantizer.bench_decode import PROMPT, engine_decode, hf_decode
from quantizer.decode_bench import interleaved_medians
from quantizer.models import load_smollm2


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--out", default=None, help="also write the table (markdown) here")
    a = p.parse_args()
    if not torch.cuda.is_available():
        print("bench/gpu_decode.py: no CUDA device; this script measures the GPU route", file=sys.stderr)
        return 2
    fp32, tok = load_smollm2(log=lambda *x: None)
    fp16 = copy.deepcopy(fp32).half().cuda().eval()
    w4 = replace_linears(copy.deepcopy(fp32), QuantSpec(4, "channel"), skip=("lm_head",)).half().cuda().eval()
    del fp32
    ids = tok(PROMPT, return_tensors="pt").input_ids.cuda()
    gens = {"fp16": Generator(fp16), "w4": Generator(w4)}
    ok = True
    for name, model in (("fp16", fp16), ("w4", w4)):
        first = gens[name].generate(ids, 64)
        with torch.no_grad():
            want = model.generate(ids, max_new_tokens=64, min_new_tokens=64, do_sample=False,
                                  pad_token_id=tok.eos_token_id)[0, ids.shape[1]:]
        same = torch.equal(first.tokens[0], want)
        ok &= same
        print(f"{'PASS' if same else 'FAIL'} {name}: engine's first 64 greedy tokens equal generate()'s "
              f"(compile {first.compile_seconds:.1f} s)")
    n = a.new_tokens
    rates = interleaved_medians({
        "HF fp16 generate()": lambda: (hf_decode(fp16, ids, n),),
        "fp16, fxkernels.Generator (CUDA graph)": lambda: (engine_decode(gens["fp16"], ids, n),),
        "W4 per-channel (Triton) + fp16 lm_head, generate()": lambda: (hf_decode(w4, ids, n),),
        "W4 per-channel (Triton) + fp16 lm_head, fxkernels.Generator": lambda: (engine_decode(gens["w4"], ids, n),),
    }, rounds=3)
    base = rates["HF fp16 generate()"][0]
    lines = [f"SmolLM2-135M on {torch.cuda.get_device_name()}, batch 1, greedy, {n} new tokens "
             "(`PYTHONPATH=. python bench/gpu_decode.py`)", "", "| | decode tok/s | vs HF fp16 generate() |",
             "|---|---:|---:|"]
    lines += [f"| {k} | {v[0]:.1f} | {v[0] / base:.2f}x |" for k, v in rates.items()]
    table = "\n".join(lines)
    print(table)
    if a.out:
        Path(a.out).write_text(table + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
