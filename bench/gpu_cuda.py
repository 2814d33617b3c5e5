"""One command for a GPU machine: build fxkernels._cuda, check it against the reference, benchmark.

    python bench/gpu_cuda.py OUT.md [--no-build] [--quick]

Run from the repository root (the package need not be installed: the script puts the root on
sys.path). Steps:

1. build the CUDA extension in place (FXK_BUILD_CUDA=1; only that extension, for the local GPU's
   architecture unless FXK_CUDA_ARCHS is set);
2. correctness on the GPU, one ``PASS``/``FAIL`` line per case: raw int8 GEMM bit-exact vs
   ``fxkernels.reference.int8_mm`` and ``torch._int_mm`` for every tile config, activation
   quantization bit-exact, fused W8A8 ``qact_linear`` vs the reference, QuantLinear end to end,
   ``torch.library.opcheck`` of ``fxk::int8_mm_cuda``, dispatch choosing the cuda kernels;
3. benchmark (CUDA graphs, so times are GPU times, not Python launch overhead) of the fused
   GEMM+epilogue against ``torch._int_mm`` + a separate torch epilogue and against cuBLAS fp16
   (``F.linear``), M in {1, 16, 128, 1024, 4096}, N = K in {4096, 8192}; markdown to OUT.md.

Every case runs in its own try/except; the exit status is 1 if any correctness case failed.
"""

from __future__ import annotations

import argparse
import glob
import os
import statistics
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

RESULTS = []  # (name, ok, detail)


def log(msg):
    print(msg, flush=True)


def case(name):
    def deco(fn):
        def run(*a, **k):
            t0 = time.time()
            try:
                detail = fn(*a, **k) or ""
                RESULTS.append((name, True, detail))
                log(f"PASS {name} ({time.time() - t0:.1f}s) {detail}")
            except Exception as e:  # each case reports and the run goes on
                RESULTS.append((name, False, f"{type(e).__name__}: {e}"))
                log(f"FAIL {name}: {type(e).__name__}: {e}")
                traceback.print_exc(limit=4)
        return run
    return deco


# -- 1. build ------------------------------------------------------------------------------------
BUILD_SNIPPET = r"""
import os, sys
sys.path.insert(0, os.path.join(os.getcwd(), "csrc", "cuda"))
from build_ext import cuda_extensions
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension
exts, why = cuda_extensions(os.getcwd())
print("flexround:", why, flush=True)
setup(name="fxk_cuda_build", ext_modules=exts,
      cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
      script_args=["build_ext", "--inplace", "--build-temp", os.path.join("build", "cuda_temp")])
"""


def build():
    import torch
    env = dict(os.environ, FXK_BUILD_CUDA="1", MAX_JOBS=str(min(16, os.cpu_count() or 4)))
    if "FXK_CUDA_ARCHS" not in env and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        env["FXK_CUDA_ARCHS"] = f"{major}{minor}"  # only this GPU: halves the build time
    t0 = time.time()
    r = subprocess.run([sys.executable, "-c", BUILD_SNIPPET], cwd=ROOT, env=env, capture_output=True, text=True)
    tail = (r.stdout + r.stderr)[-3000:]
    if r.returncode != 0:
        log(tail)
        raise RuntimeError(f"build failed (rc={r.returncode})")
    so = glob.glob(os.path.join(ROOT, "fxkernels", "_cuda*.so"))
    log(f"build: {time.time() - t0:.0f}s, {so}")
    return so


