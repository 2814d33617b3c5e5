"""The CUDA INT8 GEMM extension (csrc/cuda, fxkernels/backends/cuda.py).

On GPU-less machines: every .cu compiles for sm_80 and sm_90 without register spills or local
memory; the module builds/imports and refuses CPU tensors clearly; the kernels' index arithmetic
(a CPU replay of cp.async/ldmatrix/mma addressing) and epilogue/quantization math (the same
__host__ __device__ helpers the kernels run) match fxkernels.reference. On a GPU the tests at
the bottom run the kernels themselves against the reference.
"""

import importlib
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from fxkernels import dispatch, reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_DIR = os.path.join(ROOT, "csrc", "cuda")
sys.path.insert(0, CUDA_DIR)
import build_ext  # noqa: E402  (csrc/cuda/build_ext.py)

try:
    from fxkernels import _cuda as ext
    EXT_ERROR = None
except ImportError as e:
    ext, EXT_ERROR = None, str(e)

HOME, NVCC_VER, _ = build_ext.find_cuda_home()


def _need_ext():
    if ext is None:
        if os.environ.get("FXK_REQUIRE_CUDA_EXT") == "1":
            pytest.fail(f"fxkernels._cuda not importable: {EXT_ERROR}")
        pytest.skip(f"fxkernels._cuda not built here ({EXT_ERROR})")


