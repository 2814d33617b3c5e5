"""pytest-benchmark configuration for the kernel benchmarks.

Default: a quick subset (K x N = 4096 x 11008, M in 1, 8, 32, 512). The full grid of the issue
((2048,2048), (4096,4096), (4096,11008), (11008,4096) x M in 1, 8, 32, 128, 512) runs with
``--full-grid`` or ``FXK_BENCH_FULL=1``. At the end a table with GB/s, GOP/s and ratios to fp32
(all measured in this run) is printed.
"""

import os

import pytest
import torch

from fxkernels import bench as B

_results = []


def pytest_addoption(parser):
    parser.addoption("--full-grid", action="store_true", default=False,
                     help="benchmark every (K, N) x M of the issue instead of the quick subset")
    parser.addoption("--bench-threads", type=int, default=2, help="torch threads (default 2)")


def full_grid(config) -> bool:
    return config.getoption("--full-grid") or os.environ.get("FXK_BENCH_FULL") == "1"


def pytest_generate_tests(metafunc):
    if "shape" in metafunc.fixturenames:
        full = full_grid(metafunc.config)
        metafunc.parametrize("shape", B.SHAPES if full else B.QUICK_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
        metafunc.parametrize("m", B.MS if full else B.QUICK_MS, ids=lambda m: f"M{m}")


@pytest.fixture(scope="session")
def threads(pytestconfig):
    n = pytestconfig.getoption("--bench-threads")
    torch.set_num_threads(n)
    return n


@pytest.fixture(scope="session")
def bandwidth(threads):
    return B.measure_read_bandwidth()


@pytest.fixture(scope="session")
def results():
    return _results


def pytest_terminal_summary(terminalreporter):
    if not _results:
        return
    bw = _results[0][1]
    rows = [r for r, _ in _results]
    fp32 = {(r.k, r.n, r.m): r for r in rows if r.method == "fp32"}
    for r in rows:
        base = fp32.get((r.k, r.n, r.m))
        if base is not None:
            r.vs_fp32, r.vs_fp32_min = base.ms / r.ms, base.min_ms / r.min_ms
    terminalreporter.write_sep("=", f"fxkernels CPU kernels, {torch.get_num_threads()} threads, "
                                    f"read bandwidth {bw:.1f} GB/s (medians)")
    terminalreporter.write_line(B.format_table(rows, bw))
