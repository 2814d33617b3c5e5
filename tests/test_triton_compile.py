"""Every Triton configuration the dequant-GEMM may choose compiles to a cubin for sm_80 (A100) and
sm_90a (H100), without register spills.

No GPU is needed: ``triton.compile`` on an ``ASTSource`` with a ``GPUTarget`` runs the whole
pipeline (TTIR -> TTGIR -> LLVM -> PTX -> ptxas). This catches what the interpreter cannot:
``tl.dot`` shape limits, layout-conversion failures, and shared memory beyond what the GPU offers
per block (checked here against the opt-in limits: 163 KiB on sm_80, 227 KiB on sm_90). One child
process per architecture, run concurrently, with ``TRITON_INTERPRET`` unset.

Default (fast, ~1-2 s per compile): every configuration the architecture may choose as INT4 g128
fp16 in the scale mode its BM selects, plus further variants spread over the buckets (INT8 bf16,
split-K, the gather mode, bf16 INT4) and half of the fp32-activation tilings. ``-m slow`` adds
the whole matrix: INT8 (the largest weight tile in shared memory), the gather mode and the fp32
group modes on every configuration.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMEM_LIMIT = {80: 166912, 90: 232448}  # cudaDevAttrMaxSharedMemoryPerBlockOptin


def _variants(full: bool, arch: int):
    """(config, bits, dtype, scale mode, split-K, BK override) to compile for ``sm_<arch>``: the
    configurations the backend may choose there (tilings that spill on it are left out)."""
    import torch
    from fxkernels.backends import triton as tb

    cc = (arch // 10, arch % 10)
    out = []
    for cfg in tb.shipped_configs(cc):  # the main case: INT4 g128 fp16, the mode its BM selects
        out.append((cfg, 4, torch.float16, 1 if cfg.bm <= 32 else 2, 1, min(cfg.bk, 128)))
    extras = []
    for limit, _ in tb.BUCKETS:
        m = limit or 4096
        cfg = tb.candidate_configs(m, cc)[1][0]
        gcfg = tb.candidate_configs(m, cc, gather=True)[1][0]
        extras += [(cfg, 8, torch.bfloat16, 0, 1, None), (cfg, 4, torch.float16, 0, 4, None),
                   (gcfg, 4, torch.float16, 3, 1, None), (cfg, 4, torch.bfloat16, 2 if cfg.bm > 32 else 1, 1, None)]
    f32 = [(cfg, 4, torch.float32, 0, 1, None) for cfg in tb.shipped_configs(cc, torch.float32)]
    f32 += [(cfg, 4, torch.float32, 3, 1, None) for cfg in tb.shipped_configs(cc, torch.float32, gather=True)]
    if full:  # the largest weight tiles (INT8 per channel), gathered scales and fp32 group modes everywhere
        extras += [(cfg, 8, torch.bfloat16, 0, 1, None) for cfg in tb.shipped_configs(cc)]
        extras += [(cfg, 4, torch.float16, 3, 1, None) for cfg in tb.shipped_configs(cc, gather=True)]
        extras += [(cfg, 4, torch.float32, 2 if cfg.bm > 32 else 1, 1, None)
                   for cfg in tb.shipped_configs(cc, torch.float32)]
        return out + extras + f32
    return out + extras[::3] + f32[::2]


def _worker(arch: int, full: bool) -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_static
    from fxkernels.backends import triton as tb

    for cfg, bits, dtype, mode, split, bk in _variants(full, arch):
        tag = f"sm_{arch} {cfg} W{bits} {dtype} mode{mode} split{split}"
        try:
            k = tb.compile_variant(arch, cfg, bits, dtype, mode, split_k=split, bk=bk)
            cubin = k.asm.get("cubin", b"")
            spills = sum(1 for _, t in gpu_static.disassemble(cubin) if gpu_static.opcode(t) in ("LDL", "STL"))
            row = dict(tag=tag, cubin=len(cubin), shared=k.metadata.shared, wgmma="wgmma" in k.asm["ptx"],
                       spills=spills, local=gpu_static.resources(cubin)["local"])
        except Exception as e:
            row = dict(tag=tag, error=f"{type(e).__name__}: {str(e)[:2000]}")
        print(json.dumps(row), flush=True)


def _compile_all(full: bool):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    procs = {arch: subprocess.Popen([sys.executable, __file__, "--worker", str(arch), str(int(full))],
                                    env=env, cwd=ROOT,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for arch in (80, 90)}
    rows = {}
    for arch, p in procs.items():
        out, err = p.communicate(timeout=600)
        if p.returncode != 0:
            pytest.fail(f"compile worker sm_{arch} failed (rc={p.returncode}):\n{err[-5000:]}")
        rows[arch] = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return rows


@pytest.fixture(scope="module")
def compiled():
    return _compile_all(full=False)


def _check(rows, arch, full):
    assert len(rows) == len(_variants(full, arch))
    errors = [f"{r['tag']}: {r['error']}" for r in rows if "error" in r]
    assert not errors, "\n".join(errors)
    for r in rows:
        assert r["cubin"] > 0, f"{r['tag']}: no cubin"
        assert r["shared"] <= SMEM_LIMIT[arch], f"{r['tag']}: {r['shared']} B shared memory > {SMEM_LIMIT[arch]}"
    spilled = [f"{r['tag']}: {r['spills']} LDL/STL, {r['local']} B local" for r in rows if r["spills"] or r["local"]]
    assert not spilled, "register spills in a configuration the backend may choose:\n" + "\n".join(spilled)


@pytest.mark.parametrize("arch", [80, 90])
def test_every_shipped_config_compiles(compiled, arch):
    _check(compiled[arch], arch, full=False)


@pytest.mark.slow
def test_full_variant_matrix_compiles():
    rows = _compile_all(full=True)
    for arch in (80, 90):
        _check(rows[arch], arch, full=True)


def test_hopper_uses_wgmma_for_large_tiles(compiled):
    """Tiles with BM >= 64 and 4+ warps must reach Hopper's warp-group MMA, or large-M speed is lost."""
    big = [r for r in compiled[90] if "BM128" in r["tag"] and "mode2" in r["tag"]]
    assert big and all(r["wgmma"] for r in big), [r["tag"] for r in big if not r["wgmma"]]


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--worker":
    _worker(int(sys.argv[2]), bool(int(sys.argv[3])))
