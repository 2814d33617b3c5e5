"""One prepared command for a machine with one NVIDIA GPU (any model): checks first, then timings,
of every GPU kernel of the project (Triton weight-only, Triton W8A8 / W4A8 + activation
quantizer, the CUDA INT8 extension), against cuBLAS and torch's quantized peers. Under 8 minutes
on one H100 or H200 (``--budget``, default 420 s, bounds the timing phase by wall clock).

    PYTHONPATH=. python bench/gpu_all.py --out docs/bench_gpu.md [--quick] [--no-build]
    PYTHONPATH=. python bench/gpu_all.py --dry-run          # the plan; any machine, no GPU needed
    TRITON_INTERPRET=1 PYTHONPATH=. python bench/gpu_all.py --smoke-cpu   # whole flow, tiny shapes

Steps:

0. the CUDA extension: imported, or built in place for this GPU's architecture (``--no-build``:
   skip, its rows are then reported as unavailable);
1. checks (one PASS/FAIL line each; exit status 1 if any fails): Triton dequant-GEMM within 2x
   torch's own matmul error of a float64 product; Triton ``qact_linear`` (W8A8 / W4A8, per
   channel, g128, g48) within the first-principles fp32 bound of tests/test_triton_int8.py;
   Triton ``quantize_act`` bit-exact; CUDA ``int8_mm`` bit-exact and its ``qact_linear`` within
   the same bound; which kernel dispatch picks for each layout; ``torch.compile(fullgraph=True)``
   over W4A8 and W8A8 QuantLinear layers against their eager output;
2. timings: every row's output is checked against the reference on the same inputs first (ours
   gate the exit status; peers are reported). Each repetition is preceded by a write of a buffer
   of twice the GPU's L2 size (L2 flushed: weights come from HBM, as in a real decode step), timed
   with CUDA events around the call alone, median. Rows: cuBLAS fp16 ``F.linear``; the
   fused-epilogue baseline ``torch._int_mm`` + the zero-point/scale/bias epilogue compiled into one
   kernel by ``torch.compile``; ``torch._int_mm`` alone; ``torch._weight_int4pack_mm`` (W4A16 g128
   peer); ours: Triton W4A16 g128, Triton W8A8 / W4A8 (channel, g128), the CUDA W8A8 kernel, and
   the whole A8 layer (``quantize_act`` + GEMM) through dispatch.

Figures for whichever GPU is found: measured device-to-device copy bandwidth, and the peak from
the memory clock and bus width when torch reports them; percentages use the measured copy rate.
Writes a markdown report to ``--out`` (and prints it).
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

SHAPES = [(4096, 11008), (4096, 4096), (4096, 1024), (11008, 4096)]  # (K, N), LLaMA-7B-like
MS = [1, 16, 128, 1024, 4096]
QUICK_SHAPES, QUICK_MS = [(4096, 11008), (4096, 1024)], [1, 16, 1024]
SMOKE_SHAPES, SMOKE_MS = [(256, 96)], [1, 17]
# rows timed per (shape, M): (name, kind); kind decides the inputs and the check
ROWS = [
    ("cuBLAS fp16", "fp16"),
    ("_int_mm + compiled epilogue", "intmm_epi"),
    ("_int_mm (int32 out)", "intmm"),
    ("_weight_int4pack_mm g128", "int4pack"),
    ("triton W4A16 g128", "w4a16"),
    ("triton W8A8 ch", "qact:8:0"),
    ("triton W8A8 g128", "qact:8:128"),
    ("triton W4A8 ch", "qact:4:0"),
    ("triton W4A8 g128", "qact:4:128"),
    ("cuda W8A8 ch", "cuda:8:0"),
    ("A8 layer W4A8 g128 (quantize + GEMM)", "layer:4:128"),
]
OURS = ("w4a16", "qact", "cuda", "layer")
RESULTS = []  # (name, ok, detail)


def log(msg: str) -> None:
    print(msg, flush=True)


def record(name: str, ok: bool, detail: str = "") -> None:
    RESULTS.append((name, ok, detail))
    log(f"{'PASS' if ok else 'FAIL'} {name} {detail}")


def check_cases(smoke: bool):
    """(kind, bits, group, M, N, K, dtype name): the correctness cases of step 1."""
    if smoke:
        return [("dequant", 4, 32, 3, 40, 128, "float16"), ("qact", 8, 0, 1, 40, 200, "float16"),
                ("qact", 4, 32, 17, 33, 128, "float32"), ("qact", 4, 48, 2, 40, 192, "float32"),
                ("quant", 0, 0, 5, 0, 300, "float16")]
    out = []
    for dt, bits, group, m in (("float16", 4, 128, 1), ("float16", 4, 128, 33), ("bfloat16", 4, 0, 300),
                               ("float16", 8, 0, 1), ("float16", 4, 48, 33), ("bfloat16", 8, 128, 16)):
        out.append(("dequant", bits, group, m, 1000, 1920, dt))
    for bits, group, m, dt in ((8, 0, 1, "float16"), (8, 0, 300, "bfloat16"), (8, 128, 16, "float16"),
                               (4, 0, 1, "float16"), (4, 128, 1, "float16"), (4, 128, 300, "bfloat16"),
                               (4, 48, 33, "float32"), (8, 128, 1024, "float16"), (4, 128, 5, "float16")):
        out.append(("qact", bits, group, m, 1000 if m != 5 else 1024, 1920 if m != 5 else 4096, dt))
    for dt in ("float16", "bfloat16", "float32"):
        out.append(("quant", 0, 0, 300, 0, 4104, dt))
    for m in (1, 17, 300):
        out.append(("cuda", 8, 0, m, 1000, 1920, "float16"))
    for bits, group in ((4, 128), (8, 0)):  # torch.compile(fullgraph=True) over an A8 QuantLinear
        out.append(("compile", bits, group, 4, 1024, 2048, "float16"))
    # which kernel dispatch runs: (bits, group, M, N) -> expected in the dispatch check
    for bits, group, m, n in ((4, 128, 1, 4096), (8, 128, 300, 4096), (8, 0, 1, 1024), (8, 0, 1, 4096),
                              (8, 0, 300, 4096)):
        out.append(("dispatch", bits, group, m, n, 4096, "float16"))
    return out


def expected_qact_kernel(bits: int, group: int, m: int, n: int, sms: int, have_ext: bool) -> str:
    """The kernel dispatch must choose for ``fxk::qact_linear`` on a CUDA tensor (docs/bench_cuda.md)."""
    from fxkernels.backends import triton_int8 as ti
    if ti.small_m_preferred(m, n, sms)[0]:
        return ti.QACT_SMALL_M_NAME
    return "cuda_qact_linear" if bits > 4 and not group and have_ext else ti.QACT_KERNEL_NAME


def timing_rows(quick: bool, smoke: bool):
    shapes, ms = (SMOKE_SHAPES, SMOKE_MS) if smoke else (QUICK_SHAPES, QUICK_MS) if quick else (SHAPES, MS)
    return [(k, n, m, name, kind) for k, n in shapes for m in ms for name, kind in ROWS]


def print_plan(args) -> None:
    checks = check_cases(args.smoke_cpu)
    rows = timing_rows(args.quick, args.smoke_cpu)
    log(f"plan: build/import the CUDA extension ({'skipped: --no-build' if args.no_build else 'if not importable'})")
    log(f"plan: {len(checks)} checks")
    for c in checks:
        log(f"  check {c}")
    log(f"plan: {len(rows)} timing rows (each checked against the reference first), "
        f"L2 flushed between repetitions, budget {args.budget:.0f} s")
    for r in rows:
        log(f"  time K={r[0]} N={r[1]} M={r[2]} {r[3]}")


# -- data --------------------------------------------------------------------------------------
def make_weight(n, k, bits, group, dev, seed=0):
    """Random codes, asymmetric grid (scales ~ weight std / levels): (qweight, scale, zero, wsum)."""
    from fxkernels import reference
    from fxkernels.format import QuantSpec, as_grouped, pack

    g = torch.Generator(device=dev).manual_seed(seed)
    spec = QuantSpec(bits=bits, granularity="group" if group else "channel", group_size=group or None)
    q = torch.randint(0, spec.qmax + 1, (n, k), generator=g, device=dev, dtype=torch.int32)
    shape = spec.scale_shape(n, k)
    s = (torch.rand(shape, generator=g, device=dev) * 0.5 + 0.75) * (0.04 / spec.qmax)
    z = torch.randint(0, spec.qmax + 1, shape, generator=g, device=dev, dtype=torch.int32)
    qw = pack(q, spec)
    s, z = as_grouped(s, spec, n), as_grouped(z, spec, n)
    return qw, s, z, reference.weight_sums(qw, bits, k, s.shape[1])


def make_act(m, k, dev, seed=1):
    g = torch.Generator(device=dev).manual_seed(seed)
    xq = torch.randint(-128, 128, (m, k), generator=g, device=dev, dtype=torch.int8)
    sa = torch.rand(m, generator=g, device=dev) * 0.05 + 1e-3
    za = torch.randint(-128, 128, (m,), generator=g, device=dev, dtype=torch.int32)
    return xq, sa, za


def qact_check(y, *args, chunk=None, splits=16):
    """(ok, text): ``y`` within the fp32 error model of fxkernels.backends.triton_int8.error_bound
    (``chunk=None``: the chunk the Triton kernel's default plan for this call would use)."""
    from fxkernels.backends import triton as tb
    from fxkernels.backends import triton_int8 as ti

    xq, qw, s = args[0], args[3], args[4]
    m, k = xq.shape
    if chunk is None:
        cc, sms = tb._device_facts(xq.device) if xq.device.type == "cuda" else ((9, 0), 4)
        cfgs = ti.qact_candidates(cc, m, k, s.shape[1])[1] if xq.device.type == "cuda" else \
            [ti.QACT_INTERPRETER_CONFIGS[m <= 16]]
        # every candidate the autotuner may have kept: the smallest chunk gives the loosest bound
        chunk = min(ti.plan_chunk(ti.make_qact_plan(c, m, qw.shape[0], k, s.shape[1], sms), k, s.shape[1])
                    for c in cfgs)
    exact, bound = ti.error_bound(*args, chunk=chunk, splits=splits)
    err = (y.double() - exact).abs()
    return bool((err <= bound).all()), f"max err {err.max().item():.3g}, {(err / bound).max().item():.2f}x the bound"


def dequant_check(y, x, qw, s, z, bias, bits, k):
    from gpu_triton import within_tolerance
    from fxkernels import reference
    ok, err, terr = within_tolerance(y, x, reference.dequant_weight(qw, s, z, bits, k), bias)
    return ok, f"err {err:.3g} (torch {terr:.3g})"


# -- step 1: checks ----------------------------------------------------------------------------
def run_checks(dev, smoke: bool) -> None:
    import fxkernels
    from fxkernels import dispatch, reference

    for kind, bits, group, m, n, k, dt in check_cases(smoke):
        dtype = getattr(torch, dt)
        name = f"{kind} W{bits} {'g%d' % group if group else 'ch'} M={m} N={n} K={k} {dt}"
        try:
            with fxkernels.use_backend("triton") if smoke else _null():
                if kind == "dequant":
                    qw, s, z, _ = make_weight(n, k, bits, group, dev, seed=m)
                    x = torch.randn(m, k, device=dev).to(dtype)
                    b = torch.randn(n, device=dev)
                    kern = dispatch.select("dequant_linear", x, qw, s, z, b, bits, k).name
                    y = fxkernels.ops.dequant_linear(x, qw, s, z, b, bits, k)
                    ok, detail = dequant_check(y, x, qw, s, z, b, bits, k)
                    record(name, ok and kern.startswith("triton"), f"kernel={kern} {detail}")
                elif kind == "qact":
                    qw, s, z, ws = make_weight(n, k, bits, group, dev, seed=m)
                    xq, sa, za = make_act(m, k, dev, seed=m)
                    b = torch.randn(n, device=dev)
                    args = (xq, sa, za, qw, s, z, ws, b, bits, dtype)
                    picked = dispatch.select("qact_linear", *args).name
                    with fxkernels.use_backend("triton"):
                        y = fxkernels.ops.qact_linear(*args)
                    ok, detail = qact_check(y, *args)
                    record(name, ok, f"(forced triton; dispatch picks {picked}) {detail}")
                elif kind == "quant":
                    x = (torch.randn(m, k, device=dev) * torch.logspace(-3, 2, m, device=dev)[:, None]).to(dtype)
                    x[0] = 0
                    for static in (False, True):
                        sz = ((torch.tensor([0.037], device=dev), torch.tensor([5], dtype=torch.int32, device=dev))
                              if static else (None, None))
                        with fxkernels.use_backend("triton"):
                            got = fxkernels.ops.quantize_act(x, *sz)
                        want = reference.quantize_act(x.cpu(), *[t.cpu() if t is not None else None for t in sz])
                        same = all(torch.equal(a.cpu(), b) for a, b in zip(got, want))
                        record(f"{name} {'static' if static else 'dynamic'}", same, "bit-exact" if same else "differs")
                elif kind == "cuda":
                    from fxkernels.backends import cuda
                    if cuda._ext is None:
                        record(name, True, f"skipped: {cuda.IMPORT_ERROR}")
                        continue
                    qw, s, z, ws = make_weight(n, k, bits, group, dev, seed=m)
                    xq, sa, za = make_act(m, k, dev, seed=m)
                    exact = torch.equal(cuda.int8_mm(xq, qw).cpu(), reference.int8_mm(xq.cpu(), qw.cpu()))
                    b = torch.randn(n, device=dev)
                    args = (xq, sa, za, qw, s, z, ws, b, bits, dtype)
                    ok, detail = qact_check(cuda.qact_linear(*args), *args, chunk=k, splits=1)
                    record(name, ok and exact, f"int8_mm {'exact' if exact else 'DIFFERS'}; epilogue {detail}")
                elif kind == "compile":
                    spec = fxkernels.QuantSpec(bits=bits, granularity="group" if group else "channel",
                                               group_size=group or None, act_bits=8)
                    torch.manual_seed(0)
                    ql = fxkernels.QuantLinear.from_linear(torch.nn.Linear(k, n), spec).to(dev)
                    x = torch.randn(2, m, k, device=dev).to(dtype)
                    eager = ql(x)
                    torch._dynamo.reset()
                    got = torch.compile(ql, fullgraph=True)(x)
                    err = ((got.float() - eager.float()).abs().max() / eager.float().abs().max()).item()
                    record(name, err <= 1e-3, f"fullgraph compiled vs eager: rel diff {err:.2g}")
                elif kind == "dispatch":
                    from fxkernels.backends import cuda
                    from fxkernels.backends import triton as tb
                    qw, s, z, ws = make_weight(n, k, bits, group, dev)
                    xq, sa, za = make_act(m, k, dev)
                    got = dispatch.select("qact_linear", xq, sa, za, qw, s, z, ws, None, bits, dtype).name
                    want = expected_qact_kernel(bits, group, m, n, tb._device_facts(dev)[1], cuda._ext is not None)
                    record(name, got == want, f"dispatch runs {got}, expected {want}")
        except Exception as e:
            record(name, False, f"{type(e).__name__}: {e}")
            traceback.print_exc(limit=4)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


# -- step 2: timings ---------------------------------------------------------------------------
class Timer:
    """Median time of ``fn()`` with L2 flushed before every repetition (CUDA events around the
    call alone); on CPU (``--smoke-cpu``) wall-clock time without a flush."""

    def __init__(self, dev):
        self.dev = dev
        self.cuda = dev.type == "cuda"
        l2 = torch.cuda.get_device_properties(dev).L2_cache_size if self.cuda else 0
        self.flush_bytes = max(2 * l2, 64 << 20) if self.cuda else 0
        self.buf = torch.empty(self.flush_bytes // 4, dtype=torch.int32, device=dev) if self.cuda else None

    def ms(self, fn, target_ms: float = 40.0) -> float:
        """The flush is followed by a GPU-side sleep before the start event: the host enqueues the
        call (Python dispatch, launch) while the GPU is still busy, so host overhead never shows as
        idle GPU time between the events."""
        if not self.cuda:
            fn()
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        once = max((time.perf_counter() - t0) * 1e3, 1e-3)
        reps = int(min(100, max(5, target_ms / once)))
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        sleep = getattr(torch.cuda, "_sleep", None)
        for e0, e1 in ev:
            self.buf.zero_()  # writes 2x the L2 size: the previous call's weights are evicted
            if sleep is not None:
                sleep(1_000_000)  # ~0.5 ms of clock cycles
            e0.record()
            fn()
            e1.record()
        torch.cuda.synchronize()
        return statistics.median(e0.elapsed_time(e1) for e0, e1 in ev)


def copy_bandwidth(dev) -> float:
    """Measured device-to-device copy GB/s (read + write) of a 1 GiB buffer."""
    a = torch.empty(1 << 28, dtype=torch.float32, device=dev)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(10):
        b.copy_(a)
    e1.record()
    torch.cuda.synchronize()
    gbs = 10 * 2 * a.numel() * 4 / (e0.elapsed_time(e1) / 1e3) / 1e9
    del a, b
    torch.cuda.empty_cache()
    return gbs


def spec_bandwidth(props):
    """Peak DRAM GB/s from the memory clock (kHz) and bus width (bits), when torch reports them."""
    clk, bus = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    return 2 * clk * 1e3 * bus / 8 / 1e9 if clk and bus else None


def _epilogue(acc, xq, za, zs, sa, sw, wsum, bias, k: int):
    """The W8A8 epilogue as torch ops: zero-point corrections, scales, bias, fp16 out (compiled
    into one kernel by torch.compile for the fused-epilogue baseline)."""
    xsum = xq.sum(1, dtype=torch.int32)
    corr = acc - za[:, None] * wsum[None, :] - zs[None, :] * xsum[:, None] + k * za[:, None] * zs[None, :]
    return (corr.float() * sw[None, :] * sa[:, None] + bias[None, :]).half()


def int4pack_peer(x16, q, s, z, group):
    """``torch._weight_int4pack_mm`` on the same INT4 g128 weights: (fn, or None and why).

    torch's layout: bf16 activations, a tiled int4 weight from ``_convert_weight_to_int4pack``
    (uint8 [N, K/2], high nibble = even column), and ``scales_and_zeros [K/g, N, 2]`` with
    ``w = (q - 8) * scale + zero``, so zero = (8 - z) * scale for this project's ``(q - z) * s``."""
    try:
        u8 = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
        packed = torch._convert_weight_to_int4pack(u8, 8)
        sz = torch.stack([s, (8 - z).float() * s], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
        xb = x16.to(torch.bfloat16)
        fn = lambda: torch._weight_int4pack_mm(xb, packed, group, sz)  # noqa: E731
        fn()
        return fn, ""
    except Exception as e:
        return None, f"{type(e).__name__}: {str(e)[:200]}"


def run_timings(dev, quick: bool, smoke: bool, budget_end: float):
    import torch.nn.functional as F
    import fxkernels
    from fxkernels import dispatch, reference
    from fxkernels.backends import cuda

    timer = Timer(dev)
    rows, skipped = [], []
    epi_compiled = None
    ours_ctx = (lambda: fxkernels.use_backend("triton")) if smoke else _null
    cur = None
    for k, n, m, name, kind in timing_rows(quick, smoke):
        if time.time() > budget_end:
            skipped.append(f"K={k} N={n} M={m} {name}: time budget")
            continue
        if cur is None or cur[0] != (k, n):
            cur = ((k, n), {})
            torch.cuda.empty_cache() if dev.type == "cuda" else None
        cache = cur[1]
        row = dict(K=k, N=n, M=m, name=name, kind=kind)
        try:
            x16 = torch.randn(m, k, device=dev).half() if dev.type == "cuda" else torch.randn(m, k, device=dev)
            head = kind.split(":")[0]
            check, fn, wbytes = "", None, 0
            if head == "fp16":
                if "w16" not in cache:
                    cache["w16"] = (torch.randn(n, k, device=dev) * 0.02).to(x16.dtype)
                w16 = cache["w16"]
                fn = lambda: F.linear(x16, w16)  # noqa: E731
                wbytes = w16.numel() * w16.element_size()
            elif head in ("intmm", "intmm_epi"):
                if dev.type != "cuda":
                    raise RuntimeError("needs CUDA")
                qw, s, z, ws = cache.setdefault("w8", make_weight(n, k, 8, 0, dev))
                xq, sa, za = make_act(m, k, dev)
                mp = max(m, 17)  # torch._int_mm takes M > 16 only: the activation rows are padded
                xq_p = F.pad(xq, (0, 0, 0, mp - m))
                sa_p, za_p = F.pad(sa, (0, mp - m), value=1.0), F.pad(za, (0, mp - m))
                wt, zs = qw.t(), (z - 128).reshape(-1)
                wbytes = qw.numel()
                if head == "intmm":
                    fn = lambda: torch._int_mm(xq_p, wt)  # noqa: E731
                    exact = torch.equal(fn()[:m].cpu(), reference.int8_mm(xq.cpu(), qw.cpu()))
                    check = "exact" if exact else "DIFFERS"
                else:
                    if epi_compiled is None:
                        try:
                            epi_compiled = torch.compile(_epilogue, dynamic=True)
                        except Exception as e:
                            log(f"torch.compile unavailable ({e}); the epilogue runs eagerly")
                            epi_compiled = _epilogue
                    b = torch.randn(n, device=dev)
                    fn = lambda: epi_compiled(torch._int_mm(xq_p, wt), xq_p, za_p, zs, sa_p,  # noqa: E731
                                              s.reshape(-1), ws.reshape(-1), b, k)
                    ok, check = qact_check(fn()[:m], xq, sa, za, qw, s, z, ws, b, 8, torch.float16, chunk=k,
                                           splits=1)
                    check = ("ok " if ok else "OUT OF BOUND ") + check
            elif head == "int4pack":
                if dev.type != "cuda":
                    raise RuntimeError("needs CUDA")
                if "int4pack" not in cache:
                    g = torch.Generator(device=dev).manual_seed(3)
                    q = torch.randint(0, 16, (n, k), generator=g, device=dev, dtype=torch.int32)
                    s = torch.rand(n, k // 128, generator=g, device=dev) * 0.004 + 0.002
                    z = torch.randint(0, 16, (n, k // 128), generator=g, device=dev, dtype=torch.int32)
                    cache["int4pack"] = (q, s, z)
                q, s, z = cache["int4pack"]
                fn, why = int4pack_peer(x16, q, s, z, 128)
                if fn is None:
                    raise RuntimeError(f"peer unavailable: {why}")
                w = (q - z.repeat_interleave(128, dim=1)).float() * s.repeat_interleave(128, dim=1)
                ref = x16.double() @ w.double().t()
                err = ((fn().double() - ref).abs().max() / ref.abs().max()).item()
                check = f"rel err {err:.2g} (bf16 scales)"
                wbytes = n * k // 2
            elif head == "w4a16":
                qw, s, z, _ = cache.setdefault("w4g128", make_weight(n, k, 4, 128, dev))
                with ours_ctx():
                    kern = dispatch.select("dequant_linear", x16, qw, s, z, None, 4, k).name
                    fn = lambda: fxkernels.ops.dequant_linear(x16, qw, s, z, None, 4, k)  # noqa: E731
                    y = fn()
                ok, check = dequant_check(y, x16, qw, s, z, None, 4, k)
                check = f"{'ok' if ok else 'FAIL'} {kern} {check}"
                row["ok"] = ok
                wbytes = qw.numel() + s.numel() * 8
            elif head in ("qact", "cuda", "layer"):
                bits, group = int(kind.split(":")[1]), int(kind.split(":")[2])
                qw, s, z, ws = cache.setdefault(f"w{bits}g{group}", make_weight(n, k, bits, group, dev))
                xq, sa, za = make_act(m, k, dev)
                args = (xq, sa, za, qw, s, z, ws, None, bits, x16.dtype)
                wbytes = qw.numel() + s.numel() * 12
                if head == "cuda":
                    if cuda._ext is None:
                        raise RuntimeError(f"CUDA extension unavailable: {cuda.IMPORT_ERROR}")
                    cuda._needs_xsum(z)
                    fn = lambda: cuda.qact_linear(*args)  # noqa: E731
                    kern = "cuda_qact_linear"
                    ok, check = qact_check(fn(), *args, chunk=k, splits=1)
                elif head == "qact":
                    with fxkernels.use_backend("triton"):
                        kern = dispatch.select("qact_linear", *args).name

                    def fn():  # forced: on a GPU dispatch would give W8A8 per channel to the extension
                        with fxkernels.use_backend("triton"):
                            return fxkernels.ops.qact_linear(*args)
                    ok, check = qact_check(fn(), *args)
                else:  # the whole A8 layer through dispatch: quantize_act + qact_linear
                    x = torch.randn(m, k, device=dev).to(x16.dtype)
                    with ours_ctx():
                        kq = dispatch.select("quantize_act", x, None, None).name
                        codes = fxkernels.ops.quantize_act(x, None, None)
                        kern = f"{kq}+{dispatch.select('qact_linear', *codes, *args[3:]).name}"

                        def fn():
                            c = fxkernels.ops.quantize_act(x, None, None)
                            return fxkernels.ops.qact_linear(*c, *args[3:])
                        y = fn()
                    ok, check = qact_check(y, *codes, *args[3:])
                    wbytes += m * k * x.element_size()
                check = f"{'ok' if ok else 'FAIL'} {kern} {check}"
                row["ok"] = ok
            if fn is None:
                raise RuntimeError(f"unknown row kind {kind}")
            if head in OURS and fn is not None:
                with ours_ctx():
                    t = timer.ms(fn)
            else:
                t = timer.ms(fn)
            row.update(ms=t, check=check, tops=2.0 * m * n * k / t / 1e9, gbs=wbytes / t / 1e6)
            rows.append(row)
            log(f"K={k:5d} N={n:5d} M={m:4d} {name:38s} {t * 1e3:9.1f} us {row['tops']:7.1f} TOP/s "
                f"{row['gbs']:7.0f} GB/s  {check}")
        except Exception as e:
            skipped.append(f"K={k} N={n} M={m} {name}: {type(e).__name__}: {str(e)[:200]}")
            log(f"skip K={k} N={n} M={m} {name}: {type(e).__name__}: {str(e)[:200]}")
            if not isinstance(e, RuntimeError):
                traceback.print_exc(limit=3)
    return rows, skipped


def to_markdown(info: dict, rows, skipped, elapsed: float) -> str:
    out = [f"# GPU kernels on {info['name']}", "",
           f"{info['desc']}; run took {elapsed:.0f} s. Times: median over repetitions, L2 flushed "
           f"before each (a {info['flush_mib']:.0f} MiB write, 2x the L2), CUDA events around the call "
           "alone. TOP/s = 2·M·N·K / time; GB/s = weight bytes (codes + scales/zeros) / time, against "
           f"the measured copy rate {info['copy']}. Speedups are over cuBLAS fp16 in the same run.", "",
           f"## Checks: {'all PASS' if all(ok for _, ok, _ in RESULTS) else 'FAILURES'}", "", "```"]
    out += [f"{'PASS' if ok else 'FAIL'} {n} {d}" for n, ok, d in RESULTS] + ["```", ""]
    out += ["## Timings", "", "| K | N | M | kernel | µs | TOP/s | weight GB/s | vs cuBLAS fp16 | check |",
            "|---|---|---|---|---|---|---|---|---|"]
    base = {(r["K"], r["N"], r["M"]): r["ms"] for r in rows if r["kind"] == "fp16"}
    for r in rows:
        b = base.get((r["K"], r["N"], r["M"]))
        sp = f"{b / r['ms']:.2f}x" if b else "-"
        out.append(f"| {r['K']} | {r['N']} | {r['M']} | {r['name']} | {r['ms'] * 1e3:.1f} | {r['tops']:.1f} | "
                   f"{r['gbs']:.0f} | {sp} | {r['check']} |")
    if skipped:
        out += ["", "## Skipped rows", ""] + [f"- {s}" for s in skipped]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="markdown report to write")
    ap.add_argument("--quick", action="store_true", help="two shapes, M in 1/16/1024")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds from start after which timing rows stop")
    ap.add_argument("--no-build", action="store_true", help="do not build the CUDA extension if it is missing")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and exit (no GPU needed)")
    ap.add_argument("--smoke-cpu", action="store_true",
                    help="tiny shapes on CPU through the Triton interpreter (TRITON_INTERPRET=1): the flow, not speed")
    args = ap.parse_args(argv)
    t0 = time.time()
    if args.dry_run:
        print_plan(args)
        return 0
    if args.smoke_cpu:
        if os.environ.get("TRITON_INTERPRET", "0") != "1":
            log("--smoke-cpu needs TRITON_INTERPRET=1 in the environment")
            return 2
        dev = torch.device("cpu")
        info = dict(name="CPU (Triton interpreter smoke run)", desc="no GPU: figures mean nothing", flush_mib=0,
                    copy="-")
    else:
        if not torch.cuda.is_available():
            log("FAIL no CUDA device visible to torch; use --dry-run or --smoke-cpu without a GPU")
            return 2
        if os.environ.get("TRITON_INTERPRET"):
            log("FAIL unset TRITON_INTERPRET (it makes triton run kernels on the CPU)")
            return 2
        dev = torch.device("cuda")
        if not args.no_build:
            try:
                import fxkernels._cuda  # noqa: F401
            except ImportError as e:
                log(f"fxkernels._cuda not importable ({e}); building it for this GPU")
                try:
                    import gpu_cuda
                    gpu_cuda.build()
                    importlib.invalidate_caches()  # the new .so must be seen by the next import
                except Exception as e:  # the Triton rows still run
                    log(f"build failed: {type(e).__name__}: {e}")
        props = torch.cuda.get_device_properties(dev)
        peak = spec_bandwidth(props)
        copy = copy_bandwidth(dev)
        info = dict(name=props.name, flush_mib=max(2 * props.L2_cache_size, 64 << 20) / 2 ** 20,
                    copy=f"{copy:.0f} GB/s" + (f" (spec {peak:.0f} GB/s)" if peak else ""),
                    desc=(f"sm_{props.major}{props.minor}, {props.multi_processor_count} SMs, "
                          f"L2 {props.L2_cache_size / 2 ** 20:.0f} MiB, torch {torch.__version__}, "
                          f"triton {__import__('triton').__version__}, CUDA {torch.version.cuda}"))
        log(f"device: {info['name']}, {info['desc']}, copy {info['copy']}")
    from fxkernels import dispatch
    log(dispatch.format_kernel_table())
    run_checks(dev, args.smoke_cpu)
    rows, skipped = run_timings(dev, args.quick, args.smoke_cpu, t0 + args.budget)
    md = to_markdown(info, rows, skipped, time.time() - t0)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(md)
    log(md)
    ok = all(ok for _, ok, _ in RESULTS) and all(r.get("ok", True) for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
