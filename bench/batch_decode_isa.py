"""Batch-8 against batch-1 decode through ``fxkernels.Generator`` on each integer kernel set the
CPU offers (VNNI, AMX tiles), SmolLM2-135M W4 + INT8 ``lm_head``, in one process.

Figures are CPU milliseconds per decode step (``time.process_time``) on one thread, so they hold on
a busy machine where wall-clock tokens/s would not; ``flexround bench decode`` gives the wall-clock
figures on a quiet one. A step's time is (run of ``--tokens`` tokens - run of one token) / (tokens - 1),
which leaves the prefill out. The batch rows repeat one prompt, so row 0's tokens must equal batch 1's.

    OMP_NUM_THREADS=1 .venv/bin/python bench/batch_decode_isa.py [--batch 8] [--tokens 128] [--rounds 2]
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    from fxkernels import _C, fuse_projections
    from fxkernels.backends import cpu
    from fxkernels.generation import Generator
    from quantizer.bench_decode import PROMPT, quantized_smollm2
    from quantizer.models import load_smollm2

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(1)
    isas = ["avx512vnni"] + (["avx512amx"] if _C.cpu_features().get("amx_int8") else [])
    if not _C.cpu_features().get("avx512vnni"):
        raise SystemExit("this CPU has no AVX-512 VNNI: nothing to compare")
    fp, tok = load_smollm2(log=lambda *_: None)
    one = tok(PROMPT, return_tensors="pt").input_ids
    many = one.repeat(a.batch, 1)
    model = quantized_smollm2(fp)
    fuse_projections(model)
    del fp
    # one cache length for the prefill-only and the full runs, so neither reallocates nor recompiles
    gen = Generator(model, max_length=-(-(one.shape[1] + a.tokens) // 128) * 128)
    gen.generate(one, a.tokens)
    gen.generate(many, a.tokens)  # both step shapes compiled for this cache length before timing

    def cpu_ms_per_step(ids):
        c0 = time.process_time()
        gen.generate(ids, 1)  # prefill only
        c1 = time.process_time()
        out = gen.generate(ids, a.tokens)
        c2 = time.process_time()
        return ((c2 - c1) - (c1 - c0)) / (a.tokens - 1) * 1e3, out

    rows = {isa: [] for isa in isas}
    same = True
    for _ in range(a.rounds):
        for isa in isas:
            with cpu.isa(isa):
                t1, o1 = cpu_ms_per_step(one)
                tn, on = cpu_ms_per_step(many)
            rows[isa].append((t1, tn))
            same = same and torch.equal(on.tokens[0], o1.tokens[0])
    print(f"SmolLM2-135M W4 + INT8 lm_head, engine, {a.tokens} new tokens, 1 thread, CPU ms per decode step "
          f"(best of {a.rounds})\n")
    print(f"| kernels | batch 1 | batch {a.batch} | batch {a.batch} / batch 1 tokens/s |")
    print("|---|---:|---:|---:|")
    for isa, r in rows.items():
        t1, tn = min(x[0] for x in r), min(x[1] for x in r)
        print(f"| {isa} | {t1:.1f} | {tn:.1f} | {a.batch * t1 / tn:.2f}x |")
    print(f"\nbatch row 0 equals batch 1's tokens: {same}")


if __name__ == "__main__":
    main()