# -- 2. correctness ------------------------------------------------------------------------------
def correctness(quick):
    import torch
    import torch.nn.functional as F  # noqa: F401
    from fxkernels import QuantLinear, QuantSpec, dispatch, reference
    from fxkernels.backends import cuda
    from fxkernels import _cuda as ext

    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(0)

    def ri(*shape):
        return torch.randint(-128, 128, shape, dtype=torch.int8, generator=g)

    mm_shapes = [(1, 256, 4096), (16, 4096, 4096), (17, 333, 272), (255, 520, 1040), (1024, 1024, 1024),
                 (4096, 4096, 512)]
    for m, n, k in mm_shapes[: 3 if quick else None]:
        @case(f"int8_mm exact M={m} N={n} K={k} all configs")
        def _():
            a, b = ri(m, k), ri(n, k)
            ref = reference.int8_mm(a, b)
            ad, bd = a.to(dev), b.to(dev)
            for cfg in [-1] + list(range(ext.num_configs)):
                got = cuda.int8_mm(ad, bd, cfg).cpu()
                if not torch.equal(got, ref):
                    bad = (got != ref).nonzero()[:5].tolist()
                    raise AssertionError(f"config {cfg}: {int((got != ref).sum())} mismatches, first {bad}")
            if m > 16 and n % 8 == 0 and k % 8 == 0:
                ti = torch._int_mm(ad, bd.t()).cpu()
                assert torch.equal(ti, ref), "torch._int_mm disagrees with the reference"
            return f"(configs -1..{ext.num_configs - 1})"
        _()

    @case("int8_mm extremes (-128*-128, K=131072 bound)")
    def _():
        a = torch.full((32, 65536), -128, dtype=torch.int8, device=dev)
        got = cuda.int8_mm(a, a[:24]).cpu()
        assert torch.equal(got, torch.full((32, 24), 128 * 128 * 65536, dtype=torch.int32))
    _()

    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for static in (False, True):
            @case(f"quantize_act bit-exact {dtype} {'static' if static else 'dynamic'}")
            def _():
                x = torch.randn(300, 4104, generator=g) * torch.logspace(-3, 2, 300)[:, None]
                x[0] = 0
                x[1] = x[1].abs() + 0.1
                x[2, :8] = torch.tensor([0.5, 1.5, -2.5, 2.5, 1e4, -1e4, 3.5, -0.5])
                x = x.to(dtype)
                s, z = (torch.tensor([0.037]), torch.tensor([5], dtype=torch.int32)) if static else (None, None)
                rq, rs, rz = reference.quantize_act(x, s, z)
                for xx in (x, x[:, 3:]):  # aligned vector path and unaligned scalar path
                    with dispatch.use_backend("cuda"):
                        q, sc, zz = torch.ops.fxk.quantize_act(
                            xx.to(dev), None if s is None else s.to(dev), None if z is None else z.to(dev))
                    rq, rs, rz = reference.quantize_act(xx, s, z)
                    assert torch.equal(sc.cpu(), rs), "scale differs"
                    assert torch.equal(zz.cpu(), rz), "zero differs"
                    assert torch.equal(q.cpu(), rq), f"{int((q.cpu() != rq).sum())} codes differ"
            _()

    tol = {torch.float32: 2.0 ** -21, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}
    for m, n, k in [(1, 4096, 4096), (77, 200, 512), (1024, 2048, 4096)][: 2 if quick else None]:
        for sym in (False, True):
            for out_dtype in (torch.float32, torch.float16, torch.bfloat16):
                @case(f"qact_linear M={m} N={n} K={k} {'sym' if sym else 'asym'} -> {out_dtype}")
                def _():
                    xq, c = ri(m, k), ri(n, k)
                    sa = torch.rand(m, generator=g) * 0.05 + 1e-3
                    za = torch.randint(-128, 128, (m,), dtype=torch.int32, generator=g)
                    sw = torch.rand(n, 1, generator=g) * 0.01 + 1e-4
                    zero = (torch.full((n, 1), 128, dtype=torch.int32) if sym
                            else torch.randint(0, 256, (n, 1), dtype=torch.int32, generator=g))
                    bias = torch.randn(n, generator=g)
                    wsum = reference.weight_sums(c, 8, k, 1)
                    args = (xq, sa, za, c, sw, zero, wsum, bias, 8, out_dtype)
                    ref = reference.qact_linear(*args).float()
                    dargs = [a.to(dev) if isinstance(a, torch.Tensor) else a for a in args]
                    with dispatch.use_backend("cuda"):
                        got = torch.ops.fxk.qact_linear(*dargs).cpu().float()
                    t = tol[out_dtype]
                    err = ((got - ref).abs() / (ref.abs() + ref.abs().max() * 1e-3)).max().item()
                    assert err <= 2 * t, f"max relative error {err:.3g} > {2 * t:.3g}"
                    for cfg in range(ext.num_configs):
                        g2 = cuda.qact_linear(*dargs, config=cfg).cpu().float()
                        e2 = ((g2 - ref).abs() / (ref.abs() + ref.abs().max() * 1e-3)).max().item()
                        assert e2 <= 2 * t, f"config {cfg}: max relative error {e2:.3g}"
                    return f"max rel err {err:.2e}"
                _()

    @case("QuantLinear W8A8 (per-tensor asym weights, dynamic + static acts) on cuda vs reference")
    def _():
        torch.manual_seed(0)
        lin = torch.nn.Linear(1024, 768)
        x = torch.randn(5, 7, 1024)
        for spec, extra in ((QuantSpec(bits=8, granularity="tensor", act_bits=8, act_mode="dynamic"), {}),
                            (QuantSpec(bits=8, granularity="channel", act_bits=8, act_mode="static"),
                             dict(act_scale=torch.tensor([0.03]), act_zero=torch.tensor([-3], dtype=torch.int32)))):
            q = QuantLinear.from_linear(lin, spec, **extra)
            with dispatch.use_backend("reference"):
                ref = q(x)
            qd = q.to(dev)
            with dispatch.use_backend("cuda"):
                got = qd(x.to(dev)).cpu()
            err = ((got - ref).abs().max() / ref.abs().max()).item()
            assert err < 1e-5, f"{spec}: relative error {err:.3g}"
    _()

    @case("dispatch picks the cuda kernels for CUDA tensors")
    def _():
        x = torch.randn(4, 64, device=dev)
        k = dispatch.select("quantize_act", x, None, None)
        assert k.backend == "cuda", k.name
        xq, sa, za = torch.ops.fxk.quantize_act(x, None, None)
        w = torch.zeros(32, 64, dtype=torch.int8, device=dev)
        s, z = torch.ones(32, 1, device=dev), torch.full((32, 1), 128, dtype=torch.int32, device=dev)
        ws = torch.zeros(32, 1, dtype=torch.int32, device=dev)
        k = dispatch.select("qact_linear", xq, sa, za, w, s, z, ws, None, 8, torch.float16)
        assert k.backend == "cuda", k.name
        w4 = torch.zeros(32, 32, dtype=torch.uint8, device=dev)
        k = dispatch.select("qact_linear", xq, sa, za, w4, s, z, ws, None, 4, torch.float16)
        assert k.backend != "cuda"
    _()

    @case("opcheck fxk::int8_mm_cuda")
    def _():
        a, b = ri(33, 128).to(dev), ri(40, 128).to(dev)
        torch.library.opcheck(torch.ops.fxk.int8_mm_cuda.default, (a, b, -1))
    _()

    @case("torch.compile over fxk::int8_mm_cuda")
    def _():
        a, b = ri(64, 256).to(dev), ri(48, 256).to(dev)
        f = torch.compile(lambda a, b: torch.ops.fxk.int8_mm_cuda(a, b, -1) + 1, fullgraph=True)
        assert torch.equal(f(a, b).cpu(), reference.int8_mm(a.cpu(), b.cpu()) + 1)
    _()