needs_nvcc = pytest.mark.skipif(HOME is None, reason="no CUDA toolkit (nvcc) found")
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# -- compile checks: no spills, no local memory --------------------------------------------------
def ptxas_report(src, arch):
    """{kernel mangled name: dict(regs, stack, spill_st, spill_ld)} from `nvcc -cubin -Xptxas -v`."""
    out = subprocess.run(
        [os.path.join(HOME, "bin", "nvcc"), "-cubin", f"-arch=sm_{arch}", "-O3", "-std=c++17", "-Xptxas", "-v",
         "-I", CUDA_DIR, "-o", os.devnull, os.path.join(CUDA_DIR, src)],
        capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"nvcc failed for {src} sm_{arch}:\n{out.stderr[-4000:]}"
    funcs, cur = {}, None
    for line in out.stderr.splitlines():
        m = re.search(r"Compiling entry function '(\w+)' for 'sm_(\d+)'", line)
        if m:
            cur = m.group(1)
            funcs[cur] = {}
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and cur:
            funcs[cur].update(stack=int(m.group(1)), spill_st=int(m.group(2)), spill_ld=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m and cur:
            funcs[cur]["regs"] = int(m.group(1))
    return funcs


@needs_nvcc
@pytest.mark.parametrize("arch", ["80", "90"])
def test_quantize_act_compiles_without_spills(arch):
    funcs = ptxas_report("quantize_act.cu", arch)
    assert len(funcs) == 6
    for name, r in funcs.items():
        assert r.get("spill_st") == 0 and r.get("spill_ld") == 0 and r.get("stack") == 0, (name, r)


@needs_nvcc
@pytest.mark.slow  # ~20 s per architecture on one free core, ~40 s on a busy 2-core machine
@pytest.mark.parametrize("arch", ["80", "90"])
def test_kernels_compile_without_spills(arch):
    """Every .cu (in parallel, 2 cores); every kernel: 0 spill bytes, 0 stack frame."""
    srcs = sorted(f for f in os.listdir(CUDA_DIR) if f.endswith(".cu"))
    assert {"int8_gemm.cu", "quantize_act.cu"} <= set(srcs)
    with ThreadPoolExecutor(2) as pool:
        reports = dict(zip(srcs, pool.map(lambda s: ptxas_report(s, arch), srcs)))
    gemm = [k for k in reports["int8_gemm.cu"] if "int8_gemm_kernel" in k]
    # 4 tile configs x (int32 + 3 float outputs x {with, without} row sums)
    assert len(gemm) == 4 * 7, sorted(reports["int8_gemm.cu"])
    assert len([k for k in reports["quantize_act.cu"] if "quantize_act_kernel" in k]) == 6
    for src, funcs in reports.items():
        for name, r in funcs.items():
            assert r.get("spill_st") == 0 and r.get("spill_ld") == 0, f"{src} sm_{arch} {name} spills: {r}"
            assert r.get("stack") == 0, f"{src} sm_{arch} {name} uses local memory (stack frame): {r}"
            assert 0 < r.get("regs", 0) <= 255, f"{src} sm_{arch} {name}: {r}"


# -- build logic -------------------------------------------------------------------------------
def test_build_skip_and_auto_never_fail(monkeypatch, tmp_path):
    monkeypatch.setenv("FXK_BUILD_CUDA", "0")
    assert build_ext.cuda_extensions(ROOT) == ([], "skipped (FXK_BUILD_CUDA=0)")
    # auto mode with unusable sources: no extension and a reason, never an exception
    monkeypatch.setenv("FXK_BUILD_CUDA", "auto")
    exts, why = build_ext.cuda_extensions(str(tmp_path))
    assert exts == [] and "skipped" in why and ("missing source" in why or "no usable CUDA" in why)
    monkeypatch.setenv("FXK_BUILD_CUDA", "1")
    with pytest.raises(RuntimeError):
        build_ext.cuda_extensions(str(tmp_path))
    monkeypatch.setenv("FXK_BUILD_CUDA", "yes")
    with pytest.raises(ValueError, match="FXK_BUILD_CUDA"):
        build_ext.cuda_extensions(ROOT)


def test_arch_flags(monkeypatch):
    monkeypatch.setenv("FXK_CUDA_ARCHS", "80;90")
    flags = build_ext._arch_flags()
    assert "-gencode=arch=compute_80,code=sm_80" in flags and flags[-1] == "-gencode=arch=compute_90,code=compute_90"
    monkeypatch.setenv("FXK_CUDA_ARCHS", "75")
    with pytest.raises(ValueError, match="sm_75"):
        build_ext._arch_flags()


@needs_nvcc
def test_toolkit_detection_rejects_wrapper_dirs():
    """A directory whose bin/nvcc is a wrapper without headers/cudart is never chosen."""
    assert os.path.isfile(os.path.join(HOME, "include", "cuda_runtime_api.h"))
    assert NVCC_VER >= (11, 8)
    _, _, why = build_ext.find_cuda_home(want_major=1)  # no toolkit has major version 1
    assert "does not match torch's CUDA 1.x" in why


# -- the module on a GPU-less machine ------------------------------------------------------------
def test_module_imports_and_refuses_cpu_tensors():
    _need_ext()
    info = ext.runtime_info()
    assert info["runtime_version"] > 0  # cudart is linked and loads
    a = torch.zeros(4, 32, dtype=torch.int8)
    b = torch.zeros(8, 32, dtype=torch.int8)
    with pytest.raises(RuntimeError, match=r"a: tensor on cpu; expected a CUDA tensor"):
        ext.int8_gemm(a, b, torch.empty(4, 8, dtype=torch.int32), None, None, None, None, 0, None, None,
                      False, -1, 0, 0)
    with pytest.raises(RuntimeError, match=r"x: tensor on cpu; expected a CUDA tensor"):
        ext.quantize_act(torch.zeros(2, 8), torch.empty(2, 8, dtype=torch.int8), torch.empty(2),
                         torch.empty(2, dtype=torch.int32), None, None, 0)


def test_backend_reports_and_refuses_cpu():
    cuda = importlib.import_module("fxkernels.backends.cuda")
    rows = [r for r in dispatch.available_kernels() if r["backend"] == "cuda"]
    assert {r["name"] for r in rows} >= {"cuda_quantize_act", "cuda_qact_linear"}
    if not torch.cuda.is_available():
        assert all(not r["usable"] and r["reason"] for r in rows)
    x = torch.randn(3, 32)
    ok, why = cuda._quant_can(x, None, None)
    assert not ok and ("cpu" in why or "not importable" in why)
    with pytest.raises((ValueError, RuntimeError), match="cpu|not importable"):
        torch.ops.fxk.int8_mm_cuda(torch.zeros(2, 16, dtype=torch.int8), torch.zeros(3, 16, dtype=torch.int8))
    # forced onto the cuda backend, CPU inputs give an error naming the reason
    with dispatch.use_backend("cuda"):
        with pytest.raises(RuntimeError, match="cuda_quantize_act: .*(cpu|not importable)"):
            dispatch.select("quantize_act", x, None, None)


def test_backend_refusal_reasons(monkeypatch):
    """bits < 5, groups, bad K: refused with the reason (device check bypassed to reach them)."""
    cuda = importlib.import_module("fxkernels.backends.cuda")
    monkeypatch.setattr(cuda, "_device_reason", lambda t, name: None)
    m, k, n = 2, 64, 8
    xq = torch.zeros(m, k, dtype=torch.int8)
    sa, za = torch.ones(m), torch.zeros(m, dtype=torch.int32)
    w8 = torch.zeros(n, k, dtype=torch.int8)
    s1, z1 = torch.ones(n, 1), torch.full((n, 1), 128, dtype=torch.int32)
    ws = torch.zeros(n, 1, dtype=torch.int32)
    ok, why = cuda._qa_can(xq, sa, za, torch.zeros(n, k // 2, dtype=torch.uint8), s1, z1, ws, None, 4, torch.float16)
    assert not ok and "bits=4" in why and "W4A8" in why
    ok, why = cuda._qa_can(xq, sa, za, w8, torch.ones(n, 2), torch.zeros(n, 2, dtype=torch.int32),
                           torch.zeros(n, 2, dtype=torch.int32), None, 8, torch.float16)
    assert not ok and "G=1" in why
    ok, why = cuda._qa_can(xq[:, :40], sa, za, w8[:, :40], s1, z1, ws, None, 8, torch.float16)
    assert not ok and "K=40" in why and "multiple of 16" in why
    ok, why = cuda._qa_can(xq, sa, za, w8, s1, z1, ws, None, 8, torch.float16)
    assert ok, why


# -- host replays of the kernel math ---------------------------------------------------------------
SHAPES = [(1, 40, 48), (16, 32, 128), (17, 33, 272), (130, 260, 128), (300, 70, 80), (64, 64, 1024)]


@pytest.mark.parametrize("config", range(4))
def test_simulated_gemm_matches_reference(config):
    """cp.async chunking + swizzle, ldmatrix lane addresses, mma fragments (modelled from the PTX
    tables), the all-ones row-sum mma and the output coordinates give the exact int32 product."""
    _need_ext()
    g = torch.Generator().manual_seed(config)
    for m, n, k in SHAPES:
        a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
        b = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
        c, xs = ext.host_simulate_gemm(a, b, config)
        assert torch.equal(c, reference.int8_mm(a, b)), (config, m, n, k)
        assert torch.equal(xs, a.to(torch.int32).sum(1).to(torch.int32)), (config, m, n, k)
    # extremes: -128 * -128 everywhere (largest positive products)
    a = torch.full((20, 256), -128, dtype=torch.int8)
    c, _ = ext.host_simulate_gemm(a, a[:9], config)
    assert torch.equal(c, torch.full((20, 9), 128 * 128 * 256, dtype=torch.int32))


def test_simulator_rejects_bad_input():
    _need_ext()
    with pytest.raises(RuntimeError, match="K=40; expected a multiple of 16"):
        ext.host_simulate_gemm(torch.zeros(2, 40, dtype=torch.int8), torch.zeros(2, 40, dtype=torch.int8), 0)
    with pytest.raises(RuntimeError, match="config: got 9"):
        ext.host_simulate_gemm(torch.zeros(2, 32, dtype=torch.int8), torch.zeros(2, 32, dtype=torch.int8), 9)


@pytest.mark.parametrize("grid_m,grid_n", [(1, 1), (3, 5), (8, 8), (17, 3), (9, 40)])
def test_tile_order_is_a_grouped_bijection(grid_m, grid_n):
    _need_ext()
    t = ext.host_tile_order(grid_m, grid_n, 8)
    pairs = {tuple(r) for r in t.tolist()}
    assert pairs == {(i, j) for i in range(grid_m) for j in range(grid_n)}
    # the first min(8, grid_m) CTAs walk down one column of tiles (shared B panel in L2)
    first = t[: min(8, grid_m)]
    assert (first[:, 1] == 0).all() and first[:, 0].tolist() == list(range(min(8, grid_m)))


def _exact(xq, za, c, zc):
    """sum_k (xq - za)(c - zc) in int64."""
    return (xq.long() - za.long()[:, None]) @ (c.long() - zc.long()[:, None]).t()


@pytest.mark.parametrize("seed", range(3))
def test_host_epilogue_matches_reference(seed):
    _need_ext()
    g = torch.Generator().manual_seed(seed)
    m, n, k = 9, 24, 96
    xq = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
    c = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    za = torch.randint(-128, 128, (m,), dtype=torch.int32, generator=g)
    zero = torch.randint(0, 256, (n, 1), dtype=torch.int32, generator=g)  # unsigned domain
    sa = torch.rand(m, generator=g) * 0.1 + 1e-3
    sw = torch.rand(n, 1, generator=g) * 0.01 + 1e-4
    bias = torch.randn(n, generator=g)
    wsum = reference.weight_sums(c, 8, k, 1)
    acc = reference.int8_mm(xq, c)
    xsum = xq.to(torch.int32).sum(1).to(torch.int32)
    corr, y = ext.host_epilogue(acc, xsum, sa, za, sw.reshape(-1), zero.reshape(-1), 128, wsum.reshape(-1), bias, k)
    assert torch.equal(corr.long(), _exact(xq, za, c, zero.reshape(-1) - 128))
    ref = reference.qact_linear(xq, sa, za, c, sw, zero, wsum, bias, 8, torch.float32)
    # three fp32 roundings (x sw, x sa, + bias) against one: bound from first principles
    prod = (corr.double() * sw.reshape(1, -1).double() * sa.double()[:, None]).abs()
    bound = 4 * 2.0 ** -24 * (prod + ref.double().abs())
    assert ((y.double() - ref.double()).abs() <= bound).all()
    _, y0 = ext.host_epilogue(acc, xsum, sa, za, sw.reshape(-1), zero.reshape(-1), 128, wsum.reshape(-1), None, k)
    ref0 = reference.qact_linear(xq, sa, za, c, sw, zero, wsum, None, 8, torch.float32)
    assert ((y0.double() - ref0.double()).abs() <= 4 * 2.0 ** -24 * ref0.double().abs() * 2).all()


def test_host_epilogue_exact_at_int32_limits():
    """K = 32768 with extreme codes: intermediate terms overflow int32, the result must not."""
    _need_ext()
    k = 32768
    xq = torch.tensor([[-128] * k, [127] * k, [-128, 127] * (k // 2)], dtype=torch.int8)
    c = torch.tensor([[127] * k, [-128] * k, [0] * k], dtype=torch.int8)
    za = torch.tensor([127, -128, 0], dtype=torch.int32)
    zero = torch.tensor([0, 255, 128], dtype=torch.int32)  # zs = -128, 127, 0
    acc = reference.int8_mm(xq, c)
    xsum = xq.to(torch.int32).sum(1).to(torch.int32)
    wsum = reference.weight_sums(c, 8, k, 1).reshape(-1)
    corr, _ = ext.host_epilogue(acc, xsum, torch.ones(3), za, torch.ones(3), zero, 128, wsum, None, k)
    exact = _exact(xq, za, c, zero - 128)
    assert exact.abs().max() > 2 ** 30  # the test really is near the limit
    assert torch.equal(corr.long(), exact)


def _quant_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 200, generator=g) * torch.logspace(-3, 2, 12)[:, None]
    x[0] = 0.0                                    # all-zero row: scale 1
    x[1] = x[1].abs() + 0.1                       # all positive: lo clamps to 0
    x[2] = -x[2].abs() - 0.1                      # all negative: hi clamps to 0
    x[3] = torch.arange(200).float() * 0.5 - 50   # many exact ties at scale steps
    x[4, :5] = torch.tensor([1e4, -1e4, 3.5, -2.5, 0.5])
    return x


def test_host_quantize_act_bit_exact():
    _need_ext()
    x = _quant_inputs()
    q, s, z = ext.host_quantize_act(x, None, None)
    rq, rs, rz = reference.quantize_act(x)
    assert torch.equal(s, rs) and torch.equal(z, rz) and torch.equal(q, rq)
    for scale, zero in ((0.05, 3), (0.5, -128), (1.0 / 3.0, 127), (2.0, 0)):
        st, zt = torch.tensor([scale]), torch.tensor([zero], dtype=torch.int32)
        q, s, z = ext.host_quantize_act(x, st, zt)
        rq, rs, rz = reference.quantize_act(x, st, zt)
        assert torch.equal(q, rq) and torch.equal(s, rs) and torch.equal(z, rz), (scale, zero)


def test_config_shapes_and_picker():
    _need_ext()
    shapes = [ext.host_config_shape(i) for i in range(ext.num_configs)]
    for bm, bn, bk, wm, wn, stages, smem in shapes:
        assert smem == stages * (bm + bn) * bk and smem <= 227 * 1024  # fits an H100/A100 SM
        assert bm % (16 * wm) == 0 and bn % (16 * wn) == 0
    assert ext.pick_config(1, 4096, 132) == 0 and ext.pick_config(16, 8192, 132) == 0
    assert ext.pick_config(4096, 4096, 132) in (2, 3)
    assert ext.pick_config(128, 4096, 132) == 1


# -- on a GPU: the kernels themselves ----------------------------------------------------------
@gpu
@pytest.mark.gpu
def test_gpu_int8_mm_exact_all_configs():
    _need_ext()
    from fxkernels.backends import cuda
    g = torch.Generator().manual_seed(0)
    for m, n, k in [(1, 256, 4096), (17, 333, 272), (300, 512, 1024), (1024, 1024, 1024)]:
        a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
        b = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
        ref = reference.int8_mm(a, b)
        for cfg in [-1] + list(range(ext.num_configs)):
            got = cuda.int8_mm(a.cuda(), b.cuda(), cfg).cpu()
            assert torch.equal(got, ref), (m, n, k, cfg)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_quantize_act_bit_exact(dtype):
    _need_ext()
    x = _quant_inputs().to(dtype)
    with dispatch.use_backend("cuda"):
        q, s, z = torch.ops.fxk.quantize_act(x.cuda(), None, None)
    rq, rs, rz = reference.quantize_act(x)
    assert torch.equal(q.cpu(), rq) and torch.equal(s.cpu(), rs) and torch.equal(z.cpu(), rz)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_qact_linear_matches_reference(out_dtype):
    _need_ext()
    g = torch.Generator().manual_seed(1)
    m, n, k = 77, 200, 512
    xq = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
    c = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    sa, za = torch.rand(m, generator=g) * 0.05 + 1e-3, torch.randint(-128, 128, (m,), dtype=torch.int32, generator=g)
    sw = torch.rand(n, 1, generator=g) * 0.01 + 1e-4
    zero = torch.randint(0, 256, (n, 1), dtype=torch.int32, generator=g)
    bias = torch.randn(n, generator=g)
    wsum = reference.weight_sums(c, 8, k, 1)
    args = (xq, sa, za, c, sw, zero, wsum, bias, 8, out_dtype)
    ref = reference.qact_linear(*args)
    with dispatch.use_backend("cuda"):
        got = torch.ops.fxk.qact_linear(*[a.cuda() if isinstance(a, torch.Tensor) else a for a in args]).cpu()
    tol = {torch.float32: 2.0 ** -21, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}[out_dtype]
    assert torch.allclose(got.float(), ref.float(), rtol=tol, atol=tol * ref.float().abs().max().item())
