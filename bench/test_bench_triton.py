"""pytest-benchmark suite of the Triton dequant-GEMM (GPU only; skipped without CUDA).

    PYTHONPATH=. pytest bench/test_bench_triton.py --benchmark-columns=median,ops

The benchmark fixture times end to end from the host (Python dispatch + launch + synchronize),
which is what a decode step pays; GPU-only kernel time (``triton.testing.do_bench``, L2 flushed)
is stored in ``extra_info`` next to cuBLAS fp16 on the same shape, and the speed targets of the
issue (INT4 g128, 4096x11008, on an H100 or H200) are asserted on those GPU times. The full table with
GB/s and TFLOP/s comes from ``bench/gpu_triton.py``.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

cuda = pytest.mark.skipif(not torch.cuda.is_available() or bool(os.environ.get("TRITON_INTERPRET")),
                          reason="needs a CUDA GPU (and TRITON_INTERPRET unset)")
pytestmark = [cuda, pytest.mark.gpu]

TARGETS = {1: 3.0, 16: 2.5, 1024: 0.9}  # speedup over cuBLAS fp16, H100 or H200, K=4096 N=11008 INT4 g128


def _layer(n, k, bits, group):
    from fxkernels.format import QuantSpec, as_grouped, pack

    spec = QuantSpec(bits=bits, granularity="group" if group else "channel", group_size=group)
    q = torch.randint(0, spec.qmax + 1, (n, k))
    shape = spec.scale_shape(n, k)
    s = torch.rand(shape) * 0.01 + 0.001
    z = torch.randint(0, spec.qmax + 1, shape, dtype=torch.int32)
    return pack(q, spec).cuda(), as_grouped(s, spec, n).cuda(), as_grouped(z, spec, n).cuda()


def _gpu_ms(fn):
    from triton.testing import do_bench
    return do_bench(fn, warmup=10, rep=50, return_mode="median")


@pytest.mark.parametrize("m", [1, 16, 64, 256, 1024])
@pytest.mark.parametrize("bits,group", [(4, 128), (4, None), (8, None)], ids=["w4g128", "w4ch", "w8ch"])
@pytest.mark.parametrize("k,n", [(4096, 4096), (4096, 11008), (11008, 4096)], ids=lambda v: str(v))
def test_dequant_linear(benchmark, k, n, bits, group, m):
    import fxkernels
    from fxkernels import dispatch
    from fxkernels.backends import triton as tb

    qw, s, z = _layer(n, k, bits, group)
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    w16 = torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02
    assert dispatch.select("dequant_linear", x, qw, s, z, None, bits, k).name == tb.KERNEL_NAME

    def step():
        fxkernels.ops.dequant_linear(x, qw, s, z, None, bits, k)
        torch.cuda.synchronize()

    step()  # autotune outside the timed region
    benchmark(step)
    t_tr = _gpu_ms(lambda: fxkernels.ops.dequant_linear(x, qw, s, z, None, bits, k))
    t_cu = _gpu_ms(lambda: F.linear(x, w16))
    benchmark.extra_info.update(gpu_ms=t_tr, cublas_fp16_ms=t_cu, speedup=t_cu / t_tr,
                                weight_gbs=qw.numel() * qw.element_size() / t_tr / 1e6,
                                tflops=2 * m * n * k / t_tr / 1e9,
                                config=str(tb.choose_config(x, qw, s, z, None, bits, k)))
    name = torch.cuda.get_device_name()
    if any(g in name for g in ("H100", "H200")) and (k, n, bits, group) == (4096, 11008, 4, 128) and m in TARGETS:
        assert t_cu / t_tr >= TARGETS[m], (
            f"M={m}: {t_cu / t_tr:.2f}x cuBLAS fp16 ({t_tr * 1e3:.1f} us vs {t_cu * 1e3:.1f} us); target {TARGETS[m]}x")
