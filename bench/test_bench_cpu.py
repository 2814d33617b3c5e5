"""CPU kernel benchmarks (pytest-benchmark): ours vs torch baselines in the same run.

Run: ``.venv/bin/pytest bench/test_bench_cpu.py`` (quick subset) or with ``--full-grid``.
Speed targets are checked by reading the summary table, never asserted here.
"""

import time

import pytest
import torch

from fxkernels import bench as B

pytest.importorskip("fxkernels.backends.cpu", reason="fxkernels._C CPU extension not built")


@pytest.mark.parametrize("method", B.METHODS)
def test_linear(benchmark, shape, m, method, threads, bandwidth, results):
    k, n = shape
    probe = {"fp32": n * k * 4, "fbgemm_int8": n * k, "ours_w8a8": n * k, "ours_w8": n * k}.get(method, n * k // 2)
    copies = B.copies_for(probe, m)
    nbytes, fn = B.build_method(method, k, n, copies)
    x = torch.randn(m, k)
    state = {"i": 0}

    def call():
        state["i"] += 1
        return fn(x, state["i"] % copies)

    with torch.inference_mode():
        for _ in range(copies):  # one-time repacks and allocations stay out of the measurement
            call()
        t0 = time.perf_counter()
        call()
        one = time.perf_counter() - t0
        rounds = int(max(5, min(50, 1.5 / max(one, 1e-6))))
        benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=2)
    med = benchmark.stats.stats.median
    row = B.Row(k, n, m, method, med * 1e3, nbytes / med / 1e9, 2 * m * n * k / med / 1e9,
                min_ms=benchmark.stats.stats.min * 1e3)
    benchmark.extra_info.update(gbps=row.gbps, gops=row.gops, bandwidth_gbps=bandwidth, copies=copies,
                                threads=threads)
    results.append((row, bandwidth))
