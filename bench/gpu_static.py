"""Static GPU review without a GPU: registers, spills, shared memory and main-loop SASS of every
Triton kernel variant (the weight-only dequant-GEMMs, the integer-activation W8A8 / W4A8 GEMM and
the activation quantizer) and the CUDA INT8 GEMM cubin, compiled for sm_80 and sm_90 (sm_90a:
Triton targets Hopper with the arch-specific features, wgmma and TMA).

    PYTHONPATH=. python bench/gpu_static.py [--out docs/GPU_STATIC.md] [--arch 80 90] [--quick]

Each variant is compiled with ``triton.compile`` (or ``nvcc -cubin``) and disassembled with the
``cuobjdump`` that ships with Triton. The main loop is the backward branch whose body holds the
most global loads (``LDG``/``LDGSTS``); its instructions are counted statically (every
instruction once, predicated or not: an issue-slot count, not a timing).

Model of the issue-rate bound (stated, not measured): an SM issues at most 4 warp-instructions
per clock (4 SMSPs x 1), i.e. 128 thread-instructions. A loop of ``L`` SASS instructions run by
``T`` threads over ``W`` weights costs ``L*T/W`` thread-instructions per weight, so one SM
consumes at most ``128 / (L*T/W)`` weights per clock, and the GPU
``SMs x clock x that x bytes-per-weight`` bytes per second. The printed share is that rate over
the HBM bandwidth, capped at 100 %: the ceiling the instruction stream alone allows, before
latency, bank conflicts or tensor-core time. GPUs: H100 SXM (132 SMs, 1.98 GHz boost,
3.35 TB/s), H200 (132 SMs, 1.98 GHz, 4.8 TB/s), A100 SXM 80 GB (108 SMs, 1.41 GHz, 2.04 TB/s).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GPUS = {  # name: (arch, SMs, boost clock GHz, HBM GB/s)
    "H100 SXM": (90, 132, 1.98, 3350.0),
    "H200": (90, 132, 1.98, 4800.0),
    "A100 SXM": (80, 108, 1.41, 2039.0),
}
ISSUE_PER_SM_CLK = 4 * 32  # 4 SMSPs x 1 warp-instruction per clock x 32 threads
_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRA = re.compile(r"\bBRA\s+(?:\S+\s+)?0x([0-9a-f]+)")
_GLOAD = re.compile(r"\b(LDG|LDGSTS|UTMALDG|UBLKCP)\b")


def tool(name: str) -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name}: neither in triton's bundled bin/ nor on PATH")
    return found


def disassemble(cubin: bytes) -> list:
    """``[(address, instruction text)]`` of every SASS instruction in ``cubin``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True, check=True).stdout
    return [(int(a, 16), t) for a, t in _LINE.findall(out)]