# -- 3. benchmark --------------------------------------------------------------------------------
def gpu_time_ms(fn, reps=20, rounds=5):
    """Median per-call time of ``fn`` replayed from a CUDA graph (GPU time without launch overhead);
    falls back to eager timing if capture fails."""
    import torch
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(reps):
                fn()
        run = graph.replay
        mode = "graph"
    except Exception:
        def run():
            for _ in range(reps):
                fn()
        mode = "eager"
    run()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        run()
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1) / reps)
    return statistics.median(times), mode


def benchmark(out_path, quick):
    import torch
    import torch.nn.functional as F
    from fxkernels import reference  # noqa: F401
    from fxkernels.backends import cuda
    from fxkernels import _cuda as ext

    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(0)
    rows, cfg_rows = [], []
    ms_list = [1, 16, 128, 1024, 4096]
    nk_list = [4096, 8192]
    for nk in nk_list:
        n = k = nk
        w = torch.randint(-128, 128, (n, k), dtype=torch.int8, device=dev)
        sw = torch.rand(n, 1, device=dev) * 0.01 + 1e-4
        zero = torch.randint(0, 256, (n, 1), dtype=torch.int32, device=dev)  # asymmetric: needs row sums
        wsum = w.to(torch.int32).sum(1, keepdim=True).to(torch.int32)
        bias = torch.randn(n, device=dev)
        w16 = torch.randn(n, k, device=dev, dtype=torch.float16)
        for m in ms_list:
            row = dict(M=m, NK=nk)
            try:
                xq = torch.randint(-128, 128, (m, k), dtype=torch.int8, device=dev)
                sa = torch.rand(m, device=dev) * 0.05 + 1e-3
                za = torch.randint(-128, 128, (m,), dtype=torch.int32, device=dev)
                x16 = torch.randn(m, k, device=dev, dtype=torch.float16)
                ops = 2.0 * m * n * k

                def ours(cfg=-1):
                    return cuda.qact_linear(xq, sa, za, w, sw, zero, wsum, bias, 8, torch.float16, config=cfg)
                cuda._needs_xsum(zero)  # decide (and cache) outside graph capture
                row["ours"], row["mode"] = gpu_time_ms(ours)
                row["cfg"] = ext.config_name(ext.pick_config(m, n, props.multi_processor_count))
                row["ours_raw"], _ = gpu_time_ms(lambda: cuda.int8_mm(xq, w))

                # torch._int_mm needs M > 16: pad the activation rows (what a user would have to do)
                mp = max(m, 17)
                xq_p = torch.nn.functional.pad(xq, (0, 0, 0, mp - m)) if mp != m else xq
                sa_p = torch.nn.functional.pad(sa, (0, mp - m), value=1.0)
                za_p = torch.nn.functional.pad(za, (0, mp - m))
                zs = (zero - 128).reshape(1, -1)
                wt = w.t()
                swr = sw.reshape(1, -1)
                ws_r = wsum.reshape(1, -1)

                def int_mm_epilogue():
                    acc = torch._int_mm(xq_p, wt)
                    xsum = xq_p.sum(1, dtype=torch.int32).reshape(-1, 1)
                    zc = za_p.reshape(-1, 1)
                    corr = acc - zc * ws_r - zs * xsum + k * zc * zs
                    return (corr.float() * swr * sa_p.reshape(-1, 1) + bias).to(torch.float16)
                row["intmm"], _ = gpu_time_ms(int_mm_epilogue)
                row["intmm_raw"], _ = gpu_time_ms(lambda: torch._int_mm(xq_p, wt))
                row["padded"] = mp != m
                row["fp16"], _ = gpu_time_ms(lambda: F.linear(x16, w16))
                row["tops"] = ops / row["ours"] / 1e9
                row["tops_fp16"] = ops / row["fp16"] / 1e9
                if m >= 128 and not quick:
                    best = None
                    for cfg in range(ext.num_configs):
                        t, _ = gpu_time_ms(lambda: ours(cfg), reps=10, rounds=3)
                        cfg_rows.append(dict(M=m, NK=nk, cfg=ext.config_name(cfg), ms=t, tops=ops / t / 1e9))
                        best = t if best is None or t < best else best
                    row["best_cfg_ms"] = best
                log(f"bench M={m} N=K={nk}: ours {row['ours']:.4f} ms ({row['tops']:.0f} TOP/s, {row['cfg']}), "
                    f"_int_mm+epi {row['intmm']:.4f} ms, fp16 {row['fp16']:.4f} ms")
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"
                log(f"bench M={m} N=K={nk} FAILED: {row['error']}")
                traceback.print_exc(limit=3)
            rows.append(row)
            if quick and m >= 128:
                break

    def f(v, fmt="{:.4f}"):
        return fmt.format(v) if isinstance(v, (int, float)) else "-"

    lines = [
        "# fxkernels CUDA INT8 GEMM benchmark",
        "",
        f"Device: {props.name} ({props.multi_processor_count} SMs, sm_{props.major}{props.minor}), "
        f"torch {torch.__version__}, CUDA {torch.version.cuda}. Times are medians of CUDA-graph replays "
        "(GPU time, no Python overhead), fp16 output.",
        "",
        "* **ours**: `fxk::qact_linear` CUDA kernel = int8 mma.sync GEMM with fused epilogue (per-token "
        "activation scale/zero, per-channel asymmetric weight scale/zero, exact zero-point corrections, bias).",
        "* **_int_mm+epi**: `torch._int_mm` (cuBLASLt int8) then the same epilogue as separate torch ops "
        "(M <= 16 padded to 17 rows, which `_int_mm` requires).",
        "* **fp16**: cuBLAS `F.linear` on fp16 operands of the same shape.",
        "* TOP/s = 2·M·N·K / time. Ratios > 1 mean ours is faster.",
        "",
        "| M | N=K | ours ms | ours TOP/s | tile | _int_mm+epi ms | fp16 ms | fp16 TFLOP/s | vs _int_mm+epi | vs fp16 "
        "| ours raw int32 ms | _int_mm raw ms | best tile ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['M']} | {r['NK']} | error: {r['error'][:120]} |" + " |" * 11)
            continue
        lines.append(
            f"| {r['M']} | {r['NK']} | {f(r['ours'])} | {f(r['tops'], '{:.0f}')} | {r['cfg']} | "
            f"{f(r['intmm'])}{' (padded)' if r['padded'] else ''} | {f(r['fp16'])} | {f(r['tops_fp16'], '{:.0f}')} | "
            f"{f(r['intmm'] / r['ours'], '{:.2f}x')} | {f(r['fp16'] / r['ours'], '{:.2f}x')} | "
            f"{f(r['ours_raw'])} | {f(r['intmm_raw'])} | {f(r.get('best_cfg_ms'))} |")
    if cfg_rows:
        lines += ["", "## Every tile configuration (fused kernel, fp16 out)", "",
                  "| M | N=K | tile | ms | TOP/s |", "|---|---|---|---|---|"]
        for c in cfg_rows:
            lines.append(f"| {c['M']} | {c['NK']} | {c['cfg']} | {c['ms']:.4f} | {c['tops']:.0f} |")
    big = [r for r in rows if r.get("M") == 4096 and r.get("NK") == 4096 and "error" not in r]
    if big:
        r = big[0]
        lines += ["", "## Targets (4096³)", "",
                  f"* vs cuBLAS fp16: {r['fp16'] / r['ours']:.2f}x (target >= 1.6x): "
                  f"{'met' if r['fp16'] / r['ours'] >= 1.6 else 'NOT met'}",
                  f"* vs `_int_mm` + epilogue: {r['intmm'] / r['ours']:.2f}x (target >= 1.1x): "
                  f"{'met' if r['intmm'] / r['ours'] >= 1.1 else 'NOT met'}"]
    lines += ["", "## Correctness", ""] + [f"* {'PASS' if ok else 'FAIL'} {n} {d}" for n, ok, d in RESULTS]
    with open(out_path, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    log(f"wrote {out_path}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="markdown file for the benchmark table")
    ap.add_argument("--no-build", action="store_true", help="use the already built fxkernels._cuda")
    ap.add_argument("--quick", action="store_true", help="fewer shapes (smoke test)")
    args = ap.parse_args()
    import torch
    if not torch.cuda.is_available():
        log("FAIL no CUDA device visible to torch; this script needs a GPU")
        sys.exit(2)
    log(f"device: {torch.cuda.get_device_name()} sm_{''.join(map(str, torch.cuda.get_device_capability()))}, "
        f"torch {torch.__version__}")
    if not args.no_build:
        case("build fxkernels._cuda (FXK_BUILD_CUDA=1)")(build)()
    try:
        from fxkernels import _cuda  # noqa: F401
    except ImportError as e:
        log(f"FAIL import fxkernels._cuda: {e}")
        sys.exit(1)
    t0 = time.time()
    correctness(args.quick)
    log(f"correctness: {sum(ok for _, ok, _ in RESULTS)}/{len(RESULTS)} passed in {time.time() - t0:.0f}s")
    t0 = time.time()
    try:
        benchmark(args.out, args.quick)
    except Exception as e:
        log(f"FAIL benchmark: {type(e).__name__}: {e}")
        traceback.print_exc()
    log(f"benchmark: {time.time() - t0:.0f}s")
    sys.exit(0 if all(ok for _, ok, _ in RESULTS) else 1)


if __name__ == "__main__":
    main()