def resources(cubin: bytes) -> dict:
    """Registers, stack and local memory bytes per thread (``cuobjdump -res-usage``)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    regs = [int(v) for v in re.findall(r"REG:(\d+)", out)]
    stack = [int(v) for v in re.findall(r"STACK:(\d+)", out)]
    local = [int(v) for v in re.findall(r"LOCAL:(\d+)", out)]
    return dict(regs=max(regs or [0]), stack=max(stack or [0]), local=max(local or [0]))


def main_loop(ins: list) -> list:
    """Body of the loop (backward branch) holding the most global loads; ties: the shortest."""
    best, best_key = [], None
    for addr, text in ins:
        m = _BRA.search(text)
        if not m or int(m.group(1), 16) >= addr:
            continue
        start = int(m.group(1), 16)
        body = [(a, t) for a, t in ins if start <= a <= addr]
        key = (sum(bool(_GLOAD.search(t)) for _, t in body), -len(body))
        if best_key is None or key > best_key:
            best, best_key = body, key
    return best


def opcode(text: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", text).split()[0].split(".")[0]


def analyse(cubin: bytes, threads: int, weights_per_iter: int, bits: int) -> dict:
    ins = disassemble(cubin)
    body = main_loop(ins)
    hist = collections.Counter(opcode(t) for _, t in body)
    spill_ins = sum(1 for _, t in ins if opcode(t) in ("LDL", "STL"))
    per_w = len(body) * threads / weights_per_iter if body else float("nan")
    row = dict(loop=len(body), per_weight=per_w, per_byte=per_w * 8 / bits, hist=hist, spill_ins=spill_ins)
    row.update(resources(cubin))
    for gpu, (arch, sms, ghz, bw) in GPUS.items():
        bytes_per_s = sms * ghz * 1e9 * ISSUE_PER_SM_CLK / per_w * bits / 8
        row[gpu] = min(1.0, bytes_per_s / (bw * 1e9))
    return row


# -- variants ---------------------------------------------------------------------------------
def triton_variants(arch: int, quick: bool):
    """(label, compile() -> kernel, threads, weights per main-loop trip, bits) for ``sm_<arch>``:
    every decode candidate of that architecture, then the general kernel's configurations."""
    import torch
    from fxkernels.backends import triton as tb

    out = []
    layouts = [(4, 32, torch.float16, "g128")] if quick else [
        (4, 32, torch.float16, "g128"), (4, 1, torch.float16, "ch"), (4, 32, torch.bfloat16, "g128"),
        (8, 1, torch.float16, "ch"), (8, 32, torch.float16, "g128")]
    for cfg in tb.decode_configs((arch // 10, arch % 10)):
        for bits, groups, dt, lay in layouts:
            out.append((f"decode {cfg} W{bits} {lay} {str(dt)[6:]}",
                        lambda cfg=cfg, bits=bits, groups=groups, dt=dt:
                        tb.compile_decode_variant(arch, cfg, bits, dt, groups),
                        32 * cfg.warps, cfg.bn * cfg.bk, bits))
    for cfg in tb.shipped_configs((arch // 10, arch % 10)):  # what this architecture may choose
        if quick and cfg.bm > 16:
            continue
        bk = min(cfg.bk, 128)
        mode = 1 if cfg.bm <= 32 else 2
        out.append((f"gemm {cfg} W4 g128 fp16 (BK{bk} mode{mode})",
                    lambda cfg=cfg, bk=bk, mode=mode: tb.compile_variant(arch, cfg, 4, torch.float16, mode, bk=bk),
                    32 * cfg.warps, cfg.bn * bk, 4))
    return out


def qact_variants(arch: int, quick: bool):
    """(label, compile() -> kernel, threads, weights per main-loop trip, bits, config) of the
    integer-activation GEMM: every configuration the backend may choose on ``sm_<arch>``, with the
    layouts it serves (per-channel: W8 and W4; grouped: W4 and W8 g128; odd groups: W4 g48)."""
    from fxkernels.backends import triton_int8 as ti

    out = []
    for cfg, grouped in ti.qact_shipped_configs((arch // 10, arch % 10)):
        if cfg in ti.QACT_ODD_GROUP_CONFIGS:
            layouts = [(4, 96, "g48", 4608)]
        elif grouped:
            layouts = [(4, 32, "g128", 4096)] if quick else [(4, 32, "g128", 4096), (8, 32, "g128", 4096)]
        else:
            layouts = [(8, 1, "ch", 4096)] if quick else [(8, 1, "ch", 4096), (4, 1, "ch", 4096)]
        for bits, groups, lay, k in layouts:
            plan = ti.make_qact_plan(cfg, 16, 4096, k, groups, 132, 1)
            out.append((f"qact {cfg} W{bits}A8 {lay} (mode{plan.scale_mode} BK{plan.bk})",
                        lambda cfg=cfg, bits=bits, groups=groups, k=k: ti.compile_qact_variant(arch, cfg, bits, groups,
                                                                                                 k=k),
                        32 * cfg.warps, cfg.bn * plan.bk, bits, cfg))
    return out


def mma_ops(cubin: bytes) -> collections.Counter:
    """Tensor-core instructions in the whole kernel (IGMMA: Hopper warp-group MMA on integers,
    HGMMA: on fp16/bf16; IMMA / HMMA: the warp-level mma.sync)."""
    return collections.Counter(opcode(t) for _, t in disassemble(cubin) if "MMA" in opcode(t))


def cuda_int8_rows(archs) -> list:
    """ptxas -v figures of the CUDA INT8 GEMM (csrc/cuda), when nvcc is present (no SASS loop
    count: its weights are int8 activations' partner, reported as registers/spills only)."""
    nvcc = shutil.which("nvcc")
    src = ROOT / "csrc" / "cuda"
    if not nvcc or not src.is_dir():
        return []
    rows = []
    for cu in sorted(src.glob("*.cu")):
        for arch in archs:
            with tempfile.TemporaryDirectory() as d:
                cmd = [nvcc, "-cubin", f"-arch=sm_{arch}", "-O3", "-std=c++17", "-Xptxas", "-v",
                       f"-I{ROOT / 'csrc'}", str(cu), "-o", os.path.join(d, "k.cubin")]
                p = subprocess.run(cmd, capture_output=True, text=True)
                if p.returncode != 0:
                    rows.append((cu.name, arch, f"nvcc failed: {p.stderr.strip().splitlines()[-1][:200]}"))
                    continue
                for fn, info in re.findall(r"Compiling entry function '(\w+)'.*?\n(.*?Used \d+ registers[^\n]*)",
                                           p.stderr, flags=re.S):
                    regs = re.search(r"Used (\d+) registers", info).group(1)
                    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info)
                    smem = re.search(r"(\d+) bytes smem", info)
                    text = (f"`{_demangle(fn)}`: {regs} regs, spills "
                            f"{spill.group(1) + '/' + spill.group(2) if spill else '?'} B st/ld, "
                            f"smem {smem.group(1) if smem else 0} B")
                    if (cu.name, arch, text) not in rows:  # ptxas reports some entries once per pass
                        rows.append((cu.name, arch, text))
    return rows


def _demangle(name: str) -> str:
    filt = shutil.which("c++filt")
    if not filt:
        return name
    out = subprocess.run([filt, name], capture_output=True, text=True).stdout.strip() or name
    return out.replace("(anonymous namespace)::", "")


def summary(results: dict, archs) -> list:
    """The decode comparison the issue asks for: INT4 g128 fp16 at M <= 16, the decode kernel's
    untimed default candidate against the general kernel's decode-bucket default."""
    from fxkernels.backends import triton as tb

    out = ["## Decode (M <= 16), INT4 g128 fp16: main loop", "",
           "| arch | kernel (configuration) | SASS instr / INT4 weight | regs | spills | issue-bound share of HBM |",
           "|---|---|---|---|---|---|"]
    for arch in archs:
        new = f"decode {tb.decode_configs((arch // 10, arch % 10))[0]} W4 g128 float16"
        old_cfg = tb.bucket_configs(1)[0]
        old = f"gemm {old_cfg} W4 g128 fp16 (BK{min(old_cfg.bk, 128)} mode1)"
        for label in (new, old):
            r = results.get((arch, label))
            if r is None:
                continue
            share = " / ".join(f"{g} {100 * r[g]:.0f}%" for g in GPUS if GPUS[g][0] == arch)
            out.append(f"| sm_{arch} | {label} | {r['per_weight']:.2f} | {r['regs']} | {r['spill_ins']} | {share} |")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="markdown file to write (e.g. docs/GPU_STATIC.md)")
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    ap.add_argument("--quick", action="store_true", help="INT4 g128 fp16 and the decode bucket only")
    ap.add_argument("--no-cuda", action="store_true", help="skip the nvcc compile of csrc/cuda")
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET"):
        sys.exit("gpu_static.py: unset TRITON_INTERPRET (kernels must be decorated for the GPU compiler)")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import triton

    lines = ["| arch | variant | loop instr | instr / weight | instr / weight byte | regs | spills (LDL+STL, local B) "
             "| smem KiB | issue-bound share of HBM (H100 / H200 / A100) | top opcodes in the loop |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    failures, results = [], {}
    for arch in args.arch:
        for label, comp, threads, wpi, bits in triton_variants(arch, args.quick):
            try:
                k = comp()
                r = analyse(k.asm["cubin"], threads, wpi, bits)
            except Exception as e:  # report and go on: one broken variant must not hide the others
                failures.append(f"sm_{arch} {label}: {type(e).__name__}: {str(e)[:300]}")
                print("FAIL", failures[-1], flush=True)
                continue
            shares = " / ".join(f"{100 * r[g]:.0f}%" if GPUS[g][0] == arch else "-" for g in GPUS)
            top = ", ".join(f"{op} {c}" for op, c in r["hist"].most_common(6))
            line = (f"| sm_{arch} | {label} | {r['loop']} | {r['per_weight']:.2f} | {r['per_byte']:.2f} | "
                    f"{r['regs']} | {r['spill_ins']}, {r['local']} | {k.metadata.shared / 1024:.0f} | {shares} | "
                    f"{top} |")
            print(line, flush=True)
            lines.append(line)
            results[(arch, label)] = r
    qlines = ["| arch | variant | loop instr | instr / weight | regs | spills (LDL+STL, local B) | smem KiB "
              "| tensor-core instructions (whole kernel) | top opcodes in the loop |",
              "|---|---|---|---|---|---|---|---|---|"]
    for arch in args.arch:
        for label, comp, threads, wpi, bits, cfg in qact_variants(arch, args.quick):
            try:
                k = comp()
                r = analyse(k.asm["cubin"], threads, wpi, bits)
                mma = mma_ops(k.asm["cubin"])
            except Exception as e:
                failures.append(f"sm_{arch} {label}: {type(e).__name__}: {str(e)[:300]}")
                print("FAIL", failures[-1], flush=True)
                continue
            top = ", ".join(f"{op} {c}" for op, c in r["hist"].most_common(6))
            line = (f"| sm_{arch} | {label} | {r['loop']} | {r['per_weight']:.2f} | {r['regs']} | "
                    f"{r['spill_ins']}, {r['local']} | {k.metadata.shared / 1024:.0f} | "
                    f"{', '.join(f'{op} {c}' for op, c in sorted(mma.items()))} | {top} |")
            print(line, flush=True)
            qlines.append(line)
        from fxkernels.backends import triton_int8 as ti
        for static in (False, True):
            try:
                k = ti.compile_quantize_variant(arch, __import__("torch").bfloat16, static)
                res = resources(k.asm["cubin"])
                qlines.append(f"| sm_{arch} | quantize_act bf16 {'static' if static else 'dynamic'} BLOCK"
                              f"{ti.QUANT_BLOCK} | - | - | {res['regs']} | -, {res['local']} | "
                              f"{k.metadata.shared / 1024:.0f} | - | - |")
            except Exception as e:
                failures.append(f"sm_{arch} quantize_act: {type(e).__name__}: {str(e)[:300]}")
    cuda = [] if args.no_cuda else cuda_int8_rows(args.arch)
    md = ["# Static GPU review (compile-only, no GPU)", "",
          f"Command: `PYTHONPATH=. python bench/gpu_static.py --out docs/GPU_STATIC.md` "
          f"(triton {triton.__version__}; cuobjdump from Triton's bundled CUDA tools).", "",
          "Issue model: 4 SMSPs x 1 warp-instruction per clock per SM (128 thread-instructions), "
          "boost clock, every main-loop instruction costs one issue slot; "
          + "; ".join(f"{g}: sm_{a}, {s} SMs, {c} GHz, {bw / 1000:.2f} TB/s" for g, (a, s, c, bw) in GPUS.items())
          + ". The share is the HBM bandwidth the instruction stream alone could sustain (capped at 100 %).",
          "Instructions per weight = main-loop SASS instructions x threads per CTA / weights per loop trip.", ""]
    md += summary(results, args.arch) + ["", "## Every variant", ""] + lines
    md += ["", "## Integer-activation GEMM (W8A8 / W4A8, `triton_qact_linear`) and activation quantizer", "",
           "Every configuration the backend may choose (fxkernels/backends/triton_int8.py), at M = 16, "
           "N = K = 4096 (odd groups: K = 4608, g48), no split. Instructions per weight count the main "
           "loop (one K step) over the BN x BK weights it consumes; for the large-M tiles the tensor "
           "cores, not the issue rate, bound the loop. IGMMA = Hopper warp-group MMA on int8 "
           "(`wgmma.mma_async ... .s32.s8.s8`), IMMA = `mma.sync`.", ""] + qlines
    if cuda:
        md += ["", "## CUDA kernels (nvcc -cubin -Xptxas -v; static shared memory only, the GEMM's dynamic "
               "shared memory is sized at launch)", ""] + [f"- sm_{a} {f}: {t}" for f, a, t in cuda]
    if failures:
        md += ["", "## Variants that failed to compile", ""] + [f"- {f}" for f in failures]
    text = "\n".join(md) + "\n"
    print("\n".join(md[len(md) - len(cuda) - 3:]) if cuda else "", flush=True)
    if args.out:
        Path(args.out).write_text(text)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
